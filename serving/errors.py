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

log = logging.getLogger(__name__)


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
