"""Application factory for the HTTP server.

The model is resolved and loaded in the lifespan (never at import, never per request), and
kept in ``app.state``; TensorFlow is only touched there, and only when the artifact has a history
tower. Loading memory-maps the arrays and reads the retrieval index saved at export (ScaNN is
imported then, before any request thread exists: see ``features.index.scann_import``); nothing
is ranked ahead of requests, so start-up does no work that grows as users x tracks. The heap the
imports leave is frozen out of the garbage collector just before the model is loaded: it is
100k+ long-lived objects (more with MLflow or TensorFlow), and a full collection walking them
(0.1-0.5 s on a busy 2-core box) stalls every in-flight request. When the model URI is an alias
(``models:/NAME@ALIAS``), an ``AliasWatcher`` thread follows it and swaps a new version in
without a restart (``serving/swap.py``, which also says why the model is not frozen).

A model that cannot be loaded (missing or mismatched files, a bad index: any DataError) fails the
start-up with its one line as uvicorn's startup-failure message instead of a traceback, and
uvicorn exits non-zero before accepting a request; ``tracktower serve`` checks the artifact in the
parent first (``check_artifact``), so there it is ``error: <line>`` and exit 2.

``create_app`` with no arguments reads ``TRACKTOWER_*`` settings, which is what
``uvicorn --factory tracktower.serving.app:factory`` (and ``tracktower serve``) runs in each worker.

Middleware, outermost first, all pure ASGI: the one-line startup error (above), metrics (so
every answer is counted), header limits
(431), API keys (401, only when ``api_keys`` is set: an open server pays nothing for auth), the
body-size limit (413). The limits that apply while a request is still arriving are the HTTP
protocol's (``serving/protocol.py``, chosen by ``tracktower serve``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.concurrency import run_in_threadpool

from tracktower.features.errors import DataError, one_line
from tracktower.serving.artifact import Recommender
from tracktower.serving.auth import ApiKeyAuth, declare_security, key_digests, open_paths
from tracktower.serving.coalesce import Coalescer
from tracktower.serving.deps import LoadedModel, Serving
from tracktower.serving.errors import BodySizeLimit, install_error_handlers
from tracktower.serving.limits import BatchGate, HeaderLimits
from tracktower.serving.metrics import Metrics, MetricsMiddleware
from tracktower.serving.routers import health, model, recommendations
from tracktower.serving.settings import Settings
from tracktower.serving.swap import AliasWatcher

log = logging.getLogger(__name__)

_NO_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


def limit_blas_threads(threads: int) -> Any:
    """Cap BLAS threads process-wide; returns a limiter (``.restore_original_limits()``) or None.

    A single-user score is a small matrix-vector product: BLAS threads buy nothing there but
    stall on a busy core, which turned a 0.2 ms median into a >10 ms p99 on a shared 2-core box.
    The server scales by concurrent requests and workers instead.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.warning("threadpoolctl is not installed; BLAS thread count left at its default")
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def load_model(settings: Settings) -> tuple[Recommender, LoadedModel]:
    """The start-up model: a registry version through the per-host cache, loaded after the heap
    imported so far is frozen (``serving/swap.py`` says why the model itself is not). With an
    alias URI and ``model_start_version`` (set by ``tracktower serve``) that version is loaded,
    and the alias is followed from there."""
    from tracktower.serving.resolve import registry_alias, resolve_artifact
    from tracktower.serving.swap import load_version

    uri = settings.model_uri
    alias = registry_alias(uri)
    if alias is not None and settings.model_start_version is not None:
        uri = f"models:/{alias[0]}/{settings.model_start_version}"
    resolved = resolve_artifact(
        uri,
        tracking_uri=settings.tracking_uri,
        cache_dir=settings.model_cache_dir,
        cache_keep=settings.model_cache_keep,
    )
    recommender = load_version(resolved.path, settings, startup=True)
    registry = uri.startswith("models:/") and resolved.version is not None
    loaded = LoadedModel(
        name=resolved.name,
        version=resolved.version,
        uri=f"models:/{resolved.name}/{resolved.version}" if registry else settings.model_uri,
    )
    return recommender, loaded


