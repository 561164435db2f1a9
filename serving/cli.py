"""``tracktower serve`` and ``tracktower recommend``.

``serve`` resolves the model URI once in the parent process, so a missing alias or path is one
error line (DataError, exit 2) instead of a traceback from every worker, and downloads a registry
model once for the host (``serving.resolve``'s cache). Every worker starts on the version resolved
here (``model_start_version``), even if the alias moves during start-up, and then follows the
alias (``model_poll_seconds``, see ``serving.swap``); a version-pinned URI or a path stays put.
Options reach the workers as ``TRACKTOWER_*`` environment variables (see settings.py).

Bad input (a missing model, a bad ``TRACKTOWER_*`` variable) is one ``error: <line>`` on stderr
and exit 2, through the root CLI's guard (``tracktower.features.cli.guarded``), which lives in the
shared layer so that serving never imports training.

``serve`` refuses to bind anything but a loopback address without API keys (the Docker image
binds 0.0.0.0): an exposed server with no authentication must be asked for explicitly, with
``--allow-unauthenticated`` or ``TRACKTOWER_ALLOW_UNAUTHENTICATED``. The check runs before the
model is resolved, so the refusal is immediate. It lives here, not in the app: the app does not
know the address it is bound to (``uvicorn --factory`` run by hand bypasses it).

With ``--workers N`` (N > 1) the workers run under :class:`WorkerSupervisor` (uvicorn's, with a
start-up allowance for loading the model) and share one multiprocess metrics directory, so any
worker's ``/metrics`` counts them all (``serving/metrics.py``). ``uvicorn --factory --workers N``
run by hand has neither. Each worker memory-maps the same artifact arrays, so the model's memory
is shared through the page cache; what each worker holds alone is its heap, its known-user cache
and a ScaNN index's own structures.
"""

from __future__ import annotations

import ipaddress
import os
import pickle
import signal
import socket
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process
from uvicorn.supervisors.multiprocess import logger as uvicorn_logger

from tracktower.features.cli import guarded
from tracktower.features.errors import DataError, one_line
from tracktower.serving.metrics import mark_worker_dead
from tracktower.serving.settings import Settings

app = typer.Typer(
    help="Serve or batch-score an exported tracktower model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a local artifact/model "
    "directory (default: $TRACKTOWER_MODEL_URI, else models:/tracktower@champion)"
)


TrackingOpt = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI for models:/ and runs:/ URIs (default: "
        "$TRACKTOWER_TRACKING_URI, else $MLFLOW_TRACKING_URI, else ./mlflow.db)",
        show_default=False,
    ),
]


@app.command()
@guarded
def serve(
    model: Annotated[str | None, typer.Option(help=MODEL_HELP, show_default=False)] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: 8000)")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: 1)")] = None,
    tracking_uri: TrackingOpt = None,
    allow_unauthenticated: Annotated[
        bool,
        typer.Option(
            "--allow-unauthenticated",
            help="Serve a non-loopback address without API keys (default: "
            "$TRACKTOWER_ALLOW_UNAUTHENTICATED, else refuse)",
            show_default=False,
        ),
    ] = False,
) -> None:
    """Run the HTTP API (uvicorn) for a registered or local model.

    API keys come from $TRACKTOWER_API_KEYS (comma-separated), never from a flag: flags are
    visible to every user of the machine in the process list.
    """
    from tracktower.serving.artifact import check_artifact
    from tracktower.serving.resolve import registry_alias, resolve_artifact

    overrides = {"host": host, "port": port, "workers": workers, "tracking_uri": tracking_uri}
    if allow_unauthenticated:
        overrides["allow_unauthenticated"] = "true"
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"TRACKTOWER_{name.upper()}"] = str(value)
    base = _settings()
    check_exposure(base)
    check_port(base.host, base.port)
    uri = model if model is not None else base.model_uri
    resolved = resolve_artifact(
        uri,
        tracking_uri=base.tracking_uri,
        cache_dir=base.model_cache_dir,
        cache_keep=base.model_cache_keep,
    )
    # Checked here, in the parent, so a bad artifact or index is one error line and exit 2
    # instead of every worker failing its start-up.
    check_artifact(resolved.path)
    pinned = f"models:/{resolved.name}/{resolved.version}" if uri.startswith("models:/") else uri
    if registry_alias(uri) is not None:
        os.environ["TRACKTOWER_MODEL_URI"] = uri
        os.environ["TRACKTOWER_MODEL_START_VERSION"] = str(resolved.version)
    else:
        os.environ["TRACKTOWER_MODEL_URI"] = pinned
    settings = _settings()
    server = _server_options(settings)
    parser = "h11" if server["http"] == "h11" else "httptools"
    auth = f"{len(settings.api_keys)} API key(s)" if settings.auth_enabled else "no API keys"
    typer.echo(
        f"serving {_describe(resolved.name, resolved.version)} from {pinned} "
        f"on http://{settings.host}:{settings.port} ({parser}, {server['loop']}); {auth}",
        err=True,
    )
    run_server(settings, server)


