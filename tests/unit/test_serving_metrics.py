"""Metrics: route labels of answers given before routing, model gauges across a swap, and the
multiprocess mode that aggregates several workers (in child processes: the mode is chosen when
prometheus-client is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import cached_artifact, user_id
from fastapi.testclient import TestClient

from tracktower.serving.app import create_app
from tracktower.serving.metrics import (
    MULTIPROC_ENV,
    UNMATCHED,
    Metrics,
    mark_worker_dead,
    multiprocess_dir,
)
from tracktower.serving.settings import Settings

KEY = "metrics-key-0123456789"
USER_ROUTE = "/v1/users/{user_id}/recommendations"
BATCH_ROUTE = "/v1/recommendations:batch"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    artifact = cached_artifact(tmp_path_factory)
    settings = Settings(model_uri=str(artifact), api_keys=KEY, max_headers=20, max_body_bytes=2048)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def count(text: str, route: str, method: str, status: int) -> float:
    labels = f'method="{method}",route="{route}",status="{status}"'
    prefix = f"tracktower_http_requests_total{{{labels}}} "
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def scrape(client: TestClient) -> str:
    response = client.get("/metrics", headers={"X-API-Key": KEY})
    assert response.status_code == 200
    return response.text


def test_401s_are_labelled_with_the_route_they_were_aimed_at(client: TestClient) -> None:
    before = scrape(client)
    assert client.get(f"/v1/users/{user_id(1)}/recommendations").status_code == 401
    assert client.get("/v1/users/someone-else/recommendations").status_code == 401
    assert client.post(BATCH_ROUTE, json={"user_ids": ["a"]}).status_code == 401
    assert client.get(BATCH_ROUTE).status_code == 401  # would be 405: the path is the route's
    assert client.get("/v1/model").status_code == 401
    assert client.get("/no/such/path").status_code == 401
    after = scrape(client)
    for route, method, n in [
        (USER_ROUTE, "GET", 2),
        (BATCH_ROUTE, "POST", 1),
        (BATCH_ROUTE, "GET", 1),
        ("/v1/model", "GET", 1),
        (UNMATCHED, "GET", 1),
    ]:
        assert count(after, route, method, 401) - count(before, route, method, 401) == n, route
    assert "someone-else" not in after and "/no/such/path" not in after


def test_431_and_413_are_labelled_with_their_route(client: TestClient) -> None:
    before = scrape(client)
    many = {f"x-h{i}": "v" for i in range(25)}
    assert client.get("/v1/model", headers=many).status_code == 431
    big = {"user_ids": ["x" * 100] * 50}
    assert client.post(BATCH_ROUTE, json=big, headers={"X-API-Key": KEY}).status_code == 413
    after = scrape(client)
    assert count(after, "/v1/model", "GET", 431) - count(before, "/v1/model", "GET", 431) == 1
    assert count(after, BATCH_ROUTE, "POST", 413) - count(before, BATCH_ROUTE, "POST", 413) == 1


def test_a_404_stays_unmatched(client: TestClient) -> None:
    before = scrape(client)
    assert client.get("/nowhere", headers={"X-API-Key": KEY}).status_code == 404
    assert count(scrape(client), UNMATCHED, "GET", 404) - count(before, UNMATCHED, "GET", 404) == 1


def test_a_model_swap_leaves_one_model_info_series() -> None:
    metrics = Metrics()
    assert not metrics.multiprocess
    metrics.set_model("tracktower", "3")
    metrics.set_model("tracktower", "4")
    text = metrics.render().decode()
    assert 'tracktower_model_info{name="tracktower",version="4"} 1.0' in text
    assert 'version="3"' not in text and "tracktower_model_loaded 1.0" in text
    metrics.unset_model()
    text = metrics.render().decode()
    assert "tracktower_model_info{" not in text and "tracktower_model_loaded 0.0" in text


def test_multiprocess_dir_is_fresh_private_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"left by an earlier server")
    monkeypatch.setenv(MULTIPROC_ENV, str(stale))
    with multiprocess_dir(2) as path:
        assert path is not None and os.environ[MULTIPROC_ENV] == path
        assert Path(path) != stale and not list(Path(path).iterdir())
        assert (os.stat(path).st_mode & 0o777) == 0o700
    assert not Path(path).exists() and os.environ[MULTIPROC_ENV] == str(stale)
    with multiprocess_dir(1) as none:
        assert none is None and MULTIPROC_ENV not in os.environ  # one worker: own registry
    assert os.environ[MULTIPROC_ENV] == str(stale)


WORKER = textwrap.dedent(
    """
    import sys
    from tracktower.serving.metrics import Metrics
    metrics = Metrics()
    assert metrics.multiprocess
    metrics.set_model("tracktower", sys.argv[1])
    for _ in range(int(sys.argv[2])):
        metrics.observe_request("/v1/model", "GET", 200, 0.003)
    print(metrics.render().decode())
    """
)


def _worker(directory: Path, version: str, requests: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, MULTIPROC_ENV: str(directory)}
    return subprocess.run(
        [sys.executable, "-c", WORKER, version, str(requests)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _merged(directory: Path) -> str:
    """What a worker's /metrics shows, read from the files by this (single-process) test."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return generate_latest(registry).decode()


def test_multiprocess_mode_sums_workers_and_forgets_dead_ones_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _worker(tmp_path, "3", 5).stdout
    assert count(first, "/v1/model", "GET", 200) == 5
    second = _worker(tmp_path, "4", 7).stdout  # any worker's /metrics sees every worker's files
    assert count(second, "/v1/model", "GET", 200) == 12
    assert 'tracktower_http_request_duration_seconds_count{method="GET"' in second
    assert second.count("tracktower_model_info{") == 2  # one series per live worker (pid)
    assert "tracktower_model_loaded 1.0" in second
    pids = sorted(int(f.stem.rsplit("_", 1)[1]) for f in tmp_path.glob("gauge_liveall_*.db"))
    assert len(pids) == 2
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    mark_worker_dead(pids[0])
    merged = _merged(tmp_path)
    assert merged.count("tracktower_model_info{") == 1 and f'pid="{pids[1]}"' in merged
    assert count(merged, "/v1/model", "GET", 200) == 12  # the dead worker's requests still count
