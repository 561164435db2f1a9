"""uvicorn's httptools protocol with the two limits uvicorn lacks (head size, read time) and a
JSON answer when the server is over its connection limit.

uvicorn 0.54 with httptools has no limit on the size of a request head (httptools buffers a
header value until it ends, so five unfinished 20 MB headers held 141 MB) and no read timeout:
its keep-alive timer runs only between requests and any byte cancels it, so a client that
connects and sends nothing, or one byte every few seconds, holds its connection forever. The
``h11`` parser limits the head (``h11_max_incomplete_event_size``) but is several times slower.

This subclass adds, per connection:

* a head-size cap: once an incomplete request head has grown past the limit (uvicorn's
  ``h11_max_incomplete_event_size``, which ``tracktower serve`` sets from ``max_header_bytes``),
  the client gets 431 and the connection is closed. Bytes are counted per read, so a head may
  run past the limit by at most one read (256 KiB) before it is cut; complete heads are checked
  exactly by :class:`tracktower.serving.limits.HeaderLimits`.
* a read deadline (``read_timeout_seconds``): a request must arrive completely, head and body,
  within that time of its first byte (of the connection opening, for the first request). A head
  still incomplete then gets 408; a body still incomplete closes the connection (the handler
  waiting for it sees a disconnect); a connection that never sent a byte is closed.
* the answer over ``limit_concurrency`` (``max_connections``): uvicorn's own 503 is plain text
  ("Service Unavailable"); here it is 503 ``busy`` in the JSON error shape with ``Retry-After``,
  still closing the connection (that frees a slot). The request never reaches the app, so it is
  not in ``/metrics``; uvicorn logs a warning for each.

The deadline covers receiving only; handling time is the route's business (see the batch
deadline in ``routers/recommendations.py``), idle time between requests uvicorn's keep-alive
timeout. WebSocket upgrades are not expected (``tracktower serve`` passes ``ws="none"``).
Selected by import path so that every uvicorn worker process can load it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from tracktower.serving.limits import HEADERS_TOO_LARGE
from tracktower.serving.settings import Settings

log = logging.getLogger(__name__)

BUSY_RETRY_AFTER_SECONDS = 1


@functools.cache
def _settings() -> Settings:
    """Read once per process: the worker's environment, written by ``tracktower serve``."""
    return Settings()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """See the module docstring; everything else is uvicorn's."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = _settings()
        self.max_head_bytes = config.h11_max_incomplete_event_size or settings.max_header_bytes
        self.read_timeout = settings.read_timeout_seconds
        self._read_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # between a request's first byte and the end of its headers
        self._in_message = False  # between a request's first byte and the end of its body
        self._head_serial = 0  # heads begun on this connection (pipelining: several per read)
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        # Only reads that start inside the current head are counted: where in a read a head
        # begins is not known, which is the "at most one read" of slack.
        serial = self._head_serial if self._in_head else -1
        super().data_received(data)
        if self._in_head and serial == self._head_serial:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                message = f"request line and headers over {self.max_head_bytes} bytes"
                self._refuse(431, HEADERS_TOO_LARGE, message)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._in_message = True
        self._head_serial += 1
        self._head_bytes = 0
        if self._read_timer is None:
            self._arm_read_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        if self.pipeline:
            # Queued behind a response in progress, with reading paused by uvicorn: the wait is
            # the server's, not the client's, so the clock restarts when the request's turn comes.
            self._cancel_read_timer()

    def on_message_complete(self) -> None:
        self._in_message = False
        self._cancel_read_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_message and self._read_timer is None and not self.transport.is_closing():
            self._arm_read_timer()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if app is service_unavailable:  # uvicorn chose it: over limit_concurrency
            app = self._busy
        super()._start_asgi_task(cycle, app)

    async def _busy(self, scope: Any, receive: Any, send: Any) -> None:
        """uvicorn's ``service_unavailable`` in the JSON error shape."""
        message = (
            f"the server is at its limit of {self.limit_concurrency} concurrent connections "
            "or requests; retry shortly"
        )
        body = json.dumps({"error": {"code": "busy", "message": message, "field": None}})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"retry-after", str(BUSY_RETRY_AFTER_SECONDS).encode("ascii")),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode("ascii")})

    def _arm_read_timer(self) -> None:
        self._cancel_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._in_head:
            message = f"request not received within {self.read_timeout:g} s"
            self._refuse(408, "request_timeout", message)
        else:  # a fresh connection that sent nothing, or a body that stopped arriving
            log.debug("closing a connection whose request did not arrive in time")
            self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer in the JSON error shape and close; when a response to an earlier
        (pipelined) request is still being written, close without one."""
        self._cancel_read_timer()
        log.debug("refusing a request with %d: %s", status, message)
        if self.cycle is None or self.cycle.response_complete:
            body = json.dumps({"error": {"code": code, "message": message, "field": None}})
            head = (
                b"content-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode("ascii")
            )
            self.transport.write(STATUS_LINE[status] + head + body.encode("ascii"))
        self.transport.close()


# The protocol as uvicorn's ``http`` option (an import path, so that every worker can load it).
PROTOCOL = f"{__name__}:{LimitedHttpToolsProtocol.__qualname__}"
