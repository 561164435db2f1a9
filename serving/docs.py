"""The API's description: the OpenAPI document, completed with this app's limits, and the pages
that show it, Swagger UI at ``/docs`` and ReDoc at ``/redoc``, which work without internet.

FastAPI's own pages load their JavaScript and CSS from a CDN, so behind a firewall (or on a
laptop on a train) ``/docs`` is a blank page. Here the assets come from the ``fastapi-offline``
package: four files (Swagger UI 5's bundle and CSS, ReDoc's bundle, a favicon; 2.8 MB), and
FastAPI, already ours, as its only dependency. Only its files are used, through FastAPI's
``get_swagger_ui_html`` and ``get_redoc_html``, so the pages are FastAPI's own.
``swagger-ui-bundle`` was the other candidate, but its last release ships Swagger UI 4.15,
which cannot render OpenAPI 3.1, the version FastAPI writes. The assets live under
``/docs/``, so when API keys are on and ``docs_public`` is set (the default),
``auth.open_paths`` serves them without a key, like the page.

The document itself states every constraint the server enforces, so that a client (or
schemathesis) generating requests from it gets no surprise 422: the models in ``schemas`` mark
the limits that are Settings (``max_k``, ``max_id_length``, ...), and :func:`describe_api`
writes this app's values in, once, when the document is first built. It also declares what the
middleware and the HTTP protocol can answer on any route (413, 431, 500, 503 busy), which no
route declares itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from tracktower.serving.errors import DESCRIPTIONS, RETRY_AFTER, error_example
from tracktower.serving.schemas import SETTINGS_KEY
from tracktower.serving.settings import Settings

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
# Under DOCS_URL, so that auth.open_paths' prefix for the docs covers it.
ASSETS_URL = f"{DOCS_URL}/assets"
ASSETS_PACKAGE = ("fastapi_offline", "static")
SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON = (
    "swagger-ui-bundle.js",
    "swagger-ui.css",
    "redoc.standalone.js",
    "favicon.png",
)
ERROR_SCHEMA = "#/components/schemas/ErrorResponse"
_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def install_docs(app: FastAPI, settings: Settings) -> None:
    """Complete the app's OpenAPI document (:func:`describe_api`) and serve the offline pages.

    Call it on an app built with ``docs_url=None, redoc_url=None`` (so FastAPI adds no CDN
    pages) before authentication is set up: it sets ``app.docs_url`` and ``app.redoc_url`` to
    where the pages now are, which is what ``auth.open_paths`` reads."""
    app.description = overview(settings)
    describe_api(app, settings)
    app.mount(ASSETS_URL, StaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=redirect_url,
            swagger_js_url=f"{root}{ASSETS_URL}/{SWAGGER_JS}",
            swagger_css_url=f"{root}{ASSETS_URL}/{SWAGGER_CSS}",
            swagger_favicon_url=f"{root}{ASSETS_URL}/{FAVICON}",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/{REDOC_JS}",
            redoc_favicon_url=f"{root}{ASSETS_URL}/{FAVICON}",
            with_google_fonts=False,
        )

    # Plain Starlette routes, as FastAPI adds its own pages: they sit before the API's routes,
    # and a request to those tries each one first (an APIRoute's miss costs twice as much).
    app.add_route(DOCS_URL, swagger_ui, include_in_schema=False)
    if redirect_url:
        app.add_route(redirect_url, swagger_ui_redirect, include_in_schema=False)
    app.add_route(REDOC_URL, redoc, include_in_schema=False)
    app.docs_url, app.redoc_url = DOCS_URL, REDOC_URL


def overview(settings: Settings) -> str:
    """The document's description (the top of /docs): what a client must know first, with this
    server's limits."""
    s = settings
    key = (
        "The /v1 routes need an API key, as `Authorization: Bearer KEY` or `X-API-Key: KEY` "
        '("Authorize" on /docs); without one the answer is 401.'
        if s.auth_enabled
        else "This server takes no API key."
    )
    return (
        f"{key}\n\n"
        f"Limits here: k from 1 to {s.max_k} (default {s.default_k}); ids up to "
        f"{s.max_id_length} characters, not blank; up to {s.max_track_ids} ids in "
        f"exclude_track_ids and in recent_track_ids; 1 to {s.max_batch_users} users per batch; "
        f"bodies up to {s.max_body_bytes} bytes; up to {s.max_headers} header fields and "
        f"{s.max_header_bytes} bytes of request line and headers.\n\n"
        "Each item's `score` is the model's (a dot product of embeddings, higher is better). "
        "Users the model cannot score get the popularity fallback (`source: popular`): its "
        "items have `score: null` and `listeners`, the number of distinct users who played the "
        "track in the training data.\n\n"
        'Every error is `{"error": {"code", "message", "field"}}`.'
    )


