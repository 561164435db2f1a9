"""``serve`` / ``recommend`` commands, with uvicorn replaced by a recorder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from builders import cached_artifact, user_id
from typer.testing import CliRunner

from tracktower.serving.cli import app

ENV = [
    "TRACKTOWER_MODEL_URI",
    "TRACKTOWER_HOST",
    "TRACKTOWER_PORT",
    "TRACKTOWER_WORKERS",
    "TRACKTOWER_API_KEYS",
    "TRACKTOWER_ALLOW_UNAUTHENTICATED",
    "TRACKTOWER_MAX_HEADER_BYTES",
    "TRACKTOWER_KEEP_ALIVE_TIMEOUT_SECONDS",
    "TRACKTOWER_WORKER_STARTUP_TIMEOUT_SECONDS",
    "PROMETHEUS_MULTIPROC_DIR",
]
KEY = "k" * 16 + "-valid-key"


@pytest.fixture(autouse=True)
def _no_uvicorn_logging_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """``uvicorn.Config`` runs ``logging.config.dictConfig``, which closes every existing
    handler: with TensorFlow imported by an earlier test, absl's handler, whose stream is the
    sys.stderr pytest captured then (its reporting breaks). A server process configures its
    logging once at start; tests of the CLI do not need it."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Every variable serve writes is registered with monkeypatch, so it is restored."""
    for name in ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_recommend_command(artifact: Path, tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    users = tmp_path / "users.csv"
    users.write_text(f"user_id\n{user_id(0)}\nnew\n")
    out = tmp_path / "recs.parquet"
    args = ["recommend", "--model", str(artifact), "--users", str(users), "--k", "3"]
    result = CliRunner().invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 6 rows" in result.output
    assert pd.read_parquet(out)["user_id"].tolist() == [user_id(0)] * 3 + ["new"] * 3


def test_recommend_rejects_k_zero(artifact: Path, tmp_path: Path) -> None:
    args = ["recommend", "--model", str(artifact), "--users", "u.txt", "--output", "o.parquet"]
    result = CliRunner().invoke(app, [*args, "--k", "0"])
    assert result.exit_code == 2


def test_serve_passes_options_through_env(artifact: Path, env: pytest.MonkeyPatch) -> None:
    import os

    import uvicorn

    calls: list[dict[str, Any]] = []

    def fake_run(target: str, **kwargs: Any) -> None:
        calls.append({"target": target, **kwargs, "env": {k: os.environ.get(k) for k in ENV}})

    env.setattr(uvicorn, "run", fake_run)
    env.setenv("PROMETHEUS_MULTIPROC_DIR", "/stale/metrics")
    args = ["serve", "--model", str(artifact), "--port", "8123", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["target"] == "tracktower.serving.app:factory" and call["factory"] is True
    assert (call["host"], call["port"], call["workers"]) == ("127.0.0.1", 8123, 1)
    assert call["timeout_worker_healthcheck"] == 5
    assert call["env"]["PROMETHEUS_MULTIPROC_DIR"] is None  # one worker: the app's registry
    assert call["env"]["TRACKTOWER_MODEL_URI"] == str(artifact)
    assert call["env"]["TRACKTOWER_PORT"] == "8123"
    assert call["access_log"] is False
    # httptools (pinned in pyproject) through the protocol that adds the head/read limits.
    assert call["http"] == "tracktower.serving.protocol:LimitedHttpToolsProtocol"
    assert call["loop"] == "uvloop" and call["ws"] == "none"
    assert "(httptools, uvloop); no API keys" in result.stderr


def _recorded_serve(env: pytest.MonkeyPatch, args: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    import uvicorn

    calls: list[dict[str, Any]] = []
    env.setattr(uvicorn, "run", lambda target, **kwargs: calls.append(kwargs))
    return CliRunner().invoke(app, ["serve", *args]), calls


def test_serve_passes_server_limits_to_uvicorn(artifact: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("TRACKTOWER_MAX_HEADER_BYTES", "4096")
    env.setenv("TRACKTOWER_KEEP_ALIVE_TIMEOUT_SECONDS", "3")
    result, calls = _recorded_serve(env, ["--model", str(artifact)])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["h11_max_incomplete_event_size"] == 4096
    assert call["timeout_keep_alive"] == 3
    assert call["limit_concurrency"] == 1000 and call["timeout_graceful_shutdown"] == 15


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org", "[::]"])
def test_serve_refuses_an_exposed_address_without_keys(
    artifact: Path, env: pytest.MonkeyPatch, host: str
) -> None:
    result, calls = _recorded_serve(env, ["--model", str(artifact), "--host", host])
    assert result.exit_code == 2 and not calls
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.output
    assert line.startswith(f"error: refusing to serve on {host} without authentication")
    assert "TRACKTOWER_API_KEYS" in line and "--allow-unauthenticated" in line


def test_serve_refusal_comes_before_loading_the_model(
    tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    result, _ = _recorded_serve(env, ["--model", str(tmp_path / "missing"), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "refusing to serve on 0.0.0.0" in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"])
def test_serve_allows_loopback_without_keys(
    artifact: Path, env: pytest.MonkeyPatch, host: str
) -> None:
    result, calls = _recorded_serve(env, ["--model", str(artifact), "--host", host])
    assert result.exit_code == 0, result.output
    assert calls[0]["host"] == host


def test_serve_exposed_with_keys_or_explicit_opt_out(
    artifact: Path, env: pytest.MonkeyPatch
) -> None:
    args = ["--model", str(artifact), "--host", "0.0.0.0"]
    env.setenv("TRACKTOWER_API_KEYS", f"{KEY},{KEY}2")
    result, calls = _recorded_serve(env, args)
    assert result.exit_code == 0 and calls[0]["host"] == "0.0.0.0", result.output
    assert "; 2 API key(s)" in result.stderr and KEY not in result.output
    env.delenv("TRACKTOWER_API_KEYS")
    result, calls = _recorded_serve(env, [*args, "--allow-unauthenticated"])
    assert result.exit_code == 0 and calls[0]["host"] == "0.0.0.0", result.output
    assert "warning: serving 0.0.0.0 without authentication" in result.stderr
    env.delenv("TRACKTOWER_ALLOW_UNAUTHENTICATED")
    env.setenv("TRACKTOWER_ALLOW_UNAUTHENTICATED", "true")  # the Docker image's opt-out
    result, calls = _recorded_serve(env, args)
    assert result.exit_code == 0 and calls[0]["host"] == "0.0.0.0", result.output


def test_bad_api_key_is_named_by_position_not_echoed(
    artifact: Path, env: pytest.MonkeyPatch
) -> None:
    env.setenv("TRACKTOWER_API_KEYS", f"{KEY}, short-secret")
    result, calls = _recorded_serve(env, ["--model", str(artifact)])
    assert result.exit_code == 2 and not calls
    assert result.stderr.startswith("error: TRACKTOWER_API_KEYS: ")
    assert "API key 2 must be at least 16 characters" in result.stderr
    assert "short-secret" not in result.output


def test_serve_reports_missing_model(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: no such model directory"


def test_bad_environment_is_a_data_error(artifact: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("TRACKTOWER_PORT", "not-a-port")
    result = CliRunner().invoke(app, ["serve", "--model", str(artifact)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: TRACKTOWER_PORT: ")


def test_recommend_bad_users_file(artifact: Path, tmp_path: Path) -> None:
    args = ["recommend", "--model", str(artifact), "--users", str(tmp_path / "none.csv")]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2
    assert "users file does not exist" in result.stderr
    assert "Traceback" not in result.output


def test_serve_reports_a_broken_index_in_one_line(
    artifact: Path, tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    import shutil

    from tracktower.features.artifact import INDEX_DIR

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    shutil.rmtree(broken / INDEX_DIR)
    result = CliRunner().invoke(app, ["serve", "--model", str(broken)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "index/ is missing" in result.stderr


def test_several_workers_run_under_the_supervisor_with_shared_metrics(
    artifact: Path, env: pytest.MonkeyPatch
) -> None:
    import os

    from tracktower.serving import cli

    calls: list[dict[str, Any]] = []

    def fake_run_workers(config: Any, startup_timeout: float) -> bool:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        listing = os.listdir(directory) if directory else None
        calls.append({"config": config, "startup": startup_timeout, "dir": directory})
        calls[-1]["listing"] = listing
        return True

    env.setattr(cli, "run_workers", fake_run_workers)
    env.setenv("PROMETHEUS_MULTIPROC_DIR", "/stale/metrics")
    env.setenv("TRACKTOWER_WORKER_STARTUP_TIMEOUT_SECONDS", "90")
    result = CliRunner().invoke(app, ["serve", "--model", str(artifact), "--workers", "3"])
    assert result.exit_code == 0, result.output
    (call,) = calls
    config = call["config"]
    assert (config.app, config.factory, config.workers) == (cli.APP, True, 3)
    assert config.timeout_worker_healthcheck == 5 and call["startup"] == 90
    assert config.http == "tracktower.serving.protocol:LimitedHttpToolsProtocol"
    assert config.limit_concurrency == 1000
    # A fresh, empty directory for this server only, removed when it stops.
    assert call["dir"] not in (None, "/stale/metrics") and call["listing"] == []
    assert not os.path.exists(call["dir"])
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == "/stale/metrics"


def test_a_worker_that_cannot_start_stops_serve_with_exit_3(
    artifact: Path, env: pytest.MonkeyPatch
) -> None:
    from tracktower.serving import cli

    env.setattr(cli, "run_workers", lambda config, startup_timeout: False)
    result = CliRunner().invoke(app, ["serve", "--model", str(artifact), "--workers", "2"])
    assert result.exit_code == 3


class FakeWorker:
    """A uvicorn ``Process`` stand-in; the test plays the worker's end of the ping pipe."""

    def __init__(self, pid: int) -> None:
        import multiprocessing
        from types import SimpleNamespace

        self.parent_conn, self.child_conn = multiprocessing.Pipe()
        self.pid = pid
        self.exitcode: int | None = None
        self.alive = True
        self.killed = False
        self.health_checks: list[float] = []
        self.process = SimpleNamespace(is_alive=lambda: self.alive)

    def is_alive(self, timeout: float = 5) -> bool:
        self.health_checks.append(timeout)
        return self.alive

    def kill(self) -> None:
        self.killed, self.alive = True, False
        self.exitcode = -9 if self.exitcode is None else self.exitcode

    def join(self) -> None:
        pass

    def start(self) -> None:
        pass

    def pings(self) -> int:
        received = 0
        while self.child_conn.poll(0):
            self.child_conn.recv()
            received += 1
        return received


@pytest.fixture
def supervise(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``supervise(workers, startup_timeout)`` -> (supervisor, replacements, marked dead)."""
    import signal
    from types import SimpleNamespace

    from tracktower.serving import cli

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # uvicorn installs handlers
    dead: list[int] = []
    monkeypatch.setattr(cli, "mark_worker_dead", dead.append)
    replacements: list[FakeWorker] = []

    def new_process(config: Any, sockets: Any) -> FakeWorker:
        replacements.append(FakeWorker(1000 + len(replacements)))
        return replacements[-1]

    monkeypatch.setattr(cli, "Process", new_process)

    def make(workers: list[FakeWorker], startup_timeout: float) -> Any:
        config = SimpleNamespace(workers=len(workers), timeout_worker_healthcheck=7)
        supervisor = cli.WorkerSupervisor(config, [], startup_timeout)
        supervisor.processes = list(workers)
        return supervisor, replacements, dead

    return make


def test_a_loading_worker_is_not_held_to_the_health_check(supervise: Any) -> None:
    worker = FakeWorker(1)
    supervisor, replacements, _ = supervise([worker], startup_timeout=60)
    for _ in range(5):  # silent (holding the GIL): asked once, never waited for, kept
        supervisor.keep_subprocess_alive()
    assert worker.pings() == 1 and not worker.killed and not worker.health_checks
    worker.child_conn.send(False)  # answers: not started yet
    supervisor.keep_subprocess_alive()  # reads the answer
    supervisor.keep_subprocess_alive()  # asks again
    assert worker.pings() == 1 and not worker.killed
    worker.child_conn.send(True)  # started
    supervisor.keep_subprocess_alive()
    assert not worker.health_checks
    supervisor.keep_subprocess_alive()  # serving: uvicorn's health check from now on
    assert worker.health_checks == [7] and not worker.killed and not replacements
    worker.alive = False
    supervisor.keep_subprocess_alive()
    assert worker.killed and len(replacements) == 1
    assert supervisor.processes == replacements


def test_a_worker_past_its_startup_timeout_is_replaced(supervise: Any) -> None:
    import time

    worker = FakeWorker(1)
    supervisor, replacements, dead = supervise([worker], startup_timeout=0.2)
    supervisor.keep_subprocess_alive()
    assert not worker.killed
    time.sleep(0.3)
    supervisor.keep_subprocess_alive()
    assert worker.killed and dead == [1] and supervisor.processes == replacements
    assert not supervisor.should_exit.is_set()


def test_a_worker_that_failed_to_start_stops_the_supervisor(supervise: Any) -> None:
    from uvicorn.config import STARTUP_FAILURE

    worker = FakeWorker(1)
    supervisor, replacements, dead = supervise([worker], startup_timeout=60)
    worker.alive, worker.exitcode = False, STARTUP_FAILURE
    supervisor.keep_subprocess_alive()
    assert supervisor.startup_failed and supervisor.should_exit.is_set()
    assert not replacements and dead == [1]


def test_a_busy_port_fails_before_the_model_is_resolved(
    artifact: Path, env: pytest.MonkeyPatch
) -> None:
    import socket

    from tracktower.serving import resolve

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was resolved before the port was checked")

    env.setattr(resolve, "resolve_artifact", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--model", str(artifact), "--port", str(port)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "\n" not in line
