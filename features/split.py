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

from tracktower.features.canonical import codes_of
from tracktower.features.errors import DataError

__all__ = ["TEST", "TRAIN", "VAL", "Split", "holdout", "holdout_labels", "pair_keys", "partition"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Partition labels of holdout_labels: one int8 per row instead of three copies of the frame.
TRAIN, VAL, TEST = 0, 1, 2


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
    labels = holdout_labels(
        df,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        min_user_interactions=min_user_interactions,
        seed=seed,
    )
    return partition(df, labels)


def partition(df: pd.DataFrame, labels: np.ndarray) -> Split:
    """The frames of a :func:`holdout_labels` labelling (copies: call it where they are used)."""
    return Split(
        train=df.loc[labels == TRAIN].reset_index(drop=True),
        val=df.loc[labels == VAL].reset_index(drop=True),
        test=df.loc[labels == TEST].reset_index(drop=True),
    )


def holdout_labels(
    df: pd.DataFrame,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_user_interactions: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """:func:`holdout` as one int8 label per row (:data:`TRAIN`, :data:`VAL`, :data:`TEST`),
    computed on integer codes, so that a 66M-row dataset is split without copying it."""
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

    users = codes_of(df["user_id"])[0]
    order = _user_then_key_order(users, pair_keys(df, seed))
    counts = np.bincount(users, minlength=users.max() + 1 if len(users) else 0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(df), dtype=np.int64)  # position in the sorted order, then in the user
    rank[order] = np.arange(len(df))
    del order
    rank -= starts[users]

    eligible = counts >= min_user_interactions
    n_test = _held(counts, test_fraction, eligible)
    n_val = _held(counts, val_fraction, eligible)
    excess = np.maximum(0, n_test + n_val - (counts - 1))
    cut_val = np.minimum(excess, n_val)
    n_val -= cut_val
    n_test -= excess - cut_val

    user_test = n_test[users]
    labels = np.full(len(df), TRAIN, dtype=np.int8)
    labels[rank < user_test + n_val[users]] = VAL
    labels[rank < user_test] = TEST
    return labels


def _user_then_key_order(users: np.ndarray, key: np.ndarray) -> np.ndarray:
    """``np.lexsort((key, users))``: each user's rows together, in seeded random order.

    One sort of a 64-bit key (the user code above the pair key's top bits) is ~4x faster than a
    lexsort at 66M rows; it is the same order unless two of a user's keys share those top bits,
    which is detected (equal neighbours) and then answered by the lexsort itself.
    """
    bits = max(1, int(users.max()).bit_length()) if len(users) else 1
    if bits > 32:
        return np.lexsort((key, users))
    combined = users.astype(np.uint64) << np.uint64(64 - bits)
    combined |= key >> np.uint64(bits)
    order = np.argsort(combined)
    combined = combined[order]
    if (combined[1:] == combined[:-1]).any():
        return np.lexsort((key, users))
    return order


def _held(counts: np.ndarray, fraction: float, eligible: np.ndarray) -> np.ndarray:
    if fraction == 0.0:
        return np.zeros_like(counts)
    wanted = np.maximum(1, np.floor(counts * fraction + 0.5).astype(np.int64))
    return np.where(eligible, wanted, 0)


def pair_keys(df: pd.DataFrame, seed: int) -> np.ndarray:
    """A uint64 per row that is a pure function of ``(seed, user_id, track_id)``.

    pandas hashes a Categorical's categories and gathers them by code, so a categorical id column
    gets the same keys as the strings it stands for, at the cost of one hash per distinct id."""
    hashed = pd.util.hash_pandas_object(df[["user_id", "track_id"]], index=False)
    base = hashed.to_numpy(copy=not hashed.to_numpy().flags.writeable)
    del hashed
    salt = _splitmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    base ^= salt
    return _splitmix(base)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: decorrelates hash values from the seed (uint64 wrap-around).
    In place on a copy of ``x``, so 66M keys need two arrays, not six."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            z ^= z >> np.uint64(shift)
            z *= np.uint64(factor)
        z ^= z >> np.uint64(31)
        return z
