"""One JSON error shape for every failure: ``{"error": {"code", "message", "field"}}``.

Clients (and on-call humans) get a machine-readable code and the offending field for every 4xx,
and a 5xx never carries a stack trace or exception text: those go to the server log only.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tracktower.serving.schemas import ErrorResponse

log = logging.getLogger(__name__)

# What each error status means here, for the OpenAPI document: routes list theirs through
# ``documented``, and ``serving.docs`` adds the ones the middleware can answer on any route.
DESCRIPTIONS: dict[int, str] = {
    400: "malformed_json: the body is not valid JSON.",
    401: "unauthorized: no configured API key in 'Authorization: Bearer KEY' or 'X-API-Key'.",
    404: "not_found: no such path; for this route, user_id is empty, holds a '/', or is '.' "
    "or '..' (which clients resolve as path segments): send such ids in a POST body.",
    413: "payload_too_large: the body is over max_body_bytes ({max_body_bytes} bytes here).",
    422: "A value breaks a constraint stated in this document (invalid_request, invalid_id, "
    "out_of_range, too_many_items); `field` names it, e.g. 'user_ids[3]'.",
    431: "request_header_fields_too_large: more than max_headers ({max_headers}) header fields, "
    "or request line and headers over max_header_bytes ({max_header_bytes} bytes here).",
    500: "internal_error: an unexpected failure; details go to the server log, never here.",
    503: "busy: the server is at max_connections connections or requests in progress "
    "(answered by `tracktower serve`'s HTTP protocol). Retry-After says when to try again.",
    504: "deadline_exceeded: not scored within request_timeout_seconds; send fewer user_ids.",
}
NOT_READY_503 = (
    "not_ready: the model is still loading; busy: the server is at max_connections. "
    "Retry-After says when to try again."
)
BATCH_503 = (
    "not_ready: the model is still loading; busy: max_concurrent_batches batches are already "
    "in progress, or the server is at max_connections. Retry-After says when to try again."
)
# One example body per status, so the docs show the code each one carries; ``{setting}`` in a
# message or a description is the setting's value.
_EXAMPLES: dict[int, tuple[str, str, str | None]] = {
    400: ("malformed_json", "request body is not valid JSON: Expecting value", None),
    404: ("not_found", "Not Found", None),
    413: ("payload_too_large", "request body over {max_body_bytes} bytes", None),
    422: ("out_of_range", "k must be between 1 and {max_k}", "k"),
    431: ("request_header_fields_too_large", "more than {max_headers} header fields", None),
    500: ("internal_error", "internal server error", None),
    503: ("not_ready", "model is not loaded yet", None),
    504: (
        "deadline_exceeded",
        "batch of {max_batch_users} users not scored within {request_timeout_seconds:g} s "
        "(request_timeout_seconds); send fewer user_ids per request",
        None,
    ),
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def error_example(status: int, settings: dict[str, Any]) -> dict[str, Any] | None:
    """An example body for ``status`` with these ``settings`` values, or None for none."""
    if status not in _EXAMPLES:
        return None
    code, message, field = _EXAMPLES[status]
    return {"error": {"code": code, "message": message.format_map(settings), "field": field}}


def documented(
    *statuses: int, overrides: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` entries in the JSON error shape for ``statuses``, described as in
    ``DESCRIPTIONS`` unless ``overrides`` says more for this route; a 503 has Retry-After.
    (Their example bodies are added by ``serving.docs``: FastAPI would drop their nulls.)"""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        text = (overrides or {}).get(status, DESCRIPTIONS[status])
        entry: dict[str, Any] = {"model": ErrorResponse, "description": text}
        if status == 503:
            entry["headers"] = RETRY_AFTER
        responses[status] = entry
    return responses


class ApiError(Exception):
    """A 4xx/5xx in the JSON error shape; a 503 without its own ``headers`` says Retry-After 5."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_response(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        response = error_response(exc.status, exc.code, exc.message, exc.field)
        if exc.headers is not None:
            response.headers.update(exc.headers)
        elif exc.status == 503:
            response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "invalid JSON")
            return error_response(
                400, "malformed_json", f"request body is not valid JSON: {detail}"
            )
        field = _field(first.get("loc", ()))
        message = str(first.get("msg", "invalid request"))
        if first.get("type") == "model_attributes_type" and field is None:
            message = "request body must be a JSON object (Content-Type: application/json)"
        return error_response(422, "invalid_request", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, code, str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")


class BodySizeLimit:
    """413 in the JSON error shape for bodies over the limit, declared or streamed.

    Used instead of FastAPI's ``max_body_size``, which answers a declared oversize length with
    plain text. A streamed (chunked) body is cut off by raising from ``receive``, which FastAPI
    re-raises as the HTTPException it is, so the JSON handler above renders it.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over {self.max_bytes} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await error_response(413, "payload_too_large", message)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Any:
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)


def _field(loc: object) -> str | None:
    """``("body", "user_ids", 3)`` → ``"user_ids[3]"``; the location kind (body, query) goes."""
    if not isinstance(loc, list | tuple):
        return None
    parts = [p for p in loc if p not in {"body", "query", "path", "header", "cookie"}]
    if not parts:
        return None
    text = str(parts[0])
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text
