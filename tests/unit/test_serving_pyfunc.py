"""Pyfunc wrapper and model URI resolution (local directories and a real MLflow registry)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from serving_fixtures import cached_artifact, user_id

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
    wrapper.load_context(SimpleNamespace(artifacts={"artifact": str(artifact)}))
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


def test_resolve_local_artifact_and_pyfunc_dirs(artifact: Path, tmp_path: Path) -> None:
    resolved = resolve_artifact(str(artifact))
    assert resolved.path == artifact.resolve()
    assert (resolved.name, resolved.version, resolved.uri) == ("tracktower", None, str(artifact))
    pyfunc_dir = tmp_path / "model"
    shutil.copytree(artifact, pyfunc_dir / "artifacts" / "exported")
    (pyfunc_dir / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n"
        "      artifact:\n        path: artifacts/exported\n"
    )
    assert resolve_artifact(str(pyfunc_dir)).path == (pyfunc_dir / "artifacts/exported").resolve()
    (pyfunc_dir / "MLmodel").write_text("flavors: {}\n")
    assert resolve_artifact(str(pyfunc_dir)).path.name == "exported"


@pytest.mark.parametrize("uri", ["", "models:/only-name", "models:/a/b/c", "runs:/only-id"])
def test_resolve_rejects_bad_uris(uri: str) -> None:
    with pytest.raises(DataError):
        resolve_artifact(uri)


def test_resolve_missing_or_foreign_dirs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such model directory"):
        resolve_artifact(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="neither an artifact"):
        resolve_artifact(str(tmp_path))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, artifact: Path) -> Iterator[str]:
    """A sqlite tracking store with tracktower v1 (alias champion) logged through the wrapper."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tracktower.serving.pyfunc import log_model

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=str(root / "art"))
        with mlflow.start_run(experiment_id=experiment) as run:
            log_model(artifact, registered_model_name="tracktower")
        MlflowClient(uri).set_registered_model_alias("tracktower", "champion", "1")
        yield f"{uri}|{run.info.run_id}"
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.slow
def test_registry_round_trip(registry: str, tmp_path: Path) -> None:
    import mlflow.pyfunc

    tracking_uri, run_id = registry.split("|")
    resolved = resolve_artifact("models:/tracktower@champion", tracking_uri=tracking_uri)
    assert (resolved.name, resolved.version) == ("tracktower", "1")
    assert (resolved.path / "manifest.json").is_file()
    by_version = resolve_artifact("models:/tracktower/1", tracking_uri=tracking_uri)
    assert by_version.version == "1"
    by_run = resolve_artifact(f"runs:/{run_id}/model", tracking_uri=tracking_uri)
    assert (by_run.path / "arrays.npz").is_file()
    for bad, match in [
        ("models:/tracktower@nope", "no alias 'nope'"),
        ("models:/tracktower/9", "no version 9"),
        ("models:/missing@champion", "registered model 'missing' not found"),
    ]:
        with pytest.raises(DataError, match=match) as info:
            resolve_artifact(bad, tracking_uri=tracking_uri)
        assert "\n" not in str(info.value)

    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pyfunc.load_model("models:/tracktower@champion")
    out = loaded.predict(pd.DataFrame({"user_id": [user_id(1), "new"]}), params={"k": 4})
    assert list(out.columns) == OUTPUT_COLUMNS
    assert out["rank"].tolist() == [1, 2, 3, 4] * 2
    assert out["source"].tolist() == ["model"] * 4 + ["popular"] * 4


@pytest.mark.slow
def test_registry_download_uses_the_explicit_tracking_uri(
    registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the explicit store has the model; the process-wide one (env and mlflow) does not."""
    import mlflow

    tracking_uri, run_id = registry.split("|")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(other)
    try:
        with pytest.raises(DataError, match="registered model 'tracktower' not found"):
            resolve_artifact("models:/tracktower/1")
        resolved = [
            resolve_artifact(uri, tracking_uri=tracking_uri, dst_path=tmp_path / f"dl{i}")
            for i, uri in enumerate(
                ["models:/tracktower@champion", "models:/tracktower/1", f"runs:/{run_id}/model"]
            )
        ]
    finally:
        mlflow.set_tracking_uri(previous)
    assert [(r.name, r.version) for r in resolved[:2]] == [("tracktower", "1")] * 2
    for r in resolved:
        assert (r.path / "manifest.json").is_file() and (r.path / "arrays.npz").is_file()
