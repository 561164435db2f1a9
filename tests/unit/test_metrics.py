"""Ranking metrics on a hand-computed example and against a per-user reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from tracktower.training.metrics import coverage, ranking_metrics, users_with_heldout


def test_hand_computed_example() -> None:
    # user 0 held out {1, 3}; user 1 held out {0} plus one track unknown to training;
    # user 2 held out nothing and must not count. Slots after the third are unfilled (-1).
    truth = sp.csr_matrix(
        np.array([[0, 1, 0, 1, 0], [2, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float32)
    )
    unknown = np.array([0, 1, 0])
    top = np.full((3, 10), -1)
    top[:, :3] = [[3, 2, 1], [2, 0, -1], [0, 1, 2]]
    m = ranking_metrics(top, truth, unknown, (1, 3))
    ideal2 = 1 + 1 / math.log2(3)
    ndcg_u0 = (1 + 1 / math.log2(4)) / ideal2
    ndcg_u1 = (1 / math.log2(3)) / ideal2
    assert m["recall_at_1"] == pytest.approx((1 + 0) / 2)
    assert m["recall_at_3"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert m["ndcg_at_10"] == pytest.approx((ndcg_u0 + ndcg_u1) / 2)
    assert m["hit_rate_at_10"] == pytest.approx(1.0)
    assert m["coverage_at_10"] == pytest.approx(4 / 5)  # users 0 and 1 show items 0-3
    assert set(m) == {
        "recall_at_1",
        "recall_at_3",
        "ndcg_at_10",
        "hit_rate_at_10",
        "coverage_at_10",
    }


def test_users_with_heldout_counts_unknown_tracks() -> None:
    truth = sp.csr_matrix(np.array([[0, 1], [0, 0], [0, 0], [1, 1]], dtype=np.float32))
    np.testing.assert_array_equal(users_with_heldout(truth, None), [0, 3])
    np.testing.assert_array_equal(users_with_heldout(truth, np.array([0, 0, 2, 0])), [0, 2, 3])
    with pytest.raises(ValueError, match="unknown has 2 entries for 4 users"):
        users_with_heldout(truth, np.array([0, 1]))


def test_hit_rate_counts_users_without_a_hit() -> None:
    truth = sp.csr_matrix(np.array([[1, 0], [0, 1]], dtype=np.float32))
    top = np.zeros((2, 10), dtype=np.int64)  # both users are shown track 0 only
    top[:, 1:] = -1
    assert ranking_metrics(top, truth, ks=(10,))["hit_rate_at_10"] == pytest.approx(0.5)


def test_recall_denominator_is_capped_at_k() -> None:
    truth = sp.csr_matrix(np.ones((1, 30), dtype=np.float32))
    top = np.arange(10)[None, :]
    m = ranking_metrics(top, truth, None, (10,), n_items=30)
    assert m["recall_at_10"] == 1.0 and m["ndcg_at_10"] == pytest.approx(1.0)
    assert m["coverage_at_10"] == pytest.approx(10 / 30)


def reference(
    top: np.ndarray, truth: sp.csr_matrix, unknown: np.ndarray, k: int
) -> tuple[float, float]:
    recalls, ndcgs = [], []
    for u in range(top.shape[0]):
        relevant = set(truth[u].indices.tolist())
        n_held = len(relevant) + int(unknown[u])
        if n_held == 0:
            continue
        gains = [1.0 if i in relevant else 0.0 for i in top[u, :k]]
        recalls.append(sum(gains) / min(k, n_held))
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, n_held)))
        ndcgs.append(dcg / idcg)
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def test_matches_reference_on_random_data() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 200
    truth = sp.csr_matrix(sp.random(n_users, n_items, density=0.03, format="csr", random_state=rng))
    unknown = rng.integers(0, 3, n_users)
    top = np.stack([rng.permutation(n_items)[:100] for _ in range(n_users)])
    top[::7, 90:] = -1
    m = ranking_metrics(top, truth, unknown)
    assert set(m) == {
        "recall_at_10", "recall_at_20", "recall_at_50", "recall_at_100",
        "ndcg_at_10", "ndcg_at_100", "hit_rate_at_10", "coverage_at_10",
    }  # fmt: skip
    for k in (10, 100):
        recall, ndcg = reference(top, truth, unknown, k)
        assert m[f"recall_at_{k}"] == pytest.approx(recall)
        assert m[f"ndcg_at_{k}"] == pytest.approx(ndcg)


def test_no_held_out_users_and_bad_shapes() -> None:
    empty = sp.csr_matrix((2, 5), dtype=np.float32)
    assert ranking_metrics(np.zeros((2, 10), dtype=np.int64), empty, ks=(10,)) == {}
    with pytest.raises(ValueError, match="do not fit"):
        ranking_metrics(np.zeros((2, 5), dtype=np.int64), empty, ks=(10,))
    with pytest.raises(ValueError, match="rows"):
        ranking_metrics(np.zeros((3, 10), dtype=np.int64), empty, ks=(10,))


def test_coverage_ignores_padding() -> None:
    top = np.array([[0, 1, -1], [1, 2, 9]])
    assert coverage(top, n_items=4, k=2) == pytest.approx(3 / 4)
    assert coverage(top, n_items=4, k=3) == pytest.approx(3 / 4)
    assert coverage(top, n_items=0) == 0.0
