"""Checkpoints of real ``tracktower train`` processes: a ``kill -9`` mid-training leaves the
run's backed-up epoch in the configured directory (not the temp dir); the next ``train`` sweeps
it by the retention settings and removes its own directory when it finishes, or, with
``--resume``, continues it from that epoch in the same MLflow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from tracktower.features import synth
from tracktower.training import checkpoints

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
TT = [sys.executable, "-c", "from tracktower.features.cli import main; main()"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        checkpoints.ENV_VAR: str(tmp_path / "ckpt"),
    }
    return env


def _train_args(data: Path, *extra: str) -> list[str]:
    return [
        *TT, "train", "--config", str(SMOKE), "--no-baseline",
        "--interactions", str(data / "interactions.parquet"), *extra,
    ]  # fmt: skip


def _wait_for_backup(root: Path, proc: subprocess.Popen[bytes], timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in root.glob("*") if checkpoints.has_state(p)]
        if found:
            return found[0]
        assert proc.poll() is None, "training ended before its first backup"
        time.sleep(0.2)
    raise AssertionError("no epoch was backed up in time")


def test_a_killed_runs_checkpoint_is_kept_then_swept_and_a_finished_run_leaves_none(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path)
    synth = subprocess.run(
        [*TT, "data", "synth", "--out", str(tmp_path / "synth"), "--users", "700",
         "--tracks", "1800"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert synth.returncode == 0, synth.stderr
    root = tmp_path / "ckpt"
    victim = subprocess.Popen(
        _train_args(tmp_path / "synth", "--set", "train.epochs=50"),
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        killed_dir = _wait_for_backup(root, victim)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    owner = checkpoints.read_owner(killed_dir)
    assert owner is not None and owner.pid == victim.pid and not owner.alive()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    tags = client.get_run(owner.run_id).data.tags
    assert tags[checkpoints.DIR_TAG] == str(killed_dir)
    assert tags[checkpoints.KEY_TAG] == owner.key

    retrain = _train_args(tmp_path / "synth", "--set", "train.epochs=1")
    done = subprocess.run(
        [*retrain, "--set", "train.checkpoints.keep_failed=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # the dead run's swept, the finished run's own removed (the sweep's lock file stays)
    assert [p for p in root.iterdir() if p.name != checkpoints.LOCK_FILE] == []
    run_id = done.stdout.split("run ", 1)[1].split(":", 1)[0]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert Path(finished.data.tags[checkpoints.DIR_TAG]).parent == root
    assert client.get_run(owner.run_id).info.status == "KILLED"


def _epochs_run(log: str) -> list[int]:
    """The epochs a ``train`` process ran, from its ``epoch N/M`` log lines."""
    return [int(line.split(" epoch ", 1)[1].split("/")[0]) for line in log.splitlines()
            if " INFO tracktower.training.train: epoch " in line]  # fmt: skip


def test_resume_continues_a_killed_run_from_its_last_backup_in_the_same_mlflow_run(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path)
    synth.save(tmp_path / "synth", *synth.generate(users=700, tracks=1800, seed=0))
    root = tmp_path / "ckpt"
    args = _train_args(tmp_path / "synth", "--set", "train.epochs=4",
                       "--set", "train.early_stopping.patience=10")  # fmt: skip
    victim = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        killed_dir = _wait_for_backup(root, victim)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    owner = checkpoints.read_owner(killed_dir)
    assert owner is not None

    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [*args, "--resume", "--summary", str(summary)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(summary.read_text())
    restored = result["resumed_epochs"]
    # The same run, from the epoch after the last one backed up (epoch 1 at least), not epoch 1.
    assert result["run_id"] == owner.run_id and 1 <= restored < 4
    assert f"resumed from the backup: epochs 1-{restored} restored" in done.stderr
    assert _epochs_run(done.stderr) == list(range(restored + 1, 5))
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(owner.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[checkpoints.DIR_TAG] == str(killed_dir)
    assert run.data.tags["tracktower.resumed_epochs"] == str(restored)
    assert run.data.tags["tracktower.pid"] != str(owner.pid)  # owned by the resuming process
    (experiment,) = [e for e in client.search_experiments() if e.name == "tracktower-smoke"]
    assert len(client.search_runs([experiment.experiment_id])) == 1
    versions = client.search_model_versions("name = 'tracktower'")
    assert [v.run_id for v in versions] == [owner.run_id]
    # Each epoch once in the curves, but the one the kill interrupted after it was logged and
    # before its backup, which the resumed run logs again.
    steps = [m.step for m in client.get_metric_history(owner.run_id, "epoch_loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4] and len(steps) - 4 <= 1
    # finished: its directory removed (the sweep's lock file stays)
    assert [p for p in root.iterdir() if p.name != checkpoints.LOCK_FILE] == []
