"""Offline ranking metrics over a top-k index matrix and a held-out truth matrix.

Everything is vectorised over users and computed from the top-k indices that
``tracktower.features.ranking.top_k`` produced, so each model and baseline is measured on exactly
the lists it would serve.

Definitions (binary relevance; a held-out item is relevant whatever its weight):

* ``|H_u|`` = held-out items of user ``u`` in ``truth`` **plus** ``unknown[u]`` (held-out tracks
  that were not in the training vocabulary; no model can rank them, but hiding them would flatter
  every model). Users with ``|H_u| = 0`` are left out of every average.
* ``recall_at_k`` = hits in the top k / ``min(k, |H_u|)`` (so a perfect list scores 1).
* ``ndcg_at_k`` = DCG / ideal DCG with gains ``1 / log2(rank + 1)``; the ideal list has
  ``min(k, |H_u|)`` relevant items.
* ``hit_rate_at_k`` = share of users with at least one hit in the top k.
* ``coverage_at_k`` = distinct items recommended in the evaluated users' top k / ``n_items``.

Slots holding ``-1`` (unfilled, see ``ranking.top_k``) are never hits and never covered.

Evaluation that does not grow as users x tracks: above a budget of (users x tracks) pairs, every
system is scored exactly on one seeded random sample of users (:func:`sample_users`, the same
sample for the model and its baselines, since it depends only on the users, the track count and
the settings), and Recall@20 and NDCG@10 get a percentile-bootstrap 95% interval over the
evaluated users (:func:`bootstrap_intervals`, from :func:`per_user_metrics`, the vectors whose
means :func:`ranking_metrics` reports).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp

__all__ = [
    "BOOTSTRAP_DRAWS",
    "CI_METRICS",
    "DEFAULT_KS",
    "MIN_SAMPLE_USERS",
    "Sampling",
    "UserSample",
    "bootstrap_intervals",
    "coverage",
    "per_user_metrics",
    "ranking_metrics",
    "sample_users",
    "users_with_heldout",
]

DEFAULT_KS = (10, 20, 50, 100)
_NDCG_KS = (10, 100)
_HIT_KS = (10,)
_COVERAGE_KS = (10,)

# Metrics reported with a bootstrap interval: the two the README and the promotion gate quote.
CI_METRICS = ("recall_at_20", "ndcg_at_10")
# A sample never smaller than this (when that many users exist): at 1,000 users the interval of
# Recall@20 is already about +-0.02 wide, so fewer would make model comparisons meaningless.
MIN_SAMPLE_USERS = 1000
# Bootstrap draws (users x resamples) computed at all; above it the interval is skipped (only
# possible without sampling, over very many users, where it would be negligibly narrow anyway).
BOOTSTRAP_DRAWS = 1 << 27
_DRAWS_PER_CHUNK = 1 << 22  # draws held in memory at once (int64 indices + gathered values)


class Sampling(Protocol):
    """The evaluation budget (``training.config.EvalConfig`` has these fields): scored pairs,
    bootstrap resamples and the seed of both draws."""

    @property
    def max_pairs(self) -> int: ...

    @property
    def bootstrap(self) -> int: ...

    @property
    def seed(self) -> int: ...


@dataclass(frozen=True)
class UserSample:
    """The users (sorted rows) a system is scored on, out of ``population`` with held-out
    tracks; a sample only when users x tracks was over the budget."""

    users: np.ndarray
    population: int

    @property
    def sampled(self) -> bool:
        return len(self.users) < self.population

    def as_metrics(self) -> dict[str, float]:
        """Logged next to the metrics, so a run says on how many users its figures rest."""
        return {"eval_users": float(len(self.users)), "eval_sampled": float(self.sampled)}


def sample_users(
    users: np.ndarray,
    n_items: int,
    sampling: Sampling | None,
    *,
    min_users: int = MIN_SAMPLE_USERS,
) -> UserSample:
    """``users`` when ``len(users) * n_items`` fits in ``sampling.max_pairs`` (or ``sampling`` is
    None), else a seeded random ``max(min_users, max_pairs // n_items)`` of them (never more than
    there are), sorted.

    Depends only on its arguments, so a model and a baseline scored on the same held-out users
    and tracks are scored on the same sample.
    """
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    population = len(users)
    if sampling is None or population * max(n_items, 1) <= sampling.max_pairs:
        return UserSample(users, population)
    size = min(population, max(min_users, sampling.max_pairs // max(n_items, 1)))
    if size >= population:
        return UserSample(users, population)
    rng = np.random.default_rng(sampling.seed)
    return UserSample(np.sort(rng.choice(users, size, replace=False)), population)


def _heldout_counts(truth: sp.csr_matrix, unknown: np.ndarray | None) -> np.ndarray:
    """``|H_u|`` per row: the held-out tracks in ``truth`` plus the ``unknown`` ones, which count
    against a model even though no model can rank them (see the module docstring)."""
    csr = sp.csr_matrix(truth)
    held = np.diff(csr.indptr).astype(np.int64)
    if unknown is None:
        return held
    extra = np.asarray(unknown, dtype=np.int64).reshape(-1)
    if len(extra) != len(held):
        raise ValueError(f"unknown has {len(extra)} entries for {len(held)} users")
    return held + extra


def users_with_heldout(truth: sp.csr_matrix, unknown: np.ndarray | None) -> np.ndarray:
    """Rows with at least one held-out track: the only users any metric averages over, so
    scoring the others would be wasted work."""
    return np.flatnonzero(_heldout_counts(truth, unknown) > 0)


def _checked_top(topk_idx: np.ndarray, truth: sp.csr_matrix, ks: Sequence[int]) -> np.ndarray:
    top = np.asarray(topk_idx)
    if top.ndim != 2:
        raise ValueError(f"topk_idx must be 2-D [users, K], got shape {top.shape}")
    if truth.shape[0] != top.shape[0]:
        raise ValueError(f"truth has {truth.shape[0]} rows but topk_idx has {top.shape[0]}")
    too_long = [k for k in ks if k > top.shape[1] or k < 1]
    if too_long:
        raise ValueError(f"ks {too_long} do not fit in top-k lists of length {top.shape[1]}")
    return top


def per_user_metrics(
    topk_idx: np.ndarray,
    truth: sp.csr_matrix,
    unknown: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, np.ndarray]:
    """Each averaged user's ``recall_at_{k}`` (every ``k`` in ``ks``), ndcg at 10 and 100 and hit
    rate at 10 (those that fit in the ``K`` columns of ``topk_idx``): float64 vectors over the
    rows with held-out tracks (:func:`users_with_heldout`), in row order; empty dict when there
    are none. :func:`ranking_metrics` reports their means, the bootstrap resamples them."""
    return _per_user(topk_idx, truth, unknown, ks)[1]


def _per_user(
    topk_idx: np.ndarray, truth: sp.csr_matrix, unknown: np.ndarray | None, ks: Sequence[int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`per_user_metrics` and the rows its vectors belong to."""
    csr = sp.csr_matrix(truth)
    top = _checked_top(topk_idx, csr, ks)
    width = top.shape[1]
    held = _heldout_counts(csr, unknown)
    users = np.flatnonzero(held > 0)
    if len(users) == 0:
        return users, {}
    hits = _hits(top[users], csr[users])
    held = held[users]
    cum = np.cumsum(hits, axis=1, dtype=np.int64)
    discounts = 1.0 / np.log2(np.arange(1, width + 1) + 1.0)
    dcg = np.cumsum(hits * discounts, axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall_at_{k}"] = cum[:, k - 1] / np.minimum(k, held)
    for k in _fits(_NDCG_KS, width):
        out[f"ndcg_at_{k}"] = dcg[:, k - 1] / ideal[np.minimum(k, held)]
    for k in _fits(_HIT_KS, width):
        out[f"hit_rate_at_{k}"] = (cum[:, k - 1] > 0).astype(np.float64)
    return users, out


def ranking_metrics(
    topk_idx: np.ndarray,
    truth: sp.csr_matrix,
    unknown: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    n_items: int | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """The means of :func:`per_user_metrics`, plus ``coverage_at_10`` when 10 fits in the ``K``
    columns of ``topk_idx``; with ``bootstrap`` resamples, ``{name}_ci_low``/``_ci_high`` for
    the :data:`CI_METRICS` computed (:func:`bootstrap_intervals`, seeded by ``seed``).

    Row ``u`` of ``topk_idx`` is the ranked list for row ``u`` of ``truth``. Returns ``{}`` when
    no user has held-out items (nothing to average).
    """
    users, per_user = _per_user(topk_idx, truth, unknown, ks)
    if not per_user:
        return {}
    top = np.asarray(topk_idx)
    n_items = truth.shape[1] if n_items is None else n_items
    out = {name: float(np.mean(values)) for name, values in per_user.items()}
    for k in _fits(_COVERAGE_KS, top.shape[1]):
        out[f"coverage_at_{k}"] = coverage(top[users], n_items, k)
    if bootstrap > 0:
        out.update(bootstrap_intervals(per_user, bootstrap, seed))
    return out


def bootstrap_intervals(
    per_user: Mapping[str, np.ndarray],
    resamples: int,
    seed: int,
    names: Sequence[str] = CI_METRICS,
    level: float = 0.95,
) -> dict[str, float]:
    """Percentile-bootstrap ``level`` interval of the mean of each of ``names`` present in
    ``per_user``: ``{name}_ci_low`` / ``{name}_ci_high``.

    All metrics share each resample of the users (one draw of indices per resample), so the
    intervals describe the same resampled populations. ``{}`` when there is nothing to resample
    or users x resamples exceeds :data:`BOOTSTRAP_DRAWS` (see there).
    """
    present = [name for name in names if name in per_user]
    if not present or resamples < 1:
        return {}
    n = len(per_user[present[0]])
    if n == 0 or n * resamples > BOOTSTRAP_DRAWS:
        return {}
    values = [np.asarray(per_user[name], dtype=np.float64) for name in present]
    # Its own stream: the sample of users (sample_users) is drawn from default_rng(seed).
    rng = np.random.default_rng([seed, 1])
    means = np.empty((len(present), resamples))
    step = max(1, _DRAWS_PER_CHUNK // n)
    for start in range(0, resamples, step):
        stop = min(start + step, resamples)
        draws = rng.integers(0, n, size=(stop - start, n), dtype=np.int32)
        for i, vector in enumerate(values):  # np.take: far faster than 2-D fancy indexing
            means[i, start:stop] = np.take(vector, draws).mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail], axis=1)
    out: dict[str, float] = {}
    for i, name in enumerate(present):
        out[f"{name}_ci_low"] = float(low[i])
        out[f"{name}_ci_high"] = float(high[i])
    return out


def _fits(wanted: Sequence[int], width: int) -> list[int]:
    return [k for k in wanted if 1 <= k <= width]


def _hits(top: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """bool [U, K]: is ``top[u, j]`` a stored entry of ``truth`` row ``u``?"""
    csr = sp.csr_matrix(truth, copy=True)
    csr.sum_duplicates()  # also sorts indices, which the searchsorted below relies on
    n_users, n = csr.shape
    row_of = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(csr.indptr))
    stored = row_of * n + csr.indices
    valid = (top >= 0) & (top < n)
    wanted = np.arange(len(top), dtype=np.int64)[:, None] * n + np.where(valid, top, 0)
    pos = np.searchsorted(stored, wanted)
    found = np.zeros(top.shape, dtype=bool)
    in_range = pos < len(stored)
    found[in_range] = stored[pos[in_range]] == wanted[in_range]
    return found & valid


def coverage(topk_idx: np.ndarray, n_items: int, k: int = 10) -> float:
    """Share of the ``n_items`` candidates that appear in at least one top-``k`` list."""
    if n_items <= 0:
        return 0.0
    top = np.asarray(topk_idx)[:, :k]
    shown = np.unique(top[(top >= 0) & (top < n_items)])
    return float(len(shown) / n_items)
