"""Batch scoring to Parquet, its users-file reader, the output path both engines share, and the
Spark engine's checks and helpers that need no JVM (the Spark runs: tests/integration)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import brute_force, cached_artifact, fake_arrays, seen_of, user_id

from tracktower.features.errors import DataError
from tracktower.serving import batch
from tracktower.serving.batch import prepare_output, publish, read_user_ids, recommend_to_parquet
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
    assert not list(out.parent.glob("*.partial*"))


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


# --- the output path, shared by both engines ----------------------------------------------------


def _spark_like_output(path: Path) -> Path:
    """What Spark's Parquet writer leaves: part files, the job marker, hidden checksums."""
    path.mkdir()
    pd.DataFrame({"user_id": ["old"]}).to_parquet(path / "part-00000-abc-c000.snappy.parquet")
    (path / "_SUCCESS").write_text("")
    (path / ".part-00000-abc-c000.snappy.parquet.crc").write_text("")
    return path


def test_local_engine_replaces_earlier_output_and_refuses_other_files(
    artifact: Path, tmp_path: Path
) -> None:
    users = tmp_path / "u.txt"
    users.write_text(f"{user_id(1)}\n")
    spark_dir = _spark_like_output(tmp_path / "recs")
    assert recommend_to_parquet(artifact, users, 2, spark_dir) == 2
    assert (
        spark_dir.is_file() and pd.read_parquet(spark_dir)["user_id"].tolist() == [user_id(1)] * 2
    )
    assert recommend_to_parquet(artifact, users, 3, spark_dir) == 3  # a Parquet file: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs", "u.txt"]
    notes = tmp_path / "notes.csv"
    notes.write_text("user_id\nkeep me\n")
    with pytest.raises(DataError, match=r"notes.csv: exists and is not Parquet output"):
        recommend_to_parquet(artifact, users, 2, notes)
    assert notes.read_text() == "user_id\nkeep me\n"


@pytest.mark.parametrize("extra", ["report.txt", "nested/"])
def test_prepare_output_refuses_directories_with_other_files(tmp_path: Path, extra: str) -> None:
    out = _spark_like_output(tmp_path / "recs")
    (out / extra.rstrip("/")).mkdir() if extra.endswith("/") else (out / extra).write_text("x")
    with pytest.raises(DataError, match="exists and is not Parquet output"):
        prepare_output(out)
    assert (out / "_SUCCESS").exists()


def test_prepare_output_removes_only_dead_jobs_staging_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_pid = 424242
    monkeypatch.setattr(batch, "_alive", lambda pid: pid != dead_pid)
    stale = tmp_path / "sub" / f"recs.partial-{dead_pid}-0000abcd"
    stale.mkdir(parents=True)
    (stale / "part-0.parquet").write_text("half")
    live = tmp_path / "sub" / f"recs.partial-{os.getppid()}-1111abcd"  # a live job's
    live.write_text("writing")
    staging = prepare_output(tmp_path / "sub" / "recs")
    assert staging.parent == stale.parent and staging.name.startswith(
        f"recs.partial-{os.getpid()}-"
    )
    assert not stale.exists() and live.read_text() == "writing"
    # Two jobs writing one output never share a staging path.
    assert prepare_output(tmp_path / "sub" / "recs") != staging
    assert prepare_output(tmp_path / "new" / "recs.parquet").parent.is_dir()


@pytest.mark.parametrize(("new_is_dir", "old_is_dir"), [(True, True), (True, False), (False, True)])
def test_publish_replaces_files_and_directories(
    tmp_path: Path, new_is_dir: bool, old_is_dir: bool
) -> None:
    out = tmp_path / "recs"
    if old_is_dir:
        _spark_like_output(out)
    else:
        pd.DataFrame({"user_id": ["old"]}).to_parquet(out)
    staging = prepare_output(out)
    if new_is_dir:
        staging.mkdir()
        pd.DataFrame({"user_id": ["new"]}).to_parquet(staging / "part-00000.parquet")
    else:
        pd.DataFrame({"user_id": ["new"]}).to_parquet(staging)
    publish(staging, out)
    assert pd.read_parquet(out)["user_id"].tolist() == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs"]


