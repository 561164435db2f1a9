"""Readers: every layout gives the same canonical frame; every bad input one clear line."""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tracktower.features import io
from tracktower.features.dataset import fingerprint
from tracktower.features.errors import DataError

SLICES = "mpd-subset/raw/soundscout_f611061_data_mpd_slices.tar.gz"


def _parquet(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_parquet(path, index=False)
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _raises(
    path: Path, fn: Callable[[], object], *, column: str | None = None, row: int | None = None
) -> DataError:
    """The error names the file, and the column and row when given, and is a single line."""
    with pytest.raises(DataError) as info:
        fn()
    err = info.value
    assert err.path == str(path)
    assert str(path) in str(err)
    assert "\n" not in str(err)
    if column is not None:
        assert err.column == column
        assert f"column '{column}'" in str(err)
    if row is not None:
        assert err.row == row
        assert f"row {row}" in str(err)
    return err


# --- formats -----------------------------------------------------------------------------------


def test_parquet_is_canonical_and_sums_duplicates(tmp_path: Path) -> None:
    raw = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 1],
            "track_id": ["a", "b", "a", "a"],
            "plays": [2, 1, 4, 3],
            "timestamp": [10, 11, 12, 15],
        }
    )
    df = io.read_interactions(_parquet(tmp_path / "x.parquet", raw))
    assert list(df.columns) == ["user_id", "track_id", "weight", "timestamp"]
    assert df["weight"].dtype == np.float64 and df["timestamp"].dtype == np.int64
    assert df["user_id"].tolist() == ["1", "1", "2"]
    assert df["track_id"].tolist() == ["a", "b", "a"]
    assert df["weight"].tolist() == [5.0, 1.0, 4.0]
    assert df["timestamp"].tolist() == [15, 11, 12]


def test_parquet_directory_is_concatenated(tmp_path: Path) -> None:
    _parquet(tmp_path / "part-0.parquet", pd.DataFrame({"user_id": ["u"], "track_id": ["a"]}))
    _parquet(
        tmp_path / "part-1.parquet", pd.DataFrame({"user_id": ["u", "v"], "track_id": ["a", "b"]})
    )
    (tmp_path / "_SUCCESS").write_text("")
    df = io.read_interactions(tmp_path)
    assert df.to_dict("list") == {
        "user_id": ["u", "v"],
        "track_id": ["a", "b"],
        "weight": [2.0, 1.0],
    }


def test_csv_with_header_and_tsv_without(tmp_path: Path) -> None:
    csv_df = io.read_interactions(
        _text(tmp_path / "a.csv", "user_id,track_id,weight\nu,a,2\nv,b,1.5\n")
    )
    tsv_df = io.read_interactions(_text(tmp_path / "a.txt", "u\ta\t2\nv\tb\t1.5\n"))
    pd.testing.assert_frame_equal(csv_df, tsv_df)
    assert csv_df["weight"].tolist() == [2.0, 1.5]


def test_headerless_two_columns_weigh_one(tmp_path: Path) -> None:
    df = io.read_interactions(_text(tmp_path / "a.csv", "u,a\nu,b\r\n"))
    assert df["weight"].tolist() == [1.0, 1.0] and "timestamp" not in df


def test_column_map_and_iso_timestamps(tmp_path: Path) -> None:
    path = _text(
        tmp_path / "log.csv",
        "listener,song,count,when\nu,a,3,2024-01-01T00:00:10Z\nu,b,1,2024-01-01T00:00:00Z\n",
    )
    cols = io.ColumnMap(user="listener", track="song", weight="count", timestamp="when")
    df = io.read_interactions(path, cols)
    assert df["weight"].tolist() == [3.0, 1.0]
    assert df["timestamp"].tolist() == [1_704_067_210, 1_704_067_200]


def _slice(path: Path, playlists: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"info": {"slice": "0-999"}, "playlists": playlists}))
    return path


