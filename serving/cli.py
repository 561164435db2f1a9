"""``tracktower serve`` and ``tracktower recommend``.

``serve`` resolves the model URI once in the parent process, so a missing alias or path is one
error line (DataError, exit 2) instead of a traceback from every worker, and an alias is pinned to
its concrete version so all workers load the same model even if the alias moves during startup.
Options reach the workers as ``TRACKTOWER_*`` environment variables (see settings.py).

Bad input (a missing model, a bad ``TRACKTOWER_*`` variable) is one ``error: <line>`` on stderr
and exit 2, through the root CLI's guard (``tracktower.features.cli.guarded``), which lives in the
shared layer so that serving never imports training.

``serve`` refuses to bind anything but a loopback address without API keys (the Docker image
binds 0.0.0.0): an exposed server with no authentication must be asked for explicitly, with
``--allow-unauthenticated`` or ``TRACKTOWER_ALLOW_UNAUTHENTICATED``. The check runs before the
model is resolved, so the refusal is immediate. It lives here, not in the app: the app does not
know the address it is bound to (``uvicorn --factory`` run by hand bypasses it).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from tracktower.features.cli import guarded
from tracktower.features.errors import DataError, one_line
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
    import uvicorn

    from tracktower.serving.artifact import check_artifact
    from tracktower.serving.resolve import resolve_artifact

    overrides = {"host": host, "port": port, "workers": workers, "tracking_uri": tracking_uri}
    if allow_unauthenticated:
        overrides["allow_unauthenticated"] = "true"
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"TRACKTOWER_{name.upper()}"] = str(value)
    base = _settings()
    check_exposure(base)
    uri = model if model is not None else base.model_uri
    resolved = resolve_artifact(uri, tracking_uri=base.tracking_uri)
    # Checked here, in the parent, so a bad artifact or index is one error line and exit 2
    # instead of every worker failing its start-up.
    check_artifact(resolved.path)
    pinned = f"models:/{resolved.name}/{resolved.version}" if uri.startswith("models:/") else uri
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
    uvicorn.run(
        "tracktower.serving.app:factory",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        **server,
    )


@app.command()
@guarded
def recommend(
    model: Annotated[str | None, typer.Option(help=MODEL_HELP, show_default=False)] = None,
    *,
    users: Annotated[
        Path, typer.Option(help="Parquet/CSV with a user_id column, or one id per line")
    ],
    k: Annotated[int, typer.Option(min=1, help="Tracks per user")] = 10,
    output: Annotated[Path, typer.Option(help="Parquet file to write")],
    tracking_uri: TrackingOpt = None,
) -> None:
    """Write top-k recommendations for every listed user to Parquet."""
    from tracktower.serving.batch import recommend_to_parquet
    from tracktower.serving.resolve import resolve_artifact

    base = _settings()
    uri = tracking_uri or base.tracking_uri
    resolved = resolve_artifact(model or base.model_uri, tracking_uri=uri)
    rows = recommend_to_parquet(resolved, users, k, output)
    typer.echo(f"wrote {rows} rows to {output} ({_describe(resolved.name, resolved.version)})")


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


def _settings() -> Settings:
    """Settings from the environment, with a bad variable reported as DataError (exit 2)."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        raise DataError(one_line(exc, env_prefix="TRACKTOWER_")) from None


def _describe(name: str | None, version: str | None) -> str:
    return f"{name} version {version}" if version else f"{name} (unregistered)"
