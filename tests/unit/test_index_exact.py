"""ExactIndex against a plain argsort brute force: ties, padding, exclusions, no copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tracktower.features.errors import DataError
from tracktower.features.index import ExactIndex, RetrievalIndex, load_index


def brute_force(
    queries: np.ndarray, candidates: np.ndarray, k: int, excluded: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Score desc, then index asc; excluded (bool [B, n]) and missing slots are -1 / -inf."""
    scores = (queries.astype(np.float64) @ candidates.astype(np.float64).T).astype(np.float32)
    if excluded is not None:
        scores[excluded] = -np.inf
    batch, n = scores.shape
    idx = np.full((batch, k), -1, dtype=np.int64)
    top = np.full((batch, k), -np.inf, dtype=np.float32)
    for b in range(batch):
        order = np.lexsort((np.arange(n), -scores[b]))[:k]
        order = order[np.isfinite(scores[b, order])]
        idx[b, : len(order)], top[b, : len(order)] = order, scores[b, order]
    return idx, top


def integer_case(seed: int, batch: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Small integer vectors: every dot product is exact in float32, and many are tied."""
    rng = np.random.default_rng(seed)
    queries = rng.integers(-2, 3, size=(batch, dim)).astype(np.float32)
    candidates = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    return queries, candidates


@pytest.mark.parametrize("k", [1, 7, 40, 41, 60])
def test_equals_brute_force_with_ties_and_padding(k: int) -> None:
    queries, candidates = integer_case(k, batch=13, n=41, dim=3)
    index = ExactIndex(candidates)
    idx, top = index.search(queries, k)
    want_idx, want_top = brute_force(queries, candidates, k)
    assert idx.dtype == np.int64 and top.dtype == np.float32 and idx.shape == (13, k)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(top, want_top)
    assert isinstance(index, RetrievalIndex)
    assert (index.backend, index.params, index.size, index.dim) == ("exact", {}, 41, 3)


def test_exclusions_with_row_mapping() -> None:
    queries, candidates = integer_case(1, batch=6, n=30, dim=4)
    rng = np.random.default_rng(2)
    dense = rng.random((9, 30)) < 0.3
    dense[4, :28] = True  # row 4 leaves two candidates
    rows = np.array([4, 0, 8, 4, 1, 2])
    idx, top = ExactIndex(candidates).search(queries, 5, sp.csr_matrix(dense), rows)
    want_idx, want_top = brute_force(queries, candidates, 5, dense[rows])
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(top, want_top)
    assert idx[0, 2:].tolist() == [-1, -1, -1]


def test_uses_a_read_only_map_in_place(tmp_path: Path) -> None:
    _, candidates = integer_case(3, batch=1, n=20, dim=4)
    np.save(tmp_path / "emb.npy", candidates)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    index = ExactIndex(mapped)
    assert np.shares_memory(index.candidates, mapped)
    index.save(tmp_path / "index")  # a description only: the index is the artifact's matrix
    assert [p.name for p in (tmp_path / "index").iterdir()] == ["tracktower_index.json"]
    loaded = load_index(None, "exact", {}, mapped)
    np.testing.assert_array_equal(
        loaded.search(candidates[:3], 4)[0], index.search(candidates[:3], 4)[0]
    )


def test_bad_input_is_one_line() -> None:
    index = ExactIndex(np.ones((5, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"queries must be float32 \[batch, 3\].*\(2, 4\)"):
        index.search(np.ones((2, 4)), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones((2, 3)), 0)
    with pytest.raises(DataError, match="candidate embeddings"):
        ExactIndex(np.ones(5))
    with pytest.raises(DataError, match="unknown index backend 'faiss'"):
        load_index(None, "faiss", {}, np.ones((5, 3)))


def test_save_describes_the_index_and_load_checks_it(tmp_path: Path) -> None:
    """Never an empty directory (artifact stores drop those), and a mismatch is one line."""
    from tracktower.features.index.base import META_FILE, load_index

    cand = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    ExactIndex(cand).save(tmp_path / "index")
    assert (tmp_path / "index" / META_FILE).is_file()
    loaded = load_index(tmp_path / "index", "exact", {}, cand)
    assert loaded.size == 30 and loaded.dim == 4
    with pytest.raises(DataError, match=r"index built for \('exact', 30, 4\)"):
        load_index(tmp_path / "index", "exact", {}, cand[:20])