def test_mpd_slices_playlists_become_users(tmp_path: Path) -> None:
    def track(i: int, **extra: int) -> dict[str, Any]:
        return {
            "track_uri": f"spotify:track:T{i}",
            "track_name": f"Song {i}",
            "artist_name": "A",
        } | extra

    _slice(
        tmp_path / "mpd.slice.0-999.json", [{"pid": 7, "tracks": [track(1), track(2), track(1)]}]
    )
    _slice(tmp_path / "mpd.slice.1000-1999.json", [{"pid": 8, "tracks": [track(3, pos=5)]}])
    inter, tracks = io.read_mpd_slices(tmp_path)
    assert inter.to_dict("list") == {
        "user_id": ["7", "7", "8"],
        "track_id": ["T1", "T2", "T3"],
        "weight": [2.0, 1.0, 1.0],
        "timestamp": [2, 1, 5],
    }
    assert tracks.to_dict("list") == {
        "track_id": ["T1", "T2", "T3"],
        "title": ["Song 1", "Song 2", "Song 3"],
        "artist": ["A", "A", "A"],
    }
    pd.testing.assert_frame_equal(io.read_interactions(tmp_path), inter)
    pd.testing.assert_frame_equal(io.read_tracks(tmp_path, inter), tracks)


@pytest.fixture(scope="module")
def real_slices(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mpd")
    with tarfile.open(shared_data / SLICES, "r:gz") as tar:
        taken = 0
        for member in tar:  # stream: stop after three slices instead of inflating all 932
            if member.isfile() and member.name.endswith(".json"):
                member.name = Path(member.name).name
                tar.extract(member, out, filter="data")
                taken += 1
                if taken == 3:
                    break
    return out


@pytest.fixture(scope="module")
def mpd_read(shared_data: Path) -> tuple[pd.DataFrame, float]:
    """The published MPD parquet, read once per module, with the time the read took."""
    start = time.perf_counter()
    df = io.read_interactions(shared_data / "mpd-subset/interactions.parquet")
    return df, time.perf_counter() - start


def test_real_mpd_slices_match_the_published_parquet(
    real_slices: Path, mpd_read: tuple[pd.DataFrame, float]
) -> None:
    mpd_parquet = mpd_read[0]
    inter, tracks = io.read_mpd_slices(real_slices)
    assert len(list(real_slices.glob("mpd.slice.*.json"))) == 3
    assert inter["user_id"].nunique() > 10 and len(tracks) > 100
    assert set(tracks.columns) == {"track_id", "title", "artist"}
    assert not inter["track_id"].str.startswith("spotify:").any()
    same_users = mpd_parquet[mpd_parquet["user_id"].isin(inter["user_id"].unique())]
    assert fingerprint(same_users) == fingerprint(inter)


def test_real_msd_raw_text_equals_parquet(shared_data: Path) -> None:
    raw = io.read_interactions(shared_data / "msd-sample/raw/10000.txt")
    parquet = io.read_interactions(shared_data / "msd-sample/interactions.parquet")
    assert (len(raw), raw["user_id"].nunique(), raw["track_id"].nunique()) == (42739, 1630, 9071)
    assert fingerprint(raw) == fingerprint(parquet)
    tracks = io.read_tracks(shared_data / "msd-sample/tracks.parquet", raw)
    assert {"title", "artist", "album", "year"} <= set(tracks.columns)
    assert tracks["year"].dtype == "Int64" and tracks["year"].isna().any()
    song_df = io.read_tracks(shared_data / "msd-sample/raw/song_df.csv", raw)  # aliases
    assert song_df["track_id"].is_unique and (song_df["year"].dropna() > 0).all()


def test_real_mpd_parquet_reads_and_merges_duplicates(mpd_read: tuple[pd.DataFrame, float]) -> None:
    df, _ = mpd_read
    assert len(df) == 696_957 - 9_962  # duplicate (playlist, track) pairs are merged
    assert df["weight"].sum() == 696_957


# --- bad input ---------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.parquet"
    _raises(path, lambda: io.read_interactions(path))


@pytest.mark.parametrize("content", [b"this is not parquet", b"PAR1\x00\x01truncated"])
def test_not_parquet(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(content)
    err = _raises(path, lambda: io.read_interactions(path))
    assert "Parquet" in str(err)


def test_non_utf8_text_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"user_id,track_id\nu,a\nu,caf\xe9\n")
    err = _raises(path, lambda: io.read_interactions(path), row=2)
    assert "UTF-8" in str(err)


@pytest.mark.parametrize("content", ["", "\n", "user_id,track_id,weight\n"])
def test_empty_text_file(tmp_path: Path, content: str) -> None:
    path = _text(tmp_path / "x.csv", content)
    _raises(path, lambda: io.read_interactions(path))


def test_empty_parquet(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "x.parquet", pd.DataFrame({"user_id": [], "track_id": []}))
    err = _raises(path, lambda: io.read_interactions(path))
    assert "no rows" in str(err)


def test_missing_column_lists_the_columns_present(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "x.parquet", pd.DataFrame({"user_id": ["u"], "song_id": ["a"]}))
    err = _raises(path, lambda: io.read_interactions(path), column="track_id")
    assert "user_id, song_id" in str(err)
    cols = io.ColumnMap(track="song_id", weight="count")
    _raises(path, lambda: io.read_interactions(path, cols), column="count")


@pytest.mark.parametrize("bad", [None, "", "  "])
def test_null_or_empty_ids_in_parquet(tmp_path: Path, bad: str | None) -> None:
    frame = pd.DataFrame({"user_id": ["u", "v", bad, None], "track_id": ["a", "b", "c", "d"]})
    path = _parquet(tmp_path / "x.parquet", frame)
    _raises(path, lambda: io.read_interactions(path), column="user_id", row=2)


def test_empty_id_in_headerless_text(tmp_path: Path) -> None:
    path = _text(tmp_path / "x.tsv", "u\ta\t1\nu\t\t1\n")
    _raises(path, lambda: io.read_interactions(path), column="track_id", row=2)


@pytest.mark.parametrize(
    ("value", "needle"),
    [("-3", ">= 0"), ("abc", "'abc'"), ("", "missing"), ("nan", "'nan'"), ("inf", "finite")],
)
def test_bad_weights_in_text(tmp_path: Path, value: str, needle: str) -> None:
    path = _text(tmp_path / "x.csv", f"user_id,track_id,plays\nu,a,1\nu,b,{value}\nu,c,-1\n")
    err = _raises(path, lambda: io.read_interactions(path), column="plays", row=2)
    assert needle in str(err)


@pytest.mark.parametrize("value", [-1.0, np.nan])
def test_bad_weights_in_parquet(tmp_path: Path, value: float) -> None:
    frame = pd.DataFrame(
        {"user_id": ["u"] * 3, "track_id": list("abc"), "weight": [1.0, 2.0, value]}
    )
    path = _parquet(tmp_path / "x.parquet", frame)
    _raises(path, lambda: io.read_interactions(path), column="weight", row=2)


def test_non_numeric_weight_column_in_parquet(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["u", "u"], "track_id": ["a", "b"], "weight": ["2", "lots"]})
    path = _parquet(tmp_path / "x.parquet", frame)
    _raises(path, lambda: io.read_interactions(path), column="weight", row=1)


