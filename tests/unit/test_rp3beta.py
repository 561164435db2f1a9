"""RP3beta against a plain dense numpy implementation of the same formula."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tracktower.features.errors import DataError
from tracktower.training.baselines import Recommender, make_recommender
from tracktower.training.baselines.rp3beta import RP3beta, top_per_row


def _dense_rp3beta(x: np.ndarray, alpha: float, beta: float, neighbors: int) -> np.ndarray:
    """W by the textbook formula: dense matrices, one row at a time, a full stable sort."""
    x = x.astype(np.float64)
    binary = (x != 0).astype(np.float64)
    p_ui = x / np.maximum(x.sum(axis=1, keepdims=True), 1e-300)
    p_iu = binary.T / np.maximum(binary.T.sum(axis=1, keepdims=True), 1e-300)
    p_ui, p_iu = p_ui**alpha, p_iu**alpha
    degree = binary.sum(axis=0)
    penalty = np.where(degree > 0, np.power(np.maximum(degree, 1.0), -beta), 0.0)
    walk = (p_iu @ p_ui) * penalty[np.newaxis, :]
    np.fill_diagonal(walk, 0.0)
    out = np.zeros_like(walk)
    for i, row in enumerate(walk):
        order = np.argsort(-row, kind="stable")[:neighbors]  # ties: lower index first
        keep = order[row[order] != 0]
        out[i, keep] = row[keep]
    return out


def _counts(users: int, items: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.random((users, items)) < density
    return np.where(mask, rng.integers(1, 9, size=(users, items)), 0).astype(np.float32)


@pytest.mark.parametrize(
    ("alpha", "beta", "neighbors", "binary"),
    [(1.0, 0.5, 1000, False), (0.8, 0.3, 5, False), (0.5, 0.0, 3, False), (0.5, 0.3, 1000, True)],
)
def test_rp3beta_equals_dense_reference(alpha, beta, neighbors, binary) -> None:
    """Play counts (``binarize=False``) keep the walk probabilities distinct, so the top-k cut is
    compared too; 0/1 rows make many of them equal in exact arithmetic but not in float
    (summation order), so there every neighbour is kept (the cut's tie rule has its own test)."""
    counts = _counts(50, 30, 0.15, seed=3)
    x = (counts > 0).astype(np.float32) if binary else counts
    # 64 dense elements per block: 2 rows of 30 at a time, so the row blocks are exercised.
    model = RP3beta(alpha, beta, neighbors, binarize=binary, block_elements=64)
    model.fit(sp.csr_matrix(counts))
    expected = _dense_rp3beta(x, alpha, beta, neighbors)
    assert model.weights is not None and sp.issparse(model.weights)
    np.testing.assert_allclose(model.weights.toarray(), expected, rtol=1e-5, atol=1e-7)
    assert (np.diff(model.weights.indptr) <= neighbors).all()
    rows = np.array([0, 7, 49])
    scores = model.score(rows)
    assert scores.dtype == np.float32 and scores.shape == (3, 30)
    np.testing.assert_allclose(scores, x[rows] @ expected, rtol=1e-5, atol=1e-7)
    assert isinstance(model, Recommender)


def test_rp3beta_block_size_changes_nothing() -> None:
    x = sp.csr_matrix(_counts(40, 25, 0.2, seed=5))
    one = RP3beta(0.8, 0.3, 4, binarize=False, block_elements=25).fit(x).weights
    all_rows = RP3beta(0.8, 0.3, 4, binarize=False, block_elements=10_000).fit(x).weights
    assert one is not None and all_rows is not None
    assert (one != all_rows).nnz == 0


def test_top_per_row_breaks_ties_by_lower_index() -> None:
    block = np.array([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(
        top_per_row(block, 2),
        [[False, True, True, False, False], [False, False, True, False, False]],
    )


def test_rp3beta_validates_and_registers() -> None:
    with pytest.raises(DataError, match="alpha"):
        RP3beta(alpha=0.0)
    with pytest.raises(DataError, match="neighbors"):
        RP3beta(neighbors=0)
    with pytest.raises(DataError, match="non-negative"):
        RP3beta().fit(sp.csr_matrix(np.array([[1.0, -1.0]], np.float32)))
    with pytest.raises(RuntimeError, match="before fit"):
        RP3beta().score(np.array([0]))
    model = make_recommender("rp3beta", alpha=0.5, beta=0.3, neighbors=10)
    assert model.params() == {
        "model": "rp3beta",
        "alpha": 0.5,
        "beta": 0.3,
        "neighbors": 10,
        "binarize": True,
    }
