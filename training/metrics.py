"""Offline ranking metrics over a top-k index matrix and a held-out truth matrix.

Everything is vectorised over users and computed from the top-k indices that
``tracktower.features.ranking.top_k`` produced, so each model and baseline is measured on exactly
the lists it would serve.

Definitions (binary relevance; a held-out item is relevant whatever its weight):

* ``|H_u|`` = held-out items of user ``u`` in ``truth`` **plus** ``unknown[u]`` (held-out tracks
  that were not in the training vocabulary; no model can rank them, but hiding them would flatter
  every model). Users with ``|H_u| = 0`` are left out of every average.
* ``recall_at_k`` = hits in the top k / ``min(k, |H_u|)`` (so a perfect list scores 1).
* ``ndcg_at_k`` = DCG / ideal DCG with gains ``1 / log2(rank + 1)``; the ideal list has
  ``min(k, |H_u|)`` relevant items.
* ``hit_rate_at_k`` = share of users with at least one hit in the top k.
* ``coverage_at_k`` = distinct items recommended in the evaluated users' top k / ``n_items``.

Slots holding ``-1`` (unfilled, see ``ranking.top_k``) are never hits and never covered.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "DEFAULT_KS",
    "coverage",
    "ranking_metrics",
    "users_with_heldout",
]

DEFAULT_KS = (10, 20, 50, 100)
_NDCG_KS = (10, 100)
_HIT_KS = (10,)
_COVERAGE_KS = (10,)


def _heldout_counts(truth: sp.csr_matrix, unknown: np.ndarray | None) -> np.ndarray:
    """``|H_u|`` per row: the held-out tracks in ``truth`` plus the ``unknown`` ones, which count
    against a model even though no model can rank them (see the module docstring)."""
    csr = sp.csr_matrix(truth)
    held = np.diff(csr.indptr).astype(np.int64)
    if unknown is None:
        return held
    extra = np.asarray(unknown, dtype=np.int64).reshape(-1)
    if len(extra) != len(held):
        raise ValueError(f"unknown has {len(extra)} entries for {len(held)} users")
    return held + extra


def users_with_heldout(truth: sp.csr_matrix, unknown: np.ndarray | None) -> np.ndarray:
    """Rows with at least one held-out track: the only users any metric averages over, so
    scoring the others would be wasted work."""
    return np.flatnonzero(_heldout_counts(truth, unknown) > 0)


def ranking_metrics(
    topk_idx: np.ndarray,
    truth: sp.csr_matrix,
    unknown: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    n_items: int | None = None,
) -> dict[str, float]:
    """``recall_at_{k}`` for every ``k`` in ``ks``; ndcg at 10 and 100, hit rate and coverage at 10
    for those of these ks that fit in the ``K`` columns of ``topk_idx``.

    Row ``u`` of ``topk_idx`` is the ranked list for row ``u`` of ``truth``. Returns ``{}`` when
    no user has held-out items (nothing to average).
    """
    top = np.asarray(topk_idx)
    if top.ndim != 2:
        raise ValueError(f"topk_idx must be 2-D [users, K], got shape {top.shape}")
    n_users, width = top.shape
    csr = sp.csr_matrix(truth)
    if csr.shape[0] != n_users:
        raise ValueError(f"truth has {csr.shape[0]} rows but topk_idx has {n_users}")
    too_long = [k for k in ks if k > width or k < 1]
    if too_long:
        raise ValueError(f"ks {too_long} do not fit in top-k lists of length {width}")
    n_items = csr.shape[1] if n_items is None else n_items
    held = _heldout_counts(csr, unknown)
    users = np.flatnonzero(held > 0)
    if len(users) == 0:
        return {}

    top = top[users]
    hits = _hits(top, csr[users])
    held = held[users]
    cum = np.cumsum(hits, axis=1, dtype=np.int64)
    ranks = np.arange(1, width + 1)
    discounts = 1.0 / np.log2(ranks + 1.0)
    dcg = np.cumsum(hits * discounts, axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])

    out: dict[str, float] = {}
    for k in ks:
        out[f"recall_at_{k}"] = float(np.mean(cum[:, k - 1] / np.minimum(k, held)))
    for k in _fits(_NDCG_KS, width):
        out[f"ndcg_at_{k}"] = float(np.mean(dcg[:, k - 1] / ideal[np.minimum(k, held)]))
    for k in _fits(_HIT_KS, width):
        out[f"hit_rate_at_{k}"] = float(np.mean(cum[:, k - 1] > 0))
    for k in _fits(_COVERAGE_KS, width):
        out[f"coverage_at_{k}"] = coverage(top, n_items, k)
    return out


def _fits(wanted: Sequence[int], width: int) -> list[int]:
    return [k for k in wanted if 1 <= k <= width]


def _hits(top: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """bool [U, K]: is ``top[u, j]`` a stored entry of ``truth`` row ``u``?"""
    csr = sp.csr_matrix(truth, copy=True)
    csr.sum_duplicates()  # also sorts indices, which the searchsorted below relies on
    n_users, n = csr.shape
    row_of = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(csr.indptr))
    stored = row_of * n + csr.indices
    valid = (top >= 0) & (top < n)
    wanted = np.arange(len(top), dtype=np.int64)[:, None] * n + np.where(valid, top, 0)
    pos = np.searchsorted(stored, wanted)
    found = np.zeros(top.shape, dtype=bool)
    in_range = pos < len(stored)
    found[in_range] = stored[pos[in_range]] == wanted[in_range]
    return found & valid


def coverage(topk_idx: np.ndarray, n_items: int, k: int = 10) -> float:
    """Share of the ``n_items`` candidates that appear in at least one top-``k`` list."""
    if n_items <= 0:
        return 0.0
    top = np.asarray(topk_idx)[:, :k]
    shown = np.unique(top[(top >= 0) & (top < n_items)])
    return float(len(shown) / n_items)