def test_bad_timestamp(tmp_path: Path) -> None:
    path = _text(tmp_path / "x.csv", "user_id,track_id,timestamp\nu,a,5\nu,b,yesterday\n")
    _raises(path, lambda: io.read_interactions(path), column="timestamp", row=2)


def test_ragged_text_names_the_row(tmp_path: Path) -> None:
    path = _text(tmp_path / "x.csv", "user_id,track_id\nu,a\nu,b\nu,c,3,4\n")
    _raises(path, lambda: io.read_interactions(path), row=3)


def test_bad_row_in_second_parquet_part_names_that_file(tmp_path: Path) -> None:
    _parquet(tmp_path / "a.parquet", pd.DataFrame({"user_id": ["u"], "track_id": ["a"]}))
    bad = _parquet(
        tmp_path / "b.parquet", pd.DataFrame({"user_id": ["u", ""], "track_id": ["a", "b"]})
    )
    _raises(bad, lambda: io.read_interactions(tmp_path), column="user_id", row=1)


def test_directory_without_readable_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    _raises(tmp_path, lambda: io.read_interactions(tmp_path))
    _raises(tmp_path, lambda: io.read_tracks(tmp_path))


def test_mpd_slice_errors_name_file_column_and_row(tmp_path: Path) -> None:
    ok = {"track_uri": "spotify:track:A"}
    _slice(tmp_path / "mpd.slice.0-999.json", [{"pid": 1, "tracks": [ok]}])
    bad = _slice(
        tmp_path / "mpd.slice.1000-1999.json", [{"pid": 2, "tracks": [ok, {"track_name": "x"}]}]
    )
    _raises(bad, lambda: io.read_mpd_slices(tmp_path), column="track_uri", row=2)
    bad.write_text('{"playlists": [')
    err = _raises(bad, lambda: io.read_mpd_slices(tmp_path))
    assert "invalid JSON" in str(err)
    bad.write_text('{"info": {}}')
    _raises(bad, lambda: io.read_mpd_slices(tmp_path), column="playlists")
    _slice(bad, [{"name": "no pid", "tracks": [ok]}])
    _raises(bad, lambda: io.read_mpd_slices(tmp_path), column="pid")