def describe_api(app: FastAPI, settings: Settings) -> None:
    """Make ``app.openapi()`` return the document completed by :func:`complete_spec`.

    FastAPI builds the document once and caches it; it is completed once per built document
    (a rebuilt one, after ``app.openapi_schema = None``, is completed again)."""
    generate: Callable[[], dict[str, Any]] = app.openapi
    completed: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        spec = generate()
        if not completed or completed[0] is not spec:
            complete_spec(spec, settings)
            completed[:] = [spec]
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def complete_spec(spec: dict[str, Any], settings: Settings) -> None:
    """Settings values in, query parameters never null, the answers any route can get from
    the middleware or the HTTP protocol declared (a route's own description of a status wins)."""
    fill_settings(spec, settings)
    values = settings.model_dump(exclude={"api_keys"})
    for operation in _operations(spec):
        for parameter in operation.get("parameters", ()):
            if parameter.get("in") == "query":
                parameter["schema"] = _not_null(parameter.get("schema", {}))
        responses = operation.setdefault("responses", {})
        statuses = (413, 431, 500, 503) if "requestBody" in operation else (431, 500, 503)
        for status in statuses:
            responses.setdefault(str(status), _error_response(status, values))
        _add_error_examples(responses, values)
        operation["responses"] = dict(sorted(responses.items()))


def fill_settings(node: Any, settings: Settings) -> None:
    """Replace every ``{SETTINGS_KEY: {keyword: setting}}`` marker, anywhere in ``node``, by
    ``keyword: <the setting's value>``; a marker naming no setting is a programming error."""
    if isinstance(node, dict):
        marker = node.pop(SETTINGS_KEY, None)
        for value in node.values():
            fill_settings(value, settings)
        for keyword, name in (marker or {}).items():
            if name not in Settings.model_fields:
                raise KeyError(f"{SETTINGS_KEY}: {name!r} is not a Settings field")
            node[keyword] = getattr(settings, name)
    elif isinstance(node, list):
        for item in node:
            fill_settings(item, settings)


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query string cannot carry JSON null: an optional parameter (``int | None``, which
    FastAPI writes as ``anyOf: [integer, null]``) is one that may be left out."""
    any_of = schema.get("anyOf")
    if not any_of:
        return schema
    options = [option for option in any_of if option != {"type": "null"}]
    if len(options) == len(any_of):
        return schema
    rest = {key: value for key, value in schema.items() if key != "anyOf"}
    if "default" in rest and rest["default"] is None:
        del rest["default"]
    return {**options[0], **rest} if len(options) == 1 else {**rest, "anyOf": options}


def _error_response(status: int, values: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": DESCRIPTIONS[status].format_map(values),
        "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA}}},
    }
    if status == 503:
        response["headers"] = RETRY_AFTER
    return response


def _add_error_examples(responses: dict[str, Any], values: dict[str, Any]) -> None:
    """An example body on every error answer in the JSON error shape, so the docs show the
    code each status carries instead of one made-up error for all."""
    for status, response in responses.items():
        media = response.get("content", {}).get("application/json", {})
        example = error_example(int(status), values) if status.isdigit() else None
        if example is not None and media.get("schema") == {"$ref": ERROR_SCHEMA}:
            media["example"] = example


def _operations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        operation
        for path_item in spec.get("paths", {}).values()
        for method, operation in path_item.items()
        if method in _METHODS
    ]
