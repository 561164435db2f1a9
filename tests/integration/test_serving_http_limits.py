"""Limits that only a real server shows: oversized and slow requests over raw loopback sockets
against ``tracktower serve`` (the httptools protocol with limits), and the bind refusal.

Every socket has a timeout and every wait a bound, so a regression fails instead of hanging.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import builders
import httpx
import pytest
from servers import running

READ_TIMEOUT = 2.0
KEEP_ALIVE = 1
MAX_HEADER_BYTES = 4096
MAX_HEADERS = 50
KEY = "integration-key-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKTOWER_")}
    return {**env, **extra}


def _tracktower() -> str:
    return str(Path(sys.executable).with_name("tracktower"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    root = tmp_path_factory.mktemp("limits")
    artifact = builders.write_fake_artifact(root / "artifact", 20, 100, 8, False)
    port = _free_port()
    env = _env(
        TRACKTOWER_READ_TIMEOUT_SECONDS=str(READ_TIMEOUT),
        TRACKTOWER_KEEP_ALIVE_TIMEOUT_SECONDS=str(KEEP_ALIVE),
        TRACKTOWER_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        TRACKTOWER_MAX_HEADERS=str(MAX_HEADERS),
        TRACKTOWER_API_KEYS=KEY,
    )
    cmd = [_tracktower(), "serve", "--model", str(artifact), "--port", str(port)]
    with running(cmd, env, root / "serve.log", port) as base:
        yield base, port


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or resets) the connection, and when."""
    start, data = time.monotonic(), b""
    while time.monotonic() - start < limit_s:
        ready, _, _ = select.select([sock], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    else:
        pytest.fail(f"connection still open after {limit_s} s")
    return data, time.monotonic() - start


def _send_until_refused(sock: socket.socket, head: bytes, piece: int = 16384) -> bytes:
    """Send ``head`` in pieces, stopping once the server answers or closes; returns what it
    sent back (the server may reset the connection once it has refused, which is fine)."""
    for start in range(0, len(head), piece):
        ready, _, _ = select.select([sock], [], [], 0.02)
        if ready:
            break
        try:
            sock.sendall(head[start : start + piece])
        except (BrokenPipeError, ConnectionResetError):
            break
    data, _ = _read_until_closed(sock, 10)
    return data


def _assert_still_serving(base: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        ok = client.get("/v1/users/u00001/recommendations", headers={"X-API-Key": KEY})
        assert ok.status_code == 200 and ok.json()["source"] == "model"


def test_a_one_megabyte_header_is_refused(server: tuple[str, int]) -> None:
    base, port = server
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    with _connect(port) as sock:
        answer = _send_until_refused(sock, head)
    assert not answer.startswith(b"HTTP/1.1 200")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    _assert_still_serving(base)


def test_an_unfinished_oversized_head_is_cut_off_without_waiting(server: tuple[str, int]) -> None:
    """The head never ends: the server must not buffer it until the read timeout."""
    base, port = server
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        time.sleep(0.1)  # the head begins in one read; the next reads are counted
        sent = 0
        try:
            while sent < 2 * MAX_HEADER_BYTES + 300_000:
                sock.sendall(b"b" * 8192)
                sent += 8192
                time.sleep(0.005)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, took = _read_until_closed(sock, 10)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b'"request_header_fields_too_large"' in answer or answer == b""
    assert took < READ_TIMEOUT  # cut for its size, not for its slowness
    _assert_still_serving(base)


def test_twenty_thousand_headers_are_refused(server: tuple[str, int]) -> None:
    base, port = server
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(20_000))
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"
    with _connect(port) as sock:
        answer = _send_until_refused(sock, head)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    _assert_still_serving(base)


def test_too_many_small_headers_are_431_json(server: tuple[str, int]) -> None:
    base, _ = server
    headers = {f"x-h{i}": "v" for i in range(MAX_HEADERS + 1)}
    response = httpx.get(f"{base}/healthz", headers=headers, timeout=10)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"


def test_a_slow_head_gets_408_within_the_read_timeout(server: tuple[str, int]) -> None:
    """One byte every 0.3 s kept the connection forever: each byte reset uvicorn's timer."""
    _, port = server
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        answer = b""
        try:
            while time.monotonic() - start < READ_TIMEOUT + 5:
                ready, _, _ = select.select([sock], [], [], 0.3)
                if ready:
                    break
                sock.sendall(b"X")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, _ = _read_until_closed(sock, 5)
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer
    assert READ_TIMEOUT - 0.5 < took < READ_TIMEOUT + 3


def test_a_silent_connection_is_closed(server: tuple[str, int]) -> None:
    _, port = server
    with _connect(port) as sock:
        answer, took = _read_until_closed(sock, READ_TIMEOUT + 5)
    assert answer == b"" and took > READ_TIMEOUT - 0.5


def test_a_stalled_body_is_closed(server: tuple[str, int]) -> None:
    _, port = server
    head = (
        b"POST /v1/recommendations HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with _connect(port) as sock:
        sock.sendall(head + b'{"user_id": ')
        answer, took = _read_until_closed(sock, READ_TIMEOUT + 5)
    assert not answer.startswith(b"HTTP/1.1 200")
    assert took < READ_TIMEOUT + 3


def test_an_idle_keep_alive_connection_is_closed(server: tuple[str, int]) -> None:
    _, port = server
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer, took = _read_until_closed(sock, KEEP_ALIVE + 5)
    assert answer.startswith(b"HTTP/1.1 200")
    assert took < KEEP_ALIVE + 3


def test_pipelined_requests_are_all_answered(server: tuple[str, int]) -> None:
    _, port = server
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(port) as sock:
        sock.sendall(one * 3 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer, _ = _read_until_closed(sock, 10)
    assert answer.count(b"HTTP/1.1 200") == 4


def test_auth_over_http(server: tuple[str, int]) -> None:
    base, _ = server
    with httpx.Client(base_url=base, timeout=10) as client:
        refused = client.get("/v1/model")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        model = client.get("/v1/model", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert model["uri"] is None and model["counts"]["users"] == 20


def test_serve_refuses_an_exposed_address_without_a_key(tmp_path: Path) -> None:
    """Before loading anything: the model path does not even exist."""
    cmd = [_tracktower(), "serve", "--model", str(tmp_path / "missing"), "--host", "0.0.0.0"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: refusing to serve on 0.0.0.0 without")
    assert len(done.stderr.strip().splitlines()) == 1
