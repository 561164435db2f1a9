"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data").

Closed form: with P = (X^T X + lambda I)^-1, the item-item weights are B = I - P / diag(P)
(column j divided by P_jj), i.e. B_ij = -P_ij / P_jj off the diagonal and 0 on it. Scores for a
user are x_u @ B. On playlist data it is usually the strongest simple baseline, which is why the
two-tower model is compared against it.

Memory: one dense float32 n_items x n_items matrix (n_items^2 * 4 bytes: 23k tracks -> 2.1 GB) plus
a row block of at most ``block`` x n_items while building the Gram. The Gram is Cholesky-factored
and inverted *in place* with LAPACK ``potrf``/``potri`` (float32), so the inverse never needs a
second n^2 buffer the way ``np.linalg.inv`` (identity right-hand side + copy) would. Above
``max_items`` the fit refuses with a DataError rather than letting the kernel OOM-kill the run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import get_lapack_funcs
from scipy.sparse import csr_matrix

from tracktower.features.errors import DataError
from tracktower.training.baselines import DEFAULT_MAX_ITEMS


def gram_bytes(n_items: int) -> int:
    """Bytes of the dense float32 item-item matrix EASE holds (its dominant memory cost)."""
    return n_items * n_items * 4


class EASE:
    """EASE with L2 strength ``l2`` (logged as ``lambda``).

    ``binarize`` (default) fits on 0/1 interactions as in the paper: play counts are heavy-tailed
    and a few replayed songs would otherwise dominate the Gram's diagonal.
    """

    name = "ease"

    def __init__(
        self,
        l2: float = 500.0,
        *,
        binarize: bool = True,
        max_items: int = DEFAULT_MAX_ITEMS,
        block: int = 2048,
    ) -> None:
        if not l2 > 0:
            raise DataError(f"EASE lambda must be > 0, got {l2}")
        self.l2 = float(l2)
        self.binarize = binarize
        self.max_items = max_items
        self.block = block
        self.weights: np.ndarray | None = None
        self._x: csr_matrix | None = None

    def params(self) -> dict[str, Any]:
        return {"model": self.name, "lambda": self.l2, "binarize": self.binarize}

    @property
    def memory_bytes(self) -> int:
        return 0 if self.weights is None else int(self.weights.nbytes)

    def check(self, train_csr: csr_matrix) -> None:
        """Fail fast (before any MLflow run starts) when the item-item matrix would not fit."""
        n = train_csr.shape[1]
        if n > self.max_items:
            raise DataError(
                f"EASE needs a dense {n:,} x {n:,} float32 matrix ({gram_bytes(n) / 1e9:.1f} GB), "
                f"above max_items={self.max_items:,}; raise the cap if the memory is there, or "
                "apply a stronger k-core to shrink the track vocabulary"
            )

    def fit(self, train_csr: csr_matrix) -> EASE:
        x = csr_matrix(train_csr, dtype=np.float32, copy=True)
        x.eliminate_zeros()
        if self.binarize:
            x.data[:] = 1.0
        self.check(x)
        n = x.shape[1]
        gram = self._gram(x)
        gram.flat[:: n + 1] += self.l2
        p = self._inverse_spd(gram)
        del gram
        diag = p.diagonal().copy()
        p /= -diag[np.newaxis, :]
        p.flat[:: n + 1] = 0.0
        self.weights = p
        self._x = x
        return self

    def _gram(self, x: csr_matrix) -> np.ndarray:
        """X^T X written into one preallocated dense array, ``block`` item rows at a time."""
        n = x.shape[1]
        xt = x.T.tocsr()
        gram = np.empty((n, n), dtype=np.float32)
        for start in range(0, n, self.block):
            stop = min(n, start + self.block)
            gram[start:stop] = (xt[start:stop] @ x).toarray()
        return gram

    def _inverse_spd(self, gram: np.ndarray) -> np.ndarray:
        """Invert a symmetric positive-definite matrix in place (Cholesky, then potri).

        ``gram.T`` is the Fortran-ordered view of the same (symmetric) buffer, so LAPACK can
        overwrite it without a copy. potri fills one triangle; the other is mirrored block-wise to
        keep the temporary at ``block`` x n.
        """
        potrf, potri = get_lapack_funcs(("potrf", "potri"), (gram,))
        factor, info = potrf(gram.T, lower=False, overwrite_a=True, clean=False)
        if info != 0:
            raise DataError(
                f"EASE: X^T X + lambda*I is not positive definite in float32 (potrf info={info}); "
                "use a larger lambda"
            )
        inv, info = potri(factor, lower=False, overwrite_c=True)
        if info != 0:
            raise DataError(f"EASE: inversion failed (potri info={info}); use a larger lambda")
        # Fortran upper triangle of inv == C-order lower triangle of p.
        p = inv.T
        n = p.shape[0]
        for start in range(0, n, self.block):
            stop = min(n, start + self.block)
            diag_block = p[start:stop, start:stop]
            diag_block[:] = np.tril(diag_block) + np.tril(diag_block, -1).T
            if stop < n:
                p[start:stop, stop:] = p[stop:, start:stop].T
        return p

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        if self.weights is None or self._x is None:
            raise RuntimeError("EASE.score called before fit")
        return np.asarray(self._x[user_rows] @ self.weights, dtype=np.float32)