class Engine(StrEnum):
    local = "local"
    spark = "spark"


UsersOpt = Annotated[
    Path | None,
    typer.Option(help="Parquet/CSV with a user_id column, or one id per line", show_default=False),
]
AllUsersOpt = Annotated[
    bool, typer.Option("--all-users", help="Every user the model knows (instead of --users)")
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Local engine: chunks of users searched in parallel (default: 1)"),
]
ChunkOpt = Annotated[
    int | None, typer.Option(min=1, help="Local engine: users per chunk (default: 1024)")
]
ProgressOpt = Annotated[bool, typer.Option(help="Local engine: a progress bar (users/s) on stderr")]


@app.command()
@guarded
def recommend(
    model: Annotated[str | None, typer.Option(help=MODEL_HELP, show_default=False)] = None,
    *,
    users: UsersOpt = None,
    all_users: AllUsersOpt = False,
    k: Annotated[int, typer.Option(min=1, help="Tracks per user")] = 10,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "--out",
            help="Parquet to write: a file (local engine) or a directory of part files (spark)",
        ),
    ],
    tracking_uri: TrackingOpt = None,
    engine: Annotated[
        Engine, typer.Option(help="local: this process; spark: a Spark job (needs Java 17)")
    ] = Engine.local,
    spark_master: Annotated[
        str | None,
        typer.Option(help="Spark master URL (default: local[2])", show_default=False),
    ] = None,
    partitions: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Spark partitions of the users (default: one per core, more when a "
            "partition would exceed 20,000 users)",
            show_default=False,
        ),
    ] = None,
    workers: WorkersOpt = None,
    chunk_size: ChunkOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Write top-k recommendations for every listed user to Parquet.

    The local engine searches the artifact's retrieval index a chunk of users at a time
    (``--workers`` chunks at once) and writes each chunk as it is done. ``--engine spark`` runs
    the same scoring as Spark tasks (``serving/spark.py``), the rows identical with an exact
    index; the model is resolved and downloaded here, on the driver.
    """
    from tracktower.serving.resolve import resolve_artifact

    if (users is None) != all_users:
        raise DataError("give either --users FILE or --all-users")
    if engine is Engine.local and (spark_master is not None or partitions is not None):
        raise DataError("--spark-master and --partitions apply to --engine spark only")
    if engine is Engine.spark and (all_users or workers is not None or chunk_size is not None):
        raise DataError("--all-users, --workers and --chunk-size apply to --engine local only")
    base = _settings()
    uri = tracking_uri or base.tracking_uri
    resolved = resolve_artifact(model or base.model_uri, tracking_uri=uri)
    described = _describe(resolved.name, resolved.version)
    if engine is Engine.spark:
        from tracktower.serving.spark import DEFAULT_MASTER, recommend_with_spark

        master = spark_master or DEFAULT_MASTER
        assert users is not None  # checked above: the Spark engine reads a users file
        run = recommend_with_spark(resolved, users, k, output, master=master, partitions=partitions)
        typer.echo(
            f"wrote {run.rows} rows to {output} ({described}; Spark {master}, "
            f"{run.partitions} partitions, model opened by {run.model_loads} Python workers)"
        )
        return
    from tracktower.serving.batch import DEFAULT_CHUNK, recommend_to_parquet

    rows = recommend_to_parquet(
        resolved,
        users,
        k,
        output,
        chunk_size=chunk_size or DEFAULT_CHUNK,
        workers=workers or 1,
        progress=progress,
    )
    typer.echo(f"wrote {rows} rows to {output} ({described})")


def check_exposure(settings: Settings) -> None:
    """Refuse a non-loopback bind address without API keys, unless explicitly allowed."""
    if settings.auth_enabled or is_loopback(settings.host):
        return
    if not settings.allow_unauthenticated:
        raise DataError(
            f"refusing to serve on {settings.host} without authentication: set "
            "TRACKTOWER_API_KEYS (comma-separated keys), bind 127.0.0.1, or pass "
            "--allow-unauthenticated (TRACKTOWER_ALLOW_UNAUTHENTICATED=true) if something in "
            "front of the server authenticates"
        )
    typer.echo(
        f"warning: serving {settings.host} without authentication (allow_unauthenticated)",
        err=True,
    )


def check_port(host: str, port: int) -> None:
    """Fail before the model is resolved, downloaded and checked (seconds to minutes) when the
    address cannot be listened on, e.g. a port already in use. It is a probe, bound and closed
    at once with the SO_REUSEADDR uvicorn sets: a port taken in the moment between it and
    uvicorn's own bind still fails there, with uvicorn's message and a non-zero exit."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise DataError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server "
            "running there? choose another --port)"
        ) from None


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 and ::1 (also IPv4-mapped, also in brackets); a host name is
    not resolved, so anything else counts as exposed."""
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _server_options(settings: Settings) -> dict[str, Any]:
    """The C HTTP parser (with the limits of ``serving/protocol.py``) and event loop when
    installed, no per-request access log by default, and the server limits from settings.

    ``h11_max_incomplete_event_size`` carries ``max_header_bytes`` to either parser: h11 applies
    it natively, the httptools protocol reads it. The API has no WebSocket routes (``ws``)."""
    from importlib.util import find_spec

    protocol = "h11"
    if find_spec("httptools"):
        from tracktower.serving import protocol as limited

        protocol = limited.PROTOCOL
    return {
        "http": protocol,
        "loop": "uvloop" if find_spec("uvloop") else "asyncio",
        "ws": "none",
        "access_log": settings.access_log,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_timeout_seconds,
        "limit_concurrency": settings.max_connections,
        "timeout_graceful_shutdown": settings.graceful_shutdown_seconds,
    }


APP = "tracktower.serving.app:factory"


def run_server(settings: Settings, server: dict[str, Any]) -> None:
    """One worker: ``uvicorn.run``, metrics in the app's own registry. Several: the workers
    under :class:`WorkerSupervisor`, metrics in a fresh multiprocess directory (see
    ``serving/metrics.py``) created before the first worker starts and removed at exit."""
    import uvicorn

    from tracktower.serving.metrics import multiprocess_dir

    options = {
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "timeout_worker_healthcheck": settings.worker_healthcheck_timeout_seconds,
        **server,
    }
    with multiprocess_dir(settings.workers):
        if settings.workers == 1:
            uvicorn.run(APP, **options)
        else:
            config = uvicorn.Config(APP, **options)
            if not run_workers(config, settings.worker_startup_timeout_seconds):
                raise typer.Exit(STARTUP_FAILURE)


def run_workers(config: Any, startup_timeout: float) -> bool:
    """What ``uvicorn.run`` does for several workers, with the supervisor below; False when a
    worker failed to start (a broken app or model would fail every restart the same way)."""
    supervisor = WorkerSupervisor(config, [config.bind_socket()], startup_timeout)
    supervisor.run()
    return not supervisor.startup_failed


class WorkerSupervisor(Multiprocess):
    """uvicorn's worker supervisor, with a start-up allowance.

    uvicorn pings each worker every half second and kills one that does not answer within
    ``timeout_worker_healthcheck`` (5 s), from the moment it is spawned. The answer comes from a
    thread of the worker, which needs the GIL: while the worker imports its modules and loads
    the model (TensorFlow's import and other C code hold the GIL for seconds on a busy machine)
    it cannot answer, so uvicorn killed a loading worker again and again. Here a worker that has
    not started serving yet is only asked, never waited for, and is given
    ``startup_timeout`` seconds (``worker_startup_timeout_seconds``) to become ready; once it
    serves, uvicorn's health check applies unchanged. At most one ping is outstanding per
    starting worker, so the answers a slow worker owes do not pile up and answer later pings
    with a stale "not started". A worker that exits is also taken out of the metrics' live
    gauges (``mark_worker_dead``).
    """

    def __init__(self, config: Any, sockets: list[Any], startup_timeout: float) -> None:
        super().__init__(config, sockets)
        self.startup_timeout = startup_timeout
        self.startup_failed = False
        self._since: dict[Process, float] = {}  # starting worker -> when it was first seen
        self._ready: set[Process] = set()
        self._unanswered: set[Process] = set()  # a ping sent whose answer is not read yet

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if self._healthy(process):
                continue
            process.kill()
            process.join()
            self._forget(process)
            if process.exitcode == STARTUP_FAILURE:
                uvicorn_logger.error(
                    f"Child process [{process.pid}] failed to start, stopping the parent process."
                )
                self.startup_failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            uvicorn_logger.info(f"Child process [{process.pid}] died")
            replacement = Process(self.config, self.sockets)
            replacement.start()
            self.processes[idx] = replacement

    def restart_all(self) -> None:
        """SIGHUP: uvicorn's rolling restart, each replacement given the start-up allowance."""
        for idx, old in enumerate(self.processes):
            if self._exit_requested():
                return
            new = Process(self.config, self.sockets)
            new.start()
            if not self._wait_until_ready(new):
                new.kill()
                new.join()
                self._forget(new)
                if not self._exit_requested():
                    uvicorn_logger.error(
                        f"New child process [{new.pid}] was not ready in time; "
                        f"keeping worker [{old.pid}] and aborting the restart."
                    )
                return
            old.terminate()
            old.join()
            self._forget(old)
            self.processes[idx] = new

    def handle_ttou(self) -> None:
        before = list(self.processes)
        super().handle_ttou()
        for process in before:
            if process not in self.processes:
                self._forget(process)

    def _healthy(self, process: Process) -> bool:
        """Alive and answering (serving), or alive and still within its start-up allowance."""
        if process in self._ready:
            return process.is_alive(timeout=self.config.timeout_worker_healthcheck)
        if not process.process.is_alive():
            return False
        since = self._since.setdefault(process, time.monotonic())
        if self._probe(process, wait=0) is True:
            self._mark_ready(process)
            return True
        if time.monotonic() < since + self.startup_timeout:
            return True
        uvicorn_logger.error(
            f"Child process [{process.pid}] did not start serving within "
            f"{self.startup_timeout:g} s (worker_startup_timeout_seconds); replacing it"
        )
        return False

    def _wait_until_ready(self, process: Process) -> bool:
        self._since[process] = time.monotonic()
        deadline = self._since[process] + self.startup_timeout
        while time.monotonic() < deadline and not self._exit_requested():
            if not process.process.is_alive():
                return False
            if self._probe(process, wait=0.5) is True:
                self._mark_ready(process)
                return True
        return False

    def _probe(self, process: Process, wait: float) -> bool | None:
        """The worker's "started" flag, or None when its answer has not come (yet)."""
        conn = process.parent_conn
        try:
            if process not in self._unanswered:
                conn.send(b"ping")
                self._unanswered.add(process)
            if not conn.poll(wait):
                return None
            started: bool = conn.recv()
        except (OSError, EOFError, pickle.UnpicklingError):
            return None
        self._unanswered.discard(process)
        return started

    def _mark_ready(self, process: Process) -> None:
        took = time.monotonic() - self._since.pop(process, time.monotonic())
        self._ready.add(process)
        uvicorn_logger.info(f"Child process [{process.pid}] serving after {took:.1f} s")

    def _forget(self, process: Process) -> None:
        self._since.pop(process, None)
        self._ready.discard(process)
        self._unanswered.discard(process)
        mark_worker_dead(process.pid)

    def _exit_requested(self) -> bool:
        stop = (signal.SIGINT, signal.SIGTERM)
        return self.should_exit.is_set() or any(sig in stop for sig in self.signal_queue)


def _settings() -> Settings:
    """Settings from the environment, with a bad variable reported as DataError (exit 2)."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        raise DataError(one_line(exc, env_prefix="TRACKTOWER_")) from None


def _describe(name: str | None, version: str | None) -> str:
    return f"{name} version {version}" if version else f"{name} (unregistered)"
