"""Seeded per-user random holdout.

Whether a (user, track) pair is held out depends only on ``(seed, user_id, track_id)`` and that
user's interaction count, never on row order or on other users, so the same data gives the same
split whichever reader, filter or shuffle produced the frame, and a metric difference between two
runs is never a split artefact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tracktower.features.errors import DataError

__all__ = ["Split", "holdout", "pair_keys"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Split:
    """Disjoint partitions of the canonical interactions; rows keep their input order."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def holdout(
    df: pd.DataFrame,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_user_interactions: int = 5,
    seed: int = 0,
) -> Split:
    """Hold out ``round(n * fraction)`` (at least 1) of each eligible user's ``n`` interactions.

    Users with fewer than ``min_user_interactions`` interactions stay wholly in train (too little
    history to learn from *and* evaluate on); every other user keeps at least one train row, the
    validation share shrinking first when a user is too small for both held-out parts.
    ``test_fraction=0`` gives the ``--final`` layout: train plus a validation slice only.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError("val_fraction + test_fraction must be < 1 so that training data remains")
    if min_user_interactions < 1:
        raise DataError(f"min_user_interactions must be >= 1, got {min_user_interactions}")
    missing = [c for c in ("user_id", "track_id") if c not in df.columns]
    if missing:
        raise DataError(f"interactions lack column(s) {', '.join(missing)}", column=missing[0])

    users, _ = pd.factorize(df["user_id"])
    key = pair_keys(df, seed)
    order = np.lexsort((key, users))  # each user's rows contiguous, in seeded random order
    counts = np.bincount(users, minlength=users.max() + 1 if len(users) else 0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(df), dtype=np.int64)
    rank[order] = np.arange(len(df)) - np.repeat(starts, counts)

    eligible = counts >= min_user_interactions
    n_test = _held(counts, test_fraction, eligible)
    n_val = _held(counts, val_fraction, eligible)
    excess = np.maximum(0, n_test + n_val - (counts - 1))
    cut_val = np.minimum(excess, n_val)
    n_val -= cut_val
    n_test -= excess - cut_val

    user_test, user_val = n_test[users], n_val[users]
    is_test = rank < user_test
    is_val = ~is_test & (rank < user_test + user_val)
    is_train = ~(is_test | is_val)
    return Split(
        train=df.loc[is_train].reset_index(drop=True),
        val=df.loc[is_val].reset_index(drop=True),
        test=df.loc[is_test].reset_index(drop=True),
    )


def _held(counts: np.ndarray, fraction: float, eligible: np.ndarray) -> np.ndarray:
    if fraction == 0.0:
        return np.zeros_like(counts)
    wanted = np.maximum(1, np.floor(counts * fraction + 0.5).astype(np.int64))
    return np.where(eligible, wanted, 0)


def pair_keys(df: pd.DataFrame, seed: int) -> np.ndarray:
    """A uint64 per row that is a pure function of ``(seed, user_id, track_id)``."""
    base = pd.util.hash_pandas_object(df[["user_id", "track_id"]], index=False).to_numpy()
    salt = _splitmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return _splitmix(base ^ salt)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: decorrelates hash values from the seed (uint64 wrap-around)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
