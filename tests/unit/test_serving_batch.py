"""Batch scoring to Parquet and its users-file reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import brute_force, cached_artifact, fake_arrays, seen_of, user_id

from tracktower.features.errors import DataError
from tracktower.serving.batch import read_user_ids, recommend_to_parquet
from tracktower.serving.resolve import resolve_artifact

ARRAYS = fake_arrays(50, 200, 8)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


def test_parquet_output(artifact: Path, tmp_path: Path) -> None:
    users = [user_id(3), "stranger", user_id(0), user_id(49)]
    users_file = tmp_path / "users.parquet"
    pd.DataFrame({"user_id": users, "other": range(4)}).to_parquet(users_file)
    out = tmp_path / "out" / "recs.parquet"
    rows = recommend_to_parquet(artifact, users_file, 5, out, chunk_size=3)
    recs = pd.read_parquet(out)
    assert rows == len(recs) == 20
    assert list(recs.columns) == ["user_id", "rank", "track_id", "score", "source"]
    assert recs["score"].dtype == np.float32 and recs["rank"].dtype == np.int64
    assert recs["user_id"].drop_duplicates().tolist() == users
    assert recs.groupby("user_id")["rank"].apply(list).map(lambda r: r == [1, 2, 3, 4, 5]).all()
    by_user = {u: g for u, g in recs.groupby("user_id")}
    assert set(by_user["stranger"]["source"]) == {"popular"}
    for u in (3, 0, 49):
        got = by_user[user_id(u)]
        assert set(got["source"]) == {"model"}
        expected = brute_force(ARRAYS, ARRAYS["user_embeddings"][u], 5, seen_of(ARRAYS, u))
        assert got["track_id"].tolist() == expected
    assert not list(out.parent.glob("*.partial"))


def test_accepts_resolved_model_and_text_files(artifact: Path, tmp_path: Path) -> None:
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"{user_id(1)}\n\n  {user_id(2)}  \n")
    out = tmp_path / "recs.parquet"
    assert recommend_to_parquet(resolve_artifact(str(artifact)), users_file, 2, out) == 4
    assert pd.read_parquet(out)["user_id"].tolist() == [user_id(1)] * 2 + [user_id(2)] * 2


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("u.csv", "user_id,x\na,1\nb,2\n", ["a", "b"]),
        ("u.csv", "a\nb\n", ["a", "b"]),
        ("u.tsv", "x\tuser_id\n1\t007\n", ["007"]),
        ("u.txt", "007\n 8 \n", ["007", "8"]),
        ("users", "a\n", ["a"]),
    ],
)
def test_read_user_ids(tmp_path: Path, name: str, content: str, expected: list[str]) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert read_user_ids(path) == expected


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("u.csv", "a,b\n1,2\n", "column 'user_id'"),
        ("u.csv", "user_id,x\na,1\n,2\n", "row 1: empty user id"),
        ("u.txt", "\n\n", "no user ids"),
        ("u.csv", "", "unreadable users file"),
        ("u.parquet", "not parquet", "unreadable users file"),
        ("missing.csv", None, "does not exist"),
    ],
)
def test_bad_users_files(tmp_path: Path, name: str, content: str | None, match: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_user_ids(path)


def test_parquet_without_user_id_column(tmp_path: Path) -> None:
    path = tmp_path / "u.parquet"
    pd.DataFrame({"uid": ["a"]}).to_parquet(path)
    with pytest.raises(DataError, match="column 'user_id'"):
        read_user_ids(path)


def test_bad_k(artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "u.txt").write_text("a\n")
    with pytest.raises(DataError, match="k must be"):
        recommend_to_parquet(artifact, tmp_path / "u.txt", 0, tmp_path / "o.parquet")


def test_parquet_users_that_are_not_text_ids_are_one_line_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"user_id": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), binary)
    with pytest.raises(DataError, match=r"binary.parquet, column 'user_id', row 1: .*UTF-8"):
        read_user_ids(binary)
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"user_id": pa.array([["u1"], ["u2"]])}), nested)
    with pytest.raises(DataError, match=r"row 0: expected one id per row"):
        read_user_ids(nested)
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"user_id": pa.array([b"u1", b"u2"], pa.binary())}), text)
    assert read_user_ids(text) == ["u1", "u2"]
