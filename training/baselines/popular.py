"""Most-popular baseline: the floor any personalised model has to clear."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse import csr_matrix


class Popularity:
    """Scores every track by the number of distinct training users who have it.

    Distinct users rather than summed weights: a handful of heavy listeners replaying one song
    should not make it everyone's top recommendation. It is the same ordering serving uses for
    unknown users (the ``popular`` array in the export artifact): both count with
    ``features.dataset.popularity`` and break ties by the lower track index
    (``features.dataset.popularity_order``; ``ranking.top_k`` breaks ties the same way).

    Every user's list is a walk down one global order, so :meth:`top_k` ranks in O(k) per user
    plus the user's excluded tracks, where :meth:`score` (the generic interface) builds a dense
    row of every track per user.
    """

    name = "popular"

    def __init__(self) -> None:
        self.popularity: np.ndarray | None = None
        self._order: np.ndarray | None = None  # track indices, most popular first
        self._rank: np.ndarray | None = None  # inverse: position of each track in _order

    def params(self) -> dict[str, Any]:
        return {"model": self.name}

    def fit(self, train_csr: csr_matrix) -> Popularity:
        from tracktower.features.dataset import popularity, popularity_order

        # Ordered by the float32 scores score() returns, so both paths see the same ties.
        self.popularity = popularity(train_csr).astype(np.float32)
        self._order = popularity_order(self.popularity)
        self._rank = np.empty_like(self._order)
        self._rank[self._order] = np.arange(len(self._order), dtype=np.int64)
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        if self.popularity is None:
            raise RuntimeError("Popularity.score called before fit")
        return np.tile(self.popularity, (len(user_rows), 1))

    def top_k(
        self, user_rows: np.ndarray, k: int, exclude: csr_matrix | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """What ``ranking.top_k(self.score(user_rows), k, exclude, rows=user_rows)`` returns
        (``-1`` / ``-inf`` where fewer than ``k`` tracks remain), without scoring every track.

        With ``P`` a user's excluded positions in the global order (sorted, unique) and
        ``g_i = P_i - i`` the allowed positions before ``P_i``, the user's ``j``-th allowed
        position is ``j + #{i : g_i <= j}``: one ``searchsorted`` over all users at once.
        """
        if self.popularity is None or self._order is None or self._rank is None:
            raise RuntimeError("Popularity.top_k called before fit")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rows = np.asarray(user_rows, dtype=np.int64).reshape(-1)
        n, batch = len(self._order), len(rows)
        if n == 0:  # no tracks at all: every slot unfilled
            return np.full((batch, k), -1, np.int64), np.full((batch, k), -np.inf, np.float32)
        slots = np.broadcast_to(np.arange(k, dtype=np.int64), (batch, k))
        positions = slots + self._skipped(rows, k, exclude) if exclude is not None else slots
        valid = positions < n
        idx = np.where(valid, self._order[np.minimum(positions, n - 1)], -1)
        scores = np.where(valid, self.popularity[np.maximum(idx, 0)], -np.inf)
        return idx.astype(np.int64), scores.astype(np.float32)

    def _skipped(self, rows: np.ndarray, k: int, exclude: csr_matrix) -> np.ndarray:
        """int64 [len(rows), k]: excluded positions at or before each user's ``j``-th allowed one
        (see :meth:`top_k`)."""
        from tracktower.features.ranking import exclude_rows

        assert self._rank is not None
        n, batch = len(self._rank), len(rows)
        sub, _ = exclude_rows(exclude, rows, batch, n)
        row_of = np.repeat(np.arange(batch, dtype=np.int64), np.diff(sub.indptr))
        stride = n + k  # above every position and every slot: rows never overlap in the keys
        keys = np.unique(row_of * stride + self._rank[sub.indices])  # sorted, deduplicated
        key_row = keys // stride
        first = np.searchsorted(key_row, np.arange(batch + 1))  # each row's start in keys
        allowed_before = keys % stride - (np.arange(len(keys)) - first[key_row])
        gaps = key_row * stride + allowed_before  # sorted: allowed_before rises within a row
        wanted = np.arange(batch, dtype=np.int64)[:, None] * stride + np.arange(k)[None, :]
        return np.searchsorted(gaps, wanted, side="right") - first[:batch, None]
