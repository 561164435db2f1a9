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
