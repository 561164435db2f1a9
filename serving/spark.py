"""Batch scoring on Apache Spark: ``tracktower recommend --engine spark``.

The same job as the local engine (``serving.batch``), spread over Spark tasks.

**Driver.** The users file is read with the local engine's reader (``batch.read_user_ids``), the
model URI is resolved (``serving.resolve``: a registry model is downloaded once, here), the
artifact is checked (``check_artifact``) and the output path too, all before the JVM starts: bad
input is the same one-line error as with ``--engine local`` and costs no Spark start-up. The users
become a DataFrame of contiguous slices in input order, as many as ``partitions`` (default
``default_partitions``: the cores, or more to keep each slice under ``USERS_PER_PARTITION``
users): ``createDataFrame`` slices a pandas frame into ``spark.default.parallelism``
partitions, which ``spark_session`` is started with, so no shuffle is needed. When the number
cannot be known before the session starts (a cluster master without ``partitions``, a session
passed in) and differs, the users are range-partitioned on their input position instead (a
sampling job and a shuffle).

**Executors.** ``mapInPandas`` with :func:`score_partition`: every Python worker process opens the
artifact once (a module-level cache, which lives as long as the worker; Spark reuses Python workers
across tasks, ``spark.python.worker.reuse``), then scores each Arrow batch of at most
``chunk_size`` users with ``Recommender.top_k_batch`` and ``batch.long_format``, the local
engine's code. With an exact index the rows are therefore the local engine's: bit for bit when
every score is exact in float32 (the integration test: integer embeddings, 1,000 users); with
float embeddings BLAS may round a score differently for another batch shape or thread count, so
a score can differ in its last bits and an exact near-tie could break the other way (the
benchmark's 100k users x 50k tracks: the same tracks in every row, scores within 2e-5). How
many workers opened the model is counted with an accumulator and reported.

**Why mapInPandas, not ``mlflow.pyfunc.spark_udf``.** ``spark_udf`` wraps a model as a scalar
pandas UDF, which must return one row per input row; the registered pyfunc (``serving.pyfunc``)
returns k rows per user, the same long format as this output, and Spark rejects that
(``OUTPUT_EXCEEDS_INPUT_ROWS``, tried with pyspark 4.3 and MLflow 3.17). Fitting ``spark_udf``
would take a second output contract for the pyfunc (one row of arrays per user) plus an explode
on the way out; ``mapInPandas`` may return any number of rows per batch and runs the code the
pyfunc itself delegates to, so there was only one candidate left to measure. Measured with
``benchmarks/batch_scoring.py`` (100k users x 50k tracks, 64-d, exact index, k 10, on this
2-core machine shared with other work, load ~2.4): local[2] 2,655 users/s in a warm session and
1,247 users/s cold (JVM and Python workers starting, about 40 s), the single process 1,998.

**Shipping the model.** The artifact directory is resolved on the driver. With a ``local``
master the workers are on the same machine and read it in place (memory-mapped, shared through
the page cache). With any other master it is packed into an uncompressed tar and added with
``SparkContext.addArchive``: every executor fetches it from the driver once and unpacks it in its
working directory, so no shared storage is needed (Spark refuses ``addFile`` on a local
directory outside local mode). That costs one copy of the artifact per executor and job.

**Output.** A Parquet dataset directory at ``output``, one ``part-*.parquet`` file per partition
(Spark's writer; the columns and types of ``batch.SCHEMA``), readable as one table by pandas,
pyarrow, Spark or DuckDB; read in file-name order the rows are in input order. It is written to
``<output>.partial-<pid>-<random>`` and renamed into place only when the job succeeded
(``batch.publish``), so a crash never leaves a half-written output at ``output``; an existing
output is replaced only if it is Parquet output (``batch.prepare_output``). Rows are counted
from the written files' footers. The driver renames the output, so ``output`` must be a path on
a file system the driver and the executors share (local mode: the machine's own; a cluster: NFS
or a similar mount); a job that reads and writes its own tables (HDFS, S3, a metastore) calls
:func:`score_frame` instead.

**Start-up.** ``spark_session``: no UI, no progress bar, ``DRIVER_MEMORY`` for the driver,
Spark's scratch space and its log configuration (WARN; two start-up notices silenced) in a
temporary directory removed when the process exits (``process_scratch``), the driver on loopback
and Python workers on this interpreter for local masters, and the session stopped in a
``finally``. Java prints one line of its own ("Using incubator modules"), which no Spark setting
removes. Outside local mode the executors need the same tracktower installed and
``PYSPARK_PYTHON`` pointing at it. A session passed in (``session=``) is used as it is and left
running.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import sys
import tarfile
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tracktower.features.artifact import MANIFEST_FILE
from tracktower.features.errors import DataError
from tracktower.serving.artifact import Recommender, check_artifact
from tracktower.serving.batch import long_format, prepare_output, publish, read_user_ids, remove
from tracktower.serving.resolve import ResolvedModel, resolve_artifact

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

DEFAULT_MASTER = "local[2]"
DRIVER_MEMORY = "1g"  # the driver holds the user ids and the job's bookkeeping, never scores
# The user ids travel inside the tasks (createDataFrame of local data): about 20k ids stay near
# Spark's recommended 1 MiB per task, far from spark.rpc.message.maxSize (128 MiB), for any size
# of users file.
USERS_PER_PARTITION = 20_000
# The driver JVM (in local mode also the executor) only moves Arrow batches and writes Parquet:
# the quick compiler alone and the serial collector (a 1 GiB heap) start faster and leave the
# cores to the Python workers. A cold 30k-user job on a 2-core machine under load ~4: 39 and
# 50 s with them, 46 and 62 s without (alternating runs).
JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
# batch.SCHEMA in Spark's DDL.
OUTPUT_DDL = "user_id string, rank bigint, track_id string, score float, source string"
_PANDAS_WARNING = "PySpark does not yet fully support pandas"
_LOG4J = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = stderr
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n%ex
# Says that Hadoop's native library is absent (Spark uses its Java code instead).
logger.native.name = org.apache.hadoop.util.NativeCodeLoader
logger.native.level = error
# Says that spark.local.dir, set here, would be overridden by a cluster manager.
logger.conf.name = org.apache.spark.SparkConf
logger.conf.level = error
"""


