"""Following the model URI's alias: a new version is loaded off the request path, checked, and
swapped in atomically, while the old one keeps serving.

``AliasWatcher`` runs in a daemon thread of each worker. Every ``model_poll_seconds`` it reads
the alias of a ``models:/NAME@ALIAS`` model URI (one registry call; a pinned version, a run or a
local path is never polled). When the alias names another version, the thread downloads it
(through the per-host cache, ``serving/resolve.py``), loads it and checks it; the event loop
never waits on any of that, though the thread shares the GIL with it (at a shorter switch
interval while it loads, so that the event loop gets the GIL back sooner).

The checks, all before the new version is visible:

* the artifact contract, by loading it through the same readers as at start-up (manifest, every
  array's dtype and shape, finite embeddings, the saved index matching them);
* the index's recall@100 measured at export (in the manifest) at least ``model_recall_floor``;
  an approximate index with no measured recall is refused (exact search is its own reference);
* a self-check of what was loaded: ``SELF_CHECK_USERS`` sampled known users answered through the
  loaded index, as requests are, against exact search over the loaded embeddings with their seen
  tracks excluded; recall below the floor minus ``SELF_CHECK_SLACK`` (a sample this small is
  noisy) means the index does not belong to these embeddings. With a history tower, one session
  query must come back from it with finite scores.

The swap is one reference assignment (``app.state.serving``): a request takes its ``Serving``
once, through its dependency, so a request in flight finishes on the version it started with
and the next one gets the new version. A version that fails any step is refused: one log line
saying why, ``tracktower_model_swaps{outcome="refused"}``, and it is remembered, so it is not
downloaded and checked again at every poll (a restart clears the memory; a fixed model is a new
version anyway). A registry that cannot be read is logged once and polled again; it is not a
refusal.

Memory and the garbage collector. Start-up imports what the model needs (MLflow, TensorFlow when
there is a history tower, ScaNN for its index) and freezes that heap out of the collector
*before* the model is loaded: the imports are hundreds of thousands of long-lived
objects, and a full collection walking them took 0.2-0.5 s on the shared 2-core box (0.16-0.22 s
without TensorFlow), stalling every request. The model itself stays collectable. It is a few
hundred tracked objects (arrays and mapped files are not tracked), ~1,000 with a TensorFlow
history tower, so a full collection of everything not frozen took 0.1-1 ms. That matters at a
swap: the TensorFlow objects of a tower form reference cycles, which only the collector frees,
and a frozen old model could never be freed short of unfreezing and collecting the whole heap.
After a swap the thread waits until the old version's last request has let go of it (reference
counting then frees its arrays, index and tables) and runs one collection for its cycles, ~1 ms.
Loading a version with a history tower into a process that has not imported TensorFlow yet (the
old version had none) imports it in this thread (seconds of GIL) and freezes the heap again;
that freezes the old version too, which is safe only because a version without a tower has no
cycles to leak.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tracktower.features.artifact import Manifest, read_manifest
from tracktower.features.errors import DataError, one_line
from tracktower.features.index import ExactIndex, IndexInfo
from tracktower.features.index.recall import overlap, sample_rows
from tracktower.features.index.scann_import import scann_ops_pybind
from tracktower.serving.artifact import Recommender
from tracktower.serving.deps import LoadedModel, Serving
from tracktower.serving.metrics import Metrics
from tracktower.serving.resolve import alias_version, registry_alias, resolve_artifact
from tracktower.serving.settings import Settings

log = logging.getLogger(__name__)

SELF_CHECK_USERS = 32
SELF_CHECK_K = 100
SELF_CHECK_SLACK = 0.05
# An unknown user id for the session self-check (no real id starts with a NUL).
_NOBODY = "\x00tracktower-self-check"
# How long the old version may stay referenced after a swap before the thread stops waiting
# for it (a batch stops at request_timeout_seconds; a single request takes milliseconds).
RELEASE_WAIT_SECONDS = 60.0
# The GIL switch interval while a version loads (see _sharing_the_gil).
LOAD_SWITCH_INTERVAL = 0.001


def import_for(manifest: Manifest) -> bool:
    """Import what loading this artifact will import (TensorFlow for a history tower, ScaNN for
    its index), so that it can be frozen first; True when TensorFlow was imported just now.

    ScaNN's import hides TensorFlow from ``sys.modules`` for a moment
    (``features.index.scann_import``); here it runs in the thread that loads models, after
    TensorFlow, and request threads never import either."""
    imported_tf = False
    if manifest.has_history_tower and "tensorflow" not in sys.modules:
        from tracktower.features.tf import tf  # noqa: F401

        imported_tf = True
    if manifest.index_info.backend == "scann":
        scann_ops_pybind()
    return imported_tf


def load_version(path: Path, settings: Settings, *, startup: bool) -> Recommender:
    """The artifact at ``path`` through ``Recommender.load``, the collector handled as the
    module explains: at start-up the imported heap is collected and frozen before the model is
    loaded; later only a first TensorFlow import is frozen."""
    manifest = read_manifest(path)
    imported_tf = import_for(manifest)
    if startup:
        gc.collect()
        gc.freeze()
    elif imported_tf:
        gc.freeze()
    return Recommender.load(
        path, cache_users=settings.known_cache_users, cache_width=settings.max_k
    )


def check_recall(info: IndexInfo, recall_floor: float) -> None:
    """Refuse an index whose recall@100 measured at export is below the floor, or an
    approximate one never measured (read from the manifest, before anything is loaded)."""
    recall = info.recall_at_100
    if recall is None and info.backend != "exact":
        raise DataError(f"its {info.backend} index has no measured recall@100; re-export the model")
    if recall is not None and recall < recall_floor:
        raise DataError(
            f"its index recall@100 {recall:.4f} (measured at export) is below "
            f"model_recall_floor {recall_floor:g}"
        )


def check_version(recommender: Recommender, recall_floor: float) -> None:
    """Refuse (DataError, one line) a loaded version that must not be served; see the module."""
    check_recall(recommender.index_info, recall_floor)
    _check_known_users(recommender, recall_floor - SELF_CHECK_SLACK)
    if recommender.has_history_tower:
        _check_session(recommender)


def _check_known_users(recommender: Recommender, minimum: float) -> None:
    """Sampled known users through the loaded index (``top_k_batch``, as a batch request) against
    exact search over the loaded embeddings, seen tracks excluded on both sides."""
    if recommender.n_users == 0:
        return
    rows = sample_rows(recommender.n_users, seed=0, size=SELF_CHECK_USERS)
    k = min(SELF_CHECK_K, recommender.n_tracks)
    exact = ExactIndex(recommender.track_embeddings)
    truth, _ = exact.search(recommender.user_embeddings[rows], k, recommender.seen, rows)
    got = recommender.top_k_batch([str(u) for u in recommender.user_ids[rows].tolist()], k)
    if not np.isfinite(got.scores[got.indices >= 0]).all():
        raise DataError(f"non-finite scores for {len(rows)} sampled known users")
    recall = overlap(got.indices, truth)
    if recall < minimum:
        raise DataError(
            f"its index answers {len(rows)} sampled known users with recall@{k} {recall:.3f} "
            f"against exact search (at least {minimum:.2f} expected): the index does not match "
            "the embeddings"
        )


def _check_session(recommender: Recommender) -> None:
    """One session query through the history tower: it runs and its scores are finite."""
    recent = [str(t) for t in recommender.track_ids[: min(5, recommender.n_tracks)].tolist()]
    rec = recommender.recommend(_NOBODY, min(10, recommender.n_tracks), recent_track_ids=recent)
    scores = np.array([item.score for item in rec.items], dtype=np.float64)
    if rec.source != "session" or not np.isfinite(scores).all():
        raise DataError(
            f"its history tower gave a {rec.source} answer with scores {scores[:3].tolist()} "
            "for a session query"
        )


class AliasWatcher:
    """Polls ``models:/name@alias`` in a daemon thread and swaps new versions into ``state``
    (the app's ``app.state``); see the module."""

    def __init__(
        self,
        state: Any,
        settings: Settings,
        metrics: Metrics,
        name: str,
        alias: str,
        version: str | None,
    ) -> None:
        self.state = state
        self.settings = settings
        self.metrics = metrics
        self.name = name
        self.alias = alias
        self.version = version  # what is being served
        self.refused: dict[str, str] = {}  # version -> why
        self._stop = threading.Event()
        self._swap_lock = threading.Lock()  # a swap never lands after stop() returned
        self._thread: threading.Thread | None = None
        self._unreachable = False

    @classmethod
    def for_settings(
        cls, state: Any, settings: Settings, metrics: Metrics, version: str | None
    ) -> AliasWatcher | None:
        """A watcher when ``settings.model_uri`` is an alias and polling is on, else None."""
        alias = registry_alias(settings.model_uri)
        if alias is None or settings.model_poll_seconds <= 0:
            return None
        return cls(state, settings, metrics, alias[0], alias[1], version)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="tracktower-model-watcher", daemon=True
        )
        self._thread.start()
        log.info(
            "following %s every %g s (serving version %s)",
            self.uri,
            self.settings.model_poll_seconds,
            self.version,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling; a load in progress finishes in the background but is not swapped in."""
        with self._swap_lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.model_poll_seconds):
            try:
                self.poll()
            except Exception:  # a bug here must not end the polling; the old version serves on
                log.exception("model watcher: unexpected error; still serving %s", self.version)

    def poll(self) -> str:
        """One look at the alias, and a swap when it moved: ``unchanged``, ``swapped``,
        ``refused`` (now or earlier), ``unreachable`` or ``stopped``."""
        try:
            version = alias_version(self.name, self.alias, tracking_uri=self.settings.tracking_uri)
        except DataError as exc:
            if not self._unreachable:
                log.warning("%s; still serving version %s, polling again", exc, self.version)
            self._unreachable = True
            return "unreachable"
        if self._unreachable:
            log.info("%s is readable again", self.uri)
            self._unreachable = False
        if version == self.version:
            return "unchanged"
        if version in self.refused:
            return "refused"
        return self._switch(version)

    def _switch(self, version: str) -> str:
        start = time.perf_counter()
        log.info("%s moved to version %s (serving %s); loading it", self.uri, version, self.version)
        try:
            with _sharing_the_gil():
                recommender = self._load(version)
        except Exception as exc:  # whatever a bad artifact raises is a refusal
            reason = one_line(exc) if isinstance(exc, DataError) else _describe(exc)
            self.refused[version] = reason
            self.metrics.count_model_swap("refused")
            log.error(
                "refused %s version %s: %s; still serving version %s (not retried)",
                self.name,
                version,
                reason,
                self.version,
            )
            return "refused"
        with self._swap_lock:
            if self._stop.is_set():
                return "stopped"
            previous, old = self.version, self._install(recommender, version)
        del recommender
        log.info(
            "swapped %s version %s -> %s (download, load and checks %.1f s)",
            self.name,
            previous,
            version,
            time.perf_counter() - start,
        )
        self._release(old, previous)
        return "swapped"

    def _load(self, version: str) -> Recommender:
        settings = self.settings
        resolved = resolve_artifact(
            f"models:/{self.name}/{version}",
            tracking_uri=settings.tracking_uri,
            cache_dir=settings.model_cache_dir,
            cache_keep=settings.model_cache_keep,
        )
        check_recall(read_manifest(resolved.path).index_info, settings.model_recall_floor)
        recommender = load_version(resolved.path, settings, startup=False)
        check_version(recommender, settings.model_recall_floor)
        return recommender

    def _install(self, recommender: Recommender, version: str) -> weakref.ref[Recommender] | None:
        """The swap; returns a weak reference to the old version (held by nothing here)."""
        loaded = LoadedModel(self.name, version, f"models:/{self.name}/{version}")
        serving = Serving(recommender, loaded, self.settings, self.metrics)
        old: Serving | None = self.state.serving
        self.state.serving = serving  # the swap: requests from now on take this one
        self.state.recommender, self.state.model = recommender, loaded
        self.metrics.set_model(self.name, version)
        self.metrics.count_model_swap("swapped")
        self.version = version
        return weakref.ref(old.recommender) if old is not None else None

    def _release(self, old: weakref.ref[Recommender] | None, version: str | None) -> None:
        """Wait for the old version's requests to finish, then collect its cycles (module)."""
        if old is None:
            return
        deadline = time.monotonic() + RELEASE_WAIT_SECONDS
        tick = 0
        while old() is not None and time.monotonic() < deadline and not self._stop.wait(0.05):
            tick += 1
            if tick % 20 == 0:  # about every second: a cycle (e.g. a traceback) may hold it
                gc.collect()
        start = time.perf_counter()
        collected = gc.collect()
        took = (time.perf_counter() - start) * 1e3
        if old() is None:
            log.info(
                "released version %s (a collection of %d objects, %.1f ms)",
                version,
                collected,
                took,
            )
        else:
            log.warning("version %s is still referenced after the swap; not released", version)


@contextmanager
def _sharing_the_gil() -> Iterator[None]:
    """A shorter GIL switch interval while a version loads: a thread waiting for the GIL (the
    event loop) gets it after at most this long of the loader's Python code instead of the
    default 5 ms (measured here: a waiting thread's wake-up delay, p50 5.2 ms -> 1.2 ms, beside
    a busy Python thread). Process-wide; restored after."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, LOAD_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}"[:300] if str(exc) else type(exc).__name__
