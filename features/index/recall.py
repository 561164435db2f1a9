"""Recall of an index against exact search, on real query vectors.

recall@k of a query = |index top-k ∩ exact top-k| / |exact top-k|, averaged over queries; the
exact top-k is :class:`ExactIndex`'s (``features.ranking``'s ties), and slots padded with -1 count
neither as retrieved nor as relevant. Each k is searched separately (a search for k rescores
``rescore_width(k)`` candidates, so recall@10 of a top-100 search would flatter the index).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from tracktower.features.index.base import RetrievalIndex, check_queries
from tracktower.features.index.exact import ExactIndex
from tracktower.features.index.filtered import search_excluding

__all__ = ["MIN_SAMPLE", "measure_recall", "overlap", "recall_against", "sample_rows"]

MIN_SAMPLE = 1000


def sample_rows(n_rows: int, seed: int = 0, size: int = MIN_SAMPLE) -> np.ndarray:
    """Sorted row numbers of a seeded sample of ``size`` rows out of ``n_rows`` (all rows when
    there are no more than ``size``): the users recall is measured on."""
    if n_rows < 0 or size < 1:
        raise ValueError(f"need n_rows >= 0 and size >= 1, got {n_rows}, {size}")
    if n_rows <= size:
        return np.arange(n_rows, dtype=np.int64)
    chosen = np.random.default_rng(seed).choice(n_rows, size=size, replace=False)
    return np.sort(chosen).astype(np.int64)


def measure_recall(
    index: RetrievalIndex,
    candidates: np.ndarray,
    queries: np.ndarray,
    ks: Sequence[int] = (10, 100),
    exclude: sp.csr_matrix | None = None,
    rows: np.ndarray | None = None,
) -> dict[str, float]:
    """``{"recall_at_10": r, "recall_at_100": r, ...}`` of ``index`` on ``queries``.

    With ``exclude`` both sides exclude the same tracks (the index through
    :func:`search_excluding`), so this is the recall a server excluding seen tracks gets.
    """
    exact = ExactIndex(candidates)
    q = check_queries(queries, exact.dim, max(ks))
    if len(q) == 0:
        raise ValueError("recall needs at least one query")
    truth, _ = exact.search(q, max(ks), exclude, rows)
    return recall_against(index, exact, q, truth, ks, exclude, rows)


def recall_against(
    index: RetrievalIndex,
    exact: ExactIndex,
    queries: np.ndarray,
    truth: np.ndarray,
    ks: Sequence[int] = (10, 100),
    exclude: sp.csr_matrix | None = None,
    rows: np.ndarray | None = None,
) -> dict[str, float]:
    """:func:`measure_recall` given the exact top-``max(ks)`` ``truth`` of the same queries, so
    retuning an index measures it again without redoing the exact search."""
    if truth.shape != (len(queries), max(ks)):
        raise ValueError(f"truth has shape {truth.shape}, expected {(len(queries), max(ks))}")
    out = {}
    for k in sorted(set(ks)):
        got, _ = search_excluding(index, exact, queries, k, exclude, rows)
        out[f"recall_at_{k}"] = overlap(got, truth[:, :k])
    return out


def overlap(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of the share of ``truth``'s valid (>= 0) entries found in ``got``'s row."""
    span = int(max(got.max(initial=0), truth.max(initial=0))) + 2
    offsets = np.arange(len(truth), dtype=np.int64)[:, None] * span
    valid_truth = truth >= 0
    keys_truth = (truth + offsets)[valid_truth]
    keys_got = (got + offsets)[got >= 0]
    found = np.zeros(truth.shape, dtype=bool)
    found[valid_truth] = np.isin(keys_truth, keys_got)
    relevant = valid_truth.sum(axis=1)
    per_row = np.divide(found.sum(axis=1), relevant, out=np.ones(len(truth)), where=relevant > 0)
    return float(per_row.mean())