# --- the Spark engine's checks that run before Spark starts (no Java needed) ---------------------


@pytest.fixture
def no_spark(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a Spark session is asked for: bad input must be refused before it."""
    from tracktower.serving import spark

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Spark was started")

    monkeypatch.setattr(spark, "spark_session", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--users", "{tmp}/none.csv"], "error: {tmp}/none.csv: users file does not exist"),
        (["--out", "{tmp}/taken"], "error: {tmp}/taken: exists and is not Parquet output"),
        (["--model", "{tmp}/no-model"], "error: {tmp}/no-model: no such model directory"),
        # Typer's own usage errors, as for --engine local.
        (["--k", "0"], "Invalid value for '--k'"),
        (["--partitions", "0"], "Invalid value for '--partitions'"),
    ],
)
def test_spark_engine_bad_input_fails_before_spark(
    artifact: Path, tmp_path: Path, no_spark: None, extra: list[str], message: str
) -> None:
    from typer.testing import CliRunner

    from tracktower.serving.cli import app

    (tmp_path / "users.txt").write_text(f"{user_id(0)}\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    options = {"--model": str(artifact), "--users": str(tmp_path / "users.txt")}
    options["--out"] = str(tmp_path / "recs")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        options[flag] = value.format(tmp=tmp_path)
    args = ["recommend", "--engine", "spark", *[x for kv in options.items() for x in kv]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    message = message.format(tmp=tmp_path)
    if message.startswith("error: "):
        assert result.stderr.strip().startswith(message)
        assert len(result.stderr.strip().splitlines()) == 1
    else:
        assert message in result.stderr
    assert "Traceback" not in result.output
    assert (tmp_path / "taken" / "keep.txt").exists()
    assert not (tmp_path / "recs").exists() and not list(tmp_path.glob("recs.partial*"))


def test_spark_options_need_the_spark_engine(artifact: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tracktower.serving.cli import app

    (tmp_path / "u.txt").write_text("a\n")
    args = ["recommend", "--model", str(artifact), "--users", str(tmp_path / "u.txt")]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o"), "--partitions", "4"])
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "error: --spark-master and --partitions apply to --engine spark only"
    )


def test_spark_engine_without_java_is_one_line(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracktower.serving.spark import recommend_with_spark

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    (tmp_path / "u.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"needs Java 17 \(Debian/Ubuntu: apt-get install"):
        recommend_with_spark(artifact, tmp_path / "u.txt", 3, tmp_path / "recs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.txt"]  # no staging left behind


def test_spark_errors_keep_a_worker_data_error_and_nothing_else() -> None:
    from tracktower.serving.spark import spark_errors

    worker = (
        "An exception was thrown from the Python worker:\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ntracktower.features.errors.DataError: /m: artifact '
        "directory does not exist\n\n\tat org.apache.spark.api.python.BasePythonRunner"
    )
    with pytest.raises(DataError) as info, spark_errors():
        raise RuntimeError(worker)
    assert str(info.value) == "Spark job failed: /m: artifact directory does not exist"
    with pytest.raises(RuntimeError, match="out of memory"), spark_errors():
        raise RuntimeError("Java heap space: out of memory")


@pytest.mark.parametrize(
    ("master", "local"),
    [("local", True), ("local[2]", True), ("local[*]", True), ("local[2,3]", True),
     ("spark://h:7077", False), ("yarn", False), ("localhost", False)],
)  # fmt: skip
def test_is_local(master: str, local: bool) -> None:
    from tracktower.serving.spark import is_local

    assert is_local(master) is local


@pytest.mark.parametrize(
    ("users", "cores", "expected"),
    [(1_000, 2, 2), (40_000, 2, 2), (40_001, 2, 4), (100_000, 2, 6), (100_000, 1, 5), (0, 4, 4)],
)
def test_default_partitions_bound_users_per_task(users: int, cores: int, expected: int) -> None:
    from tracktower.serving.spark import USERS_PER_PARTITION, default_partitions

    n = default_partitions(users, cores)
    assert n == expected and n % cores == 0
    assert -(-users // n) <= USERS_PER_PARTITION


@pytest.mark.parametrize(
    ("master", "cores"),
    [("local", 1), ("local[3]", 3), ("local[2,4]", 2), ("local[*]", os.cpu_count()),
     ("spark://h:7077", None), ("local[x]", None)],
)  # fmt: skip
def test_local_cores(master: str, cores: int | None) -> None:
    from tracktower.serving.spark import local_cores

    assert local_cores(master) == cores


# --- all users, parallel chunks, progress (issue 9, part 5) ----------------------------------


def test_parallel_chunks_write_what_one_thread_writes(artifact: Path, tmp_path: Path) -> None:
    users_file = tmp_path / "users.txt"
    users = [user_id(i) for i in range(49, -1, -1)] + ["stranger"]
    users_file.write_text("\n".join(users))
    one = tmp_path / "one.parquet"
    many = tmp_path / "many.parquet"
    rows = recommend_to_parquet(artifact, users_file, 4, one, chunk_size=3)
    assert recommend_to_parquet(artifact, users_file, 4, many, chunk_size=3, workers=3) == rows
    pd.testing.assert_frame_equal(pd.read_parquet(one), pd.read_parquet(many))
    assert pd.read_parquet(many)["user_id"].drop_duplicates().tolist() == users


def test_all_users_are_the_models_users_in_its_order(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.parquet"
    assert recommend_to_parquet(artifact, None, 2, out, chunk_size=7, workers=2) == 100
    recs = pd.read_parquet(out)
    assert recs["user_id"].drop_duplicates().tolist() == ARRAYS["user_ids"].tolist()
    assert set(recs["source"]) == {"model"}


def test_progress_bar_counts_users_on_stderr(artifact: Path, tmp_path: Path, capsys) -> None:
    recommend_to_parquet(artifact, None, 2, tmp_path / "a.parquet", chunk_size=10, progress=True)
    err = capsys.readouterr().err
    assert "recommend" in err and "50/50" in err and "user/s" in err
    recommend_to_parquet(artifact, None, 2, tmp_path / "b.parquet", chunk_size=10)
    assert capsys.readouterr().err == ""


def test_a_failing_chunk_fails_the_job_and_leaves_no_file(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracktower.serving.artifact import Recommender

    calls = []
    real = Recommender.top_k_batch

    def flaky(self, user_ids, k):  # type: ignore[no-untyped-def]
        calls.append(len(user_ids))
        if len(calls) == 3:
            raise DataError("chunk three failed")
        return real(self, user_ids, k)

    monkeypatch.setattr(Recommender, "top_k_batch", flaky)
    out = tmp_path / "recs.parquet"
    with pytest.raises(DataError, match="chunk three failed"):
        recommend_to_parquet(artifact, None, 2, out, chunk_size=2, workers=2)
    assert len(calls) < 25  # queued chunks were cancelled, not all 25 searched
    assert not out.exists() and not list(tmp_path.glob("*.partial*"))
    with pytest.raises(DataError, match="chunk_size and workers must be >= 1"):
        recommend_to_parquet(artifact, None, 2, out, workers=0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ([], "either --users FILE or --all-users"),
        (["--all-users", "--users", "u.txt"], "either --users FILE or --all-users"),
        (["--all-users", "--engine", "spark"], "apply to --engine local only"),
        (["--users", "u.txt", "--engine", "spark", "--workers", "2"], "--engine local only"),
    ],
)
def test_recommend_command_user_options(
    artifact: Path, tmp_path: Path, args: list[str], match: str
) -> None:
    from typer.testing import CliRunner

    from tracktower.serving.cli import app

    out = tmp_path / "o.parquet"
    base = ["recommend", "--model", str(artifact), "--output", str(out)]
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code != 0 and match in result.stderr
    assert not out.exists()


def test_recommend_command_all_users(artifact: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tracktower.serving.cli import app

    out = tmp_path / "o.parquet"
    args = ["recommend", "--model", str(artifact), "--all-users", "--k", "3", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--workers", "2", "--chunk-size", "8"])
    assert result.exit_code == 0, result.output
    assert "wrote 150 rows" in result.stdout and "50/50" in result.stderr
    assert pd.read_parquet(out)["user_id"].nunique() == 50
