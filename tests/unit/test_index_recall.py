"""Recall against exact search, and the seeded sample it is measured on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from tracktower.features.index import ExactIndex, measure_recall, sample_rows
from tracktower.features.index.recall import overlap


class DropsTheBest:
    """An index that returns exact search's top-k minus its best hit: recall@k is (k-1)/k."""

    backend = "test"

    def __init__(self, candidates: np.ndarray) -> None:
        self.params: dict[str, Any] = {}
        self.exact = ExactIndex(candidates)
        self.size, self.dim = candidates.shape

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        idx, top = self.exact.search(queries, k + 1)
        return idx[:, 1:], top[:, 1:]

    def save(self, directory: Path) -> None:
        raise NotImplementedError


def test_overlap_counts_valid_truth_only() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1]])
    got = np.array([[4, 9, 1, -1], [6, 5, 7, 8], [0, 1, 2, 3]])
    # row 0: 2 of 4; row 1: 2 of 2; row 2: nothing to find counts as 1
    assert overlap(got, truth) == pytest.approx((0.5 + 1.0 + 1.0) / 3)


def test_exact_has_recall_one_and_a_lossy_index_less() -> None:
    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((500, 8)).astype(np.float32)
    queries = rng.standard_normal((40, 8)).astype(np.float32)
    exact = measure_recall(ExactIndex(candidates), candidates, queries)
    assert exact == {"recall_at_10": 1.0, "recall_at_100": 1.0}
    lossy = measure_recall(DropsTheBest(candidates), candidates, queries, ks=(5, 20))
    assert lossy == pytest.approx({"recall_at_5": 0.8, "recall_at_20": 0.95})


def test_recall_with_exclusions_measures_the_filtered_search() -> None:
    rng = np.random.default_rng(1)
    candidates = rng.standard_normal((300, 4)).astype(np.float32)
    queries = rng.standard_normal((10, 4)).astype(np.float32)
    exclude = sp.csr_matrix(rng.random((10, 300)) < 0.2)
    recall = measure_recall(ExactIndex(candidates), candidates, queries, (10,), exclude)
    assert recall == {"recall_at_10": 1.0}
    with pytest.raises(ValueError, match="at least one query"):
        measure_recall(ExactIndex(candidates), candidates, queries[:0])


def test_sample_rows_is_seeded_and_takes_all_when_few() -> None:
    np.testing.assert_array_equal(sample_rows(7), np.arange(7))
    first, again, other = (
        sample_rows(50_000, seed=1),
        sample_rows(50_000, seed=1),
        sample_rows(50_000, 2),
    )
    assert len(first) == 1000 and len(np.unique(first)) == 1000
    assert (np.diff(first) > 0).all() and first.max() < 50_000
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len(sample_rows(5000, size=2000)) == 2000
    with pytest.raises(ValueError):
        sample_rows(10, size=0)
