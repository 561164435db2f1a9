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


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype({"user_id": "str", "track_id": "str"})


def test_categorical_ids_split_exactly_as_strings_and_as_before() -> None:
    """Ids held as codes (what the readers return) give the very split the strings gave, and
    the one version 1 of this module gave (digests of each part taken with it)."""
    import hashlib

    inter = synth.generate(users=80, tracks=300, seed=5)[0]
    text = split.holdout(inter, val_fraction=0.1, test_fraction=0.2, seed=11)
    codes = split.holdout(
        inter.astype({"user_id": "category", "track_id": "category"}),
        val_fraction=0.1,
        test_fraction=0.2,
        seed=11,
    )
    for a, b in zip(
        (text.train, text.val, text.test), (codes.train, codes.val, codes.test), strict=True
    ):
        pd.testing.assert_frame_equal(_as_text(a), _as_text(b))
    digests = [
        hashlib.sha256(repr(sorted(_pairs(_as_text(p)))).encode()).hexdigest()[:16]
        for p in (codes.train, codes.val, codes.test)
    ]
    assert digests == ["78792fb088fb8502", "c65032cf63d9d897", "b83c3128f574d0c1"]
    assert [len(p) for p in (codes.train, codes.val, codes.test)] == [946, 143, 269]


def test_labels_are_the_partition(data: pd.DataFrame) -> None:
    labels = split.holdout_labels(data, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert labels.dtype == np.int8
    assert set(np.unique(labels)) == {split.TRAIN, split.VAL, split.TEST}
    parts = split.holdout(data, val_fraction=0.1, test_fraction=0.2, seed=3)
    again = split.partition(data, labels)
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(getattr(parts, name), getattr(again, name))


def test_one_key_sort_is_the_lexsort_even_when_top_bits_tie() -> None:
    rng = np.random.default_rng(0)
    users = np.sort(rng.integers(0, 1000, 20_000)).astype(np.int32)
    keys = rng.integers(0, 2**63, 20_000, dtype=np.uint64)
    assert np.array_equal(split._user_then_key_order(users, keys), np.lexsort((keys, users)))
    users[1], keys[1] = users[0], keys[0] ^ np.uint64(1)  # same user, keys differ in low bits
    assert np.array_equal(split._user_then_key_order(users, keys), np.lexsort((keys, users)))
