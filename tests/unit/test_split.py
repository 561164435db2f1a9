"""Holdout: deterministic per user whatever the row order, honest ratios, the min-history rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tracktower.features import split, synth
from tracktower.features.errors import DataError


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return synth.generate(users=600, tracks=1200, seed=2)[0]


def _pairs(frame: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(frame["user_id"], frame["track_id"], strict=True))


def test_partitions_are_disjoint_and_complete(data: pd.DataFrame) -> None:
    parts = split.holdout(data, seed=0)
    train, val, test = (_pairs(p) for p in (parts.train, parts.val, parts.test))
    assert not (train & val or train & test or val & test)
    assert train | val | test == _pairs(data)
    assert list(parts.train.columns) == list(data.columns)


def test_same_split_whatever_the_row_order(data: pd.DataFrame) -> None:
    a = split.holdout(data, seed=5)
    b = split.holdout(data.sample(frac=1.0, random_state=1), seed=5)
    for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True):
        assert _pairs(x) == _pairs(y)
    c = split.holdout(data, seed=6)
    assert _pairs(c.test) != _pairs(a.test)


def test_a_users_split_ignores_other_users(data: pd.DataFrame) -> None:
    first = data["user_id"].iloc[0]
    alone = split.holdout(data[data["user_id"] == first], seed=3)
    together = split.holdout(data, seed=3)
    assert _pairs(alone.test) == _pairs(together.test[together.test["user_id"] == first])


def test_ratios_and_min_interactions(data: pd.DataFrame) -> None:
    parts = split.holdout(data, val_fraction=0.1, test_fraction=0.2, min_user_interactions=8)
    counts = data.groupby("user_id").size()
    small = set(counts.index[counts < 8])
    assert small, "fixture should contain light users"
    assert not small & set(parts.val["user_id"]) and not small & set(parts.test["user_id"])
    eligible = counts[counts >= 8].sum()
    assert len(parts.test) / eligible == pytest.approx(0.2, abs=0.02)
    assert len(parts.val) / eligible == pytest.approx(0.1, abs=0.02)
    train_users = set(parts.train["user_id"])
    assert set(parts.test["user_id"]) <= train_users and set(parts.val["user_id"]) <= train_users


def test_each_held_out_user_keeps_a_train_row() -> None:
    frame = pd.DataFrame({"user_id": ["a", "a", "b", "b", "b"], "track_id": list("xyxyz")})
    parts = split.holdout(frame, val_fraction=0.4, test_fraction=0.4, min_user_interactions=1)
    assert set(parts.train["user_id"]) == {"a", "b"}
    assert parts.train.groupby("user_id").size().min() >= 1
    assert len(parts.test) == 2  # test is filled first, validation gives way


def test_final_layout_without_test(data: pd.DataFrame) -> None:
    parts = split.holdout(data, val_fraction=0.05, test_fraction=0.0)
    assert parts.test.empty and list(parts.test.columns) == list(data.columns)
    assert 0 < len(parts.val) < 0.1 * len(data)


def test_split_is_immutable(tiny_interactions: pd.DataFrame) -> None:
    parts = split.holdout(tiny_interactions)
    with pytest.raises(AttributeError):
        setattr(parts, "train", parts.val)  # noqa: B010 - the frozen dataclass must refuse


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_fraction": -0.1},
        {"test_fraction": 1.0},
        {"val_fraction": 0.5, "test_fraction": 0.5},
        {"min_user_interactions": 0},
    ],
)
def test_invalid_arguments(tiny_interactions: pd.DataFrame, kwargs: dict[str, float]) -> None:
    with pytest.raises(DataError):
        split.holdout(tiny_interactions, **kwargs)


def test_pair_keys_depend_only_on_seed_user_track(tiny_interactions: pd.DataFrame) -> None:
    keys = split.pair_keys(tiny_interactions, 1)
    assert keys.dtype == np.uint64 and len(np.unique(keys)) == len(keys)
    reversed_keys = split.pair_keys(tiny_interactions.iloc[::-1], 1)[::-1]
    assert np.array_equal(keys, reversed_keys)
    assert not np.array_equal(keys, split.pair_keys(tiny_interactions, 2))
