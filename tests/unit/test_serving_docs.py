"""The API description: offline docs pages, the document's settings-bound constraints and
examples, and the popularity fallback's numbers in their own field.

That the document is exactly as strict as the server, request by request, is the schemathesis
test's job (tests/integration/test_openapi_schemathesis.py); here are the parts it cannot see:
the pages, the regexes over every character, and values that follow the settings.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import cached_artifact, user_id
from fastapi.testclient import TestClient

from tracktower.serving import docs
from tracktower.serving.app import create_app
from tracktower.serving.schemas import ID_PATTERN, PATH_ID_PATTERN, SETTINGS_KEY
from tracktower.serving.settings import Settings

KEY = "docs-key-0123456789abcdef"
USER_URL = "/v1/users/{user_id}/recommendations"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def client(artifact: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_uri=str(artifact)))) as test_client:
        yield test_client


def _local_urls(html: str) -> list[str]:
    """Every src/href in the page, plus the document URL Swagger UI is given."""
    return re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)


@pytest.mark.parametrize("page", [docs.DOCS_URL, docs.REDOC_URL])
def test_docs_pages_load_everything_from_the_app(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "://" not in response.text  # no CDN, no fonts: nothing outside the server
    urls = _local_urls(response.text)
    assert len(urls) >= 2, urls
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url


def test_swagger_ui_is_a_version_that_renders_openapi_3_1(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    bundle = client.get(f"{docs.ASSETS_URL}/{docs.SWAGGER_JS}").text
    major = re.search(r'PACKAGE_VERSION:"(\d+)\.', bundle)
    assert major is not None and int(major.group(1)) >= 5  # 4.x cannot render OpenAPI 3.1
    css = client.get(f"{docs.ASSETS_URL}/{docs.SWAGGER_CSS}")
    assert css.headers["content-type"].startswith("text/css")


def test_no_cdn_pages_are_left(client: TestClient) -> None:
    paths = [getattr(route, "path", None) for route in client.app.routes]  # type: ignore[attr-defined]
    assert paths.count(docs.DOCS_URL) == 1 and paths.count(docs.REDOC_URL) == 1
    assert client.get(f"{docs.ASSETS_URL}/nothing.js").status_code == 404


@pytest.mark.parametrize("docs_public", [True, False])
def test_docs_and_their_assets_follow_docs_public(artifact: Path, docs_public: bool) -> None:
    settings = Settings(model_uri=str(artifact), api_keys=KEY, docs_public=docs_public)
    urls = [
        "/openapi.json",
        docs.DOCS_URL,
        docs.REDOC_URL,
        "/docs/oauth2-redirect",
        f"{docs.ASSETS_URL}/{docs.SWAGGER_JS}",
        f"{docs.ASSETS_URL}/{docs.REDOC_JS}",
    ]
    with TestClient(create_app(settings)) as client:
        spec = client.get("/openapi.json", headers={"X-API-Key": KEY}).json()
        assert "Bearer KEY" in spec["info"]["description"]
        for url in urls:
            expected = 200 if docs_public else 401
            assert client.get(url).status_code == expected, url
            assert client.get(url, headers={"X-API-Key": KEY}).status_code == 200, url
        assert client.get(USER_URL.format(user_id="u1")).status_code == 401


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _spec(artifact: Path, **settings: Any) -> dict[str, Any]:
    app = create_app(Settings(model_uri=str(artifact), **settings))
    spec: dict[str, Any] = app.openapi()
    return spec


def test_the_document_states_this_apps_limits(artifact: Path) -> None:
    limits = {"max_k": 7, "default_k": 3, "max_id_length": 9, "max_track_ids": 4}
    spec = _spec(artifact, max_batch_users=5, max_body_bytes=4096, **limits)
    assert SETTINGS_KEY not in json.dumps(spec)
    assert "k from 1 to 7 (default 3)" in spec["info"]["description"]
    assert "no API key" in spec["info"]["description"]
    schemas = spec["components"]["schemas"]
    request = schemas["RecommendRequest"]["properties"]
    integer = next(s for s in request["k"]["anyOf"] if s.get("type") == "integer")
    assert (integer["minimum"], integer["maximum"], request["k"]["default"]) == (1, 7, 3)
    assert request["user_id"]["maxLength"] == 9 and request["user_id"]["minLength"] == 1
    for field in ("exclude_track_ids", "recent_track_ids"):
        assert request[field]["maxItems"] == 4 and request[field]["items"]["maxLength"] == 9
    batch = schemas["BatchRequest"]["properties"]["user_ids"]
    assert (batch["minItems"], batch["maxItems"], batch["items"]["maxLength"]) == (1, 5, 9)
    assert schemas["BatchRequest"]["additionalProperties"] is False
    params = {p["name"]: p for p in spec["paths"][USER_URL]["get"]["parameters"]}
    # A query string cannot carry null: k is a plain integer there, with its default.
    assert params["k"]["schema"]["type"] == "integer" and "anyOf" not in params["k"]["schema"]
    assert (params["k"]["schema"]["maximum"], params["k"]["schema"]["default"]) == (7, 3)
    assert params["user_id"]["schema"]["maxLength"] == 9
    assert params["user_id"]["schema"]["pattern"] == PATH_ID_PATTERN
    responses = spec["paths"]["/v1/recommendations"]["post"]["responses"]
    assert "4096 bytes" in responses["413"]["description"]
    example = responses["422"]["content"]["application/json"]["example"]["error"]
    assert example["message"] == "k must be between 1 and 7"
    # Another app, other settings: nothing is shared between the two documents.
    other = _spec(artifact)["components"]["schemas"]["RecommendRequest"]["properties"]
    assert other["user_id"]["maxLength"] == 256 and other["k"]["default"] == 10


def test_every_answer_an_operation_can_give_is_declared(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert {"200", "431", "500", "503"} <= set(responses), (method, path)
            assert list(responses) == sorted(responses), (method, path)
            assert ("413" in responses) == ("requestBody" in operation), (method, path)
            for status, response in responses.items():
                if status.startswith(("4", "5")):  # an example in the real shape, not k's
                    error = response["content"]["application/json"]["example"]["error"]
                    assert set(error) == {"code", "message", "field"}, (path, status)
                    assert (error["field"] == "k") == (status == "422"), (path, status)
    user = spec["paths"][USER_URL]["get"]["responses"]
    assert {"404", "422", "503"} <= set(user)
    batch = spec["paths"]["/v1/recommendations:batch"]["post"]["responses"]
    assert {"400", "422", "503", "504"} <= set(batch)
    assert batch["503"]["headers"]["Retry-After"]["required"] is True
    assert "401" not in json.dumps(spec["paths"])  # no keys configured: no 401 anywhere


def test_try_it_out_examples_succeed(client: TestClient) -> None:
    """Every example the docs page pre-fills is answered 200, and none is the k: 0 that
    Swagger UI would otherwise invent from the bare integer type."""
    spec = client.get("/openapi.json").json()
    sent = 0
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            content = operation.get("requestBody", {}).get("content", {})
            for example in content.get("application/json", {}).get("examples", {}).values():
                assert example["value"].get("k", 1) >= 1
                response = client.request(method, path, json=example["value"])
                assert response.status_code == 200, (path, example, response.text)
                sent += 1
            for parameter in operation.get("parameters", ()):
                for example in parameter.get("examples", {}).values():
                    url = path.replace("{" + parameter["name"] + "}", example["value"])
                    assert client.request(method, url).status_code == 200, url
                    sent += 1
    assert sent >= 4


def test_the_id_pattern_is_exactly_the_servers_blank_check() -> None:
    """Over every Unicode character: the pattern finds a character iff ``str.strip()`` keeps it,
    which is what the routers test (ECMA's and Rust's ``\\s`` differ from Python's)."""
    pattern = re.compile(ID_PATTERN)
    for code in range(0x110000):
        char = chr(code)
        assert bool(pattern.search(char)) == bool(char.strip()), hex(code)


def _reachable_segment(value: str) -> bool:
    """The server's rule (not blank) plus what a URL path can carry as one segment."""
    return bool(value.strip()) and "/" not in value and value not in {".", ".."}


def test_the_path_id_pattern_is_one_non_blank_segment() -> None:
    pattern = re.compile(PATH_ID_PATTERN)
    chosen = [".", "..", "...", ". ", " .", ".\n", "\u3000.", "a/b", "/", "", " ", "\u2028", "u1"]
    rng = random.Random(0)
    alphabet = [".", "/", " ", "\t", "\u00a0", "\x1c", "a", "\u00e9", "\U0001f600", "\n"]
    generated = ["".join(rng.choices(alphabet, k=rng.randint(0, 5))) for _ in range(20_000)]
    for value in chosen + generated:
        assert bool(pattern.search(value)) == _reachable_segment(value), repr(value)


def test_a_marker_naming_no_setting_is_refused() -> None:
    with pytest.raises(KeyError, match="max_kk"):
        docs.fill_settings({"maximum": 1, SETTINGS_KEY: {"maximum": "max_kk"}}, Settings())


def test_popular_fallback_counts_listeners_not_scores(client: TestClient) -> None:
    """The fallback's numbers are listener counts, in their own field; scores stay the model's."""
    popular = client.get(USER_URL.format(user_id="somebody-new"), params={"k": 3}).json()
    assert popular["source"] == "popular"
    for item in popular["items"]:
        assert item["score"] is None and isinstance(item["listeners"], int)
    counts = [item["listeners"] for item in popular["items"]]
    assert counts == sorted(counts, reverse=True)
    model = client.get(USER_URL.format(user_id=user_id(3)), params={"k": 3}).json()
    assert model["source"] == "model"
    assert all(isinstance(i["score"], float) and "listeners" not in i for i in model["items"])
    batch = client.post(
        "/v1/recommendations:batch", json={"user_ids": ["somebody-new", user_id(3)], "k": 3}
    ).json()["results"]
    assert batch[0]["items"] == popular["items"] and batch[1]["items"] == model["items"]
    spec = client.get("/openapi.json").json()["components"]["schemas"]["RecommendedItem"]
    assert "popular" in spec["properties"]["score"]["description"]
    assert "popular" in spec["properties"]["listeners"]["description"]


@pytest.mark.parametrize(("k", "status"), [(4.0, 200), (4.5, 422), (True, 422), ("4", 422)])
def test_k_is_a_json_schema_integer(client: TestClient, k: Any, status: int) -> None:
    """The document says ``integer``, which in JSON Schema includes 4.0: so does the server."""
    response = client.post("/v1/recommendations", json={"user_id": "u1", "k": k})
    assert response.status_code == status, response.text
    if status == 200:
        assert len(response.json()["items"]) == 4
