"""A real uvicorn process serving a fake artifact (with a TF history tower) over loopback HTTP."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import builders
import httpx
import pytest
from servers import running


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("http")
    artifact = builders.write_fake_artifact(root / "artifact", 40, 300, 8, True)
    port = _free_port()
    env = {**os.environ, "TRACKTOWER_MODEL_URI": str(artifact), "TRACKTOWER_MAX_K": "50"}
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "tracktower.serving.app:factory"]
    log_path = root / "server.log"
    with running([*cmd, "--host", "127.0.0.1", "--port", str(port)], env, log_path, port) as base:
        yield base, log_path


def _count(metrics: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix)
    )


def test_endpoints_over_http(server: tuple[str, Path]) -> None:
    base, log_path = server
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        model = client.get("/v1/model").json()
        assert (model["counts"]["users"], model["counts"]["tracks"]) == (40, 300)
        assert model["has_history_tower"] is True

        known = client.get("/v1/users/u00003/recommendations", params={"k": 5}).json()
        assert known["source"] == "model" and len(known["items"]) == 5
        unknown = client.get("/v1/users/nobody/recommendations").json()
        assert unknown["source"] == "popular" and len(unknown["items"]) == 10
        session = client.post(
            "/v1/recommendations",
            json={"user_id": "new", "k": 4, "recent_track_ids": ["t000001", "t000002"]},
        ).json()
        assert session["source"] == "session"
        assert not {"t000001", "t000002"} & {item["track_id"] for item in session["items"]}
        batch = client.post(
            "/v1/recommendations:batch", json={"user_ids": ["u00001", "x"], "k": 2}
        ).json()
        assert [r["source"] for r in batch["results"]] == ["model", "popular"]

        bad = client.get("/v1/users/u00003/recommendations", params={"k": 51})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "k"
        broken = client.post(
            "/v1/recommendations", content=b"{", headers={"Content-Type": "application/json"}
        )
        assert broken.status_code == 400
        assert client.get("/v1/users/u00003/recommendations").status_code == 200

        metrics = client.get("/metrics").text
    route = (
        'tracktower_http_requests_total{method="GET",route="/v1/users/{user_id}/recommendations"'
    )
    assert _count(metrics, route + ',status="200"}') == 3
    assert _count(metrics, route + ',status="422"}') == 1
    assert _count(metrics, 'tracktower_recommendations_total{source="session"}') == 1
    assert _count(metrics, 'tracktower_recommendations_total{source="popular"}') == 2
    assert _count(metrics, "tracktower_model_info{") == 1
    assert "serving tracktower" in log_path.read_text()


def test_tracktower_serve(tmp_path: Path) -> None:
    """The console command: the artifact's index, C parser and loop, no per-request access log."""
    artifact = builders.write_fake_artifact(tmp_path / "artifact", 30, 200, 8, False)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKTOWER_")}
    exe = Path(sys.executable).with_name("tracktower")
    cmd = [str(exe), "serve", "--model", str(artifact), "--port", str(port)]
    log_path = tmp_path / "serve.log"
    with running(cmd, env, log_path, port) as base, httpx.Client(base_url=base) as client:
        for u in range(30):
            body = client.get(f"/v1/users/u{u:05d}/recommendations", params={"k": 7}).json()
            assert body["source"] == "model" and len(body["items"]) == 7
        excluded = body["items"][0]["track_id"]
        again = client.post(
            "/v1/recommendations",
            json={"user_id": "u00029", "k": 7, "exclude_track_ids": [excluded]},
        ).json()
        assert [i["track_id"] for i in again["items"]] == [
            i["track_id"] for i in body["items"][1:]
        ] + [again["items"][-1]["track_id"]]
    log = log_path.read_text()
    assert "(httptools, uvloop)" in log
    assert "(30 users, 200 tracks, exact index, recall@100 1.0" in log
    assert "GET /v1/users" not in log  # access log off by default


def test_bad_index_stops_the_server_with_one_line(tmp_path: Path) -> None:
    """A worker whose artifact has no index never becomes ready: uvicorn exits non-zero with the
    one-line reason, no traceback."""
    import shutil
    import subprocess

    artifact = builders.write_fake_artifact(tmp_path / "artifact", 10, 50, 4, False)
    shutil.rmtree(artifact / "index")
    env = {**os.environ, "TRACKTOWER_MODEL_URI": str(artifact)}
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "tracktower.serving.app:factory"]
    port = str(_free_port())
    done = subprocess.run(
        [*cmd, "--port", port], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    assert f"error: cannot load model: {artifact}: index/ is missing" in done.stderr
    assert "Traceback" not in done.stderr and "Application startup failed" in done.stderr