@dataclass(frozen=True)
class SparkResult:
    rows: int
    users: int
    partitions: int
    model_loads: int  # Python worker processes that opened the artifact


def recommend_with_spark(
    model: ResolvedModel | str | Path,
    users_path: str | Path,
    k: int,
    output: str | Path,
    *,
    master: str = DEFAULT_MASTER,
    partitions: int | None = None,
    chunk_size: int = 1024,
    tracking_uri: str | None = None,
    session: SparkSession | None = None,
    ship_archive: bool | None = None,
) -> SparkResult:
    """``batch.recommend_to_parquet`` on Spark; see the module docstring.

    ``partitions`` defaults to ``default_partitions`` of the users and the master's cores;
    ``ship_archive`` defaults to True unless the master is local (``session``'s master when one
    is given)."""
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    if partitions is not None and partitions < 1:
        raise DataError(f"partitions must be >= 1, got {partitions}")
    if chunk_size < 1:
        raise DataError(f"chunk size must be >= 1, got {chunk_size}")
    users = read_user_ids(users_path)
    resolved = (
        model
        if isinstance(model, ResolvedModel)
        else resolve_artifact(str(model), tracking_uri=tracking_uri)
    )
    check_artifact(resolved.path)
    output = Path(output)
    staging = prepare_output(output)
    job = functools.partial(
        _run,
        artifact=resolved.path,
        users=users,
        k=k,
        staging=staging,
        partitions=partitions,
        chunk_size=chunk_size,
        ship_archive=ship_archive,
    )
    try:
        if session is not None:
            result = job(session)
        else:
            cores = local_cores(master)
            planned = partitions or (default_partitions(len(users), cores) if cores else None)
            with spark_session(master, parallelism=planned) as spark:
                result = job(spark)
    except BaseException:
        remove(staging)
        raise
    publish(staging, output)
    return result


def _run(
    spark: SparkSession,
    *,
    artifact: Path,
    users: list[str],
    k: int,
    staging: Path,
    partitions: int | None,
    chunk_size: int,
    ship_archive: bool | None,
) -> SparkResult:
    context = spark.sparkContext
    n = partitions or default_partitions(len(users), context.defaultParallelism)
    if ship_archive is None:
        ship_archive = not is_local(context.master or "")
    loads = context.accumulator(0)
    frame = pd.DataFrame({"_row": np.arange(len(users), dtype=np.int64), "user_id": users})
    batch = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(chunk_size)}
    with _quiet(), _sql_conf(spark, batch), _shipped(spark, artifact, ship_archive) as model:
        ordered = spark.createDataFrame(frame, "_row long, user_id string")
        if ordered.rdd.getNumPartitions() != min(n, len(users)):
            ordered = ordered.repartitionByRange(n, "_row").sortWithinPartitions("_row")
        scored = score_frame(
            ordered, model, k, chunk_size=chunk_size, archived=ship_archive, loads=loads
        )
        with spark_errors():
            # A file:// URI: a bare path would resolve against the cluster's fs.defaultFS
            # (HDFS on YARN), not the local staging directory the driver then renames.
            scored.write.mode("overwrite").parquet(staging.absolute().as_uri())
    rows = sum(pq.read_metadata(part).num_rows for part in staging.glob("part-*.parquet"))
    return SparkResult(rows, len(users), ordered.rdd.getNumPartitions(), int(loads.value))


