"""HTTP API through TestClient: every endpoint, every class of bad request, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import brute_force, cached_artifact, fake_arrays, seen_of, user_id
from fastapi.testclient import TestClient

from tracktower.serving.app import create_app
from tracktower.serving.artifact import Recommender
from tracktower.serving.settings import Settings

ARRAYS = fake_arrays(50, 200, 8)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def client(artifact: Path) -> Iterator[TestClient]:
    settings = Settings(model_uri=str(artifact), max_k=50, max_batch_users=20)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _ids(body: dict[str, Any]) -> list[str]:
    return [item["track_id"] for item in body["items"]]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_user_recommendations_match_brute_force(client: TestClient) -> None:
    for u in (0, 13, 49):
        response = client.get(f"/v1/users/{user_id(u)}/recommendations", params={"k": 7})
        assert response.status_code == 200
        body = response.json()
        assert body["user_id"] == user_id(u)
        assert body["source"] == "model"
        assert body["model"] == {"name": "tracktower", "version": None}
        expected = brute_force(ARRAYS, ARRAYS["user_embeddings"][u], 7, seen_of(ARRAYS, u))
        assert _ids(body) == expected
        assert set(body["items"][0]) == {"track_id", "score", "title", "artist"}


def test_default_k_and_unknown_user(client: TestClient) -> None:
    body = client.get("/v1/users/somebody-new/recommendations").json()
    assert body["source"] == "popular"
    assert len(body["items"]) == 10


def test_single_user_responses_follow_the_documented_schema(client: TestClient) -> None:
    from tracktower.serving.schemas import RecommendationResponse

    for response in (
        client.get(f"/v1/users/{user_id(3)}/recommendations", params={"k": 7}),
        client.get("/v1/users/nobody/recommendations"),
        client.post("/v1/recommendations", json={"user_id": user_id(3), "k": 4}),
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        RecommendationResponse.model_validate(response.json(), strict=False)


def test_post_with_excludes(client: TestClient) -> None:
    top = _ids(client.get(f"/v1/users/{user_id(5)}/recommendations?k=3").json())
    response = client.post(
        "/v1/recommendations",
        json={"user_id": user_id(5), "k": 3, "exclude_track_ids": top[:2]},
    )
    assert response.status_code == 200
    ids = _ids(response.json())
    assert ids[0] == top[2] and not set(top[:2]) & set(ids)


def test_batch(client: TestClient) -> None:
    users = [user_id(1), "nobody", user_id(2)]
    response = client.post("/v1/recommendations:batch", json={"user_ids": users, "k": 4})
    assert response.status_code == 200
    body = response.json()
    assert [r["user_id"] for r in body["results"]] == users
    assert [r["source"] for r in body["results"]] == ["model", "popular", "model"]
    single = client.get(f"/v1/users/{user_id(2)}/recommendations?k=4").json()
    assert _ids(body["results"][2]) == _ids(single)


def test_model_summary(client: TestClient, artifact: Path) -> None:
    response = client.get("/v1/model")
    body = response.json()
    assert body["name"] == "tracktower"
    assert body["run_id"] == "0123456789abcdef"
    assert body["embedding_dim"] == 8
    assert body["counts"]["users"] == 50 and body["counts"]["tracks"] == 200
    assert body["dataset"]["fingerprint"] == "f" * 64
    assert body["metrics"]["test_recall_at_10"] == 0.25
    # A local directory is not shown: no filesystem path anywhere in the answer.
    assert body["uri"] is None
    assert str(artifact.parent) not in response.text and "/tmp" not in response.text
    # The index the model ranks with, as measured at export (exact: recall 1 by definition).
    assert body["index"] == {
        "backend": "exact",
        "params": {},
        "recall_at_10": 1.0,
        "recall_at_100": 1.0,
        "build_seconds": body["index"]["build_seconds"],
        "sample_users": 50,
    }


BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    ("get", "/v1/users/u00001/recommendations?k=0", None, 422, "k"),
    ("get", "/v1/users/u00001/recommendations?k=51", None, 422, "k"),
    ("get", "/v1/users/u00001/recommendations?k=abc", None, 422, "k"),
    ("get", "/v1/users/u00001/recommendations?k=1.5", None, 422, "k"),
    ("get", "/v1/users/%20/recommendations", None, 422, "user_id"),
    ("get", "/v1/users/" + "x" * 300 + "/recommendations", None, 422, "user_id"),
    ("get", "/v1/users//recommendations", None, 404, None),
    ("post", "/v1/recommendations", {"user_id": ""}, 422, "user_id"),
    ("post", "/v1/recommendations", {"user_id": "y" * 300}, 422, "user_id"),
    ("post", "/v1/recommendations", {"user_id": 12}, 422, "user_id"),
    # A list where a string is expected is refused, never turned into the string "['u00001']".
    ("post", "/v1/recommendations", {"user_id": ["u00001"]}, 422, "user_id"),
    (
        "post",
        "/v1/recommendations",
        {"user_id": "u1", "exclude_track_ids": [["t"]]},
        422,
        "exclude_track_ids[0]",
    ),
    ("post", "/v1/recommendations:batch", {"user_ids": [["u00001"]]}, 422, "user_ids[0]"),
    ("post", "/v1/recommendations:batch", {"user_ids": [{"id": "u00001"}]}, 422, "user_ids[0]"),
    ("post", "/v1/recommendations", {"user_id": "u1", "k": "10"}, 422, "k"),
    ("post", "/v1/recommendations", {"user_id": "u1", "k": 0}, 422, "k"),
    ("post", "/v1/recommendations", {"user_id": "u1", "k": True}, 422, "k"),
    ("post", "/v1/recommendations", {"k": 3}, 422, "user_id"),
    ("post", "/v1/recommendations", {"user_id": "u1", "colour": "red"}, 422, "colour"),
    ("post", "/v1/recommendations", ["u1"], 422, None),
    (
        "post",
        "/v1/recommendations",
        {"user_id": "u1", "exclude_track_ids": ["t1", ""]},
        422,
        "exclude_track_ids[1]",
    ),
    (
        "post",
        "/v1/recommendations",
        {"user_id": "u1", "recent_track_ids": "t1"},
        422,
        "recent_track_ids",
    ),
    ("post", "/v1/recommendations:batch", {"user_ids": []}, 422, "user_ids"),
    ("post", "/v1/recommendations:batch", {"user_ids": ["a"] * 21}, 422, "user_ids"),
    ("post", "/v1/recommendations:batch", {"user_ids": ["a", ""]}, 422, "user_ids[1]"),
    ("post", "/v1/recommendations:batch", {"user_ids": ["a"], "k": 99}, 422, "k"),
    ("post", "/v1/recommendations:batch", {"user_ids": "a"}, 422, "user_ids"),
    ("delete", "/v1/model", None, 405, None),
    ("get", "/v2/nothing", None, 404, None),
]


@pytest.mark.parametrize(("method", "url", "body", "status", "field"), BAD_REQUESTS)
def test_bad_requests_are_json_4xx(
    client: TestClient, method: str, url: str, body: Any, status: int, field: str | None
) -> None:
    response = client.request(method, url, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"}
    assert error["field"] == field
    assert "Traceback" not in response.text
    # The server keeps answering correctly afterwards.
    ok = client.get(f"/v1/users/{user_id(0)}/recommendations?k=2")
    assert ok.status_code == 200 and len(ok.json()["items"]) == 2


@pytest.mark.parametrize(
    "raw",
    [b'{"user_id": "u1", ', b"not json", b'{"user_id": "u1"}}'],
)
def test_malformed_json(client: TestClient, raw: bytes) -> None:
    response = client.post(
        "/v1/recommendations", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"


def test_wrong_content_type(client: TestClient) -> None:
    response = client.post(
        "/v1/recommendations", content=b"user_id=u1", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_metrics_count_requests_and_sources(client: TestClient) -> None:
    before = client.get("/metrics").text
    client.get(f"/v1/users/{user_id(4)}/recommendations")
    client.get("/v1/users/ghost/recommendations")
    client.get("/v1/users/ghost/recommendations?k=0")
    text = client.get("/metrics").text
    assert response_count(text, "200") == response_count(before, "200") + 2
    assert response_count(text, "422") == response_count(before, "422") + 1
    assert sample(text, 'tracktower_recommendations_total{source="popular"}') >= 1
    assert sample(text, 'tracktower_model_info{name="tracktower",version=""}') == 1
    assert "tracktower_http_request_duration_seconds_bucket" in text
    assert "ghost" not in text  # labels use the route template, not the raw path


def response_count(text: str, status: str) -> float:
    labels = f'method="GET",route="/v1/users/{{user_id}}/recommendations",status="{status}"'
    return sample(text, f"tracktower_http_requests_total{{{labels}}}")


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_not_ready_until_lifespan_ran(artifact: Path) -> None:
    app = create_app(Settings(model_uri=str(artifact)))
    client = TestClient(app)  # no context manager: lifespan never runs
    assert client.get("/healthz").json() == {"status": "loading"}
    for url in ["/readyz", "/v1/model", "/v1/users/u00001/recommendations"]:
        response = client.get(url)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "not_ready"


def test_injected_recommender_and_session(tmp_path_factory: pytest.TempPathFactory) -> None:
    rec = Recommender.load(cached_artifact(tmp_path_factory, with_history_tower=True))
    with TestClient(create_app(Settings(model_uri="unused"), recommender=rec)) as client:
        body = client.post(
            "/v1/recommendations",
            json={"user_id": "new", "k": 5, "recent_track_ids": ["t000003", "t000004"]},
        ).json()
        assert body["source"] == "session"
        query = ARRAYS["track_embeddings"][[3, 4]].mean(axis=0)
        assert _ids(body) == brute_force(ARRAYS, query, 5, {3, 4})
        text = client.get("/metrics").text
        assert sample(text, 'tracktower_recommendations_total{source="session"}') == 1


def test_startup_fails_for_missing_model(tmp_path: Path) -> None:
    app = create_app(Settings(model_uri=str(tmp_path / "missing")))
    with pytest.raises(Exception, match="no such model directory"), TestClient(app):
        pass


def test_scores_are_the_dot_products(client: TestClient) -> None:
    body = client.get(f"/v1/users/{user_id(9)}/recommendations?k=3").json()
    rows = [int(item["track_id"][1:]) for item in body["items"]]
    expected = ARRAYS["track_embeddings"][rows] @ ARRAYS["user_embeddings"][9]
    np.testing.assert_allclose([item["score"] for item in body["items"]], expected, rtol=1e-6)


def test_settings_reject_inconsistent_limits() -> None:
    with pytest.raises(ValueError, match="default_k"):
        Settings(default_k=20, max_k=10)


def test_oversized_bodies_are_413_json(artifact: Path) -> None:
    settings = Settings(model_uri=str(artifact), max_body_bytes=2048)
    with TestClient(create_app(settings)) as client:
        big = {"user_ids": ["x" * 100] * 50}
        declared = client.post("/v1/recommendations:batch", json=big)
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "payload_too_large"

        def chunks() -> Iterator[bytes]:
            yield b'{"user_ids": ['
            for _ in range(50):
                yield b'"' + b"x" * 100 + b'",'

        streamed = client.post(
            "/v1/recommendations:batch",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert streamed.status_code == 413
        assert streamed.json()["error"]["code"] == "payload_too_large"
        assert client.post("/v1/recommendations:batch", json={"user_ids": ["a"]}).status_code == 200


def test_unexpected_errors_are_generic_500(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recommender.load(artifact)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(rec, "recommend", boom)
    app = create_app(Settings(model_uri="unused"), recommender=rec)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/users/u00001/recommendations")
        assert response.status_code == 500
        assert response.json() == {
            "error": {"code": "internal_error", "message": "internal server error", "field": None}
        }
        assert "secret" not in response.text
        assert client.get("/healthz").status_code == 200
        assert response_count(client.get("/metrics").text, "500") == 1
    assert "secret internals" in caplog.text


def test_openapi_documents_the_api(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v1/users/{user_id}/recommendations",
        "/v1/recommendations",
        "/v1/recommendations:batch",
        "/v1/model",
        "/healthz",
        "/readyz",
    } <= set(paths)


def test_metrics_children_are_cached_and_methods_bounded() -> None:
    from tracktower.serving.metrics import Metrics

    metrics = Metrics()
    for method in ("GET", "GET", "BREW", "PROPFIND"):
        metrics.observe_request("/healthz", method, 200, 0.002)
    metrics.count_source("popular", 3)
    text = metrics.render().decode()
    labels = 'method="{}",route="/healthz",status="200"'
    assert sample(text, "tracktower_http_requests_total{" + labels.format("GET") + "}") == 2
    assert sample(text, "tracktower_http_requests_total{" + labels.format("OTHER") + "}") == 2
    assert "BREW" not in text and "PROPFIND" not in text
    assert sample(text, 'tracktower_recommendations_total{source="popular"}') == 3
    assert len(metrics._http) == 2


def test_heap_is_frozen_while_serving(artifact: Path) -> None:
    import gc

    with TestClient(create_app(Settings(model_uri=str(artifact)))) as client:
        assert gc.get_freeze_count() > 0
        assert client.get("/readyz").status_code == 200
    assert gc.get_freeze_count() == 0
