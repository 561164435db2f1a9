"""Baselines with a real MLflow store or a fresh process (integration tier)."""

from __future__ import annotations

import os

import pytest
from builders import synthetic_interactions

from tracktower.features.errors import DataError


def test_ials_pins_blas_to_one_thread_in_a_fresh_process() -> None:
    """threadpoolctl only limits loaded libraries; implicit loads scipy's OpenBLAS on import.

    Entering the limit before that import left BLAS multi-threaded under implicit's OpenMP pool
    (minutes instead of seconds per fit). A fresh process is needed: in this one scipy.linalg is
    long loaded. implicit's own warning fires when BLAS has more than one thread.
    """
    import subprocess
    import sys

    code = (
        "import warnings, numpy as np, scipy.sparse as sp\n"
        "warnings.simplefilter('error', RuntimeWarning)\n"
        "from tracktower.training.baselines.ials import IALS\n"
        "x = sp.random(50, 40, density=0.2, format='csr', dtype=np.float32, random_state=0)\n"
        "IALS(factors=4, iterations=2).fit(x)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env["OPENBLAS_NUM_THREADS"] = "2"  # what an unconfigured multi-core machine would use
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_runner_logs_each_grid_point(tmp_path, monkeypatch) -> None:
    """Every point is a run with VAL metrics; only the one chosen on VAL has TEST metrics."""
    import mlflow

    from tracktower.training.baselines.runner import run_baseline
    from tracktower.training.config import DataConfig, SplitConfig
    from tracktower.training.data import prepare

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = tmp_path / "interactions.parquet"
    synthetic_interactions(src)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    no_val = prepare(DataConfig(interactions=src), SplitConfig(val_fraction=0.0, test_fraction=0.2))
    with pytest.raises(DataError, match="val_fraction"):
        run_baseline("ease", no_val, [{"l2": 10.0}, {"l2": 100.0}], tracking_uri=uri)
    data = prepare(DataConfig(interactions=src), SplitConfig(val_fraction=0.2, test_fraction=0.2))
    out = run_baseline(
        "rp3beta",
        data,
        [{"alpha": 1.0, "beta": 0.0, "neighbors": 5}, {"alpha": 0.5, "beta": 0.5, "neighbors": 20}],
        experiment="baselines-test",
        tracking_uri=uri,
        params={"split": {"seed": 0}},
    )
    assert len(out.results) == 2
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("baselines-test")
    assert exp is not None
    refused = client.get_experiment_by_name("tracktower")  # where the refused grid would log
    assert refused is None or not client.search_runs([refused.experiment_id])
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(r.info.run_name for r in runs.values()) == [
        "rp3beta a=0.5 b=0.5 k=20",
        "rp3beta a=1 b=0 k=5",
    ]
    for result in out.results:
        run = runs[result.run_id]
        metrics = run.data.metrics
        for name in ("recall_at_10", "recall_at_20", "recall_at_50", "recall_at_100"):
            assert metrics[f"val_{name}"] == pytest.approx(result.metrics[name])
        assert {"val_ndcg_at_10", "fit_seconds", "val_eval_seconds"} <= set(metrics)
        assert run.data.params["model"] == "rp3beta"
        assert run.data.params["dataset.fingerprint"] == data.fingerprint
        assert run.data.params["split.seed"] == "0"
        assert run.data.tags["system"] == "rp3beta"
        assert run.data.tags["sweep.select"] == "val_recall_at_20"
        assert run.data.tags["sweep.select_split"] == "val"
        assert run.info.status == "FINISHED"
        tested = {k for k in metrics if k.startswith("test_")}
        if result.selected:
            assert run.data.tags.get("sweep.best") == "true"
            assert {"test_recall_at_20", "test_ndcg_at_10", "test_eval_seconds"} <= tested
            assert metrics["test_recall_at_20"] == pytest.approx(out.test_metrics["recall_at_20"])
        else:
            assert "sweep.best" not in run.data.tags and not tested
    assert sum(r.selected for r in out.results) == 1 and out.best.selected

    # A too-large EASE is refused before any run is started, not as a FAILED run.
    with pytest.raises(DataError, match="max_items"):
        run_baseline(
            "ease",
            data,
            [{"l2": 10.0, "max_items": 5}],
            experiment="baselines-test",
            tracking_uri=uri,
        )
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_baseline_cli_takes_train_flags(tmp_path, monkeypatch) -> None:
    import mlflow
    import typer
    from typer.testing import CliRunner

    from tracktower.training.baselines.cli import baseline_command

    app = typer.Typer()
    app.command()(baseline_command)
    monkeypatch.chdir(tmp_path)  # no configs/default.yaml here: the built-in defaults apply
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = tmp_path / "i.parquet"
    synthetic_interactions(src)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["popular", "--interactions", str(src), "--no-grid", "--tracking-uri", uri]
    args += ["--set", "split.val_fraction=0.2", "--experiment", "cli-test"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best: popular" in result.output and "test_recall_at_20" in result.output
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cli-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["split.val_fraction"] == "0.2"
    assert run.data.tags["sweep.best"] == "true" and "test_recall_at_20" in run.data.metrics

    # RP3beta is a peer like EASE: its defaults through the same command, chosen on VAL.
    args = ["rp3beta", "--interactions", str(src), "--no-grid", "--tracking-uri", uri]
    result = CliRunner().invoke(app, [*args, "--experiment", "cli-rp3"])
    assert result.exit_code == 0, result.output
    assert "best: rp3beta a=0.5 b=0.3 k=200" in result.output
    assert "val recall@20=" in result.output and "test_ndcg_at_10" in result.output
