"""The pyfunc model through a real sqlite registry: logged the way training logs it, loaded back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from builders import cached_artifact, user_id

from tracktower.features.artifact import MANIFEST_FILE, array_file
from tracktower.features.errors import DataError
from tracktower.serving.pyfunc import OUTPUT_COLUMNS
from tracktower.serving.resolve import resolve_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, artifact: Path) -> Iterator[str]:
    """A sqlite tracking store with tracktower v1 (alias champion), logged the way training
    registers models."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tracktower.training import tracking

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=str(root / "art"))
        with mlflow.start_run(experiment_id=experiment) as run:
            logged = tracking.log_model(artifact)
        mlflow.register_model(f"models:/{logged.model_id}", "tracktower")
        MlflowClient(uri).set_registered_model_alias("tracktower", "champion", "1")
        yield f"{uri}|{run.info.run_id}"
    finally:
        mlflow.set_tracking_uri(previous)


def test_registry_round_trip(registry: str, tmp_path: Path) -> None:
    import mlflow.pyfunc

    tracking_uri, run_id = registry.split("|")
    resolved = resolve_artifact("models:/tracktower@champion", tracking_uri=tracking_uri)
    assert (resolved.name, resolved.version) == ("tracktower", "1")
    assert (resolved.path / "manifest.json").is_file()
    by_version = resolve_artifact("models:/tracktower/1", tracking_uri=tracking_uri)
    assert by_version.version == "1"
    by_run = resolve_artifact(f"runs:/{run_id}/model", tracking_uri=tracking_uri)
    assert array_file(by_run.path, "user_ids").is_file()
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
        assert (r.path / MANIFEST_FILE).is_file() and array_file(r.path, "user_ids").is_file()
