"""Exact search: every candidate scored, top-k through :mod:`tracktower.features.ranking`.

The reference every approximate backend is measured against, the fallback when exclusions leave
an approximate result too short, and the cheaper choice for small catalogues (no build, nothing
stored, recall 1 by construction).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from tracktower.features import ranking
from tracktower.features.errors import DataError
from tracktower.features.index.base import META_FILE, check_candidates, check_queries

__all__ = ["ExactIndex"]

# Many queries over a large catalogue (the export's fallback rows, a recall sample at MPD shape):
# a SCORE_BUDGET block would hold only a few rows, so every few rows would re-read the whole
# candidate matrix and argpartition every score (about 12 ns each). Below MIN_CHUNK_ROWS rows per
# block the search goes candidate block by candidate block instead: ROW_BLOCK queries share each
# pass over the candidates (one large matrix product), and after the first block only scores
# above a row's running k-th best are kept (one comparison each), so selection costs little.
MIN_CHUNK_ROWS = 256
ROW_BLOCK = 1024
COLUMN_BLOCK = 16384


class ExactIndex:
    """Brute-force inner-product top-k over ``candidates [n, dim]`` (kept as given: a read-only
    memory map is scored in place, never copied or transposed into a new array)."""

    backend = "exact"

    def __init__(self, candidates: np.ndarray) -> None:
        self._candidates = check_candidates(candidates)

    @property
    def params(self) -> dict[str, Any]:
        return {}

    @property
    def size(self) -> int:
        return int(self._candidates.shape[0])

    @property
    def dim(self) -> int:
        return int(self._candidates.shape[1])

    @property
    def candidates(self) -> np.ndarray:
        return self._candidates

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        rows: np.ndarray | None = None,
        *,
        spare: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-(k + spare), equal to ``ranking.top_k(queries @ candidates.T, k + spare,
        exclude, rows)``.

        Scoring runs in :func:`ranking.top_k_chunks` blocks, so memory stays bounded for any
        batch; ``exclude`` / ``rows`` mean what they mean there.
        """
        q = check_queries(queries, self.dim, k)
        if spare < 0:
            raise ValueError(f"spare must be >= 0, got {spare}")
        k += spare
        per_chunk = max(1, ranking.SCORE_BUDGET // self.size)
        if len(q) > per_chunk and per_chunk < MIN_CHUNK_ROWS:
            return _columns_top_k(q, self._candidates, k, exclude, rows)
        cand_t = self._candidates.T  # a view: BLAS reads the transposed layout directly
        blocks = ranking.top_k_chunks(
            lambda block: q[block] @ cand_t, len(q), self.size, k, exclude, rows=rows
        )
        indices = np.empty((len(q), k), dtype=np.int64)
        scores = np.empty((len(q), k), dtype=np.float32)
        start = 0
        for idx, top in blocks:
            indices[start : start + len(idx)], scores[start : start + len(idx)] = idx, top
            start += len(idx)
        return indices, scores

    def save(self, directory: Path) -> None:
        """Only a small description: the index is the candidate matrix, which the artifact already
        holds. Writing it at all matters: artifact stores (MLflow's included) do not keep empty
        directories, so an exact artifact downloaded from a registry would lose ``index/``."""
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"backend": self.backend, "num_tracks": self.size, "dim": self.dim}
        (directory / META_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path | None, candidates: np.ndarray) -> ExactIndex:
        """Over ``candidates``; the description in ``directory``, when there is one, must match."""
        index = cls(candidates)
        file = Path(directory) / META_FILE if directory is not None else None
        if file is not None and file.is_file():
            try:
                meta = json.loads(file.read_text(encoding="utf-8"))
                saved = (meta["backend"], int(meta["num_tracks"]), int(meta["dim"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"unreadable index description ({exc})", path=file) from None
            if saved != (cls.backend, index.size, index.dim):
                raise DataError(
                    f"index built for {saved}, artifact has exact over ({index.size}, {index.dim})",
                    path=file,
                )
        return index


def _columns_top_k(
    q: np.ndarray,
    cand: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None,
    rows: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``ranking.top_k(q @ cand.T, k, exclude, rows)``, ROW_BLOCK queries at a time, each block
    scored COLUMN_BLOCK candidates at a time (see MIN_CHUNK_ROWS)."""
    n = len(cand)
    if exclude is not None:
        exclude, rows = ranking.exclude_rows(exclude, rows, len(q), n)
    indices = np.empty((len(q), k), dtype=np.int64)
    scores = np.empty((len(q), k), dtype=np.float32)
    for start in range(0, len(q), ROW_BLOCK):
        stop = min(start + ROW_BLOCK, len(q))
        mask = None
        if exclude is not None:
            lo, hi = exclude.indptr[start], exclude.indptr[stop]
            r = np.repeat(np.arange(stop - start), np.diff(exclude.indptr[start : stop + 1]))
            c = exclude.indices[lo:hi].astype(np.int64)
            order = np.argsort(c, kind="stable")
            mask = (r[order], c[order])
        indices[start:stop], scores[start:stop] = _row_block_top_k(q[start:stop], cand, k, mask)
    return indices, scores


def _row_block_top_k(
    q: np.ndarray, cand: np.ndarray, k: int, mask: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k over candidate blocks, in index order. The first block is ranked by
    ``ranking.top_k``; a later candidate enters only with a score strictly above the row's k-th
    (an equal score loses the tie to the lower index already held), so the result is top_k's,
    ties and padding included. ``mask``: (row, candidate) pairs to exclude, sorted by candidate."""
    n = len(cand)
    best_idx = best_top = None
    for c0 in range(0, n, COLUMN_BLOCK):
        c1 = min(c0 + COLUMN_BLOCK, n)
        s = q @ cand[c0:c1].T
        if mask is not None:
            lo, hi = np.searchsorted(mask[1], [c0, c1])
            s[mask[0][lo:hi], mask[1][lo:hi] - c0] = -np.inf
        if best_idx is None or best_top is None:
            idx, best_top = ranking.top_k(s, k)
            best_idx = np.where(idx >= 0, idx + c0, -1)
            continue
        r, c = np.nonzero(s > best_top[:, -1:])
        if len(r):
            best_idx, best_top = _merge(best_idx, best_top, r, c + c0, s[r, c], k)
    assert best_idx is not None and best_top is not None
    return best_idx, best_top


def _merge(
    idx: np.ndarray, top: np.ndarray, r: np.ndarray, c: np.ndarray, s: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best ``k`` of its current list and the new (row ``r``, candidate ``c``, score
    ``s``) entries: score descending, then index ascending; -1 / -inf where nothing is left."""
    rows = len(idx)
    all_r = np.concatenate([np.repeat(np.arange(rows), k), r])
    all_i = np.concatenate([idx.ravel(), c])
    all_s = np.concatenate([top.ravel(), s.astype(np.float32, copy=False)])
    order = np.lexsort((np.where(all_i < 0, np.iinfo(np.int64).max, all_i), -all_s, all_r))
    counts = k + np.bincount(r, minlength=rows)
    starts = np.cumsum(counts) - counts
    take = order[(starts[:, None] + np.arange(k)).ravel()]
    new_idx, new_top = all_i[take].reshape(rows, k), all_s[take].reshape(rows, k)
    new_idx[np.isneginf(new_top)] = -1
    return new_idx, new_top