def test_tracks_file_matching_no_interactions(tmp_path: Path) -> None:
    inter = pd.DataFrame({"user_id": ["u"], "track_id": ["a"], "weight": [1.0]})
    path = _text(tmp_path / "tracks.csv", "track_id,title\nx,X\ny,Y\n")
    err = _raises(path, lambda: io.read_tracks(path, inter), column="track_id")
    assert "'x'" in str(err)


def test_tracks_aliases_dedupe_and_bad_year(tmp_path: Path) -> None:
    path = _text(
        tmp_path / "t.csv",
        "song_id,track_name,artist_name,release,year\na,A,Art,Alb,0\na,A2,Art,Alb,1999\nb,,,,2001\n",
    )
    tracks = io.read_tracks(path)
    assert tracks.columns.tolist() == ["track_id", "title", "artist", "album", "year"]
    assert tracks["track_id"].tolist() == ["a", "b"]
    assert tracks["title"].tolist()[0] == "A" and pd.isna(tracks["title"].iloc[1])
    assert pd.isna(tracks["year"].iloc[0]) and tracks["year"].iloc[1] == 2001
    bad = _text(tmp_path / "bad.csv", "track_id,year\na,1999\nb,soon\n")
    _raises(bad, lambda: io.read_tracks(bad), column="year", row=2)
    empty_id = _parquet(tmp_path / "t.parquet", pd.DataFrame({"track_id": ["a", None]}))
    _raises(empty_id, lambda: io.read_tracks(empty_id), column="track_id", row=1)
    no_id = _text(tmp_path / "n.csv", "title,artist\nA,B\n")
    _raises(no_id, lambda: io.read_tracks(no_id), column="track_id")


