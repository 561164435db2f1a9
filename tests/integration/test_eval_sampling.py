"""A real ``tracktower train`` over ``eval.max_pairs``: the test and the popularity baseline are
scored on one seeded sample of users, whose size and bootstrap intervals MLflow records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from tracktower.features import synth
from tracktower.training.cli import app
from tracktower.training.metrics import UserSample

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
SAMPLE = 1100  # users scored: over MIN_SAMPLE_USERS, under the ~1,400 with test tracks


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # a sqlite store puts run artifacts under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_train_over_the_pair_budget_scores_one_sample(
    tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    synth.write(data, users=1600, tracks=600, seed=5)
    samples: list[UserSample] = []
    as_metrics = UserSample.as_metrics

    def recorded(self: UserSample) -> dict[str, float]:
        samples.append(self)
        return as_metrics(self)

    monkeypatch.setattr(UserSample, "as_metrics", recorded)
    summary = tmp_path / "summary.json"
    args = [
        "train",
        "--config", str(SMOKE),
        "--interactions", str(data / "interactions.parquet"),
        "--tracks", str(data / "tracks.parquet"),
        "--set", "train.epochs=1",
        "--set", f"eval.max_pairs={SAMPLE * 600}",
        "--set", "eval.bootstrap=300",
        "--summary", str(summary),
        "--tracking-uri", store,
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(summary.read_text())
    tracks = out["dataset"]["tracks"]
    assert tracks <= 600
    size = SAMPLE * 600 // tracks

    # One sample for both systems: the popularity baseline (before training) and the test.
    baseline, test = samples[0], samples[-1]
    assert baseline.sampled and len(baseline.users) == size < baseline.population
    np.testing.assert_array_equal(baseline.users, test.users)
    assert baseline.population == test.population

    client = MlflowClient(store)
    for run_id in (out["run_id"], out["baseline_run_id"]):
        metrics = client.get_run(run_id).data.metrics
        assert metrics["test_eval_users"] == size and metrics["test_eval_sampled"] == 1.0
        for name in ("test_recall_at_20", "test_ndcg_at_10"):
            low, high = metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]
            assert 0.0 <= low <= metrics[name] <= high <= 1.0 and low < high
    model = client.get_run(out["run_id"]).data.metrics
    assert model["baseline_test_eval_users"] == size
    assert out["metrics"]["recall_at_20"] == model["test_recall_at_20"]
