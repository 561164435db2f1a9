"""Prometheus metrics: one registry per app, or files shared by all workers.

A per-app registry (instead of the process-global default) lets tests build many apps in one
process without duplicate-metric errors. Routes are labelled by their *template*
(``/v1/users/{user_id}/recommendations``), never the raw path, and methods outside the standard set
as ``OTHER``, to keep label cardinality bounded. The labelled children are looked up once per
(route, method, status) and cached: ``labels()`` validates and hashes its arguments under a lock on
every call, a measurable share of a request answered from the known-user cache.

With several workers, one scrape reaches one worker, so each worker's own registry would show a
random fraction of the traffic. ``tracktower serve --workers N`` (N > 1) therefore runs the
workers in prometheus-client's multiprocess mode (:func:`multiprocess_dir`): every value is also
written to a per-process file in a fresh private directory, and ``/metrics`` in any worker merges
all the files. Counters and histograms of a worker that died still count (the totals never go
back); the model gauges are ``live*`` and leave with their worker (:func:`mark_worker_dead`, called
by the supervisor). The mode is chosen by ``PROMETHEUS_MULTIPROC_DIR`` when prometheus-client is
first imported, i.e. before the worker imports the app; a single worker, or a test process without
the variable, keeps the per-app registry.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import generate_latest

UNMATCHED = "<unmatched>"
SOURCES = ("model", "popular", "session")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Answered by a middleware before routing (API key, header limits, declared body size): the
# route is looked up for the label only for these, so the hot path pays nothing.
BEFORE_ROUTING = frozenset({401, 413, 431})
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LEGACY_MULTIPROC_ENV = "prometheus_multiproc_dir"


def multiprocess_enabled() -> bool:
    """True when this process writes its values to the shared files (the variable was set
    before prometheus-client was imported) and the directory is there to read them back."""
    multi = bool(getattr(prometheus_values.ValueClass, "_multiprocess", False))
    path = os.environ.get(MULTIPROC_ENV)
    return multi and path is not None and os.path.isdir(path)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess_enabled()
        labels = ["route", "method", "status"]
        self.requests = Counter(
            "tracktower_http_requests", "HTTP requests.", labels, registry=self.registry
        )
        self.latency = Histogram(
            "tracktower_http_request_duration_seconds",
            "HTTP request latency.",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.recommendations = Counter(
            "tracktower_recommendations",
            "Recommendation lists served, by source (popular/session are fallbacks).",
            ["source"],
            registry=self.registry,
        )
        self._sources = {source: self.recommendations.labels(source=source) for source in SOURCES}
        self._http: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        # Several workers: one series per live worker (a ``pid`` label), so a scrape during a
        # model swap shows which worker serves which version.
        self.model_info = Gauge(
            "tracktower_model_info",
            "Loaded model (value 1), labelled with registry name and version.",
            ["name", "version"],
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self._model_child: Any = None
        # Several workers: the minimum over live workers, so 1 means every worker has a model.
        self.model_loaded = Gauge(
            "tracktower_model_loaded",
            "1 once the model is loaded (with several workers: in every worker).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.model_swaps = Counter(
            "tracktower_model_swaps",
            "Model versions the server tried to switch to while running, by outcome "
            "(swapped, or refused: failed to download, load or pass the checks).",
            ["outcome"],
            registry=self.registry,
        )
        self._exposed = self.registry
        if self.multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed)

    def set_model(self, name: str | None, version: str | None) -> None:
        self._drop_model_info()
        self._model_child = self.model_info.labels(name=name or "", version=version or "")
        self._model_child.set(1)
        self.model_loaded.set(1)

    def count_model_swap(self, outcome: str) -> None:
        """``outcome`` is ``swapped`` or ``refused``."""
        self.model_swaps.labels(outcome=outcome).inc()

    def unset_model(self) -> None:
        self._drop_model_info()
        self.model_loaded.set(0)

    def _drop_model_info(self) -> None:
        """One registry: the previous version's series goes. Multiprocess mode cannot remove
        what a worker's file holds (``clear()`` only warns), so there it stays, at 0."""
        if self._model_child is not None:
            self._model_child.set(0)
            self._model_child = None
        if not self.multiprocess:
            self.model_info.clear()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "OTHER"
        key = (route, method, status)
        children = self._http.get(key)
        if children is None:
            labels = {"route": route, "method": method, "status": str(status)}
            children = (self.requests.labels(**labels), self.latency.labels(**labels))
            self._http[key] = children  # bounded: route templates x METHODS x status codes
        children[0].inc()
        children[1].observe(seconds)

    def count_source(self, source: str, n: int = 1) -> None:
        child = self._sources.get(source)
        if child is None:
            child = self.recommendations.labels(source=source)
        child.inc(n)

    def render(self) -> bytes:
        return generate_latest(self._exposed)


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware overhead on the hot path)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._routes: RouteTable | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = perf_counter()
        status = 500  # if the app raises before responding, the server answers 500

        async def send_and_record(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The router stores the matched route in this same scope dict.
            route = scope.get("route")
            if route is not None:
                label = getattr(route, "path", None) or UNMATCHED
            elif status in BEFORE_ROUTING:
                label = self._aimed_at(scope)
            else:
                label = UNMATCHED
            self.metrics.observe_request(label, scope["method"], status, perf_counter() - start)

    def _aimed_at(self, scope: Any) -> str:
        """The template of the route a refused request was addressed to; built on first use
        from the app Starlette put in the scope."""
        if self._routes is None:
            app = scope.get("app")
            if app is None:
                return UNMATCHED
            self._routes = RouteTable(app)
        return self._routes.template(scope)


class RouteTable:
    """Route templates as regular expressions, to name the route of a request the router never
    saw. FastAPI 0.165 keeps included routers as opaque entries of ``app.routes`` (no ``path``):
    ``iter_route_contexts`` is its way to list the routes inside them."""

    def __init__(self, app: Any) -> None:
        from fastapi.routing import iter_route_contexts
        from starlette.routing import Mount, compile_path

        self.entries: list[tuple[re.Pattern[str], str, frozenset[str] | None]] = []
        for context in iter_route_contexts(app.router.routes):
            path = context.path
            if not path:
                continue
            # The label the router gives: the route's own path (FastAPI's ``scope["route"]``).
            label = getattr(context.original_route, "path", None) or path
            if isinstance(context.original_route, Mount):
                path = path.rstrip("/") + "/{path:path}"
            methods = context.methods
            self.entries.append((compile_path(path)[0], label, frozenset(methods or ()) or None))

    def template(self, scope: Any) -> str:
        """First route matching path and method, else first matching the path (the router's
        order: that request would have been a 405), else ``<unmatched>``."""
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        method = scope.get("method", "")
        partial = None
        for pattern, label, methods in self.entries:
            if pattern.match(path):
                if methods is None or method in methods:
                    return label
                partial = partial or label
        return partial or UNMATCHED


@contextmanager
def multiprocess_dir(workers: int) -> Iterator[str | None]:
    """For ``workers`` > 1: a fresh private directory in ``PROMETHEUS_MULTIPROC_DIR`` (the
    workers inherit it) for the duration, removed after. A directory set in the environment
    beforehand is never used: its files would be counted as this server's. With one worker the
    variable is removed, so the worker keeps its own registry."""
    saved = {name: os.environ.pop(name, None) for name in (MULTIPROC_ENV, _LEGACY_MULTIPROC_ENV)}
    path = tempfile.mkdtemp(prefix="tracktower-metrics-") if workers > 1 else None
    try:
        if path is not None:
            os.environ[MULTIPROC_ENV] = path
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def mark_worker_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the totals)."""
    path = os.environ.get(MULTIPROC_ENV)
    if pid is None or not path or not os.path.isdir(path):
        return
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, path)
