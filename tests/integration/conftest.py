"""Integration fixtures: a real ``mlflow server`` process on a loopback port, and a throwaway
PostgreSQL cluster to be its backend store as in production.

A real server (REST API + proxied artifacts) catches what a local sqlite store hides: error codes
that arrive over HTTP, artifact uploads through ``mlflow-artifacts:/``, and alias resolution by a
client that shares no files with the server.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class MlflowServer:
    """A real ``mlflow server`` (proxied artifacts) on one loopback port, which a test may stop
    and start again on the same port: its clients keep the URL, as they would across a restart
    in production. The backend store URI travels in the environment, not on the command line
    (a password there is readable by every user of the machine in the process list)."""

    def __init__(self, root: Path, backend_uri: str, artifacts: Path) -> None:
        self.root, self.backend_uri, self.artifacts = root, backend_uri, artifacts
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start on the port of the first start; a first start tries three fresh ports."""
        for _ in range(1 if self.port else 3):
            port = self.port or _free_port()
            log_path = self._launch(port)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            url = f"http://127.0.0.1:{port}"
            while self._alive() and time.monotonic() < deadline and not _healthy(url):
                time.sleep(0.5)
            if self._alive() and _healthy(url):
                self.port = port
                return self.url
            self.stop()
            log_tail = log_path.read_text(errors="replace")[-3000:]
            if self.port or "address already in use" not in log_tail.lower():
                pytest.fail(f"mlflow server did not become healthy at {url}:\n{log_tail}")
        pytest.fail("mlflow server: no free port after 3 attempts")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _launch(self, port: int) -> Path:
        self.starts += 1
        log_path = self.root / f"server-{self.starts}.log"
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
            "--artifacts-destination", str(self.artifacts),
            "--serve-artifacts",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_BACKEND_STORE_URI"] = self.backend_uri
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        # MLflow 3 also starts a job runner with ~7 huey consumer processes; nothing here needs it.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.root.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return log_path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a real MLflow server (sqlite backend, proxied local artifacts)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root, f"sqlite:///{root}/mlflow.db", root / "artifacts")
    try:
        yield server.start()
    finally:
        server.stop()


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


# --- a throwaway PostgreSQL cluster (the backend store of a production MLflow server) ---------


@dataclass(frozen=True)
class Postgres:
    """A running cluster on 127.0.0.1:``port`` whose superuser ``user`` logs in by password."""

    port: int
    user: str
    password: str

    def uri(self, database: str) -> str:
        """SQLAlchemy URI, as ``mlflow server --backend-store-uri`` takes it. The driver is
        named: SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3, not psycopg2."""
        where = f"127.0.0.1:{self.port}/{database}"
        return f"postgresql+psycopg2://{self.user}:{self.password}@{where}"

    def connect(self, database: str = "postgres") -> Any:
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            connect_timeout=10,
        )


