"""Exclusion-aware search (seen and request-excluded tracks) on any index.

An approximate index cannot mask candidates before selection the way ``ranking.top_k(...,
exclude)`` does, so every row is over-fetched by the same ``overfetch`` spare results (searched
with the effort of k, see ``RetrievalIndex.search``), excluded tracks are dropped, and the first
k survivors kept: the result has ranking.top_k's format, order and padding. The width is fixed,
not each batch's largest exclusion count, because an approximate index's answer depends on the
width asked for: a user's list must not change with the users batched beside it, so a batch
job, the server's single-user path and offline evaluation give the same top-k. A row left with
fewer than k survivors (more exclusions than the over-fetch, or an index that returned too few)
is recomputed by exact search with the mask, so no row comes back short while unexcluded
candidates exist. On an exact index the mask is applied directly, which is what
``ranking.top_k(..., exclude)`` computes.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from tracktower.features import ranking
from tracktower.features.index.base import RetrievalIndex, check_queries
from tracktower.features.index.exact import ExactIndex

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_OVERFETCH", "overfetch_search", "search_excluding", "top_lists"]

# Extra results fetched per excluded track, at most: MPD playlists hold at most 250 tracks, so
# a known user's seen tracks plus a few request excludes fit without the exact fallback.
DEFAULT_OVERFETCH = 256


def search_excluding(
    index: RetrievalIndex,
    exact: ExactIndex,
    queries: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    rows: np.ndarray | None = None,
    overfetch: int = DEFAULT_OVERFETCH,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``index`` with the stored entries of ``exclude[rows[b]]`` removed from row b.

    ``exclude`` / ``rows`` mean what they mean in ``ranking.top_k`` (``rows`` defaults to one
    exclude row per query); ``exact`` scores the rows the over-fetch cannot fill.
    """
    if isinstance(index, ExactIndex):
        return index.search(queries, k, exclude, rows)
    if exclude is None:
        return index.search(queries, k)
    return overfetch_search(index, exact, queries, k, exclude, rows, overfetch)


def top_lists(
    index: RetrievalIndex,
    candidates: np.ndarray,
    queries: np.ndarray,
    width: int,
    exclude: sp.csr_matrix,
    block: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """Row b's top ``width`` with ``exclude[b]`` removed, for every row (int32 indices, -1
    padded; float32 scores): the ``search_excluding`` call a server makes for one user, a
    block of rows at a time so temporaries stay bounded. ``candidates`` are the index's
    embeddings (for the exact fallback).

    The rows the over-fetch leaves short are searched exactly once, all together at the end:
    at a million users they are thousands of rows, and ``ExactIndex`` then scores a thousand
    of them per pass over the candidates instead of a few per block."""
    exact = index if isinstance(index, ExactIndex) else ExactIndex(candidates)
    indices = np.empty((len(queries), width), dtype=np.int32)
    scores = np.empty((len(queries), width), dtype=np.float32)
    if isinstance(index, ExactIndex):
        for start in range(0, len(queries), block):
            rows = np.arange(start, min(start + block, len(queries)))
            indices[rows], scores[rows] = index.search(queries[rows], width, exclude, rows)
        return indices, scores
    short = []
    for start in range(0, len(queries), block):
        rows = np.arange(start, min(start + block, len(queries)))
        idx, top, missing = _filtered(index, queries[rows], width, exclude, rows, DEFAULT_OVERFETCH)
        indices[rows], scores[rows] = idx, top
        short.append(rows[missing])
    redo = np.concatenate(short) if short else np.zeros(0, dtype=np.int64)
    log.info(
        "top lists: %d of %d rows searched exactly (over-fetch too short)", len(redo), len(queries)
    )
    if len(redo):
        q = np.asarray(queries[redo], dtype=np.float32)
        indices[redo], scores[redo] = exact.search(q, width, exclude, redo)
    return indices, scores


def overfetch_search(
    index: RetrievalIndex,
    exact: ExactIndex,
    queries: np.ndarray,
    k: int,
    exclude: sp.csr_matrix,
    rows: np.ndarray | None = None,
    overfetch: int = DEFAULT_OVERFETCH,
) -> tuple[np.ndarray, np.ndarray]:
    """The over-fetch, filter and exact-fallback path of :func:`search_excluding`, on any index
    (also an exact one, which makes its result equal to ``ranking.top_k(..., exclude)``)."""
    q = check_queries(queries, index.dim, k)
    out_idx, out_top, short = _filtered(index, q, k, exclude, rows, overfetch)
    if short.any():
        rows = np.arange(len(q)) if rows is None else np.asarray(rows, dtype=np.int64).ravel()
        out_idx[short], out_top[short] = exact.search(q[short], k, exclude, rows[short])
    return out_idx, out_top


def _filtered(
    index: RetrievalIndex,
    queries: np.ndarray,
    k: int,
    exclude: sp.csr_matrix,
    rows: np.ndarray | None,
    overfetch: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The over-fetched search with excluded tracks dropped: the first ``k`` survivors of each
    row, and which rows had fewer (the caller searches those exactly)."""
    q = check_queries(queries, index.dim, k)
    if overfetch < 0:
        raise ValueError(f"overfetch must be >= 0, got {overfetch}")
    sub, rows = ranking.exclude_rows(exclude, rows, len(q), index.size)
    idx, top = index.search(q, k, spare=overfetch)
    hit = idx < 0
    if sub.nnz:
        hit |= _excluded(sub, idx, index.size)
    return _first_survivors(idx, top, ~hit, k)


def _excluded(sub: sp.csr_matrix, idx: np.ndarray, n: int) -> np.ndarray:
    """Whether ``idx[b, j]`` is stored in row b of ``sub``: one binary search per result in the
    sorted (row, track) keys of the exclusions (``np.isin`` would sort the results too)."""
    width = n + 1  # key = row * width + track; -1 (padding) never matches a stored track
    counts = np.diff(sub.indptr)
    excluded = np.repeat(np.arange(len(idx), dtype=np.int64) * width, counts) + sub.indices
    excluded.sort()
    keys = np.arange(len(idx), dtype=np.int64)[:, None] * width + idx
    pos = np.minimum(np.searchsorted(excluded, keys), len(excluded) - 1)
    return excluded[pos] == keys


def _first_survivors(
    idx: np.ndarray, top: np.ndarray, keep: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``k`` kept entries of each row, in order, padded -1 / -inf; and which rows
    had fewer than ``k`` to keep."""
    rank = np.cumsum(keep, axis=1)
    r, c = np.nonzero(keep & (rank <= k))
    out_idx = np.full((len(idx), k), -1, dtype=np.int64)
    out_top = np.full((len(idx), k), -np.inf, dtype=np.float32)
    out_idx[r, rank[r, c] - 1] = idx[r, c]
    out_top[r, rank[r, c] - 1] = top[r, c]
    short = (rank[:, -1] if rank.shape[1] else np.zeros(len(idx), dtype=np.int64)) < k
    return out_idx, out_top, short
