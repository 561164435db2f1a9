"""MLflow as deployed: ``mlflow server`` on a PostgreSQL backend store with proxied artifacts.

The real ``tracktower train`` trains, registers and promotes through it while the server is
stopped and started again mid-run (MLflow's client retries, with tracktower's defaults, carry
the run across), and ``tracktower serve`` then serves the champion from it. No mocks: the
database, the server and the CLI are the real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx
import pandas as pd
import pytest
from mlflow import MlflowClient
from servers import running

from tracktower.features.errors import DataError
from tracktower.training import tracking

if TYPE_CHECKING:
    from conftest import MlflowServer, Postgres  # tests/integration/conftest.py

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
TT = [sys.executable, "-c", "from tracktower.features.cli import main; main()"]
EPOCHS = 3
# What urllib3 logs (WARNING, shown by the CLI) each time MLflow's client retries a request.
RETRY_LINE = "Retrying (Retry("


def test_retry_settings_default_where_unset_and_keep_what_the_user_set() -> None:
    settings = tracking.http_retry_settings({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": " 3 "})
    assert settings == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
    }


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "11", "expected int 0..10, got '11'"),
        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0.5", "expected int 0..120, got '0.5'"),
        ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "nan", "expected float >= 0, got 'nan'"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "0", "expected int >= 1, got '0'"),
    ],
)
def test_a_retry_setting_mlflow_would_reject_is_one_line(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(DataError) as err:
        tracking.http_retry_settings({name: value})
    assert str(err.value) == f"{name}: {expected}"


def test_configure_exports_the_settings_for_mlflow_and_child_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    for name in tracking.HTTP_RETRY_SETTINGS:
        # setenv first, so that monkeypatch restores the caller's value (or its absence)
        # after configure has written the variable.
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    try:
        tracking.configure(f"sqlite:///{tmp_path}/mlflow.db")
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 5  # the user's value stays
        assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1  # tracktower's default
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None = back to env/default


def _env(url: str) -> dict[str, str]:
    """The caller's environment without MLflow settings: tracktower's retry defaults apply."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    return env


class _Lines:
    """Collects a process's stream line by line in a thread, so the test can wait for a line
    while the process runs (and the pipe never fills up and blocks it)."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str] | None) -> None:
        for line in stream or ():
            self.lines.append(line)

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)

    def wait_for(self, needle: str, proc: subprocess.Popen[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.lines):
            assert proc.poll() is None, f"exited before {needle!r}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} in {timeout} s"
            time.sleep(0.2)


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    """The synthetic dataset of ``tracktower data synth`` (written in-process: one interpreter
    start less than the CLI on a 2-core machine)."""
    from tracktower.features import synth as synth_mod

    out = tmp_path / "synth"
    synth_mod.save(out, *synth_mod.generate(users=700, tracks=1800, seed=0))
    return out


def _first_epoch_run(client: MlflowClient, proc: subprocess.Popen[str], timeout: float) -> str:
    """The id of the training run once its first epoch's metrics are on the server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before its first epoch was logged"
        exp = client.get_experiment_by_name("tracktower-smoke")
        runs = (
            client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
        )
        if runs and "epoch_loss" in runs[0].data.metrics:
            return str(runs[0].info.run_id)
        time.sleep(0.5)
    raise AssertionError(f"no epoch logged in {timeout} s")


def _start_training(synth: Path, cwd: Path, url: str) -> subprocess.Popen[str]:
    cmd = [
        *TT, "train", "--config", str(SMOKE), "--no-baseline",
        "--interactions", str(synth / "interactions.parquet"),
        "--tracks", str(synth / "tracks.parquet"),
        "--set", f"train.epochs={EPOCHS}",
        "--set", f"train.early_stopping.patience={EPOCHS}",  # every epoch runs
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=cwd, env=_env(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _train_through_a_restart(server: MlflowServer, synth: Path, cwd: Path) -> str:
    """Run ``tracktower train``, stop the server once the first epoch is logged, start it again
    on the same port once the client has met the outage (a retry logged, so the run did not
    simply fall between two requests); returns the run id."""
    client = MlflowClient(server.url)
    train = _start_training(synth, cwd, server.url)
    stdout, stderr = _Lines(train.stdout), _Lines(train.stderr)
    try:
        run_id = _first_epoch_run(client, train, timeout=240)
        server.stop()
        stderr.wait_for(RETRY_LINE, train, timeout=120)
        server.start()
        train.wait(timeout=600)
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
            train.wait(timeout=60)
        (cwd / "train.log").write_text(stderr.text())
    assert train.returncode == 0, stderr.text()[-3000:]
    assert f"run {run_id}" in stdout.text()
    return run_id


def _check_store(client: MlflowClient, postgres: Postgres, database: str, run_id: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "epoch_loss"))
    assert steps == list(range(1, EPOCHS + 1)), "an epoch's metrics were lost or doubled"
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")
    assert client.get_model_version_by_alias("tracktower", "champion").version == version.version
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    # The rows are in PostgreSQL itself (not in some fallback store of the server's).
    with postgres.connect(database) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("FINISHED",)]
        cur.execute("SELECT version FROM model_versions WHERE run_id = %s", (run_id,))
        assert cur.fetchall() == [(int(version.version),)]
    conn.close()


def test_training_outlives_a_tracking_server_restart_then_serves_from_postgres(
    mlflow_on_postgres: MlflowServer,
    postgres: Postgres,
    postgres_database: str,
    synth: Path,
    tmp_path: Path,
    free_port: int,
) -> None:
    server = mlflow_on_postgres
    run_id = _train_through_a_restart(server, synth, tmp_path)
    client = MlflowClient(server.url)
    _check_store(client, postgres, postgres_database.rsplit("/", 1)[1], run_id)
    assert list(server.artifacts.rglob("MLmodel")), "the model's files are not in the proxy's store"

    port = free_port
    serve = [*TT, "serve", "--model", "models:/tracktower@champion", "--port", str(port)]
    env = _env(server.url)
    with running(serve, env, tmp_path / "serve.log", port) as base:
        user = pd.read_parquet(synth / "interactions.parquet")["user_id"].iloc[0]
        response = httpx.get(f"{base}/v1/users/{user}/recommendations", params={"k": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["source"] == "model" and len(body["items"]) == 5
