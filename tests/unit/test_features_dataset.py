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
