"""The exported artifact held in memory, and the request-time recommendation logic.

Everything derivable from the artifact (contiguous float32 matrices, the seen-items CSR, id→index
maps, metadata aligned to candidate index) is built once in :meth:`Recommender.load`. With
``precompute_k`` it also ranks every known user once, through the same vectorised batch path as
offline evaluation (``ranking.score_chunks``), so a request for a known user is a slice of that
table; request-time excludes filter the slice, and only when too few tracks would remain is the
user scored on the fly (one matrix-vector product plus ``ranking.top_k``). Both paths use the one
shared top-k routine and tie-break, so they rank identically; their scores can differ in the last
float32 bit (matrix-matrix vs matrix-vector BLAS kernels sum in different orders).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from tracktower.features import ranking
from tracktower.features.artifact import (
    Manifest,
    read_arrays,
    read_manifest,
    read_track_metadata,
)
from tracktower.features.errors import DataError
from tracktower.serving.loader import load_history_tower
from tracktower.serving.schemas import Source

log = logging.getLogger(__name__)

# Upper bound on users x precompute_k kept in memory (8 bytes per entry); see Settings.
PRECOMPUTE_MAX_ENTRIES = 50_000_000


class Item(NamedTuple):
    track_id: str
    score: float
    title: str | None
    artist: str | None


@dataclass(frozen=True)
class Recommendation:
    items: list[Item]
    source: Source


class TopK(NamedTuple):
    """Vectorised result for many users; rows shorter than k are padded with index -1 / -inf."""

    indices: np.ndarray  # int64 [B, k]
    scores: np.ndarray  # float32 [B, k]
    sources: np.ndarray  # <U7 [B]


class Recommender:
    """An immutable, thread-safe view of one artifact; see the module docstring."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        arrays: dict[str, np.ndarray],
        titles: list[str | None],
        artists: list[str | None],
        history_tower: Callable[[list[str]], np.ndarray] | None,
    ) -> None:
        # ``arrays`` follow the artifact contract (read_arrays checked them), usually as read-only
        # memory maps, used in place: ascontiguousarray is a no-op on a C-contiguous float32 map
        # and the seen CSR shares seen_indices; it allocates only its data (nnz float32 ones).
        self.path = path
        self.manifest = manifest
        self.track_ids: np.ndarray = arrays["track_ids"]
        self.user_ids: np.ndarray = arrays["user_ids"]
        self.track_embeddings = np.ascontiguousarray(arrays["track_embeddings"], dtype=np.float32)
        self.user_embeddings = np.ascontiguousarray(arrays["user_embeddings"], dtype=np.float32)
        n, u = len(self.track_ids), len(self.user_ids)
        self.seen = sp.csr_matrix(
            (
                np.ones(len(arrays["seen_indices"]), dtype=np.float32),
                arrays["seen_indices"],
                arrays["seen_indptr"],
            ),
            shape=(u, n),
        )
        self.popular: np.ndarray = arrays["popular"]
        self.popular_scores: np.ndarray = arrays["popular_scores"]
        self._popular_list: list[int] = self.popular.tolist()
        self._track_list: list[str] = self.track_ids.tolist()
        self._titles = titles
        self._artists = artists
        self._track_index = {t: i for i, t in enumerate(self._track_list)}
        self._user_index = {v: i for i, v in enumerate(self.user_ids.tolist())}
        self._history_tower = history_tower
        # Known users' top lists (seen excluded), rows aligned to user_ids; width 0 = none.
        self._pre_indices = np.empty((0, 0), dtype=np.int32)
        self._pre_scores = np.empty((0, 0), dtype=np.float32)
        self._pre_width = 0

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        history_tower: bool = True,
        precompute_k: int = 0,
        precompute_max_entries: int = PRECOMPUTE_MAX_ENTRIES,
    ) -> Recommender:
        """Read an artifact directory (arrays memory-mapped); ``history_tower=False`` skips
        TensorFlow (batch, pyfunc).

        ``precompute_k > 0`` ranks every known user's top ``precompute_k`` now (the server passes
        its ``max_k``), unless users x k exceeds ``precompute_max_entries``.
        """
        path = Path(path)
        if not path.is_dir():
            raise DataError("artifact directory does not exist", path=path)
        manifest = read_manifest(path)
        arrays = read_arrays(path, manifest, mmap=True)
        titles, artists = read_track_metadata(path, arrays["track_ids"])
        tower = None
        if history_tower and manifest.has_history_tower:
            tower = load_history_tower(path)
        recommender = cls(path, manifest, arrays, titles, artists, tower)
        if precompute_k > 0:
            recommender.precompute(precompute_k, precompute_max_entries)
        return recommender

    def precompute(self, k: int, max_entries: int = PRECOMPUTE_MAX_ENTRIES) -> None:
        """Rank every known user's top ``k`` now (see ``load``); a no-op when already that wide.

        Results do not change, only their cost, so an app serving an injected recommender may
        call it; readers see either the old or the new table (the width is assigned last).
        """
        k = min(k, self.n_tracks)
        if k <= self._pre_width:
            return
        if self.n_users * k > max_entries:
            log.info(
                "%d users x top-%d > %d entries: scoring per request", self.n_users, k, max_entries
            )
            return
        start = time.perf_counter()
        indices = np.empty((self.n_users, k), dtype=np.int32)
        scores = np.empty((self.n_users, k), dtype=np.float32)
        self._fill_known(None, k, indices, scores)
        self._pre_indices, self._pre_scores, self._pre_width = indices, scores, k
        log.info(
            "precomputed top-%d for %d users in %.2f s (%.1f MB)",
            k,
            self.n_users,
            time.perf_counter() - start,
            (indices.nbytes + scores.nbytes) / 2**20,
        )

    def _fill_known(
        self, users: np.ndarray | None, k: int, indices: np.ndarray, scores: np.ndarray
    ) -> None:
        """Known users' top-k (seen excluded) into preallocated arrays; ``None`` = all users."""
        queries = self.user_embeddings if users is None else self.user_embeddings[users]
        blocks = ranking.score_chunks(queries, self.track_embeddings, k, self.seen, rows=users)
        start = 0
        for idx, top in blocks:
            stop = start + len(idx)
            indices[start:stop], scores[start:stop] = idx, top
            start = stop

    @property
    def precomputed_k(self) -> int:
        """Width of the precomputed known-user lists (0 when every request is scored)."""
        return self._pre_width

    @property
    def n_tracks(self) -> int:
        return len(self._track_list)

    @property
    def n_users(self) -> int:
        return len(self._user_index)

    @property
    def has_history_tower(self) -> bool:
        return self._history_tower is not None

    def user_index(self, user_id: str) -> int | None:
        return self._user_index.get(user_id)

    def track_indices(self, track_ids: Iterable[str]) -> list[int]:
        """Candidate indices of the known ids, in order; unknown ids are not candidates anyway."""
        get = self._track_index.get
        return [i for i in (get(t) for t in track_ids) if i is not None]

    def recommend(
        self,
        user_id: str,
        k: int,
        exclude_track_ids: Sequence[str] = (),
        recent_track_ids: Sequence[str] = (),
    ) -> Recommendation:
        """Top-k for one user.

        Recently played tracks are excluded like explicit excludes whatever the source: a listener
        who just heard a track is not helped by having it recommended back.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        excluded = self.track_indices([*exclude_track_ids, *recent_track_ids])
        u = self._user_index.get(user_id)
        if u is not None:
            if min(k, self.n_tracks) <= self._pre_width:
                hit = self._precomputed(u, k, excluded)
                if hit is not None:
                    return hit
            seen = self.seen.indices[self.seen.indptr[u] : self.seen.indptr[u + 1]]
            return self._score(self.user_embeddings[u], k, excluded, "model", seen)
        recent = self.track_indices(recent_track_ids)
        if recent and self._history_tower is not None:
            query = self._history_tower([self._track_list[i] for i in recent])
            return self._score(query, k, excluded, "session")
        return self._popular(k, excluded)

    def _precomputed(self, u: int, k: int, excluded: list[int]) -> Recommendation | None:
        """Top-k from user ``u``'s precomputed row, or None if excludes leave too few in it.

        The row is that user's full ranking cut at ``precompute_k``, so dropping excluded tracks
        keeps the order, and its first k survivors are the answer unless fewer than k survive and
        the cut hid candidates (a row ending in -1 already holds every remaining candidate).
        """
        indices, scores = self._pre_indices[u], self._pre_scores[u]
        if not excluded:
            return Recommendation(self._items(indices[:k], scores[:k]), "model")
        skip = set(excluded)
        keep = [j for j, i in enumerate(indices.tolist()) if i not in skip]
        complete = indices[-1] < 0 or len(indices) == self.n_tracks
        if len(keep) < k and not complete:
            return None
        keep = keep[:k]
        return Recommendation(self._items(indices[keep], scores[keep]), "model")

    def _score(
        self,
        query: np.ndarray,
        k: int,
        excluded: list[int],
        src: Source,
        seen: np.ndarray | None = None,
    ) -> Recommendation:
        # The user's CSR row is masked here as a plain slice rather than passed to top_k: same
        # -inf-before-selection semantics, without a scipy row-indexing per request.
        scores = (self.track_embeddings @ query)[None, :]
        if seen is not None:
            scores[0, seen] = -np.inf
        if excluded:
            scores[0, excluded] = -np.inf
        idx, top = ranking.top_k(scores, min(k, self.n_tracks))
        return Recommendation(self._items(idx[0], top[0]), src)

    def _popular(self, k: int, excluded: list[int]) -> Recommendation:
        skip = set(excluded)
        chosen = []
        for pos, i in enumerate(self._popular_list):
            if i not in skip:
                chosen.append(pos)
                if len(chosen) == k:
                    break
        return Recommendation(
            self._items(self.popular[chosen], self.popular_scores[chosen]), "popular"
        )

    def _items(self, indices: np.ndarray, scores: np.ndarray) -> list[Item]:
        return [
            Item(self._track_list[i], s, self._titles[i], self._artists[i])
            for i, s in zip(indices.tolist(), scores.tolist(), strict=True)
            if s != -np.inf and i >= 0
        ]

    def top_k_batch(self, user_ids: Sequence[str], k: int) -> TopK:
        """Known users scored in memory-bounded matmul blocks (or sliced from the precomputed
        lists, the same computation done at load), seen excluded; unknown users → popular."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.n_tracks)
        rows = np.array([self._user_index.get(v, -1) for v in user_ids], dtype=np.int64)
        known = rows >= 0
        indices = np.empty((len(rows), k), dtype=np.int64)
        scores = np.empty((len(rows), k), dtype=np.float32)
        indices[~known] = self.popular[:k]
        scores[~known] = self.popular_scores[:k]
        users = rows[known]
        if len(users) and k <= self._pre_width:
            indices[known], scores[known] = (
                self._pre_indices[users, :k],
                self._pre_scores[users, :k],
            )
        elif len(users):
            idx = np.empty((len(users), k), dtype=np.int64)
            top = np.empty((len(users), k), dtype=np.float32)
            self._fill_known(users, k, idx, top)
            indices[known], scores[known] = idx, top
        sources = np.where(known, "model", "popular")
        return TopK(indices, scores, sources)

    def recommend_batch(self, user_ids: Sequence[str], k: int) -> list[Recommendation]:
        result = self.top_k_batch(user_ids, k)
        return [
            Recommendation(self._items(idx, top), src)
            for idx, top, src in zip(
                result.indices, result.scores, result.sources.tolist(), strict=True
            )
        ]