def score_frame(
    users: DataFrame,
    model: str,
    k: int,
    *,
    chunk_size: int = 1024,
    archived: bool = False,
    loads: Any = None,
) -> DataFrame:
    """``users`` (a ``user_id`` string column) scored lazily into ``OUTPUT_DDL`` rows, for jobs
    that read and write their own tables. ``model`` is the artifact directory as the executors
    see it, or with ``archived`` the name of an archive added with ``addArchive`` (see
    ``_shipped``); ``loads`` is an optional accumulator counting the workers that opened it."""
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    score = functools.partial(
        score_partition, model=model, archived=archived, k=k, chunk_size=chunk_size, loads=loads
    )
    with _quiet():
        return users.select("user_id").mapInPandas(score, OUTPUT_DDL)


# --- executor side --------------------------------------------------------------------------

_LOADED: dict[str, Recommender] = {}  # one artifact per Python worker, kept across its tasks


def score_partition(
    batches: Iterator[pd.DataFrame],
    *,
    model: str,
    archived: bool,
    k: int,
    chunk_size: int,
    loads: Any = None,
) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: each batch's users in ``chunk_size`` slices through the local
    engine's code (``top_k_batch`` then ``long_format``)."""
    recommender = worker_recommender(model, archived=archived, loads=loads)
    for batch in batches:
        users = batch["user_id"].tolist()
        for start in range(0, len(users), chunk_size):
            chunk = users[start : start + chunk_size]
            frame = long_format(recommender, chunk, recommender.top_k_batch(chunk, k))
            yield frame.drop(columns="_row")


def worker_recommender(model: str, *, archived: bool = False, loads: Any = None) -> Recommender:
    """This process's Recommender for ``model``, loaded on first use; loading another model
    drops the previous one (a long-lived worker serves one job's model at a time). The key
    includes the manifest's modification time, so an artifact re-exported to the same path is
    not served stale by a worker kept from an earlier job of the session."""
    path = _archive_path(model) if archived else model
    try:
        key = f"{path}@{(Path(path) / MANIFEST_FILE).stat().st_mtime_ns}"
    except OSError:
        key = path  # Recommender.load reports what is missing, as a DataError
    found = _LOADED.get(key)
    if found is None:
        _LOADED.clear()
        found = _LOADED[key] = Recommender.load(path, history_tower=False)
        if loads is not None:
            loads.add(1)
    return found


def _archive_path(name: str) -> str:
    from pyspark import SparkFiles

    return SparkFiles.get(name)


# --- driver side ----------------------------------------------------------------------------


@contextmanager
def _shipped(spark: SparkSession, artifact: Path, archive: bool) -> Iterator[str]:
    """What ``score_frame`` is given as ``model``: the artifact path itself, or with ``archive``
    the name of an uncompressed tar of it added with ``addArchive`` (unique per job, so one
    session can ship several models), the tar removed after the job."""
    if not archive:
        yield str(artifact)
        return
    scratch = Path(tempfile.mkdtemp(prefix="tracktower-ship-", dir=_scratch_root(spark)))
    try:
        archive_path = scratch / f"tracktower-model-{uuid.uuid4().hex[:12]}.tar"
        with tarfile.open(archive_path, "w") as tar:
            for entry in sorted(artifact.iterdir()):
                tar.add(entry, arcname=entry.name)
        spark.sparkContext.addArchive(str(archive_path))
        yield archive_path.name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scratch_root(spark: SparkSession) -> str | None:
    """The session's ``spark.local.dir`` (``spark_session`` sets one it removes at the end),
    else the system temporary directory."""
    return spark.sparkContext.getConf().get("spark.local.dir") or None


