"""``tracktower serve`` and ``tracktower recommend``.

``serve`` resolves the model URI once in the parent process, so a missing alias or path is one
error line (DataError, exit 2) instead of a traceback from every worker, and an alias is pinned to
its concrete version so all workers load the same model even if the alias moves during startup.
Options reach the workers as ``TRACKTOWER_*`` environment variables (see settings.py).

Bad input (a missing model, a bad ``TRACKTOWER_*`` variable) is one ``error: <line>`` on stderr
and exit 2, through the root CLI's guard (``tracktower.features.cli.guarded``), which lives in the
shared layer so that serving never imports training.
"""

from __future__ import annotations

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
) -> None:
    """Run the HTTP API (uvicorn) for a registered or local model."""
    import uvicorn

    from tracktower.serving.resolve import resolve_artifact

    overrides = {"host": host, "port": port, "workers": workers, "tracking_uri": tracking_uri}
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"TRACKTOWER_{name.upper()}"] = str(value)
    base = _settings()
    uri = model if model is not None else base.model_uri
    resolved = resolve_artifact(uri, tracking_uri=base.tracking_uri)
    pinned = f"models:/{resolved.name}/{resolved.version}" if uri.startswith("models:/") else uri
    os.environ["TRACKTOWER_MODEL_URI"] = pinned
    settings = _settings()
    server = _server_options(settings)
    typer.echo(
        f"serving {_describe(resolved.name, resolved.version)} from {pinned} "
        f"on http://{settings.host}:{settings.port} ({server['http']}, {server['loop']})",
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


def _server_options(settings: Settings) -> dict[str, Any]:
    """The C HTTP parser and event loop when installed (uvicorn's "auto" would pick them too;
    naming them puts the choice in the startup line), and no per-request access log by default."""
    from importlib.util import find_spec

    return {
        "http": "httptools" if find_spec("httptools") else "h11",
        "loop": "uvloop" if find_spec("uvloop") else "asyncio",
        "access_log": settings.access_log,
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
