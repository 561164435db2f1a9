"""The one top-k routine: offline evaluation, baselines, batch scoring and the server all call it.

Sharing it guarantees that "excluded", "tie" and "fewer than k candidates" mean the same thing
offline and online (training/serving skew), and the tie-break makes results reproducible across
machines: higher score first, then lower candidate index.

Slots that could not be filled with a real candidate (k larger than the number of candidates, or
every remaining candidate excluded) hold index ``-1`` and score ``-inf``; callers must drop them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp

__all__ = [
    "SCORE_BUDGET",
    "exclude_rows",
    "score_chunks",
    "top_k",
    "top_k_chunks",
]

# Scores per block in top_k_chunks: 16M float32 (64 MB) plus argpartition's int64 indices (128 MB).
SCORE_BUDGET = 1 << 24
_TIE_FIX_ROWS = 64  # rows per block when resolving boundary ties exactly (bounds the cumsum memory)


def top_k(
    scores: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices int64 [B, k], scores float32 [B, k])`` of the best ``k`` per row.

    ``exclude`` is a csr matrix over the candidates whose stored entries (e.g. a user's training
    tracks) get score ``-inf``; ``rows[b]`` is the row of ``exclude`` for score row ``b`` (default:
    row ``b``). NaN scores count as ``-inf``. The input array is not modified.
    """
    s = np.array(scores, dtype=np.float32, copy=True, ndmin=2)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [batch, candidates], got shape {np.shape(scores)}")
    return _top_k_inplace(s, k, exclude, rows)


