"""``tracktower tune`` on a tiny synthetic dataset: real trials in a real MLflow store (one parent
run, a child per trial, a pruned one marked), the test split never evaluated, and the best YAML
trained by ``tracktower train``; then Ctrl-C and the deadline, with a stand-in fit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from tracktower.features import synth
from tracktower.training import train, tune
from tracktower.training.cli import app
from tracktower.training.config import load_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.write(out, users=200, tracks=300, seed=5)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One sqlite store for the module (creating one takes seconds); the cwd moves there, where
    run artifacts go (./mlruns). Each test logs to an experiment of its own."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    cwd, old = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
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


def _paths(data: Path) -> list[str]:
    return [
        f"data.interactions={data / 'interactions.parquet'}",
        f"data.tracks={data / 'tracks.parquet'}",
    ]


def _runs(uri: str, experiment_name: str) -> list[Any]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], max_results=100))


class _PruneTrialOne(optuna.pruners.BasePruner):
    """Prunes trial 1 at its first report: a pruned trial on demand, whatever the scores."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1


def test_three_trials_parent_and_children_validation_only_best_yaml_trains(
    synth_data: Path, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []
    real_fit = train.fit

    def spy(cfg: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((int(data.test.nnz), int(data.test_unknown.sum())))
        return real_fit(cfg, data, *args, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    fixed = ["train.epochs=2", "train.max_val_users=200", "experiment=tune-real"]
    cfg = load_config(SMOKE, [*_paths(synth_data), *fixed])
    out = tmp_path / "tuned" / "best.yaml"
    options = tune.TuneOptions(trials=3, timeout=600.0, out=out, fixed=tune.fixed_keys(fixed))
    result = tune.tune(cfg, options, pruner=_PruneTrialOne())

    assert seen == [(0, 0)] * 3, "every trial got the data with its test partition emptied"
    assert (result.n_trials, result.n_complete, result.n_pruned) == (3, 2, 1)
    assert not result.interrupted and result.best_trial in (0, 2)
    runs = _runs(store, "tune-real")
    parent = next(r for r in runs if r.data.tags.get("system") == "tune")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 4 and len(children) == 3
    assert parent.info.status == "FINISHED" and parent.info.run_id == result.run_id
    by_trial = {int(r.data.tags["tune.trial"]): r for r in children}
    states = {n: (r.data.tags["tune.state"], r.info.status) for n, r in by_trial.items()}
    assert states == {
        0: ("complete", "FINISHED"),
        1: ("pruned", "FINISHED"),
        2: ("complete", "FINISHED"),
    }
    assert by_trial[1].data.metrics["pruned_at_epoch"] == 1.0
    pruned_curve = MlflowClient(store).get_metric_history(
        by_trial[1].info.run_id, "epoch_val_recall_at_20"
    )
    assert [m.step for m in pruned_curve] == [1], "the pruned fit stopped after its epoch"
    assert "val_recall_at_20" not in by_trial[1].data.metrics, "no kept epoch when pruned"
    for run in runs:
        assert not [k for k in run.data.metrics if k.startswith("test_")], run.data.metrics
    for n in (0, 2):
        child = by_trial[n]
        assert (
            child.data.tags["system"] == "tune_trial" and child.data.params["train.epochs"] == "2"
        )
        history = MlflowClient(store).get_metric_history(
            child.info.run_id, "epoch_val_recall_at_20"
        )
        assert [m.step for m in history] == [1, 2]
        assert child.data.metrics["val_recall_at_20"] == max(m.value for m in history)
    best_child = by_trial[result.best_trial]
    best = parent.data.metrics["best_val_recall_at_20"]
    assert best == result.best_value == best_child.data.metrics["val_recall_at_20"]
    assert best == max(by_trial[n].data.metrics["val_recall_at_20"] for n in (0, 2))
    assert parent.data.tags["best_run_id"] == best_child.info.run_id
    assert (
        parent.data.params["best.model.temperature"] == best_child.data.params["model.temperature"]
    )
    assert parent.data.metrics["n_trials"] == 3 and parent.data.metrics["n_pruned"] == 1
    assert "train.epochs" not in {
        k.removeprefix("space.") for k in parent.data.params if k.startswith("space.")
    }
    logged = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/{tune.BEST_ARTIFACT}")
    assert logged == out.read_text()

    loaded = load_config(out)
    assert loaded.data.interactions is None, "paths are the input config's only: none here"
    assert loaded.model == result.best_config.model and loaded.train == result.best_config.train
    summary = tmp_path / "summary.json"
    trained = CliRunner().invoke(
        app,
        ["train", "--config", str(out), "--interactions", str(synth_data / "interactions.parquet"),
         "--tracks", str(synth_data / "tracks.parquet"), "--set", "train.epochs=1",
         "--tracking-uri", store, "--no-baseline", "--summary", str(summary)],
    )  # fmt: skip
    assert trained.exit_code in (0, 3), trained.output  # 3: trained, below the promotion gate
    assert summary.is_file() and "recall_at_20" in summary.read_text()


def _stand_in_fit(scores: list[float | BaseException], calls: list[Any]):
    """A fit that reports one epoch with the next score (or raises it) without training."""

    def fit(cfg: Any, data: Any, track_artist: Any = None, *, on_epoch: Any = None, **_: Any):
        calls.append(cfg)
        score = scores[len(calls) - 1]
        row = {"loss": 1.0, "val_recall_at_20": 0.05 if isinstance(score, BaseException) else score}
        on_epoch(1, row)
        if isinstance(score, BaseException):
            raise score
        return SimpleNamespace(best_val={"val_recall_at_20": score}, best_epoch=1)

    return fit


@pytest.mark.usefixtures("_cli_globals_restored")
def test_ctrl_c_keeps_the_best_so_far_and_ends_the_runs_killed(
    synth_data: Path, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(train, "fit", _stand_in_fit([0.2, 0.3, KeyboardInterrupt()], calls))
    out = tmp_path / "best.yaml"
    result = CliRunner().invoke(
        app,
        ["tune", "--config", str(SMOKE), "--interactions", str(synth_data / "interactions.parquet"),
         "--trials", "10", "--timeout", "600", "--out", str(out), "--experiment", "tune-ctrl-c",
         "--tracking-uri", store],
    )  # fmt: skip
    assert result.exit_code == 130, result.output
    assert "best val_recall_at_20 0.3000 (trial 1; 3 trials: 2 complete, 0 pruned)" in result.stdout
    assert len(calls) == 3
    runs = _runs(store, "tune-ctrl-c")
    parent = next(r for r in runs if r.data.tags.get("system") == "tune")
    assert parent.info.status == "KILLED" and parent.data.tags["tune.interrupted"] == "true"
    assert parent.data.metrics["best_val_recall_at_20"] == 0.3
    by_trial = {int(r.data.tags["tune.trial"]): r for r in runs if "tune.trial" in r.data.tags}
    assert (
        by_trial[2].info.status == "KILLED" and by_trial[2].data.tags["tune.state"] == "interrupted"
    )
    assert by_trial[1].data.tags["tune.state"] == "complete"
    assert "# tracktower tune: trial 1 of parent run" in out.read_text()
    assert load_config(out) == calls[1].model_copy(
        update={"data": calls[1].data.model_copy(update={"interactions": None})}
    )
    assert not list(out.parent.glob(".best.yaml.*")), "no temporary file left"


def test_the_timeout_stops_a_running_trial_after_its_epoch(
    synth_data: Path, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    slow = _stand_in_fit([0.25, 0.5], calls)
    clock = [0.0]

    def later(*args: Any, **kwargs: Any) -> Any:
        clock[0] += 100.0  # the epoch took longer than the whole budget
        return slow(*args, **kwargs)

    monkeypatch.setattr(train, "fit", later)
    monkeypatch.setattr(tune, "_now", lambda: clock[0])
    cfg = load_config(SMOKE, [*_paths(synth_data), "experiment=tune-deadline"])
    options = tune.TuneOptions(trials=5, timeout=30.0, out=tmp_path / "best.yaml")
    result = tune.tune(cfg, options)
    assert len(calls) == 1, "no trial starts after the deadline"
    assert (result.n_complete, result.best_value) == (1, 0.25)
    child = next(r for r in _runs(store, "tune-deadline") if "tune.trial" in r.data.tags)
    assert (
        child.data.tags["tune.stopped"] == "deadline"
        and child.data.tags["tune.state"] == "complete"
    )
