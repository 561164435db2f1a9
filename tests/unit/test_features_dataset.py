"""Encoding a split: sorted train vocabularies, aligned matrices, honest unknown counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tracktower.features import dataset
from tracktower.features.errors import DataError
from tracktower.features.split import Split


def _frame(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "track_id", "weight"]).astype(
        {"user_id": "str", "track_id": "str"}
    )


@pytest.fixture
def parts() -> Split:
    train = _frame([("b", "y", 2.0), ("a", "x", 1.0), ("a", "z", 3.0), ("b", "x", 1.0)])
    val = _frame([("a", "y", 1.0), ("a", "new", 1.0), ("ghost", "x", 1.0)])
    test = _frame([("b", "z", 5.0), ("b", "new", 1.0), ("b", "other", 1.0)])
    return Split(train, val, test)


def test_encode_builds_sorted_vocabularies_and_matrices(parts: Split) -> None:
    tracks = pd.DataFrame({"track_id": ["z", "x", "q"], "title": ["Z", "X", "Q"]})
    enc = dataset.encode(parts, tracks)
    assert enc.user_ids.tolist() == ["a", "b"] and enc.track_ids.tolist() == ["x", "y", "z"]
    assert enc.user_ids.dtype.kind == "U"
    assert enc.train.dtype == np.float32 and enc.train.shape == (2, 3)
    assert enc.train.toarray().tolist() == [[1, 0, 3], [1, 2, 0]]
    assert enc.val.toarray().tolist() == [[0, 1, 0], [0, 0, 0]]  # ghost user dropped
    assert enc.test.toarray().tolist() == [[0, 0, 0], [0, 0, 5]]
    assert enc.val_unknown.tolist() == [1, 0] and enc.test_unknown.tolist() == [0, 2]
    assert enc.tracks is not None
    assert enc.tracks["track_id"].tolist() == ["x", "y", "z"]
    assert enc.tracks["title"].tolist()[0] == "X" and pd.isna(enc.tracks["title"].iloc[1])
    assert enc.user_index(["b", "nobody"]).tolist() == [1, -1]
    assert (enc.n_users, enc.n_tracks) == (2, 3)


def test_encode_ids_and_popularity(parts: Split) -> None:
    enc = dataset.encode(parts)
    assert dataset.encode_ids(enc.track_ids, np.array(["z", "a", "x", "zz"])).tolist() == [
        2,
        -1,
        0,
        -1,
    ]
    assert dataset.encode_ids(np.array([], dtype=str), ["x"]).tolist() == [-1]
    assert dataset.popularity(enc.train).tolist() == [2, 1, 1]


def test_empty_train_is_an_error(parts: Split) -> None:
    with pytest.raises(DataError, match="empty"):
        dataset.encode(Split(parts.train.iloc[:0], parts.val, parts.test))


def test_fingerprint_is_order_independent_and_content_sensitive(
    tiny_interactions: pd.DataFrame,
) -> None:
    fp = dataset.fingerprint(tiny_interactions)
    assert len(fp) == 64 and int(fp, 16) >= 0
    shuffled = tiny_interactions.sample(frac=1.0, random_state=3)
    assert dataset.fingerprint(shuffled) == fp
    assert dataset.fingerprint(tiny_interactions.astype({"weight": "float32"})) == fp
    changed = tiny_interactions.copy()
    changed.loc[0, "weight"] = 4.0
    assert dataset.fingerprint(changed) != fp
    assert dataset.fingerprint(tiny_interactions.drop(columns="timestamp")) != fp
    renamed = tiny_interactions.replace({"track_id": {"t1": "t1 "}})
    assert dataset.fingerprint(renamed) != fp


def test_fingerprint_is_a_function_of_the_rows_not_of_how_ids_are_held(
    tiny_interactions: pd.DataFrame,
) -> None:
    fp = dataset.fingerprint(tiny_interactions)
    as_codes = tiny_interactions.astype({"user_id": "category", "track_id": "category"})
    assert dataset.fingerprint(as_codes) == fp
    # ids no row holds any more (left behind by a filter) are not part of the data
    wider = as_codes.astype(
        {"track_id": pd.CategoricalDtype([*as_codes["track_id"].cat.categories, "zzz", "0"])}
    )
    assert dataset.fingerprint(wider) == fp
    other_ids = as_codes.assign(
        track_id=as_codes["track_id"].cat.rename_categories(lambda c: c + "!")
    )
    assert dataset.fingerprint(other_ids) != fp


def test_encode_labelled_matches_encode_of_the_frames(parts: Split) -> None:
    from tracktower.features.split import TEST, TRAIN, VAL, partition

    frames = [parts.train, parts.val, parts.test]
    whole = pd.concat(frames, ignore_index=True).astype(
        {"user_id": "category", "track_id": "category"}
    )
    labels = np.repeat(np.array([TRAIN, VAL, TEST], np.int8), [len(f) for f in frames])
    a, b = dataset.encode(parts), dataset.encode_labelled(whole, labels)
    assert a.user_ids.tolist() == b.user_ids.tolist() == ["a", "b"]
    assert a.track_ids.tolist() == b.track_ids.tolist()
    for name in ("train", "val", "test"):
        assert (getattr(a, name) != getattr(b, name)).nnz == 0
    assert a.val_unknown.tolist() == b.val_unknown.tolist()
    assert a.test_unknown.tolist() == b.test_unknown.tolist()
    assert dataset.encode(partition(whole, labels)).track_ids.tolist() == a.track_ids.tolist()
