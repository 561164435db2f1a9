"""Hot swap through a real sqlite registry: versions registered the way training registers them
(``tracking.log_model`` in a run, then ``register_version`` and ``record_version_in_manifest``,
as ``stages.register`` does), the server following ``models:/tracktower@champion``, and the
per-host download cache shared by concurrent resolves.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import brute_force, fake_arrays, seen_of, user_id, write_fake_artifact
from fastapi.testclient import TestClient

from tracktower.serving import resolve, swap
from tracktower.serving.app import create_app
from tracktower.serving.resolve import resolve_artifact
from tracktower.serving.settings import Settings

NAME, ALIAS = "tracktower", "champion"
USERS, TRACKS, DIM = 50, 200, 8


@dataclass
class Registry:
    uri: str
    client: Any

    def move(self, version: str) -> None:
        self.client.set_registered_model_alias(NAME, ALIAS, version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Versions 1, 2 and 5 good; 3 with a ScaNN index whose measured recall@100 is under 0.5;
    4 good when registered, then corrupted in the store (a NaN embedding)."""
    import mlflow
    from mlflow import MlflowClient

    from tracktower.training import tracking

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=str(root / "art"))
        client = MlflowClient(uri)
        for seed, backend in ((1, "exact"), (2, "exact"), (3, "scann"), (4, "exact"), (5, "exact")):
            artifact = write_fake_artifact(
                root / f"a{seed}", USERS, TRACKS, DIM, False, seed=seed, index_backend=backend
            )
            with mlflow.start_run(experiment_id=experiment) as run:
                tracking.log_model(artifact)
            model = tracking.logged_model(client, client.get_run(run.info.run_id))
            version = tracking.register_version(client, model, NAME)
            tracking.record_version_in_manifest(client, model, NAME, version)
            assert version == str(seed)
        stored = Path(client.get_model_version_download_uri(NAME, "4").removeprefix("file://"))
        (embeddings,) = stored.glob("**/arrays/track_embeddings.npy")
        corrupt = np.load(embeddings, mmap_mode="r+")
        corrupt[7, 3] = np.nan
        corrupt.flush()
        del corrupt
        registry = Registry(uri, client)
        registry.move("1")
        yield registry
    finally:
        mlflow.set_tracking_uri(previous)


def _settings(registry: Registry, cache: Path, **fields: Any) -> Settings:
    return Settings(
        model_uri=f"models:/{NAME}@{ALIAS}",
        tracking_uri=registry.uri,
        model_cache_dir=cache,
        **{"model_poll_seconds": 3600, **fields},
    )


def _expected(seed: int, u: int, k: int = 5) -> list[str]:
    arrays = fake_arrays(USERS, TRACKS, DIM, seed)
    return brute_force(arrays, arrays["user_embeddings"][u], k, seen_of(arrays, u))


def _served(client: TestClient, u: int = 3) -> tuple[str, list[str]]:
    body = client.get(f"/v1/users/{user_id(u)}/recommendations", params={"k": 5}).json()
    return body["model"]["version"], [item["track_id"] for item in body["items"]]


def test_the_server_swaps_to_the_new_champion_and_refuses_bad_ones(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(swap, "RELEASE_WAIT_SECONDS", 10.0)
    registry.move("1")
    app = create_app(_settings(registry, tmp_path / "cache", model_cache_keep=2))
    with TestClient(app) as client:
        model = client.get("/v1/model").json()
        assert (model["version"], model["uri"]) == ("1", f"models:/{NAME}/1")
        assert _served(client) == ("1", _expected(1, 3))
        watcher = app.state.model_watcher
        assert watcher is not None and watcher.poll() == "unchanged"

        first = weakref.ref(app.state.serving.recommender)
        registry.move("2")
        assert watcher.poll() == "swapped"
        assert first() is None  # the start-up version is released once its requests are done
        model = client.get("/v1/model").json()
        assert (model["version"], model["uri"]) == ("2", f"models:/{NAME}/2")
        assert model["metrics"]["test_recall_at_10"] == 0.25 and model["counts"]["users"] == USERS
        assert _served(client) == ("2", _expected(2, 3))
        assert client.get("/readyz").status_code == 200

        for bad, why in (("3", "below model_recall_floor 0.95"), ("4", "is not finite")):
            registry.move(bad)
            assert watcher.poll() == "refused" and why in watcher.refused[bad]
            assert watcher.poll() == "refused"
            assert _served(client) == ("2", _expected(2, 3))
        metrics = client.get("/metrics").text
        assert f'tracktower_model_info{{name="{NAME}",version="2"}} 1.0' in metrics
        assert 'tracktower_model_swaps_total{outcome="swapped"} 1.0' in metrics
        assert 'tracktower_model_swaps_total{outcome="refused"} 2.0' in metrics

        registry.move("5")
        assert watcher.poll() == "swapped" and _served(client) == ("5", _expected(5, 3))
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*/*") if p.is_dir())
    assert cached == ["4", "5"]  # model_cache_keep=2, most recently used


def test_workers_start_on_the_pinned_version_then_follow_the_alias(
    registry: Registry, tmp_path: Path
) -> None:
    """What ``tracktower serve`` gives each worker: the alias, and the version it resolved;
    here the alias has moved since, and the watcher thread (polling every 0.2 s) catches up."""
    registry.move("2")
    settings = _settings(registry, tmp_path / "cache", model_start_version="1")
    app = create_app(settings.model_copy(update={"model_poll_seconds": 0.2}))
    with TestClient(app) as client:
        first = client.get("/v1/model").json()["version"]
        deadline = time.monotonic() + 60
        while _served(client)[0] != "2" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first == "1" and _served(client) == ("2", _expected(2, 3))
    assert app.state.model_watcher is None  # stopped with the app


def test_a_pinned_version_is_never_polled(registry: Registry, tmp_path: Path) -> None:
    registry.move("2")
    settings = _settings(registry, tmp_path / "cache").model_copy(
        update={"model_uri": f"models:/{NAME}/1", "model_poll_seconds": 0.1}
    )
    app = create_app(settings)
    with TestClient(app) as client:
        time.sleep(0.5)
        assert app.state.model_watcher is None and _served(client)[0] == "1"


def test_concurrent_resolves_download_once(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """N workers starting together: one downloads, the others wait on the lock and reuse it.
    Threads stand in for processes: ``flock`` locks belong to open files, not processes."""
    registry.move("2")
    calls: list[str] = []
    download = resolve._download

    def slow_download(uri: str, tracking_uri: str | None, dst: str | Path | None) -> Path:
        calls.append(uri)
        time.sleep(0.5)
        return download(uri, tracking_uri, dst)

    monkeypatch.setattr(resolve, "_download", slow_download)
    barrier = threading.Barrier(4)
    paths: list[Path] = []

    def worker() -> None:
        barrier.wait()
        found = resolve_artifact(
            f"models:/{NAME}@{ALIAS}", tracking_uri=registry.uri, cache_dir=tmp_path / "cache"
        )
        paths.append(found.path)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(paths) == 4 and len(set(paths)) == 1 and len(calls) == 1
    assert (paths[0] / "manifest.json").is_file()
    assert not list((tmp_path / "cache").glob("*/.tmp-*"))
