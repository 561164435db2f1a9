"""Artist-level aggregate: weights count distinct tracks per (user, artist); bad tracks fail."""

from __future__ import annotations

import pandas as pd
import pytest

from tracktower.features.aggregate import to_artist_level
from tracktower.features.errors import DataError


def _tracks() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "track_id": ["t1", "t2", "t3", "t4", "t5"],
            "artist": ["A", "A", "B", None, " "],
        }
    )


def test_counts_distinct_tracks_of_each_artist_per_user() -> None:
    interactions = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u1", "u2", "u2", "u2", "u2"],
            # u1 lists t1 twice (one track), u2 has a track without artist and one unknown
            "track_id": ["t1", "t1", "t2", "t3", "t3", "t4", "t5", "t9"],
            "weight": [1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0],
        }
    )
    out = to_artist_level(interactions, _tracks())
    got = {(u, a): w for u, a, w in out[["user_id", "track_id", "weight"]].itertuples(index=False)}
    assert got == {("u1", "A"): 2.0, ("u1", "B"): 1.0, ("u2", "B"): 1.0}
    assert list(out.columns) == ["user_id", "track_id", "weight"]


def test_categorical_ids_give_the_same_result() -> None:
    interactions = pd.DataFrame({"user_id": ["u1", "u2", "u2"], "track_id": ["t1", "t2", "t3"]})
    plain = to_artist_level(interactions, _tracks())
    cat = to_artist_level(
        interactions.astype("category"), _tracks().astype({"track_id": "category"})
    )
    pd.testing.assert_frame_equal(plain, cat)


def test_tracks_without_artist_column_is_a_data_error() -> None:
    interactions = pd.DataFrame({"user_id": ["u1"], "track_id": ["t1"]})
    with pytest.raises(DataError, match="tracks lack column 'artist'"):
        to_artist_level(interactions, pd.DataFrame({"track_id": ["t1"], "title": ["x"]}))


def test_no_matching_artist_is_a_data_error() -> None:
    interactions = pd.DataFrame({"user_id": ["u1"], "track_id": ["zz"]})
    with pytest.raises(DataError, match="no interaction's track has an artist"):
        to_artist_level(interactions, _tracks())