def _top_k_inplace(
    s: np.ndarray, k: int, exclude: sp.csr_matrix | None, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` on a float32 array the caller owns (it is overwritten), saving a copy."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    batch, n = s.shape
    np.copyto(s, -np.inf, where=np.isnan(s))
    if exclude is not None:
        r, c = _exclude_mask(exclude, rows, batch, n)
        s[r, c] = -np.inf
    kk = min(k, n)
    if kk == 0:
        idx = np.zeros((batch, 0), dtype=np.int64)
    elif kk == n:
        idx = np.broadcast_to(np.arange(n, dtype=np.int64), (batch, n)).copy()
    else:
        idx = np.argpartition(s, n - kk, axis=1)[:, n - kk :].astype(np.int64, copy=False)
        _fix_boundary_ties(s, idx, kk)
    top = np.take_along_axis(s, idx, axis=1)
    order = np.lexsort((idx, -top), axis=1)  # descending score, then ascending index
    idx = np.take_along_axis(idx, order, axis=1)
    top = np.take_along_axis(top, order, axis=1)
    if kk < k:
        idx = np.pad(idx, ((0, 0), (0, k - kk)), constant_values=-1)
        top = np.pad(top, ((0, 0), (0, k - kk)), constant_values=-np.inf)
    idx[np.isneginf(top)] = -1
    return idx, top


def exclude_rows(
    exclude: sp.csr_matrix, rows: np.ndarray | None, batch: int, n: int
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``exclude[rows]`` as csr, and ``rows`` (default: exclude row ``b`` for score row ``b``),
    checked against ``batch`` score rows over ``n`` candidates.

    The rows are cut from ``indptr`` / ``indices`` directly, so the cost is that of the rows
    asked for: scipy's ``csr[rows]`` copies the whole values array first when it is not a plain
    one (the server's seen matrix, 66M pairs at MPD shape, has a zero-stride 1 as its values).
    Only the stored entries matter here; the values of the result are ones.
    """
    csr = exclude if isinstance(exclude, sp.csr_matrix) else sp.csr_matrix(exclude)
    if csr.shape[1] != n:
        raise ValueError(f"exclude has {csr.shape[1]} columns but there are {n} candidates")
    if rows is None:
        if csr.shape[0] != batch:
            raise ValueError(f"exclude has {csr.shape[0]} rows for {batch} score rows; pass rows=")
        return csr, np.arange(batch)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) != batch:
        raise ValueError(f"rows has {len(rows)} entries for {batch} score rows")
    if len(rows) and (rows.min() < 0 or rows.max() >= csr.shape[0]):
        raise IndexError(f"rows must be in [0, {csr.shape[0]})")
    starts = csr.indptr[rows].astype(np.int64)
    lengths = csr.indptr[rows + 1].astype(np.int64) - starts
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
    sub = sp.csr_matrix(
        (np.ones(len(take), dtype=np.float32), csr.indices[take], indptr),
        shape=(len(rows), n),
    )
    return sub, rows


def _exclude_mask(
    exclude: sp.csr_matrix, rows: np.ndarray | None, batch: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(score row, candidate) coordinates of the stored entries of ``exclude[rows]``."""
    sub, _ = exclude_rows(exclude, rows, batch, n)
    counts = np.diff(sub.indptr)
    return np.repeat(np.arange(batch), counts), sub.indices.astype(np.int64, copy=False)


def _fix_boundary_ties(s: np.ndarray, idx: np.ndarray, k: int) -> None:
    """Make the selected set exact when the k-th score is tied with unselected candidates.

    ``argpartition`` picks an arbitrary subset of equal scores at the boundary; the contract wants
    the lowest indices. Only rows with such a tie are recomputed (in place). Ties at ``-inf`` are
    left alone: those slots become ``-1`` anyway.
    """
    kth = np.take_along_axis(s, idx, axis=1).min(axis=1)
    at_least = np.count_nonzero(s >= kth[:, None], axis=1)  # == k unless the boundary is tied
    bad = np.flatnonzero(np.isfinite(kth) & (at_least > k))
    for start in range(0, len(bad), _TIE_FIX_ROWS):
        block = bad[start : start + _TIE_FIX_ROWS]
        sb, vb = s[block], kth[block, None]
        above = sb > vb
        eq = sb == vb
        need = k - np.count_nonzero(above, axis=1)[:, None]
        chosen = above | (eq & (np.cumsum(eq, axis=1, dtype=np.int32) <= need))
        idx[block] = np.nonzero(chosen)[1].reshape(len(block), k)


def score_chunks(
    queries: np.ndarray,
    candidates: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    chunk: int = 1024,
    rows: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Top-k of ``queries @ candidates.T`` in row blocks (see :func:`top_k_chunks`), in query
    order. ``exclude`` rows align with ``queries`` unless ``rows`` maps query ``i`` to ``exclude``
    row ``rows[i]``."""
    q = np.asarray(queries, dtype=np.float32)
    cand_t = np.ascontiguousarray(np.asarray(candidates, dtype=np.float32).T)
    return top_k_chunks(
        lambda block: q[block] @ cand_t, q.shape[0], cand_t.shape[1], k, exclude, chunk, rows
    )


def top_k_chunks(
    scorer: Callable[[slice], np.ndarray],
    n_rows: int,
    n_candidates: int,
    k: int,
    exclude: sp.csr_matrix | None = None,
    chunk: int = 1024,
    rows: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`top_k` of ``n_rows`` score rows that ``scorer(slice)`` produces block by block.

    The one place that decides how many rows are scored at once, so the two-tower evaluation, the
    baselines and the server share one memory bound: a block holds at most ``chunk`` rows and at
    most :data:`SCORE_BUDGET` scores (fewer rows when there are many candidates), however many rows
    there are. ``scorer`` must return a new float32 ``[len(block), n_candidates]`` array: it is
    overwritten in place. ``exclude`` row ``i`` belongs to score row ``i`` unless ``rows[i]`` says
    otherwise.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    chunk = max(1, min(chunk, SCORE_BUDGET // max(n_candidates, 1)))
    if exclude is not None and rows is None:
        rows = np.arange(n_rows)
    elif rows is not None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    return _blocks(scorer, n_rows, n_candidates, k, exclude, chunk, rows)


def _blocks(
    scorer: Callable[[slice], np.ndarray],
    n_rows: int,
    n_candidates: int,
    k: int,
    exclude: sp.csr_matrix | None,
    chunk: int,
    rows: np.ndarray | None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The generator behind :func:`top_k_chunks`, kept apart so bad arguments fail at the call."""
    for start in range(0, n_rows, chunk):
        block = slice(start, min(start + chunk, n_rows))
        scores = np.asarray(scorer(block), dtype=np.float32)
        want = (block.stop - start, n_candidates)
        if scores.shape != want:
            raise ValueError(f"scorer returned shape {scores.shape} for a block of shape {want}")
        block_rows = rows[block] if rows is not None else None
        yield _top_k_inplace(scores, k, exclude, block_rows)
