"""Exclusions with an approximate index: over-fetch, filter, exact fallback, same format."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tracktower.features import ranking
from tracktower.features.index import (
    ExactIndex,
    ScannIndex,
    overfetch_search,
    search_excluding,
    top_lists,
)
from tracktower.features.index import exact as exact_module


def integer_catalogue(seed: int, n: int, dim: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered small-integer vectors: dot products are exact in float32 whatever the summation
    order (BLAS kernel), so approximate and exact paths can be compared bit for bit; ties
    abound."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(-6, 7, size=(8, dim))
    points = centres[rng.integers(0, 8, n)] + rng.integers(-2, 3, size=(n, dim))
    queries = centres[rng.integers(0, 8, batch)] + rng.integers(-2, 3, size=(batch, dim))
    return points.astype(np.float32), queries.astype(np.float32)


def exclusions(seed: int, users: int, n: int, heavy: int, full: int) -> sp.csr_matrix:
    """Random seen tracks; user ``heavy`` has 400 (more than the over-fetch below), user
    ``full`` all but three tracks."""
    rng = np.random.default_rng(seed)
    dense = rng.random((users, n)) < 0.01
    dense[heavy, rng.choice(n, 400, replace=False)] = True
    dense[full, :] = True
    dense[full, [5, 50, 500]] = False
    return sp.csr_matrix(dense)


@pytest.mark.parametrize("k", [1, 10, 25])
def test_overfetch_path_on_an_exact_index_equals_ranking_top_k(k: int) -> None:
    points, queries = integer_catalogue(k, n=1500, dim=6, batch=40)
    exclude = exclusions(k, users=60, n=1500, heavy=7, full=11)
    rows = np.random.default_rng(k).permutation(60)[:40]
    rows[:2] = [7, 11]
    exact = ExactIndex(points)
    got = overfetch_search(exact, exact, queries, k, exclude, rows, overfetch=64)
    want = ranking.top_k(queries @ points.T, k, exclude, rows)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0][1, 3:].tolist() == [-1] * (k - 3) and got[0].dtype == np.int64
    direct = search_excluding(exact, exact, queries, k, exclude, rows)
    np.testing.assert_array_equal(direct[0], want[0])
    np.testing.assert_array_equal(direct[1], want[1])


def test_ann_path_with_the_index_forced_on_equals_exact() -> None:
    points, queries = integer_catalogue(0, n=3000, dim=8, batch=60)
    exclude = exclusions(1, users=60, n=3000, heavy=3, full=4)
    exact = ExactIndex(points)
    # Every leaf searched and wide rescoring: the ANN path must then reproduce exact search,
    # ties included, for light users, the heavy user (exact fallback) and the nearly full one.
    index = ScannIndex.build(points, {"leaves_to_search": 54, "reorder": 3000})
    got = search_excluding(index, exact, queries, 10, exclude, overfetch=64)
    want = ranking.top_k(queries @ points.T, 10, exclude)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0][4, 3:].tolist() == [-1] * 7


def test_heavy_user_falls_back_to_exact_with_a_narrow_index() -> None:
    points, queries = integer_catalogue(2, n=3000, dim=8, batch=20)
    exclude = exclusions(3, users=20, n=3000, heavy=5, full=6).tolil()
    exclude[5, :] = 0
    nearest, _ = ExactIndex(points).search(queries[5:6], 400)
    exclude[5, nearest[0]] = 1  # user 5 has seen its 400 best tracks: far beyond the over-fetch
    exclude = sp.csr_matrix(exclude)
    exact = ExactIndex(points)
    index = ScannIndex.build(points, {"leaves_to_search": 1, "reorder": 20, "reorder_per_k": 1})
    got = search_excluding(index, exact, queries, 10, exclude, overfetch=16)
    want = ranking.top_k(queries @ points.T, 10, exclude)
    for user in (5, 6):  # nothing / too little survives the over-fetch: computed exactly
        np.testing.assert_array_equal(got[0][user], want[0][user])
        np.testing.assert_array_equal(got[1][user], want[1][user])
    seen = exclude.toarray()
    assert not seen[np.arange(20)[:, None], np.maximum(got[0], 0)][got[0] >= 0].any()
    assert ((got[0] >= 0).sum(axis=1) == 10).sum() == 19  # only the nearly full user is short
    assert (got[1][:, :-1] >= got[1][:, 1:]).all()  # best first, padding last
    wide = index.search(queries, 10, spare=16)[0]  # what the over-fetch asked the index for
    short = 0
    for user in set(range(20)) - {5, 6}:
        survivors = [t for t in wide[user].tolist() if t >= 0 and not seen[user, t]]
        if len(survivors) >= 10:  # the index's own answer, excluded tracks dropped
            assert got[0][user].tolist() == survivors[:10]
        else:  # a small leaf returned too few: exact
            short += 1
            np.testing.assert_array_equal(got[0][user], want[0][user])
    assert 0 < short < 18  # both paths ran


def test_without_exclusions_it_is_the_index_search() -> None:
    points, queries = integer_catalogue(4, n=600, dim=4, batch=5)
    index = ScannIndex.build(points)
    got = search_excluding(index, ExactIndex(points), queries, 7)
    np.testing.assert_array_equal(got[0], index.search(queries, 7)[0])


def test_bad_arguments() -> None:
    points, queries = integer_catalogue(5, n=100, dim=4, batch=3)
    exact = ExactIndex(points)
    with pytest.raises(ValueError, match="columns"):
        overfetch_search(exact, exact, queries, 2, sp.csr_matrix((3, 99)))
    with pytest.raises(ValueError, match="pass rows="):
        overfetch_search(exact, exact, queries, 2, sp.csr_matrix((4, 100)))
    with pytest.raises(ValueError, match="rows has 2 entries"):
        overfetch_search(exact, exact, queries, 2, sp.csr_matrix((4, 100)), np.array([0, 1]))
    with pytest.raises(ValueError, match="overfetch"):
        overfetch_search(exact, exact, queries, 2, sp.csr_matrix((3, 100)), overfetch=-1)


def test_a_row_does_not_depend_on_the_exclusions_of_its_batch_mates() -> None:
    """An approximate index answers differently for different widths (ScaNN rescores
    reorder_per_k x width candidates), so the over-fetch width is fixed: giving one user many
    more exclusions must not change anyone else's list (batch jobs, the server's single-user
    path and offline evaluation batch users differently)."""
    rng = np.random.default_rng(4)
    points = rng.normal(size=(3000, 32)).astype(np.float32)  # noisy: quantization is lossy
    queries = rng.normal(size=(30, 32)).astype(np.float32)
    light = sp.lil_matrix((30, 3000), dtype=np.float32)
    for user in range(1, 30):
        light[user, rng.choice(3000, 5, replace=False)] = 1
    heavy = light.copy()
    nearest, _ = ExactIndex(points).search(queries[:1], 200)
    heavy[0, nearest[0]] = 1  # user 0's 200 best tracks: inside the 256 over-fetch
    exact = ExactIndex(points)
    index = ScannIndex.build(points, {"leaves_to_search": 20, "reorder": 10, "reorder_per_k": 1})
    a = search_excluding(index, exact, queries, 10, sp.csr_matrix(light))
    b = search_excluding(index, exact, queries, 10, sp.csr_matrix(heavy))
    np.testing.assert_array_equal(a[0][1:], b[0][1:])
    np.testing.assert_array_equal(a[1][1:], b[1][1:])
    assert not set(b[0][0].tolist()) & set(nearest[0].tolist())


@pytest.mark.parametrize("blocked", [False, True])
def test_top_lists_equal_search_excluding_user_by_user(
    blocked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export's lists are what the server's one-user search returns, for light users, heavy
    ones (the exact fallback, collected over every block and searched at the end) and a nearly
    full one; ``blocked`` also sends that fallback down ExactIndex's candidate-blocked path."""
    if blocked:
        monkeypatch.setattr(ranking, "SCORE_BUDGET", 256)
        monkeypatch.setattr(exact_module, "ROW_BLOCK", 3)
        monkeypatch.setattr(exact_module, "COLUMN_BLOCK", 700)
    points, queries = integer_catalogue(6, n=3000, dim=8, batch=25)
    exclude = exclusions(7, users=25, n=3000, heavy=2, full=3).tolil()
    for user in (2, 11, 19):  # their 300 best tracks seen: beyond the over-fetch of 256
        nearest, _ = ExactIndex(points).search(queries[user : user + 1], 300)
        exclude[user, nearest[0]] = 1
    exclude = sp.csr_matrix(exclude)
    index = ScannIndex.build(points, {"leaves_to_search": 3, "reorder": 20, "reorder_per_k": 1})
    fallback: list[list[int]] = []
    search = ExactIndex.search

    def spy(self: ExactIndex, q: np.ndarray, k: int, *args: object, **kw: object) -> object:
        fallback.append(list(args[1]))  # type: ignore[call-overload]
        return search(self, q, k, *args, **kw)  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(ExactIndex, "search", spy)
        idx, top = top_lists(index, points, queries, 10, exclude, block=4)
    assert len(fallback) == 1 and 3 in fallback[0] and len(fallback[0]) > 1  # once, at the end
    assert idx.dtype == np.int32 and top.dtype == np.float32
    exact = ExactIndex(points)
    for user in range(25):
        one = search_excluding(index, exact, queries[user : user + 1], 10, exclude, [user])
        np.testing.assert_array_equal(idx[user], one[0][0])
        np.testing.assert_array_equal(top[user], one[1][0])
    want = ranking.top_k(queries @ points.T, 10, exclude)
    for user in fallback[0]:
        np.testing.assert_array_equal(idx[user], want[0][user])
    assert idx[3, 3:].tolist() == [-1] * 7