def _postgres_bindir() -> Path | None:
    """``pg_ctl`` on PATH, else the newest Debian install (``/usr/lib/postgresql/N/bin``, which
    Debian keeps off PATH); None when neither has initdb, pg_ctl and postgres side by side."""
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(debian, key=lambda p: int(p.parent.name), reverse=True)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _postgres_owner() -> dict[str, Any]:
    """``subprocess`` arguments that run the cluster as an unprivileged user when we are root.

    The server refuses to run as root. Python's own ``user``/``group``/``extra_groups`` (setuid in
    the child before exec) need no ``su``, ``runuser`` or ``sudo``; the account is Debian's
    ``postgres`` (created with the package), else ``nobody``. Its files live in a private 0700
    directory under the system temp directory chowned to it, since pytest's own tmp root is
    readable by root alone."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    pytest.fail("running as root, and neither a 'postgres' nor a 'nobody' account exists")


def _pg(bindir: Path, owner: dict[str, Any], root: Path, *args: str) -> None:
    proc = subprocess.run(
        [str(bindir / args[0]), *args[1:]],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        **owner,
    )
    if proc.returncode != 0:
        log = root / "postgres.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{args[0]} {args[1]} failed: {proc.stderr.strip()}\n{tail}")


def _start_postgres(bindir: Path, owner: dict[str, Any], root: Path) -> int:
    """Start the cluster on a free loopback port (three tries: another process may take the
    port between our look and the server's bind); returns the port."""
    for attempt in range(3):
        port = _free_port()
        options = [
            f"-p{port}",
            f"-k{root / 'socket'}",  # the unix socket stays in this private directory
            "-clisten_addresses=127.0.0.1",
            # Throwaway data: without fsync MLflow's schema migrations take seconds, not minutes.
            "-cfsync=off",
            "-csynchronous_commit=off",
            "-cfull_page_writes=off",
        ]
        try:
            _pg(bindir, owner, root, "pg_ctl", "start", "-w", "-t", "60", "-D",
                str(root / "data"), "-l", str(root / "postgres.log"),
                "-o", " ".join(map(shlex.quote, options)))  # fmt: skip
            return port
        except RuntimeError as exc:
            if attempt == 2 or "already in use" not in str(exc):
                pytest.fail(str(exc))
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster of the machine's own binaries (``initdb`` + ``pg_ctl``), stopped and
    deleted at the end, even when a test fails.

    No binaries: skipped locally, failed in CI (``.ci/run`` installs Debian's ``postgresql``),
    where a silent skip would hide that the production backend store was never tested.
    """
    bindir = _postgres_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries not found (Debian: apt-get install postgresql)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    owner = _postgres_owner()
    root = Path(tempfile.mkdtemp(prefix="tt-pg-"))  # short: a socket path has ~100 bytes
    user, password = "tracktower", secrets.token_urlsafe(16)
    try:
        (root / "socket").mkdir()
        (root / "password").write_text(password + "\n")
        if owner:
            for path in (root, root / "socket", root / "password"):
                os.chown(path, owner["user"], owner["group"])
        _pg(bindir, owner, root, "initdb", "-D", str(root / "data"), "-U", user,
            "--pwfile", str(root / "password"), "--auth", "scram-sha-256", "--no-locale",
            "-E", "UTF8", "--no-sync")  # fmt: skip
        yield Postgres(port=_start_postgres(bindir, owner, root), user=user, password=password)
    finally:
        _stop_postgres(bindir, owner, root)
        shutil.rmtree(root, ignore_errors=True)


def _stop_postgres(bindir: Path, owner: dict[str, Any], root: Path) -> None:
    """``pg_ctl stop -m immediate`` (nothing to keep); if that fails, kill the postmaster whose
    pid the cluster recorded, so no server outlives the tests."""
    pid_file = root / "data" / "postmaster.pid"
    if not pid_file.exists():
        return
    try:
        _pg(bindir, owner, root, "pg_ctl", "stop", "-w", "-t", "30", "-m", "immediate",
            "-D", str(root / "data"))  # fmt: skip
    except (RuntimeError, subprocess.TimeoutExpired):
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


@pytest.fixture
def postgres_database(postgres: Postgres) -> Iterator[str]:
    """The URI of a new, empty database in the cluster, dropped after the test."""
    name = f"mlflow_{secrets.token_hex(4)}"
    conn = postgres.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        yield postgres.uri(name)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        conn.close()


@pytest.fixture
def mlflow_on_postgres(postgres_database: str, tmp_path: Path) -> Iterator[MlflowServer]:
    """A started MLflow server on a new PostgreSQL database, artifacts proxied to
    ``tmp_path/artifacts``; the test may stop and start it; stopped at the end regardless."""
    server = MlflowServer(tmp_path / "mlflow-server", postgres_database, tmp_path / "artifacts")
    try:
        server.start()
        yield server
    finally:
        server.stop()