def _binary_parquet(path: Path, columns: dict[str, list[Any]], binary: str) -> Path:
    """A Parquet file whose ``binary`` column has the Parquet type ``binary`` (not string)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {
        name: pa.array(values, type=pa.binary() if name == binary else None)
        for name, values in columns.items()
    }
    pq.write_table(pa.table(arrays), path)
    return path


@pytest.mark.parametrize("column", ["user_id", "track_id", "weight"])
def test_non_utf8_binary_values_in_parquet_name_the_row(tmp_path: Path, column: str) -> None:
    columns: dict[str, list[Any]] = {
        "user_id": ["u1", "u2", "u3"],
        "track_id": ["a", "b", "c"],
        "weight": ["1", "2", "3"],
    }
    columns[column] = [v.encode() for v in columns[column]]
    columns[column][1] = b"\xff\xfe" + columns[column][1]
    path = _binary_parquet(tmp_path / "x.parquet", columns, column)
    err = _raises(path, lambda: io.read_interactions(path), column=column, row=1)
    assert "not UTF-8" in str(err) and "\\xff\\xfe" in str(err)


def test_utf8_binary_ids_in_parquet_are_text(tmp_path: Path) -> None:
    columns: dict[str, list[Any]] = {"user_id": [b"u1", "é".encode()], "track_id": ["a", "b"]}
    path = _binary_parquet(tmp_path / "x.parquet", columns, "user_id")
    assert io.read_interactions(path)["user_id"].tolist() == ["u1", "é"]


def test_non_utf8_binary_track_metadata_names_the_row(tmp_path: Path) -> None:
    columns: dict[str, list[Any]] = {"track_id": ["a", "b", "c"], "title": [b"A", None, b"\xc3("]}
    path = _binary_parquet(tmp_path / "t.parquet", columns, "title")
    _raises(path, lambda: io.read_tracks(path), column="title", row=2)


# --- ids as codes ------------------------------------------------------------------------------


def test_ids_are_categoricals_over_a_sorted_vocabulary(tmp_path: Path) -> None:
    """Each distinct id is one string; rows hold codes whose order is the ids' string order."""
    raw = pd.DataFrame({"user_id": [3.0, 1.0, 3.0], "track_id": ["z", "a", "b"]})
    df = io.read_interactions(_parquet(tmp_path / "x.parquet", raw))
    assert isinstance(df["user_id"].dtype, pd.CategoricalDtype)
    assert df["user_id"].cat.categories.tolist() == ["1", "3"]  # float ids lose ".0"
    assert df["track_id"].cat.categories.tolist() == ["a", "b", "z"]
    assert df["user_id"].tolist() == ["3", "1", "3"] and df["track_id"].tolist() == ["z", "a", "b"]


def test_shards_read_as_the_file_they_were_cut_from(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    whole = pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in rng.integers(0, 50, 600)],
            "track_id": [f"t{i}" for i in rng.integers(0, 80, 600)],
            "weight": rng.integers(1, 5, 600).astype(float),
            "timestamp": rng.integers(0, 1000, 600),
        }
    )
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, start in enumerate(range(0, 600, 150)):
        _parquet(shards / f"part-{k:05d}.parquet", whole.iloc[start : start + 150])
    one = io.read_interactions(_parquet(tmp_path / "whole.parquet", whole))
    many = io.read_interactions(shards)
    assert len(one) < len(whole)  # duplicates across shards were merged
    pd.testing.assert_frame_equal(many, one)
    assert fingerprint(many) == fingerprint(one)


def test_first_bad_id_in_row_order_is_reported(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["u", "v", "u", " ", "", "v"], "track_id": list("abcdef")})
    path = _parquet(tmp_path / "x.parquet", frame)
    err = _raises(path, lambda: io.read_interactions(path), column="user_id", row=3)
    assert "empty id ' '" in str(err)


def test_timestamp_in_some_shards_only(tmp_path: Path) -> None:
    _parquet(tmp_path / "a.parquet", pd.DataFrame({"user_id": ["u"], "track_id": ["a"]}))
    frame = pd.DataFrame({"user_id": ["v"], "track_id": ["b"], "timestamp": [3]})
    _parquet(tmp_path / "b.parquet", frame)
    err = _raises(tmp_path / "a.parquet", lambda: io.read_interactions(tmp_path))
    assert "b.parquet" in str(err)


def test_tracks_are_checked_against_the_vocabulary(tmp_path: Path) -> None:
    inter = io.read_interactions(
        _parquet(tmp_path / "i.parquet", pd.DataFrame({"user_id": ["u"], "track_id": ["a"]}))
    )
    tracks = _parquet(tmp_path / "t.parquet", pd.DataFrame({"track_id": ["a", "q"]}))
    assert io.read_tracks(tracks, inter)["track_id"].tolist() == ["a", "q"]
    assert io.vocabulary(inter["track_id"]).tolist() == ["a"]
