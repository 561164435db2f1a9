"""API keys: which paths need one, how it is sent and compared, and what the OpenAPI declares."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import cached_artifact, user_id
from fastapi.testclient import TestClient

from tracktower.serving import auth
from tracktower.serving.app import create_app
from tracktower.serving.settings import Settings

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-FEDCBA9876543210"
USER_URL = f"/v1/users/{user_id(1)}/recommendations"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


def _client(artifact: Path, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(model_uri=str(artifact), **settings)))


@pytest.fixture(scope="module")
def client(artifact: Path) -> Iterator[TestClient]:
    with _client(artifact, api_keys=f"{KEY_A},{KEY_B}") as test_client:
        yield test_client


def _is_401(response: Any) -> bool:
    if response.status_code != 401:
        return False
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"} and error["code"] == "unauthorized"
    assert "Authorization: Bearer" in error["message"] and "X-API-Key" in error["message"]
    return True


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-0123456789"},
        {"Authorization": f"Bearer {KEY_A[:-1]}"},  # a prefix of a key
        {"Authorization": f"Bearer {KEY_A}x"},  # a key plus more
        {"Authorization": f"Basic {KEY_A}"},  # the right key under another scheme
        {"Authorization": KEY_A},
        {"X-API-Key": KEY_A.upper()},
        {"X-Api-Key": ""},
    ],
)
def test_requests_without_a_valid_key_are_401(client: TestClient, headers: dict[str, str]) -> None:
    assert _is_401(client.get(USER_URL, headers=headers))
    assert _is_401(client.post("/v1/recommendations:batch", json={"user_ids": ["a"]}))


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY_A}"},
        {"Authorization": f"bearer  {KEY_B} "},
        {"X-API-Key": KEY_B},
        {"Authorization": "Bearer wrong-key-0123456789", "X-API-Key": KEY_A},
    ],
)
def test_either_header_with_any_configured_key_passes(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.get(USER_URL, headers=headers)
    assert response.status_code == 200 and response.json()["source"] == "model"
    body = {"user_ids": [user_id(2)], "k": 2}
    assert client.post("/v1/recommendations:batch", json=body, headers=headers).status_code == 200


def test_health_is_open_metrics_closed_docs_open_by_default(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert _is_401(client.get("/metrics"))
    assert client.get("/metrics", headers={"X-API-Key": KEY_A}).status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert _is_401(client.get("/v1/model"))


def test_unknown_paths_are_401_before_routing(client: TestClient) -> None:
    """A caller without a key cannot tell which routes exist."""
    assert _is_401(client.get("/v2/nothing"))
    assert client.get("/v2/nothing", headers={"X-API-Key": KEY_A}).status_code == 404


def test_settings_open_metrics_and_close_docs(artifact: Path) -> None:
    settings = {"api_keys": KEY_A, "metrics_public": True, "docs_public": False}
    with _client(artifact, **settings) as client:
        assert client.get("/metrics").status_code == 200
        for url in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
            assert _is_401(client.get(url)), url
        assert client.get("/openapi.json", headers={"X-API-Key": KEY_A}).status_code == 200


def test_openapi_declares_the_key_schemes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes[auth.BEARER_SCHEME] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key",
    }
    assert schemes[auth.API_KEY_SCHEME] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    either: list[dict[str, list[str]]] = [{auth.BEARER_SCHEME: []}, {auth.API_KEY_SCHEME: []}]
    for path in ("/v1/users/{user_id}/recommendations", "/v1/recommendations:batch", "/v1/model"):
        for operation in spec["paths"][path].values():
            assert operation["security"] == either
            assert "401" in operation["responses"]
    for path in ("/healthz", "/readyz"):
        assert "security" not in spec["paths"][path]["get"]
    assert client.get("/openapi.json").json() == spec  # declared once, not again per call


def test_no_keys_means_no_auth_middleware_and_no_scheme(artifact: Path) -> None:
    app = create_app(Settings(model_uri=str(artifact)))
    assert auth.ApiKeyAuth not in {m.cls for m in app.user_middleware}
    with TestClient(app) as client:
        assert client.get(USER_URL).status_code == 200
        assert client.get("/metrics").status_code == 200
        assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


def test_every_key_is_compared_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the work done does not depend on which key (if any) matched."""
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    digests = auth.key_digests([KEY_A, KEY_B, "key-c-0000000000000000"])
    for key in (KEY_A, KEY_B, "nope"):
        calls.clear()
        matched = auth.is_authorized([(b"x-api-key", key.encode())], digests)
        assert matched == (key != "nope")
        assert len(calls) == 3
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: no length to leak


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ()),
        (" , ,", ()),
        (f" {KEY_A} ,{KEY_B},, ", (KEY_A, KEY_B)),
        (f"{KEY_A},{KEY_A}", (KEY_A,)),
        ([KEY_B, f" {KEY_A}"], (KEY_B, KEY_A)),
    ],
)
def test_api_keys_setting_is_parsed_robustly(raw: Any, expected: tuple[str, ...]) -> None:
    settings = Settings(api_keys=raw)
    assert tuple(k.get_secret_value() for k in settings.api_keys) == expected
    assert settings.auth_enabled == bool(expected)
    assert KEY_A not in repr(settings)


@pytest.mark.parametrize("bad", ["short", "has space inside-0123456789", "ключ-0123456789abcdef"])
def test_unusable_api_keys_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(ValueError, match="API key 2 must be at least 16 characters") as info:
        Settings(api_keys=f"{KEY_A},{bad}")
    assert bad not in str(info.value)


def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKTOWER_API_KEYS", f"{KEY_A}, {KEY_B}")
    assert [k.get_secret_value() for k in Settings().api_keys] == [KEY_A, KEY_B]
