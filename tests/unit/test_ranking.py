"""top_k and score_chunks against a plain argsort brute force, ties and exclusions included."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tracktower.features import ranking


def brute_force(
    scores: np.ndarray, k: int, exclude: sp.csr_matrix | None, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    s = np.where(np.isnan(scores), -np.inf, scores).astype(np.float32)
    if exclude is not None:
        dense = exclude.toarray()[rows if rows is not None else slice(None)] != 0
        s[dense] = -np.inf
    batch, n = s.shape
    idx = np.full((batch, k), -1, dtype=np.int64)
    top = np.full((batch, k), -np.inf, dtype=np.float32)
    for b in range(batch):
        order = np.lexsort((np.arange(n), -s[b]))[:k]  # score desc, then index asc
        idx[b, : len(order)] = order
        top[b, : len(order)] = s[b, order]
    idx[np.isneginf(top)] = -1
    return idx, top


def random_case(
    rng: np.random.Generator, batch: int, n: int, density: float, levels: int | None
) -> tuple[np.ndarray, sp.csr_matrix]:
    scores = rng.standard_normal((batch, n))
    if levels is not None:  # many exact ties
        scores = np.round(scores * levels) / levels
    scores = scores.astype(np.float32)
    exclude = sp.random(batch + 5, n, density=density, format="csr", random_state=rng)
    return scores, sp.csr_matrix(exclude)


@pytest.mark.parametrize("levels", [None, 2])
@pytest.mark.parametrize("k", [1, 5, 37, 60, 80])
def test_matches_brute_force(k: int, levels: int | None) -> None:
    rng = np.random.default_rng(k)
    scores, exclude = random_case(rng, batch=23, n=60, density=0.3, levels=levels)
    rows = rng.permutation(exclude.shape[0])[:23]
    scores[3, :] = 0.0  # a row that is one big tie
    dense = exclude.toarray()
    dense[rows[4], :55] = 1.0  # a row with only five candidates left
    exclude = sp.csr_matrix(dense)
    before = scores.copy()
    idx, top = ranking.top_k(scores, k, exclude, rows)
    want_idx, want_top = brute_force(scores, k, exclude, rows)
    assert idx.dtype == np.int64 and top.dtype == np.float32 and idx.shape == (23, k)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(top, want_top)
    np.testing.assert_array_equal(scores, before)  # input untouched


def test_ties_prefer_lower_index_and_short_rows_are_padded() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]], dtype=np.float32)
    idx, top = ranking.top_k(scores, 2)
    assert idx.tolist() == [[1, 2]] and top.tolist() == [[3.0, 3.0]]
    idx, top = ranking.top_k(scores, 7, sp.csr_matrix(np.array([[0, 1, 0, 0, 1]])))
    assert idx.tolist() == [[2, 3, 0, -1, -1, -1, -1]]
    assert np.isneginf(top[0, 3:]).all()


def test_nan_scores_rank_last_and_rows_default_to_identity() -> None:
    scores = np.array([[np.nan, 0.5, 0.1], [0.2, np.nan, 0.9]], dtype=np.float32)
    exclude = sp.csr_matrix(np.array([[0, 1, 0], [0, 0, 0]]))
    idx, _ = ranking.top_k(scores, 3, exclude)
    assert idx.tolist() == [[2, -1, -1], [2, 0, -1]]


def test_bad_arguments() -> None:
    scores = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="k must be"):
        ranking.top_k(scores, 0)
    with pytest.raises(ValueError, match="rows"):
        ranking.top_k(scores, 1, sp.csr_matrix((5, 3)))
    with pytest.raises(ValueError, match="columns"):
        ranking.top_k(scores, 1, sp.csr_matrix((2, 4)))


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_score_chunks_equals_one_big_top_k(chunk: int) -> None:
    rng = np.random.default_rng(chunk)
    queries = rng.standard_normal((50, 8)).astype(np.float32)
    candidates = rng.standard_normal((90, 8)).astype(np.float32)
    exclude = sp.csr_matrix(sp.random(50, 90, density=0.2, format="csr", random_state=rng))
    parts = list(ranking.score_chunks(queries, candidates, 10, exclude, chunk=chunk))
    assert len(parts) == -(-50 // chunk)
    idx = np.concatenate([p[0] for p in parts])
    top = np.concatenate([p[1] for p in parts])
    want_idx, want_top = ranking.top_k(queries @ candidates.T, 10, exclude)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(top, want_top, rtol=1e-6)
    rows = np.arange(45, 50)
    mapped = list(ranking.score_chunks(queries[:5], candidates, 3, exclude, rows=rows))
    direct, _ = ranking.top_k(queries[:5] @ candidates.T, 3, exclude, rows)
    np.testing.assert_array_equal(mapped[0][0], direct)


def test_top_k_chunks_keeps_blocks_within_the_score_budget(monkeypatch) -> None:
    monkeypatch.setattr(ranking, "SCORE_BUDGET", 100)
    rng = np.random.default_rng(0)
    n_rows, n = 9, 30  # 3 rows of 30 candidates fit in 100 scores
    scores = np.round(rng.standard_normal((n_rows, n)), 1).astype(np.float32)  # with ties
    users = np.array([4, 0, 2, 1, 3, 4, 0, 2, 1])
    exclude = sp.csr_matrix(sp.random(5, n, density=0.3, format="csr", random_state=rng))
    blocks: list[int] = []

    def scorer(block: slice) -> np.ndarray:
        blocks.append(block.stop - block.start)
        return scores[block].copy()

    parts = list(ranking.top_k_chunks(scorer, n_rows, n, 4, exclude, rows=users))
    assert blocks == [3, 3, 3]
    want_idx, want_top = brute_force(scores, 4, exclude, users)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), want_idx)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), want_top)


def test_top_k_chunks_checks_its_arguments_at_the_call() -> None:
    with pytest.raises(ValueError, match="chunk must be"):
        ranking.top_k_chunks(lambda b: np.zeros((1, 3), np.float32), 1, 3, 1, chunk=0)
    short = ranking.top_k_chunks(lambda b: np.zeros((1, 2), np.float32), 1, 3, 1)
    with pytest.raises(ValueError, match="scorer returned shape"):
        list(short)
