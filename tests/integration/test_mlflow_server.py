"""Runs, registry aliases and model downloads through a real MLflow server over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from builders import write_fake_artifact
from mlflow import MlflowClient

from tracktower.features.artifact import FORMAT_VERSION
from tracktower.training import stages, tracking

TRIVIAL_MODEL = """
import mlflow.pyfunc
from mlflow.models import set_model


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


set_model(Echo())
"""


def test_run_registration_and_alias_download(mlflow_tracking: str, tmp_path: Path) -> None:
    code = tmp_path / "echo_model.py"
    code.write_text(TRIVIAL_MODEL)
    mlflow.set_experiment("server-smoke")
    with mlflow.start_run() as run:
        mlflow.log_param("dataset.fingerprint", "f" * 64)
        mlflow.log_metric("test_recall_at_20", 0.5)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=code, pip_requirements=[], registered_model_name="x"
        )
    client = MlflowClient()
    client.set_registered_model_alias("x", "champion", str(info.registered_model_version))

    fetched = client.get_run(run.info.run_id)
    assert fetched.data.params["dataset.fingerprint"] == "f" * 64
    assert client.get_experiment(fetched.info.experiment_id).artifact_location.startswith(
        "mlflow-artifacts:"
    ), "artifacts must be proxied by the server, not written by the client"

    local = Path(
        mlflow.artifacts.download_artifacts("models:/x@champion", dst_path=str(tmp_path / "d"))
    )
    assert (local / "MLmodel").is_file()
    assert "set_model(Echo())" in (local / "echo_model.py").read_text()


def test_champion_rule_over_rest(mlflow_tracking: str, tmp_path: Path) -> None:
    """The missing-alias error code arrives over HTTP here, not from a local store."""
    artifact = write_fake_artifact(tmp_path / "export", 20, 50, 8, False)

    def register(recall: float) -> stages.Registration:
        with tracking.experiment_run("server-train", "train") as run:
            mlflow.log_param("dataset.fingerprint", "a" * 64)
            tracking.log_metrics({"recall_at_20": recall}, prefix="test_")
            tracking.log_model(artifact)
            return stages.register(run.info.run_id, model_name="tracktower-it", promote=None)

    first, worse = register(0.3), register(0.2)
    assert (first.champion, first.reason) == (True, "no champion yet")
    assert not worse.champion and "<" in worse.reason

    local = Path(
        mlflow.artifacts.download_artifacts(
            "models:/tracktower-it@champion", dst_path=str(tmp_path / "champion")
        )
    )
    (manifest,) = local.rglob("manifest.json")
    written = json.loads(manifest.read_text())
    assert written["format_version"] == FORMAT_VERSION
    assert (written["model_name"], written["model_version"]) == ("tracktower-it", first.version)
    model = mlflow.pyfunc.load_model(f"models:/tracktower-it/{first.version}")
    assert len(model.predict(pd.DataFrame({"user_id": ["u00001"], "k": [3]}))) == 3
