"""Optional API keys: a pure-ASGI gate in front of the app, installed only when keys are set.

With no ``api_keys`` nothing is installed, so an open server pays nothing per request. With
keys, every HTTP request except the open paths (``/healthz`` and ``/readyz`` always, ``/metrics``
and the docs as the settings say) must carry one as ``Authorization: Bearer KEY`` or
``X-API-Key: KEY``; otherwise the answer is 401 in the JSON error shape with
``WWW-Authenticate: Bearer``, before routing, so an unknown path is 401 too and a caller without
a key learns nothing about the routes.

A middleware rather than a FastAPI dependency: a dependency is solved per request (a measurable
share of a cached recommendation, see deps.py) and would have to be repeated on every
router; the middleware is one header scan. The OpenAPI document still declares both schemes
(:func:`declare_security`), so clients and Swagger UI's "Authorize" know what to send.

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key,
without stopping at a match: the time taken does not depend on which key matched, how many
leading characters were right, or the length of the key tried.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fastapi import FastAPI

from tracktower.serving.errors import error_response

BEARER_SCHEME = "bearerAuth"
API_KEY_SCHEME = "apiKeyHeader"
API_KEY_HEADER = "X-API-Key"
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
UNAUTHORIZED_MESSAGE = (
    f"missing or invalid API key: send 'Authorization: Bearer KEY' or '{API_KEY_HEADER}: KEY'"
)


class OpenPaths:
    """Paths served without a key: exact paths, plus everything under the given prefixes."""

    def __init__(self, exact: Iterable[str], prefixes: Iterable[str] = ()) -> None:
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        return path in self.exact or (bool(self.prefixes) and path.startswith(self.prefixes))


def open_paths(app: FastAPI, *, metrics_public: bool, docs_public: bool) -> OpenPaths:
    """Health checks always; /metrics and the API description (/openapi.json, /docs and what
    lies under it, /redoc) when the settings make them public."""
    exact = {"/healthz", "/readyz"}
    prefixes: list[str] = []
    if metrics_public:
        exact.add("/metrics")
    if docs_public:
        for url in (app.openapi_url, app.docs_url, app.redoc_url):
            if url:
                exact.add(url)
        if app.docs_url:
            prefixes.append(app.docs_url.rstrip("/") + "/")
    return OpenPaths(exact, prefixes)


def key_digests(keys: Sequence[str]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(key.encode("ascii")).digest() for key in keys)


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """Every key the request offers: Bearer credentials (scheme case-insensitive, RFC 7235)
    and X-API-Key values (ASGI header names are lower-case)."""
    found = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                found.append(token.strip())
        elif name == b"x-api-key":
            found.append(value.strip())
    return found


def is_authorized(headers: Iterable[tuple[bytes, bytes]], digests: Sequence[bytes]) -> bool:
    """True when any presented key is a configured one; every comparison runs (see module)."""
    matched = False
    for key in presented_keys(headers):
        digest = hashlib.sha256(key).digest()
        for expected in digests:
            matched |= hmac.compare_digest(digest, expected)
    return matched


class ApiKeyAuth:
    """Pure ASGI middleware: 401 unless the request carries a configured key or its path is
    open. Non-HTTP scopes (lifespan) pass through."""

    def __init__(self, app: Any, digests: Sequence[bytes], open_paths: OpenPaths) -> None:
        if not digests:
            raise ValueError("ApiKeyAuth needs at least one key")
        self.app = app
        self.digests = tuple(digests)
        self.open_paths = open_paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in self.open_paths
            or is_authorized(scope["headers"], self.digests)
        ):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "unauthorized", UNAUTHORIZED_MESSAGE)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def declare_security(app: FastAPI, open_paths: OpenPaths) -> None:
    """Make ``app.openapi()`` declare both key schemes, require one of them (either will do) on
    every operation outside ``open_paths``, and document their 401."""
    generate: Callable[[], dict[str, Any]] = app.openapi
    done = False

    def openapi() -> dict[str, Any]:
        nonlocal done
        schema = generate()  # FastAPI builds it once and caches it on the app
        if not done:
            _add_security(schema, open_paths)
            done = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_security(schema: dict[str, Any], open_paths: OpenPaths) -> None:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(
        {
            BEARER_SCHEME: {"type": "http", "scheme": "bearer", "description": "an API key"},
            API_KEY_SCHEME: {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
        }
    )
    error: dict[str, Any] = {"description": "Missing or invalid API key"}
    if "ErrorResponse" in components.get("schemas", {}):
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        error["content"] = {"application/json": {"schema": ref}}
    for path, operations in schema.get("paths", {}).items():
        if path in open_paths:
            continue
        for method, operation in operations.items():
            if method not in _HTTP_METHODS:
                continue
            operation["security"] = [{BEARER_SCHEME: []}, {API_KEY_SCHEME: []}]
            operation.setdefault("responses", {})["401"] = error
