"""ExactIndex's candidate-blocked path (many queries, large catalogue) equals ranking.top_k."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tracktower.features import ranking
from tracktower.features.index import ExactIndex, exact


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks small enough that a test-sized catalogue takes the blocked path, with several row
    and candidate blocks (the last of each partial)."""
    monkeypatch.setattr(ranking, "SCORE_BUDGET", 64)
    monkeypatch.setattr(exact, "MIN_CHUNK_ROWS", 8)
    monkeypatch.setattr(exact, "ROW_BLOCK", 7)
    monkeypatch.setattr(exact, "COLUMN_BLOCK", 23)


def integer_case(seed: int, batch: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Small integers: dot products exact in float32 whatever the BLAS blocking; ties abound."""
    rng = np.random.default_rng(seed)
    queries = rng.integers(-2, 3, size=(batch, dim)).astype(np.float32)
    candidates = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    return queries, candidates


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("k", [1, 5, 30, 150, 250])
def test_blocked_path_equals_top_k_with_ties_exclusions_and_padding(k: int) -> None:
    queries, candidates = integer_case(k, batch=40, n=200, dim=3)
    rng = np.random.default_rng(k)
    dense = rng.random((50, 200)) < 0.2
    dense[3, :] = True  # nothing left: all -1 / -inf
    dense[4, :190] = True  # ten left, all in the last candidate block
    dense[5, 10:] = True  # ten left, all in the first candidate block
    rows = rng.permutation(50)[:40]
    rows[:3] = [3, 4, 5]
    exclude = sp.csr_matrix(dense)
    got = ExactIndex(candidates).search(queries, k, exclude, rows)
    want = ranking.top_k(queries @ candidates.T, k, exclude, rows)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    plain = ExactIndex(candidates).search(queries, k)
    want = ranking.top_k(queries @ candidates.T, k)
    np.testing.assert_array_equal(plain[0], want[0])
    np.testing.assert_array_equal(plain[1], want[1])
    assert got[0][0].tolist() == [-1] * k


@pytest.mark.usefixtures("small_blocks")
def test_blocked_path_with_spare_and_nan_scores() -> None:
    queries, candidates = integer_case(9, batch=20, n=120, dim=4)
    candidates[[3, 60, 119]] = np.nan  # never returned, as in ranking.top_k
    got = ExactIndex(candidates).search(queries, 6, spare=4)
    want = ranking.top_k(queries @ candidates.T, 10)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_a_single_query_keeps_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(exact, "_columns_top_k", lambda q, *a: calls.append(len(q)))
    monkeypatch.setattr(ranking, "SCORE_BUDGET", 64)
    queries, candidates = integer_case(1, batch=1, n=200, dim=3)
    ExactIndex(candidates).search(queries, 5)
    assert calls == []
    ExactIndex(candidates).search(np.repeat(queries, 300, axis=0), 5)
    assert calls == [300]
