"""Hot swap without a registry: the checks a new version must pass, the watcher's swap and
refusal logic against a stand-in for the registry, and the per-host download cache.

The real registry path (sqlite store, versions registered the way training registers them) is
in tests/integration/test_hot_swap.py.
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from builders import (
    brute_force,
    cached_artifact,
    fake_arrays,
    seen_of,
    user_id,
    write_fake_artifact,
)

from tracktower.features.errors import DataError
from tracktower.features.index import ExactIndex
from tracktower.serving import resolve, swap
from tracktower.serving.artifact import Recommender
from tracktower.serving.deps import LoadedModel, Serving
from tracktower.serving.metrics import Metrics
from tracktower.serving.resolve import ResolvedModel, _HostCache, _store_key
from tracktower.serving.settings import Settings
from tracktower.serving.swap import AliasWatcher, check_version

USERS, TRACKS, DIM = 50, 200, 8


def _artifact(root: Path, name: str, seed: int, **kwargs: Any) -> Path:
    return write_fake_artifact(root / name, USERS, TRACKS, DIM, False, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Registry versions as local artifacts: 1 and 2 good, 3 with a measured recall@100 under 0.5
    (ScaNN searching 1 of 4 leaves), 4 with a NaN embedding (a corrupt download), 5 good."""
    root = tmp_path_factory.mktemp("versions")
    out = {
        "1": _artifact(root, "v1", 1),
        "2": _artifact(root, "v2", 2),
        "3": _artifact(root, "v3", 3, index_backend="scann"),
        "5": _artifact(root, "v5", 5, index_backend="scann", index_params={"leaves_to_search": 4}),
    }
    bad = _artifact(root, "v4", 4)
    emb = np.load(bad / "arrays" / "track_embeddings.npy", mmap_mode="r+")
    emb[7, 3] = np.nan
    emb.flush()
    del emb
    out["4"] = bad
    return out


# --- the checks ----------------------------------------------------------------------------------


def test_a_good_version_passes_the_checks(versions: dict[str, Path]) -> None:
    check_version(Recommender.load(versions["1"]), 0.95)
    check_version(Recommender.load(versions["5"]), 0.95)  # ScaNN, recall@100 1.0


def test_a_version_below_the_recall_floor_is_refused(versions: dict[str, Path]) -> None:
    recommender = Recommender.load(versions["3"])
    assert recommender.index_info.recall_at_100 is not None
    with pytest.raises(
        DataError,
        match=r"recall@100 0\.\d{4} \(measured at export\) is below model_recall_floor 0\.95",
    ):
        check_version(recommender, 0.95)
    check_version(recommender, 0.1)  # the floor is a setting


