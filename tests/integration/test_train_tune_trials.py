"""``tracktower train --tune-trials 2`` on a tiny synthetic dataset, end to end: a real search (a
parent run, a child per trial), then the best config trained, exported, evaluated and taken to
registration in a run tagged with the search's parent run, whose logged config is the best YAML."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from tracktower.features import synth
from tracktower.training.cli import app
from tracktower.training.config import flatten, load_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    """A sqlite store; the cwd moves next to it, where run artifacts go (./mlruns)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cwd, old = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(tmp_path)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None = back to env/default
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        os.chdir(cwd)
        optuna.logging.disable_propagation()
        optuna.logging.enable_default_handler()


def test_train_with_tune_trials_trains_and_registers_the_best_config(
    tmp_path: Path, store: str
) -> None:
    data = tmp_path / "data"
    synth.write(data, users=200, tracks=300, seed=5)
    out, summary = tmp_path / "kept" / "best.yaml", tmp_path / "summary.json"
    fixed = ["train.epochs=1", "train.max_val_users=200", "experiment=tune-in-train"]
    result = CliRunner().invoke(
        app,
        ["train", "--config", str(SMOKE), "--interactions", str(data / "interactions.parquet"),
         "--tracks", str(data / "tracks.parquet"), *[a for s in fixed for a in ("--set", s)],
         "--tune-trials", "2", "--tune-timeout", "300", "--tune-out", str(out),
         "--tracking-uri", store, "--no-baseline", "--summary", str(summary)],
    )  # fmt: skip
    assert result.exit_code in (0, 3), result.output  # 3: trained, below the promotion gate
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("tune-in-train")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=20)
    parent = next(r for r in runs if r.data.tags.get("system") == "tune")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    (trained,) = [r for r in runs if r.data.tags.get("system") == "two_tower"]
    assert len(trials) == parent.data.metrics["n_trials"] == 2 and len(runs) == 4
    assert parent.info.status == "FINISHED" and trained.info.status == "FINISHED"
    assert trained.data.tags["tune_run_id"] == parent.info.run_id
    assert trained.info.run_id == json.loads(summary.read_text())["run_id"]
    assert "registered_model" in trained.data.tags, "registration was reached"
    assert "test_recall_at_20" in trained.data.metrics

    best = load_config(out)
    assert best.train.epochs == 1, "a --set key is fixed, not searched"
    logged = trained.data.params
    for key, value in flatten(best).items():
        if key not in ("data.interactions", "data.tracks"):
            assert logged[key] == str(value), key
    assert logged["data.interactions"] == str(data / "interactions.parquet")
    for key, value in parent.data.params.items():
        if key.startswith("best."):
            assert logged[key.removeprefix("best.")] in (value, str(best.model.query_layers))
    config_files = [a.path for a in client.list_artifacts(trained.info.run_id, "config")]
    assert "config/best.yaml" in config_files, "the tuned YAML is the run's config file"
    assert "tuned: best val_recall_at_20" in result.stdout
