"""Prometheus metrics, in a registry owned by each app instance.

A per-app registry (instead of the process-global default) lets tests build many apps in one
process without duplicate-metric errors. Routes are labelled by their *template*
(``/v1/users/{user_id}/recommendations``), never the raw path, and methods outside the standard set
as ``OTHER``, to keep label cardinality bounded. The labelled children are looked up once per
(route, method, status) and cached: ``labels()`` validates and hashes its arguments under a lock on
every call, a measurable share of a request answered from the known-user cache.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

UNMATCHED = "<unmatched>"
SOURCES = ("model", "popular", "session")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.model_info = Gauge(
            "tracktower_model_info",
            "Loaded model (value 1), labelled with registry name and version.",
            ["name", "version"],
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "tracktower_model_loaded", "1 once the model is loaded.", registry=self.registry
        )

    def set_model(self, name: str | None, version: str | None) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name or "", version=version or "").set(1)
        self.model_loaded.set(1)

    def unset_model(self) -> None:
        self.model_info.clear()
        self.model_loaded.set(0)

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
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware overhead on the hot path)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

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
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            self.metrics.observe_request(route, scope["method"], status, perf_counter() - start)