def test_an_unmeasured_approximate_index_is_refused(
    versions: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    recommender = Recommender.load(versions["5"])
    monkeypatch.setattr(recommender.index_info, "recall_at_100", None)
    with pytest.raises(DataError, match="scann index has no measured recall@100"):
        check_version(recommender, 0.95)


def test_an_index_that_does_not_match_the_embeddings_fails_the_self_check(
    versions: dict[str, Path],
) -> None:
    """The contract cannot see this (shapes agree); answering known users like exact search
    does is what catches it."""
    recommender = Recommender.load(versions["1"])
    other = np.load(versions["2"] / "arrays" / "track_embeddings.npy")
    recommender.index = ExactIndex(other)
    with pytest.raises(DataError, match=r"32 sampled known users with recall@100 0\.\d+"):
        check_version(recommender, 0.95)


def test_the_session_check_runs_the_history_tower(tmp_path_factory: pytest.TempPathFactory) -> None:
    recommender = Recommender.load(cached_artifact(tmp_path_factory, with_history_tower=True))
    assert recommender.has_history_tower
    check_version(recommender, 0.95)


def test_only_an_alias_with_polling_on_is_followed() -> None:
    state, metrics = SimpleNamespace(), Metrics()

    def watcher(**fields: Any) -> AliasWatcher | None:
        return AliasWatcher.for_settings(state, Settings(**fields), metrics, "1")

    followed = watcher(model_uri="models:/tracktower@champion")
    assert followed is not None and (followed.name, followed.alias) == ("tracktower", "champion")
    assert Settings().model_poll_seconds == 30
    assert watcher(model_uri="models:/tracktower@champion", model_poll_seconds=0) is None
    for pinned in ("models:/tracktower/3", "runs:/abc/model", "/srv/artifact"):
        assert watcher(model_uri=pinned) is None


def test_recall_floor_default_is_exports() -> None:
    from tracktower.features.index import DEFAULT_RECALL_FLOOR

    assert Settings().model_recall_floor == DEFAULT_RECALL_FLOOR


# --- the watcher, against a stand-in registry ----------------------------------------------------


class Registry:
    """``alias_version`` and ``resolve_artifact`` for the watcher, over local artifacts."""

    def __init__(self, versions: dict[str, Path], champion: str) -> None:
        self.versions = versions
        self.champion = champion
        self.downloads: list[str] = []
        self.switch_intervals: list[float] = []
        self.reachable = True

    def alias_version(self, name: str, alias: str, *, tracking_uri: str | None = None) -> str:
        if not self.reachable:
            raise DataError(
                "cannot read alias 'champion' of model 'tracktower' (connection refused)"
            )
        return self.champion

    def resolve_artifact(self, uri: str, **kwargs: Any) -> ResolvedModel:
        version = uri.rsplit("/", 1)[1]
        self.downloads.append(version)
        self.switch_intervals.append(sys.getswitchinterval())
        return ResolvedModel(self.versions[version], "tracktower", version, uri)


def _watcher(
    versions: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> tuple[AliasWatcher, Registry, SimpleNamespace]:
    """A watcher serving version 1, driven by ``poll()`` (its thread is not started)."""
    registry = Registry(versions, "1")
    monkeypatch.setattr(swap, "alias_version", registry.alias_version)
    monkeypatch.setattr(swap, "resolve_artifact", registry.resolve_artifact)
    monkeypatch.setattr(swap, "RELEASE_WAIT_SECONDS", 5.0)
    settings = Settings(model_uri="models:/tracktower@champion", max_k=20)
    metrics = Metrics()
    metrics.set_model("tracktower", "1")  # as the lifespan does
    rec = Recommender.load(versions["1"], cache_users=100, cache_width=20)
    loaded = LoadedModel("tracktower", "1", "models:/tracktower/1")
    state = SimpleNamespace(serving=Serving(rec, loaded, settings, metrics), recommender=rec)
    state.model = loaded
    watcher = AliasWatcher.for_settings(state, settings, metrics, "1")
    assert watcher is not None
    return watcher, registry, state


@pytest.fixture
def served(
    versions: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> tuple[AliasWatcher, Registry, SimpleNamespace]:
    return _watcher(versions, monkeypatch)


def _top(state: SimpleNamespace, u: int, k: int = 5) -> list[str]:
    return [item.track_id for item in state.serving.recommender.recommend(user_id(u), k).items]


def _metric(watcher: AliasWatcher, line: str) -> bool:
    return line in watcher.metrics.render().decode()


def test_a_moved_alias_is_swapped_in_and_the_old_version_released(
    served: tuple[AliasWatcher, Registry, SimpleNamespace],
) -> None:
    watcher, registry, state = served
    assert watcher.poll() == "unchanged" and registry.downloads == []
    in_flight = state.serving  # a request that took the old version before the swap
    old = weakref.ref(in_flight.recommender)
    registry.champion = "2"
    done = threading.Event()
    thread = threading.Thread(target=lambda: (watcher.poll(), done.set()))
    thread.start()
    deadline = time.monotonic() + 60
    while state.serving is in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    arrays = {v: fake_arrays(USERS, TRACKS, DIM, seed) for v, seed in (("1", 1), ("2", 2))}
    # The request in flight finishes on version 1; a new request gets version 2.
    got_old = [i.track_id for i in in_flight.recommender.recommend(user_id(3), 5).items]
    assert got_old == brute_force(
        arrays["1"], arrays["1"]["user_embeddings"][3], 5, seen_of(arrays["1"], 3)
    )
    assert _top(state, 3) == brute_force(
        arrays["2"], arrays["2"]["user_embeddings"][3], 5, seen_of(arrays["2"], 3)
    )
    assert state.serving.model_ref == {"name": "tracktower", "version": "2"}
    assert state.model.version == "2" and state.recommender is state.serving.recommender
    assert not done.is_set()  # the watcher waits for the old version's last request
    del in_flight
    thread.join(30)
    assert done.is_set() and old() is None  # released, not kept in a frozen generation
    assert registry.downloads == ["2"] and watcher.version == "2"
    # Loaded with a short GIL switch interval (the event loop waits less), restored after.
    assert registry.switch_intervals == [swap.LOAD_SWITCH_INTERVAL]
    assert sys.getswitchinterval() == 0.005
    assert _metric(watcher, 'tracktower_model_info{name="tracktower",version="2"} 1.0')
    assert 'version="1"' not in watcher.metrics.render().decode()
    assert _metric(watcher, 'tracktower_model_swaps_total{outcome="swapped"} 1.0')
    assert watcher.poll() == "unchanged"


def test_bad_versions_are_refused_once_and_the_old_one_keeps_serving(
    served: tuple[AliasWatcher, Registry, SimpleNamespace], caplog: pytest.LogCaptureFixture
) -> None:
    watcher, registry, state = served
    before = _top(state, 4)
    caplog.set_level(logging.INFO, logger="tracktower.serving.swap")
    for bad, why in (("3", "below model_recall_floor 0.95"), ("4", "is not finite")):
        registry.champion = bad
        assert watcher.poll() == "refused"
        assert watcher.poll() == "refused"  # remembered: not downloaded and checked again
        assert registry.downloads.count(bad) == 1 and why in watcher.refused[bad]
        refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert refusals[-1].startswith(f"refused tracktower version {bad}: ")
        assert refusals[-1].endswith("still serving version 1 (not retried)")
        assert "\n" not in refusals[-1]
        assert _top(state, 4) == before and state.serving.model_ref["version"] == "1"
    assert _metric(watcher, 'tracktower_model_swaps_total{outcome="refused"} 2.0')
    assert _metric(watcher, 'tracktower_model_info{name="tracktower",version="1"} 1.0')
    registry.champion = "5"  # a good version after bad ones is taken
    assert watcher.poll() == "swapped" and state.serving.model_ref["version"] == "5"


def test_an_unreadable_registry_is_logged_once_and_not_a_refusal(
    served: tuple[AliasWatcher, Registry, SimpleNamespace], caplog: pytest.LogCaptureFixture
) -> None:
    watcher, registry, _state = served
    caplog.set_level(logging.INFO, logger="tracktower.serving.swap")
    registry.reachable = False
    assert [watcher.poll() for _ in range(3)] == ["unreachable"] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "still serving version 1" in warnings[0].getMessage()
    assert watcher.refused == {}
    assert 'outcome="refused"' not in watcher.metrics.render().decode()
    registry.reachable, registry.champion = True, "2"
    assert watcher.poll() == "swapped"


@pytest.mark.parametrize("frozen", [False, True])
def test_swaps_do_not_leak_the_old_history_tower(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, frozen: bool
) -> None:
    """Back and forth between two versions with a TensorFlow history tower, whose objects form
    reference cycles: what an old version leaves is collected. ``frozen`` is the control: a
    model frozen with the heap (as start-up used to do) leaks every version it swaps out."""
    root = tmp_path_factory.mktemp("towers")
    versions = {
        v: write_fake_artifact(root / v, USERS, TRACKS, DIM, True, seed=int(v)) for v in "12"
    }
    watcher, registry, _state = _watcher(versions, monkeypatch)
    if frozen:
        load = swap.load_version

        def load_and_freeze(path: Path, settings: Settings, *, startup: bool) -> Recommender:
            recommender = load(path, settings, startup=startup)
            gc.freeze()
            return recommender

        monkeypatch.setattr(swap, "load_version", load_and_freeze)
    totals = []
    try:
        for i in range(6):
            registry.champion = "2" if i % 2 == 0 else "1"
            assert watcher.poll() == "swapped"
            gc.collect()
            totals.append(len(gc.get_objects()) + gc.get_freeze_count())
    finally:
        gc.unfreeze()
    grown = totals[-1] - totals[1]
    assert (grown > 1000) if frozen else (grown < 300), totals


def test_a_swap_after_stop_is_not_installed(
    served: tuple[AliasWatcher, Registry, SimpleNamespace],
) -> None:
    watcher, registry, state = served
    watcher.stop()
    registry.champion = "2"
    assert watcher.poll() == "stopped" and state.serving.model_ref["version"] == "1"


def test_the_watcher_thread_polls(
    served: tuple[AliasWatcher, Registry, SimpleNamespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher, registry, state = served
    monkeypatch.setattr(
        watcher, "settings", watcher.settings.model_copy(update={"model_poll_seconds": 0.05})
    )
    registry.champion = "2"
    watcher.start()
    try:
        deadline = time.monotonic() + 60
        while state.serving.model_ref["version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        watcher.stop()
    assert state.serving.model_ref["version"] == "2"


# --- the per-host download cache -----------------------------------------------------------------


class Source:
    """A stand-in for MLflow's download: copies an MLflow-model-shaped directory, slowly, and
    counts the calls; ``fail_after_files`` makes it die half-way."""

    def __init__(self, artifact: Path, delay: float = 0.0) -> None:
        self.artifact = artifact
        self.delay = delay
        self.calls = 0
        self.fail = False
        self.lock = threading.Lock()

    def __call__(self, uri: str, tracking_uri: str | None, dst_path: str | Path | None) -> Path:
        with self.lock:
            self.calls += 1
        out = Path(str(dst_path)) / "artifacts"
        shutil.copytree(self.artifact, out / "artifacts" / "exported")
        (out / "MLmodel").write_text("flavors: {}\n")
        time.sleep(self.delay)
        if self.fail:
            raise DataError("cannot download model (connection reset)", path=uri)
        return out


@pytest.fixture
def source(versions: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Source:
    fake = Source(versions["1"])
    monkeypatch.setattr(resolve, "_download", fake)
    return fake


def _fetch(cache: _HostCache, version: str = "1") -> Path:
    return cache.fetch("sqlite:////srv/mlflow.db", "tracktower", version, "src", None)


def test_concurrent_resolves_download_once(source: Source, tmp_path: Path) -> None:
    """Workers starting together: one downloads, the others wait on the lock and reuse it
    (``flock`` locks belong to open files, so threads contend like processes do)."""
    source.delay = 0.3
    results: list[Path] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(_fetch(_HostCache(tmp_path / "cache", 3)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert source.calls == 1 and len(set(results)) == 1 and len(results) == 4
    assert (results[0] / "artifacts" / "exported" / "manifest.json").is_file()
    assert results[0].name == "1" and results[0].parent.name.startswith("tracktower-")
    assert [p.name for p in results[0].parent.iterdir() if p.is_dir()] == ["1"]


def test_a_half_written_download_is_never_picked_up(source: Source, tmp_path: Path) -> None:
    cache = _HostCache(tmp_path / "cache", 3)
    source.fail = True
    with pytest.raises(DataError, match="connection reset"):
        _fetch(cache)
    base = cache.model_dir("sqlite:////srv/mlflow.db", "tracktower")
    assert list(base.iterdir()) == [base / ".lock"]  # no version, no temporary left
    stale = base / ".tmp-crashed"  # what a process killed mid-download leaves
    (stale / "artifacts").mkdir(parents=True)
    source.fail = False
    got = _fetch(cache)
    assert source.calls == 2 and got == base / "1" and not stale.exists()
    _fetch(cache)
    assert source.calls == 2  # found whole: no lock, no download


def test_old_versions_are_pruned_most_recently_used_kept(source: Source, tmp_path: Path) -> None:
    cache = _HostCache(tmp_path / "cache", 2)
    for version in ("1", "2"):
        _fetch(cache, version)
    time.sleep(0.02)
    _fetch(cache, "1")  # used again: newer than 2
    time.sleep(0.02)
    got = _fetch(cache, "3")
    assert sorted(p.name for p in got.parent.iterdir() if p.is_dir()) == ["1", "3"]


def test_store_key_tells_stores_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _store_key("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert _store_key("http://mlflow:5000") == "http://mlflow:5000"
    cache = _HostCache(tmp_path, 3)
    dirs = {
        cache.model_dir(s, n)
        for s in ("sqlite:////a.db", "sqlite:////b.db")
        for n in ("m x", "m_x")
    }
    assert len(dirs) == 4
