"""Request limits enforced inside the app: header count and size, and the batch route's
concurrency gate and deadline.

What the HTTP server enforces while a request is still arriving (an incomplete head past the
size limit, a client too slow to finish its request) lives in :mod:`tracktower.serving.protocol`;
the checks here see complete requests, so they work under any ASGI server and in TestClient.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tracktower.serving.errors import ApiError, error_response

HEADERS_TOO_LARGE = "request_header_fields_too_large"


class HeaderLimits:
    """Pure ASGI middleware: 431 in the JSON error shape for a request with more than
    ``max_headers`` header fields or a head (path, query and headers) over ``max_bytes``,
    before authentication or the app look at them. Per request: one pass over the headers."""

    def __init__(self, app: Any, max_headers: int, max_bytes: int) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            problem = self._problem(scope)
            if problem is not None:
                await error_response(431, HEADERS_TOO_LARGE, problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, scope: Any) -> str | None:
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            return f"more than {self.max_headers} header fields"
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        for name, value in headers:
            size += len(name) + len(value)
        if size > self.max_bytes:
            return f"request line and headers over {self.max_bytes} bytes"
        return None


class BatchGate:
    """At most ``limit`` batch requests in progress per app; the next one is refused at once.

    A plain counter suffices: it is only touched on the event loop thread, between awaits. A
    queue would hold the waiting requests' bodies and make their clients wait for an answer
    that an immediate 503 with Retry-After gives them now.
    """

    def __init__(self, limit: int, retry_after_seconds: int = 1) -> None:
        self.limit = limit
        self.retry_after = str(retry_after_seconds)
        self.active = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise ApiError(
                503,
                "busy",
                f"{self.limit} batch requests are already in progress; retry shortly",
                headers={"Retry-After": self.retry_after},
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class DeadlineExceeded(Exception):
    """Raised between blocks of work once a request's deadline has passed."""


class Deadline:
    """A monotonic point in time that work running in a worker thread checks between blocks:
    a Python thread cannot be interrupted, so stopping is cooperative."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise DeadlineExceeded(f"deadline of {self.seconds:g} s passed")
