"""``tracktower recommend --engine spark`` in Spark local mode, against ``--engine local``.

The artifact has integer embeddings and an exact index: every score is exact in any summation
order, so the rows cannot depend on how users are batched, and the two engines must agree row for
row. Its 40-track catalogue with up to 19 seen tracks per user makes k = 25 leave many users
fewer than k candidates (short lists), and the users file mixes known users, unknown ones
(popularity fallback) and repeated ones.

Needs Java 17 and pyspark; skipped without Java locally, failed in CI (``.ci/run`` installs it).
One JVM serves the whole module (pyspark keeps its gateway for the process), so only the first
session pays the JVM's start.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from builders import user_id, write_fake_artifact
from typer.testing import CliRunner, Result

from tracktower.features.errors import DataError
from tracktower.serving.batch import SCHEMA
from tracktower.serving.cli import app

K = 25
PARTITIONS = 6


@pytest.fixture(scope="module", autouse=True)
def _java() -> None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        message = "Java not found (Debian: apt-get install openjdk-17-jre-headless)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("spark") / "artifact"
    return write_fake_artifact(out, 900, 40, 8, False, integer=True)


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 ids: 800 known, 190 unknown, 10 known ones listed twice, shuffled."""
    ids = [user_id(i) for i in range(800)] + [f"new-{i}" for i in range(190)]
    ids += [user_id(i) for i in range(0, 100, 10)]
    ids = [str(u) for u in np.random.default_rng(7).permutation(ids)]
    path = tmp_path_factory.mktemp("users") / "users.parquet"
    pd.DataFrame({"user_id": ids}).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def local_output(
    artifact: Path, users_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("local") / "recs.parquet"
    result = _cli(artifact, users_file, out)
    assert result.exit_code == 0, result.output
    assert pq.read_schema(out).equals(SCHEMA)
    return pd.read_parquet(out)


def _cli(artifact: Path, users: Path, out: Path, *extra: str) -> Result:
    args = ["recommend", "--model", str(artifact), "--users", str(users), "--k", str(K)]
    return CliRunner().invoke(app, [*args, "--out", str(out), *extra])


def _by_user_rank(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["user_id", "rank"], kind="stable").reset_index(drop=True)


def test_spark_rows_equal_the_local_engine(
    artifact: Path, users_file: Path, local_output: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "recs"
    extra = ["--engine", "spark", "--spark-master", "local[2]", "--partitions", str(PARTITIONS)]
    result = _cli(artifact, users_file, out, *extra)
    assert result.exit_code == 0, result.output
    spark = pd.read_parquet(out)
    assert pq.read_table(out).schema.equals(SCHEMA)
    pd.testing.assert_frame_equal(_by_user_rank(spark), _by_user_rank(local_output))
    # Range partitions over the input position: read in file order, the input order too.
    pd.testing.assert_frame_equal(spark, local_output)
    assert len(list(out.glob("part-*.parquet"))) == PARTITIONS
    assert not list(tmp_path.glob("*.partial*"))
    # The cases the equality covers: popularity fallback, lists cut short by seen tracks.
    counts = local_output.groupby("user_id").size()
    assert set(local_output["source"]) == {"model", "popular"}
    assert (counts < K).any() and (counts == K).any()
    assert f"wrote {len(local_output)} rows to {out}" in result.output
    # Loaded once per Python worker (local[2]: at most 2), not per partition or batch.
    loads = re.search(r"model opened by (\d+) Python workers", result.output)
    assert loads is not None and 1 <= int(loads[1]) <= 2


@pytest.fixture(scope="module")
def session() -> Iterator[Any]:
    """One session for the tests below (the CLI test starts and stops its own, as a user's run
    does)."""
    from tracktower.serving.spark import spark_session

    with spark_session("local[2]") as spark:
        yield spark


def test_archive_shipping_and_replacing_an_output(
    artifact: Path, users_file: Path, local_output: pd.DataFrame, session: Any, tmp_path: Path
) -> None:
    """The cluster path (the artifact as an archive through ``addArchive``) in local mode, run
    twice into one output: the second run replaces the first's directory. The session's default
    parallelism (2) is not what is asked for, so the users are range-partitioned instead."""
    from tracktower.serving.spark import recommend_with_spark

    out = tmp_path / "recs"
    for partitions in (3, 1):
        result = recommend_with_spark(
            artifact, users_file, K, out, session=session, partitions=partitions, ship_archive=True
        )
        assert (result.rows, result.users) == (len(local_output), 1000)
        assert result.partitions == partitions
        pd.testing.assert_frame_equal(pd.read_parquet(out), local_output)
        assert len(list(out.glob("part-*.parquet"))) == partitions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs"]


def test_worker_failure_is_one_line(session: Any, tmp_path: Path) -> None:
    """A model path the executors cannot open fails the job with the worker's DataError."""
    from tracktower.serving.spark import score_frame, spark_errors

    missing = tmp_path / "not-there"
    users = session.createDataFrame([("u1",)], "user_id string")
    with pytest.raises(DataError) as info, spark_errors():
        score_frame(users, str(missing), 5).collect()
    assert str(info.value) == f"Spark job failed: {missing}: artifact directory does not exist"