def default_partitions(users: int, cores: int) -> int:
    """The fewest partitions that keep each under ``USERS_PER_PARTITION`` users, rounded up to a
    multiple of ``cores`` so that the last wave of tasks keeps every core busy."""
    cores = max(1, cores)
    waves = max(1, -(-users // (USERS_PER_PARTITION * cores)))
    return waves * cores


def local_cores(master: str) -> int | None:
    """Cores of a local master (``local``: 1, ``local[N]``, ``local[N,F]``: N, ``local[*]``: the
    machine's); None for a cluster master (known only once a session has started)."""
    if master == "local":
        return 1
    match = re.fullmatch(r"local\[(\d+|\*)(?:,\d+)?\]", master)
    if match is None:
        return None
    return (os.cpu_count() or 1) if match[1] == "*" else int(match[1])


def is_local(master: str) -> bool:
    """``local``, ``local[N]``, ``local[*]``, ``local[N,F]``: driver and executors in one JVM."""
    return master == "local" or master.startswith("local[")


@contextmanager
def spark_session(
    master: str = DEFAULT_MASTER, *, parallelism: int | None = None
) -> Iterator[SparkSession]:
    """A quiet, bounded session for one job (see the module docstring), stopped on exit;
    ``parallelism`` sets ``spark.default.parallelism`` (see ``_run``)."""
    java = _java()
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError("--engine spark needs pyspark: pip install 'tracktower[spark]'") from None
    # Local workers must import tracktower from this environment; the driver binds loopback
    # only (SPARK_LOCAL_IP also keeps Spark from warning that the host name is a loopback name).
    local = {"PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    with _environ(local if is_local(master) else {}):
        builder = SparkSession.builder.master(master).appName("tracktower-recommend")
        for key, value in session_conf(process_scratch(), master, parallelism).items():
            builder = builder.config(key, value)
        with _quiet():
            try:
                spark = builder.getOrCreate()
            except Exception as exc:  # pyspark raises several kinds when the JVM fails
                raise DataError(f"Spark did not start with {java} ({_first_line(exc)})") from None
    try:
        spark.sparkContext.setLogLevel("WARN")
        yield spark
    finally:
        spark.stop()


@functools.cache
def process_scratch() -> Path:
    """Spark's scratch space for this process, removed when it exits. One per process, not per
    session: the JVM pyspark starts serves every later session of the process and keeps the
    local directories (and log configuration) of the first, so a later session must find
    them still there."""
    scratch = Path(tempfile.mkdtemp(prefix="tracktower-spark-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return scratch


def session_conf(scratch: Path, master: str, parallelism: int | None = None) -> dict[str, str]:
    """The settings ``spark_session`` starts Spark with; ``scratch`` holds everything it writes."""
    log4j = scratch / "log4j2.properties"
    log4j.write_text(_LOG4J, encoding="utf-8")
    conf = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": DRIVER_MEMORY,
        "spark.local.dir": str(scratch),
        "spark.driver.extraJavaOptions": " ".join(
            [f"-Dlog4j2.configurationFile={log4j.as_uri()}", *JVM_OPTIONS]
        ),
        "spark.python.worker.reuse": "true",  # the default; the once-per-worker load needs it
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
    }
    if parallelism is not None:
        conf["spark.default.parallelism"] = str(parallelism)
    if is_local(master):  # nothing leaves the machine
        conf["spark.driver.host"] = "127.0.0.1"
        conf["spark.driver.bindAddress"] = "127.0.0.1"
    return conf


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).is_file():
        raise DataError(
            "--engine spark needs Java 17 (Debian/Ubuntu: apt-get install openjdk-17-jre-headless;"
            " or set JAVA_HOME)"
        )
    return java


@contextmanager
def spark_errors() -> Iterator[None]:
    """A job that failed on a DataError in a Python worker (a model path the executors cannot
    read, say) becomes that one-line DataError; any other failure propagates unchanged."""
    try:
        yield
    except Exception as exc:
        found = re.findall(r"(?:tracktower\.features\.errors\.)?DataError: ([^\n]+)", str(exc))
        if not found:
            raise
        raise DataError(f"Spark job failed: {found[-1].strip()}") from None


@contextmanager
def _quiet() -> Iterator[None]:
    """PySpark 4.3 warns on every pandas conversion that pandas 3 is not fully supported; the
    conversions used here (strings, int64, float32) are checked by the integration test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PANDAS_WARNING, category=FutureWarning)
        yield


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


@contextmanager
def _sql_conf(spark: SparkSession, values: dict[str, str]) -> Iterator[None]:
    """Session SQL settings for the block, restored after (the session may be the caller's)."""
    saved = {name: spark.conf.get(name, None) for name in values}
    for name, value in values.items():
        spark.conf.set(name, value)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                spark.conf.unset(name)
            else:
                spark.conf.set(name, previous)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block, the previous values restored after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