def create_app(settings: Settings | None = None, recommender: Recommender | None = None) -> FastAPI:
    """Build the app; an injected ``recommender`` skips resolution (tests, embedding); its
    known-user cache is configured from ``settings`` like a loaded one's."""
    settings = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if recommender is not None:
            loaded_rec = recommender
            recommender.configure_cache(settings.known_cache_users, settings.max_k)
            loaded = LoadedModel(
                name=recommender.manifest.model_name,
                version=recommender.manifest.model_version,
                uri=str(recommender.path),
            )
        else:
            try:
                loaded_rec, loaded = await run_in_threadpool(load_model, settings)
            except DataError as exc:
                app.state.startup_error = f"error: cannot load model: {one_line(exc)}"
                raise
            except Exception as exc:
                log.error("cannot load model %s: %s", settings.model_uri, exc)
                raise
        blas = limit_blas_threads(settings.blas_threads) if settings.blas_threads else None
        app.state.recommender, app.state.model = loaded_rec, loaded
        # Per lifespan: its jobs belong to this event loop, and an app started again (a new
        # loop) must not inherit a count of jobs that loop will never finish.
        app.state.coalescer = Coalescer(settings.coalesce_max_batch, settings.coalesce_max_inflight)
        app.state.serving = Serving(loaded_rec, loaded, settings, metrics)
        metrics.set_model(loaded.name, loaded.version)
        log.info(
            "serving %s version %s (%d users, %d tracks, %s index, recall@100 %s, "
            "history tower: %s)",
            loaded.name,
            loaded.version,
            loaded_rec.n_users,
            loaded_rec.n_tracks,
            loaded_rec.index_info.backend,
            loaded_rec.index_info.recall_at_100,
            loaded_rec.has_history_tower,
        )
        del loaded_rec  # app.state holds the model: a swap must be able to let go of it
        watcher = None
        if recommender is not None:  # built before the app: frozen with the heap, never swapped
            gc.collect()
            gc.freeze()
        else:
            watcher = AliasWatcher.for_settings(app.state, settings, metrics, loaded.version)
            if watcher is not None:
                watcher.start()
        app.state.model_watcher = watcher
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()
            app.state.model_watcher = None
            app.state.serving = None
            app.state.recommender, app.state.model = None, None
            metrics.unset_model()
            gc.unfreeze()  # several apps in one process (tests) must not leak each other's heap
            if blas is not None:
                blas.restore_original_limits()

    app = FastAPI(
        title="tracktower",
        summary="Two-tower music recommendations",
        version="1",
        lifespan=lifespan,
        telemetry=None if settings.opentelemetry else _NO_TELEMETRY,
        docs_url=None,  # the offline pages instead (serving/docs.py)
        redoc_url=None,
    )
    from tracktower.serving.docs import install_docs

    install_docs(app, settings)  # before _add_middleware: auth reads app.docs_url
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.recommender = None
    app.state.model = None
    app.state.serving = None
    app.state.startup_error = None
    # Per app, not per model: a model swap must not reset the count of batches in progress.
    app.state.batch_gate = BatchGate(settings.max_concurrent_batches)
    app.state.coalescer = None
    _add_middleware(app, settings, metrics)
    install_error_handlers(app)
    # Routers carry their own /v1 prefix so route templates (metrics labels) include it. The
    # recommendation routes go first: routes are matched in order, each miss costing ~20 us.
    app.include_router(recommendations.router)
    app.include_router(health.router)
    app.include_router(model.router)
    return app


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Innermost first (each ``add_middleware`` wraps the previous ones); see the module."""
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.auth_enabled:
        keys = [key.get_secret_value() for key in settings.api_keys]
        public = open_paths(
            app, metrics_public=settings.metrics_public, docs_public=settings.docs_public
        )
        app.add_middleware(ApiKeyAuth, digests=key_digests(keys), open_paths=public)
        declare_security(app, public)
    app.add_middleware(
        HeaderLimits, max_headers=settings.max_headers, max_bytes=settings.max_header_bytes
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # also times the 4xx above
    app.add_middleware(OneLineStartupError, app_state=app.state)


class OneLineStartupError:
    """Pure ASGI, outermost: when the lifespan recorded a one-line reason (a DataError while
    loading the model), uvicorn's startup-failure message is that line, not Starlette's
    formatted traceback; every other message passes unchanged."""

    def __init__(self, app: Any, app_state: Any) -> None:
        self.app = app
        self.state = app_state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: Any) -> None:
            reason = self.state.startup_error
            if message["type"] == "lifespan.startup.failed" and reason:
                message = {**message, "message": reason}
            await send(message)

        await self.app(scope, receive, send_one_line)


def factory() -> FastAPI:
    """Entry point for ``uvicorn --factory``: settings from the environment, INFO logs to stderr."""
    package_log = logging.getLogger("tracktower")
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
    return create_app()
