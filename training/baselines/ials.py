"""Implicit ALS (Hu, Koren & Volinsky 2008) through the ``implicit`` library.

implicit 0.7.3 treats the value it is given as the confidence C_ui of an observed pair (unobserved
pairs get C = 1, preference 0) and multiplies it by its own ``alpha``. We build the confidence
matrix ourselves and pass ``alpha=1`` so the scaling is explicit and matches the paper:

- ``linear``: C = 1 + alpha * w
- ``log``:    C = 1 + alpha * log1p(w / eps)   (tames heavy-tailed play counts)
- ``binary``: C = 1 + alpha                     (counts ignored: every observed pair alike)

With 0/1 playlist data ``linear`` and ``binary`` are the same model.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from scipy.sparse import csr_matrix

from tracktower.features.errors import DataError

Scaling = Literal["linear", "log", "binary"]
SCALINGS = ("linear", "log", "binary")


class IALS:
    """Matrix factorisation; scores are user_factors @ item_factors.T."""

    name = "ials"

    def __init__(
        self,
        factors: int = 128,
        regularization: float = 0.1,
        alpha: float = 10.0,
        iterations: int = 15,
        *,
        scaling: Scaling = "linear",
        eps: float = 1.0,
        num_threads: int = 0,
        random_state: int = 0,
    ) -> None:
        if factors < 1 or iterations < 1:
            raise DataError("iALS factors and iterations must be >= 1")
        if regularization < 0 or alpha < 0 or eps <= 0:
            raise DataError("iALS regularization and alpha must be >= 0 and eps > 0")
        if scaling not in SCALINGS:
            raise DataError(f"iALS scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        self.factors = int(factors)
        self.regularization = float(regularization)
        self.alpha = float(alpha)
        self.iterations = int(iterations)
        self.scaling: Scaling = scaling
        self.eps = float(eps)
        self.num_threads = int(num_threads)
        self.random_state = int(random_state)
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.name,
            "factors": self.factors,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "iterations": self.iterations,
            "scaling": self.scaling,
            "random_state": self.random_state,
        }
        if self.scaling == "log":
            out["eps"] = self.eps
        return out

    @property
    def memory_bytes(self) -> int:
        factors = (self.user_factors, self.item_factors)
        return sum(0 if f is None else int(f.nbytes) for f in factors)

    def confidence(self, train_csr: csr_matrix) -> csr_matrix:
        c = csr_matrix(train_csr, dtype=np.float32, copy=True)
        c.eliminate_zeros()
        if self.scaling == "log":
            c.data = np.log1p(c.data / self.eps, dtype=np.float32)
        elif self.scaling == "binary":
            c.data[:] = 1.0
        c.data = (1.0 + self.alpha * c.data).astype(np.float32)
        return c

    def fit(self, train_csr: csr_matrix) -> IALS:
        # implicit runs its own OpenMP pool and calls BLAS (ssymv) from each thread; a
        # multi-threaded BLAS underneath oversubscribes the cores (what implicit's OpenBLAS warning
        # is about; measured here: minutes instead of seconds). BLAS is pinned to one thread for the
        # fit only, so EASE and scoring keep theirs. implicit is imported *first*: threadpoolctl
        # only limits BLAS libraries that are already loaded, and implicit loads scipy's OpenBLAS.
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        conf = self.confidence(train_csr)
        logging.getLogger("implicit").setLevel(logging.WARNING)
        with threadpool_limits(limits=1, user_api="blas"):
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=1.0,
                iterations=self.iterations,
                num_threads=self.num_threads,
                random_state=self.random_state,
            )
            model.fit(conf, show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        if self.user_factors is None or self.item_factors is None:
            raise RuntimeError("IALS.score called before fit")
        return np.asarray(self.user_factors[user_rows] @ self.item_factors.T, dtype=np.float32)
