"""Multi-worker training on loopback through ``tracktower train --local-workers 2``: a worker
killed with ``kill -9`` mid-run ends the job (the chief fails in one line, no process is left
behind); the same command with ``--resume`` continues from the last backed-up epoch in the same
MLflow run, which ends FINISHED with one registered version, and its test metrics match a
single-process run on the same data. Early stopping stops every worker at the same epoch.

The model and data are the smoke config's, small enough for two workers on two cores.
"""

from __future__ import annotations

import json
import os
import re
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
EPOCHS = 4
# Test metrics of the 2-worker run (resumed once) against one process on the same data: the
# global batch doubles and Adam's rate grows by sqrt(2) (training/strategy.py), so the runs
# differ by training noise, which on this data is about 0.01.
TOLERANCE = 0.03


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TF_CONFIG"))}
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        checkpoints.ENV_VAR: str(tmp_path / "ckpt"),
    }
    return env


def _train_args(data: Path, summary: Path, *extra: str) -> list[str]:
    return [
        *TT, "train", "--config", str(SMOKE), "--no-baseline",
        "--interactions", str(data / "interactions.parquet"), "--summary", str(summary),
        "--set", f"train.epochs={EPOCHS}", "--set", "train.early_stopping.patience=10", *extra,
    ]  # fmt: skip


def _worker_pids(
    log: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 60
) -> list[int]:
    """The workers' pids, as the launcher logs them when it starts them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = re.findall(r"launcher: worker \d+ \(127\.0\.0\.1:\d+\): pid (\d+)", log.read_text())
        if len(pids) == n:
            return [int(p) for p in pids]
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError("the launcher did not start its workers")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_for_backup(root: Path, proc: subprocess.Popen[bytes], timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in root.glob("*") if checkpoints.has_state(p)]
        if found:
            return found[0]
        assert proc.poll() is None, "training ended before its first backup"
        time.sleep(0.1)
    raise AssertionError("no epoch was backed up in time")


def _epochs_run(log: str, worker: int) -> list[int]:
    pattern = rf"^\[w{worker}\] .* INFO tracktower\.training\.train: epoch (\d+)/"
    return [int(m) for m in re.findall(pattern, log, flags=re.MULTILINE)]


def test_a_killed_worker_resumes_from_its_last_epoch_and_matches_one_process(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path)
    data = tmp_path / "synth"
    synth.save(data, *synth.generate(users=700, tracks=1800, seed=0))
    root = tmp_path / "ckpt"
    args = _train_args(data, tmp_path / "two.json", "--local-workers", "2")

    # 1. Two workers; worker 1 is killed once epoch 1 is backed up.
    log = tmp_path / "killed.log"
    with log.open("wb") as out:
        job = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        chief, other = _worker_pids(log, 2, job)
        run_dir = _wait_for_backup(root, job)
        os.kill(other, signal.SIGKILL)
        # The chief's next collective fails: it ends by itself, one line, exit 4 (worker lost).
        assert job.wait(timeout=120) == 4
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert _gone(chief) and _gone(other)  # the launcher stopped the chief: no orphan
    killed = log.read_text()
    assert "launcher: worker 1 exited with status 137" in killed
    assert "[w0] error: a worker of the multi-worker job was lost" in killed, killed[-3000:]
    assert "Traceback" not in killed, killed[-3000:]
    owner = checkpoints.read_owner(run_dir)
    assert owner is not None and owner.pid == chief
    # Worker 1 wrote nothing but Keras's own temporary folder, which it removes after each save.
    assert {p.name for p in run_dir.iterdir()} <= {"chief", checkpoints.OWNER_FILE, "workertemp_1"}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(owner.run_id).info.status == "FAILED", killed[-3000:]

    # 2. The same command with --resume: same run, from the epoch after the backup.
    resumed = subprocess.run(
        [*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    two = json.loads((tmp_path / "two.json").read_text())
    restored = two["resumed_epochs"]
    assert two["run_id"] == owner.run_id and 1 <= restored < EPOCHS, output[-4000:]
    for worker in (0, 1):  # both restored the backup and ran the same epochs
        assert f"[w{worker}] " in output
        assert _epochs_run(output, worker) == list(range(restored + 1, EPOCHS + 1)), output
    for line in output.splitlines():  # worker 1 neither tracks, exports nor owns checkpoints
        if line.startswith("[w1] "):
            assert not re.search(r"mlflow|checkpoints:|models:/|registered", line, re.I), line
    run = client.get_run(owner.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["resolved.workers"] == "2"
    assert run.data.params["resolved.replicas"] == "2"
    per_replica = int(run.data.params["resolved.per_replica_batch_size"])
    assert int(run.data.params["resolved.batch_size"]) == 2 * per_replica
    assert float(run.data.params["resolved.learning_rate"]) == 0.01 * 2**0.5  # smoke.yaml, Adam
    (experiment,) = [e for e in client.search_experiments() if e.name == "tracktower-smoke"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [owner.run_id]
    versions = client.search_model_versions("name = 'tracktower'")
    assert [v.run_id for v in versions] == [owner.run_id]
    # finished: the run's directory is removed (the sweep's lock file stays)
    assert [p for p in root.iterdir() if p.name != checkpoints.LOCK_FILE] == []

    # 3. One process on the same data: the same quality within noise.
    single = subprocess.run(
        [*_train_args(data, tmp_path / "one.json"), "--set", "model_name=tracktower-single"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    print("test metrics, 1 process:", one["metrics"], "2 workers:", two["metrics"])
    for name in ("recall_at_20", "ndcg_at_10"):
        assert abs(two["metrics"][name] - one["metrics"][name]) <= TOLERANCE, (one, two)


def test_interrupting_the_launcher_stops_every_worker(tmp_path: Path) -> None:
    env = _env(tmp_path)
    args = [*TT, "train", "--interactions", str(tmp_path / "never-read.parquet"),
            "--local-workers", "2"]  # fmt: skip
    log = tmp_path / "launcher.log"
    with log.open("wb") as out:
        job = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        pids = _worker_pids(log, 2, job)
        job.send_signal(signal.SIGINT)  # Ctrl-C, while the workers still import TensorFlow
        assert job.wait(timeout=60) == 130
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert all(_gone(pid) for pid in pids), log.read_text()


# Each worker process of the early-stopping test: the chief's validation is scripted to peak at
# epoch 1; the other worker's must never run (it gets the chief's values).
_SCRIPTED_WORKER = """
import json, sys
import numpy as np
from tracktower.training import launcher, train
from tracktower.training.config import load_config
from tracktower.training.data import prepare
from tracktower.training.strategy import make_strategy

