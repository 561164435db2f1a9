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


# --- per-user metrics, bootstrap intervals, the evaluation sample (issue 9, part 5) ---------


def test_per_user_metrics_are_what_ranking_metrics_averages() -> None:
    from tracktower.training.metrics import per_user_metrics

    # The hand-computed example above: users 0 and 1 are averaged, user 2 (nothing held) is not.
    truth = sp.csr_matrix(
        np.array([[0, 1, 0, 1, 0], [2, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float32)
    )
    unknown = np.array([0, 1, 0])
    top = np.full((3, 10), -1)
    top[:, :3] = [[3, 2, 1], [2, 0, -1], [0, 1, 2]]
    per_user = per_user_metrics(top, truth, unknown, (1, 3))
    ideal2 = 1 + 1 / math.log2(3)
    np.testing.assert_allclose(per_user["recall_at_1"], [1, 0])  # hits / min(1, |H_u|)
    np.testing.assert_allclose(per_user["recall_at_3"], [2 / 2, 1 / 2])
    np.testing.assert_allclose(
        per_user["ndcg_at_10"], [(1 + 1 / math.log2(4)) / ideal2, (1 / math.log2(3)) / ideal2]
    )
    np.testing.assert_array_equal(per_user["hit_rate_at_10"], [1.0, 1.0])
    means = ranking_metrics(top, truth, unknown, (1, 3))
    assert {k: v for k, v in means.items() if k in per_user} == {
        k: float(np.mean(v)) for k, v in per_user.items()
    }
    assert per_user_metrics(top, sp.csr_matrix((3, 5), dtype=np.float32), ks=(1,)) == {}


def _random_case(seed: int, n_users: int = 300) -> tuple[np.ndarray, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    truth = sp.csr_matrix(sp.random(n_users, 100, density=0.05, format="csr", random_state=rng))
    top = np.stack([rng.permutation(100)[:20] for _ in range(n_users)])
    return top, truth


def test_bootstrap_interval_contains_the_mean_and_is_seeded() -> None:
    top, truth = _random_case(1)
    m = ranking_metrics(top, truth, None, (10, 20), bootstrap=500, seed=7)
    for name in ("recall_at_20", "ndcg_at_10"):
        assert m[f"{name}_ci_low"] < m[name] < m[f"{name}_ci_high"]
    assert "recall_at_10_ci_low" not in m and "hit_rate_at_10_ci_low" not in m
    again = ranking_metrics(top, truth, None, (10, 20), bootstrap=500, seed=7)
    assert again == m
    other = ranking_metrics(top, truth, None, (10, 20), bootstrap=500, seed=8)
    assert other["recall_at_20_ci_low"] != m["recall_at_20_ci_low"]
    assert other["recall_at_20"] == m["recall_at_20"]  # only the interval is random
    assert "recall_at_20_ci_low" not in ranking_metrics(top, truth, None, (10, 20))


def test_bootstrap_known_cases() -> None:
    from tracktower.training.metrics import bootstrap_intervals

    # Every user alike: every resample has the same mean.
    same = bootstrap_intervals({"recall_at_20": np.full(50, 0.25)}, 200, seed=0)
    assert same == {"recall_at_20_ci_low": 0.25, "recall_at_20_ci_high": 0.25}
    # Half the users hit: the 95% interval of a proportion, +-1.96 sqrt(p(1-p)/n) = +-0.031.
    half = np.tile([0.0, 1.0], 500)
    ci = bootstrap_intervals({"ndcg_at_10": half, "other": half}, 2000, seed=3)
    assert set(ci) == {"ndcg_at_10_ci_low", "ndcg_at_10_ci_high"}
    assert ci["ndcg_at_10_ci_low"] == pytest.approx(0.5 - 0.031, abs=0.006)
    assert ci["ndcg_at_10_ci_high"] == pytest.approx(0.5 + 0.031, abs=0.006)
    assert bootstrap_intervals({"recall_at_20": half}, 0, seed=0) == {}
    assert bootstrap_intervals({}, 100, seed=0) == {}


def test_bootstrap_resamples_in_chunks_and_skips_above_its_budget(monkeypatch) -> None:
    from tracktower.training import metrics
    from tracktower.training.metrics import bootstrap_intervals

    values = {"recall_at_20": np.random.default_rng(0).random(100)}
    whole = bootstrap_intervals(values, 300, seed=5)
    monkeypatch.setattr(metrics, "_DRAWS_PER_CHUNK", 250)  # 2 resamples per chunk
    assert bootstrap_intervals(values, 300, seed=5) == pytest.approx(whole)
    monkeypatch.setattr(metrics, "BOOTSTRAP_DRAWS", 100 * 300 - 1)
    assert bootstrap_intervals(values, 300, seed=5) == {}


class _Budget:
    def __init__(self, max_pairs: int, seed: int = 0, bootstrap: int = 0) -> None:
        self.max_pairs, self.seed, self.bootstrap = max_pairs, seed, bootstrap


def test_sampling_rule() -> None:
    from tracktower.training.config import EvalConfig
    from tracktower.training.metrics import sample_users

    users = np.arange(0, 20_000, 2)  # 10,000 users
    # At or below the budget (or with no budget at all): every user, not a sample.
    for budget in (None, _Budget(10_000 * 50), EvalConfig(max_pairs=10**12)):
        whole = sample_users(users, 50, budget)
        np.testing.assert_array_equal(whole.users, users)
        assert not whole.sampled and whole.as_metrics() == {"eval_users": 1e4, "eval_sampled": 0}
    # Above it: max_pairs // tracks users, seeded, sorted, a subset.
    sample = sample_users(users, 50, _Budget(10_000 * 50 - 1))
    assert len(sample.users) == 9_999 and sample.sampled and sample.population == 10_000
    sample = sample_users(users, 100, EvalConfig(max_pairs=300_000, seed=4))
    assert len(sample.users) == 3_000 and sample.as_metrics()["eval_sampled"] == 1.0
    assert np.all(np.diff(sample.users) > 0) and np.isin(sample.users, users).all()
    again = sample_users(users.copy(), 100, EvalConfig(max_pairs=300_000, seed=4))
    np.testing.assert_array_equal(again.users, sample.users)
    other = sample_users(users, 100, EvalConfig(max_pairs=300_000, seed=5))
    assert not np.array_equal(other.users, sample.users)
    # Never under MIN_SAMPLE_USERS (when there are that many), never more than there are.
    assert len(sample_users(users, 10**6, _Budget(1)).users) == 1000
    assert len(sample_users(users, 10**6, _Budget(1), min_users=20_000).users) == 10_000
    assert len(sample_users(users[:10], 10**6, _Budget(1)).users) == 10
    assert len(sample_users(np.array([], np.int64), 5, _Budget(1)).users) == 0
