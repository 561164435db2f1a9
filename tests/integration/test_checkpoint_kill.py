"""Checkpoints of real ``tracktower train`` processes: a ``kill -9`` mid-training leaves the
run's backed-up epoch in the configured directory (not the temp dir), and the next ``train``
sweeps it by the retention settings and removes its own directory when it finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

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
    assert list(root.iterdir()) == []  # the dead run's swept, the finished run's own removed
    run_id = done.stdout.split("run ", 1)[1].split(":", 1)[0]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert Path(finished.data.tags[checkpoints.DIR_TAG]).parent == root
    assert client.get_run(owner.run_id).info.status == "KILLED"
