"""Pyfunc wrapper and model URI resolution (local directories and a real MLflow registry)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from builders import cached_artifact, user_id

from tracktower.features.artifact import MANIFEST_FILE, PYFUNC_ARTIFACT_KEY
from tracktower.features.errors import DataError
from tracktower.serving.artifact import Recommender
from tracktower.serving.pyfunc import OUTPUT_COLUMNS, TracktowerModel
from tracktower.serving.resolve import resolve_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def model(artifact: Path) -> TracktowerModel:
    wrapper = TracktowerModel()
    wrapper.load_context(SimpleNamespace(artifacts={PYFUNC_ARTIFACT_KEY: str(artifact)}))
    return wrapper


def test_predict_long_format(model: TracktowerModel, artifact: Path) -> None:
    users = [user_id(4), "stranger", user_id(4)]
    out = model.predict(None, pd.DataFrame({"user_id": users}), params={"k": 3})
    assert list(out.columns) == OUTPUT_COLUMNS
    assert out["user_id"].tolist() == [u for u in users for _ in range(3)]
    assert out["rank"].tolist() == [1, 2, 3] * 3
    assert out["source"].tolist() == ["model"] * 3 + ["popular"] * 3 + ["model"] * 3
    expected = Recommender.load(artifact).recommend(user_id(4), 3)
    assert out["track_id"].tolist()[:3] == [item.track_id for item in expected.items]


def test_predict_per_row_k_keeps_input_order(model: TracktowerModel) -> None:
    frame = pd.DataFrame({"user_id": [user_id(1), user_id(2), "x"], "k": [2, 1, 2]})
    out = model.predict(None, frame)
    assert out["user_id"].tolist() == [user_id(1)] * 2 + [user_id(2)] + ["x"] * 2
    assert out["rank"].tolist() == [1, 2, 1, 1, 2]


def test_predict_defaults_and_errors(model: TracktowerModel) -> None:
    assert len(model.predict(None, pd.DataFrame({"user_id": [user_id(1)]}))) == 10
    assert model.predict(None, pd.DataFrame({"user_id": []})).columns.tolist() == OUTPUT_COLUMNS
    with pytest.raises(DataError, match="user_id"):
        model.predict(None, pd.DataFrame({"uid": ["a"]}))
    with pytest.raises(DataError, match="k must be"):
        model.predict(None, pd.DataFrame({"user_id": ["a"]}), params={"k": 0})
    with pytest.raises(DataError, match="one id per row"):
        model.predict(None, pd.DataFrame({"user_id": [["a", "b"]]}))


def test_resolve_local_artifact_and_pyfunc_dirs(artifact: Path, tmp_path: Path) -> None:
    resolved = resolve_artifact(str(artifact))
    assert resolved.path == artifact.resolve()
    assert (resolved.name, resolved.version, resolved.uri) == ("tracktower", None, str(artifact))
    pyfunc_dir = tmp_path / "model"
    shutil.copytree(artifact, pyfunc_dir / "artifacts" / "exported")
    (pyfunc_dir / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n"
        f"      {PYFUNC_ARTIFACT_KEY}:\n        path: artifacts/exported\n"
    )
    assert resolve_artifact(str(pyfunc_dir)).path == (pyfunc_dir / "artifacts/exported").resolve()
    (pyfunc_dir / "MLmodel").write_text("flavors: {}\n")
    # A leftover staging directory (hidden name, sorted first) is never taken for the artifact.
    shutil.copytree(artifact, pyfunc_dir / "artifacts" / ".exported.0a1b.partial")
    assert resolve_artifact(str(pyfunc_dir)).path.name == "exported"


def test_resolve_reports_the_format_version(artifact: Path, tmp_path: Path) -> None:
    old = Path(shutil.copytree(artifact, tmp_path / "old"))
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    (old / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(DataError, match="format_version 1, this tracktower reads format_version 4"):
        resolve_artifact(str(old))


@pytest.mark.parametrize("uri", ["", "models:/only-name", "models:/a/b/c", "runs:/only-id"])
def test_resolve_rejects_bad_uris(uri: str) -> None:
    with pytest.raises(DataError):
        resolve_artifact(uri)


def test_resolve_missing_or_foreign_dirs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such model directory"):
        resolve_artifact(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="neither an artifact"):
        resolve_artifact(str(tmp_path))