make_strategy("multi_worker")
chief = launcher.role().chief
scores = iter([0.3, 0.2, 0.1, 0.05, 0.01, 0.0])

def scripted(self):
    assert chief, "a non-chief worker computed validation metrics"
    return {"recall_at_20": next(scores)}

train._Validation._validate = scripted
cfg = load_config(sys.argv[1], sys.argv[2:])
data = prepare(cfg.data, cfg.split)
result = train.fit(cfg, data.encoded, data.track_artist)
weights = float(sum(np.abs(w).sum() for w in result.model.get_weights()))
print(json.dumps({"chief": chief, "best_epoch": result.best_epoch, "weights": weights,
                  "val": [row["val_recall_at_20"] for row in result.history]}))
"""


def test_early_stopping_stops_every_worker_at_the_chiefs_epoch(tmp_path: Path) -> None:
    from tracktower.training import launcher

    data = tmp_path / "synth"
    synth.save(data, *synth.generate(users=300, tracks=600, seed=1))
    addresses = [f"127.0.0.1:{port}" for port in launcher.free_ports(2)]
    args = [str(SMOKE), f"data.interactions={data / 'interactions.parquet'}",
            "train.strategy=multi_worker", "train.epochs=6", "train.early_stopping.patience=1",
            "train.checkpoints.enabled=false"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SCRIPTED_WORKER, *args],
            env=launcher.worker_env(_env(tmp_path), addresses, index),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for index in range(2)
    ]
    try:
        outs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    chief, other = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert chief["chief"] and not other["chief"]
    # Patience 1 after the peak at epoch 1: both stop after epoch 2, on the chief's values, and
    # both restore epoch 1's weights (the same everywhere).
    assert chief["val"] == other["val"] == [0.3, 0.2]
    assert chief["best_epoch"] == other["best_epoch"] == 1
    assert chief["weights"] == other["weights"]
