"""Limits inside the app: header count and size (431), the batch gate (503) and deadline (504);
and the HTTP protocol's answer over the connection limit (503), on an in-process server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import cached_artifact, user_id
from fastapi.testclient import TestClient

from tracktower.serving.app import create_app
from tracktower.serving.artifact import Recommender
from tracktower.serving.routers.recommendations import BATCH_BLOCK
from tracktower.serving.settings import Settings

USERS = 50
USER_URL = f"/v1/users/{user_id(1)}/recommendations"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def client(artifact: Path) -> Iterator[TestClient]:
    settings = Settings(model_uri=str(artifact), max_headers=20, max_header_bytes=2048)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"} and error["code"] == code
    return str(error["message"])


def test_too_many_headers_is_431(client: TestClient) -> None:
    ok = {f"x-h{i}": "v" for i in range(10)}
    assert client.get(USER_URL, headers=ok).status_code == 200
    many = {f"x-h{i}": "v" for i in range(20)}
    message = _error(client.get(USER_URL, headers=many), 431, "request_header_fields_too_large")
    assert message == "more than 20 header fields"
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        (USER_URL, {"x-big": "v" * 2100}),
        (USER_URL, {f"x-h{i}": "v" * 200 for i in range(12)}),
        (USER_URL + "?k=5&pad=" + "p" * 2100, {}),
    ],
)
def test_oversized_heads_are_431(client: TestClient, url: str, headers: dict[str, str]) -> None:
    message = _error(client.get(url, headers=headers), 431, "request_header_fields_too_large")
    assert message == "request line and headers over 2048 bytes"


def _slow_app(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, block: Any, **settings: Any
) -> tuple[TestClient, Recommender, list[int]]:
    """An app whose recommender calls ``block()`` before each batch block it scores."""
    rec = Recommender.load(artifact)
    real = rec.recommend_batch
    calls: list[int] = []

    def recommend_batch(user_ids: list[str], k: int) -> Any:
        calls.append(len(user_ids))
        block()
        return real(user_ids, k)

    monkeypatch.setattr(rec, "recommend_batch", recommend_batch)
    app = create_app(Settings(model_uri="unused", max_batch_users=1000, **settings), rec)
    return TestClient(app), rec, calls


def test_batch_beyond_the_concurrency_limit_is_503_at_once(
    artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    client, _, _ = _slow_app(
        artifact, monkeypatch, lambda: release.wait(30), max_concurrent_batches=1
    )
    body = {"user_ids": [user_id(1), user_id(2)], "k": 3}
    first: list[Any] = []
    with client:
        gate = client.app.state.batch_gate  # type: ignore[attr-defined]
        worker = threading.Thread(
            target=lambda: first.append(client.post("/v1/recommendations:batch", json=body))
        )
        worker.start()
        try:
            deadline = time.monotonic() + 20
            while gate.active < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert gate.active == 1
            # The batch in progress runs off the event loop: other routes still answer.
            assert client.get("/healthz").status_code == 200
            assert client.get(USER_URL).status_code == 200
            start = time.monotonic()
            refused = client.post("/v1/recommendations:batch", json=body)
            assert time.monotonic() - start < 5  # not queued behind the running batch
            message = _error(refused, 503, "busy")
            assert "1 batch requests are already in progress" in message
            assert refused.headers["retry-after"] == "1"
        finally:
            release.set()
            worker.join(30)
        assert first[0].status_code == 200 and len(first[0].json()["results"]) == 2
        assert gate.active == 0
        assert client.post("/v1/recommendations:batch", json=body).status_code == 200


def test_batch_past_its_deadline_is_504_and_stops_scoring(
    artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _, calls = _slow_app(
        artifact, monkeypatch, lambda: time.sleep(0.15), request_timeout_seconds=0.2
    )
    blocks = 10
    users = [user_id(i % USERS) for i in range(BATCH_BLOCK * blocks)]
    with client:
        response = client.post("/v1/recommendations:batch", json={"user_ids": users, "k": 2})
        message = _error(response, 504, "deadline_exceeded")
        assert f"batch of {len(users)} users not scored within 0.2 s" in message
        assert len(calls) < blocks  # scoring stopped at the deadline, not at the end
        assert client.app.state.batch_gate.active == 0  # type: ignore[attr-defined]
        metrics = client.get("/metrics").text  # nothing counted for an unanswered batch
        assert 'tracktower_recommendations_total{source="model"} 0.0' in metrics
        calls.clear()
        small = client.post("/v1/recommendations:batch", json={"user_ids": users[:3], "k": 2})
        assert small.status_code == 200 and calls == [3]


def test_blocked_batch_equals_one_pass(artifact: Path) -> None:
    rec = Recommender.load(artifact)
    users = [user_id(i % USERS) for i in range(2 * BATCH_BLOCK + 7)] + ["nobody"]
    app = create_app(Settings(model_uri="unused", max_batch_users=1000), rec)
    with TestClient(app) as client:
        body = client.post("/v1/recommendations:batch", json={"user_ids": users, "k": 5}).json()
    whole = rec.recommend_batch(users, 5)
    assert [r["user_id"] for r in body["results"]] == users
    assert [r["source"] for r in body["results"]] == [rec.source for rec in whole]
    got = [[i["track_id"] for i in r["items"]] for r in body["results"]]
    assert got == [[item.track_id for item in rec.items] for rec in whole]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_over_the_connection_limit_is_503_json_with_retry_after() -> None:
    """uvicorn's own answer is plain text; the limited protocol answers in the error shape."""
    import socket

    import httpx
    import uvicorn

    from tracktower.serving.protocol import PROTOCOL

    port = _free_port()
    config = uvicorn.Config(
        _ok, host="127.0.0.1", port=port, http=PROTOCOL, loop="asyncio", lifespan="off",
        limit_concurrency=2, log_level="error",
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base, timeout=10).text == "ok"
        with socket.create_connection(("127.0.0.1", port), timeout=10):  # holds one of two
            time.sleep(0.2)
            refused = httpx.get(base, timeout=10)
        assert _error(refused, 503, "busy").startswith("the server is at its limit of 2 ")
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        assert refused.headers["content-type"] == "application/json"
        deadline = time.monotonic() + 10  # the held connection is gone: served again
        while httpx.get(base, timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(30)
