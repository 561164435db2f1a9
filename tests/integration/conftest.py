"""Integration fixtures: a real ``mlflow server`` process on a loopback port.

A real server (REST API + proxied artifacts) catches what a local sqlite store hides: error codes
that arrive over HTTP, artifact uploads through ``mlflow-artifacts:/``, and alias resolution by a
client that shares no files with the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


def _free_port() -> int:
    """A port the kernel just handed out; racy in theory, so startup retries on failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    return _free_port()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the whole process group: the server forks a uvicorn worker."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


def _start(root: Path, attempt: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = _free_port()
    log_path = root / f"server-{attempt}.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    # MLflow 3 also starts a job runner with ~7 huey consumer processes; nothing here needs it.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, f"http://127.0.0.1:{port}", log_path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a real MLflow server (sqlite backend, proxied local artifacts)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    for attempt in range(3):
        proc, url, log_path = _start(root, attempt)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not _healthy(url):
            time.sleep(0.5)
        if proc.poll() is None and _healthy(url):
            break
        _stop(proc)
        log_tail = log_path.read_text(errors="replace")[-3000:]
        if "address already in use" not in log_tail.lower():
            pytest.fail(f"mlflow server did not become healthy at {url}:\n{log_tail}")
    else:
        pytest.fail("mlflow server: no free port after 3 attempts")
    try:
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def mlflow_tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point this test's MLflow client at the server, and undo the process-global URI after."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        yield mlflow_server
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None = back to env/default
