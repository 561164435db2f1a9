"""Offline top-k for a list of users, written to Parquet.

Uses :meth:`Recommender.top_k_batch`: the artifact's retrieval index, one batched search per chunk,
seen tracks excluded, the same code the HTTP server's batch route runs (known users' lists come
straight from the artifact's precomputed ones when ``k`` fits them). Chunks run on a few threads
and are written to Parquet in order as they finish, so memory stays that of a few chunks for
any number of users. With an exact index the
lists are identical to the server's single-user answers; with an approximate one they can differ
in which candidates were retrieved (see ``serving.artifact``).

The output is written next to its path and renamed into place (``prepare_output``, ``publish``,
shared with the Spark engine of ``serving/spark.py``), so a crash never leaves a half-written
file behind, and an existing output is replaced only when it is Parquet output.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import sys
import uuid
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tracktower.features.canonical import as_text
from tracktower.features.errors import DataError
from tracktower.serving.artifact import Recommender, TopK
from tracktower.serving.resolve import ResolvedModel, resolve_artifact

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("rank", pa.int64()),
        ("track_id", pa.string()),
        ("score", pa.float32()),
        ("source", pa.string()),
    ]
)


# Users per chunk: one batched index search, one Parquet row group of up to chunk x k rows.
DEFAULT_CHUNK = 1024


def read_user_ids(path: str | Path) -> list[str]:
    """Parquet/CSV/TSV with a ``user_id`` column, or plain text with one id per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("users file does not exist", path=path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
            if "user_id" not in frame.columns:
                raise DataError("missing column", path=path, column="user_id")
            values = frame["user_id"]
        elif suffix in {".csv", ".tsv"}:
            values = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            values = pd.Series([line.strip() for line in lines if line.strip()], dtype=object)
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, pa.ArrowException) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"unreadable users file: {reason}", path=path) from exc
    values = values.reset_index(drop=True)
    nested = values.map(lambda v: isinstance(v, list | tuple | dict | np.ndarray)).to_numpy(bool)
    if nested.any():
        row = int(np.flatnonzero(nested)[0])
        raise DataError("expected one id per row, got a list", path=path, column="user_id", row=row)
    missing = values.isna().to_numpy(bool)
    text = as_text(values.where(~missing, ""), path, "user_id", row_base=0)
    bad = missing | (text.str.strip() == "").to_numpy(bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError("empty user id", path=path, column="user_id", row=row)
    ids = text.str.strip().tolist()
    if not ids:
        raise DataError("no user ids", path=path)
    return ids


def _read_delimited(path: Path, sep: str) -> pd.Series:
    frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[])
    if "user_id" in frame.columns:
        return frame["user_id"]
    if frame.shape[1] == 1:  # headerless: one id per line
        return pd.read_csv(path, sep=sep, dtype=str, header=None, keep_default_na=False)[0]
    raise DataError("missing column", path=path, column="user_id")


def long_format(recommender: Recommender, users: list[str], top: TopK) -> pd.DataFrame:
    """One row per (user, rank), dropping padding where fewer than k candidates remained.

    ``_row`` is the user's position in ``users`` so callers can restore their own order.
    """
    valid = top.indices >= 0
    rows, cols = np.nonzero(valid)
    return pd.DataFrame(
        {
            "user_id": np.asarray(users, dtype=object)[rows],
            "rank": (cols + 1).astype(np.int64),
            "track_id": recommender.track_ids[top.indices[valid]].astype(object),
            "score": top.scores[valid].astype(np.float32),
            "source": top.sources[rows].astype(object),
            "_row": rows,
        }
    )


def recommend_to_parquet(
    model: ResolvedModel | str | Path,
    users_path: str | Path | None,
    k: int,
    output: str | Path,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    tracking_uri: str | None = None,
    workers: int = 1,
    progress: bool = False,
) -> int:
    """Write ``user_id, rank, track_id, score, source`` for every listed user (``users_path``
    None: every user the model knows, in the artifact's order); returns rows.

    Chunks of ``chunk_size`` users are searched by ``workers`` threads (the index searches and
    the matrix products release the GIL) and written in order as each finishes, so memory holds
    a few chunks whatever the number of users. ``progress``: a bar on stderr with users/s.
    """
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    if chunk_size < 1 or workers < 1:
        raise DataError(f"chunk_size and workers must be >= 1, got {chunk_size} and {workers}")
    listed = read_user_ids(users_path) if users_path is not None else None
    resolved = (
        model
        if isinstance(model, ResolvedModel)
        else resolve_artifact(str(model), tracking_uri=tracking_uri)
    )
    recommender = Recommender.load(resolved.path, history_tower=False)
    users = listed if listed is not None else recommender.user_ids.tolist()
    output = Path(output)
    partial = prepare_output(output)
    written = 0
    tables = _chunk_tables(recommender, users, k, chunk_size, workers)
    # Written to a side file and renamed, so a crash never leaves a truncated output behind.
    try:
        with (
            pq.ParquetWriter(partial, SCHEMA) as writer,
            _bar(len(users), progress) as bar,
            contextlib.closing(tables),  # on an error, stop the threads' queued chunks now
        ):
            for table, n_users in tables:
                writer.write_table(table)
                written += table.num_rows
                bar.update(n_users)
    except BaseException:
        remove(partial)
        raise
    publish(partial, output)
    log.info("wrote %d rows for %d users to %s", written, len(users), output)
    return written


def _chunk_tables(
    recommender: Recommender, users: list[str], k: int, chunk_size: int, workers: int
) -> Generator[tuple[Any, int], None, None]:
    """``(table, users in it)`` per chunk, in order; with ``workers`` > 1 up to ``2 * workers``
    chunks are in flight at once, so a slow writer never lets finished chunks pile up."""

    def one(start: int) -> tuple[Any, int]:
        chunk = users[start : start + chunk_size]
        frame = long_format(recommender, chunk, recommender.top_k_batch(chunk, k))
        return _table(frame.drop(columns="_row")), len(chunk)

    starts = range(0, len(users), chunk_size)
    if workers == 1:
        yield from map(one, starts)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recommend") as pool:
        pending: deque[Future[tuple[Any, int]]] = deque()
        try:
            for start in starts:
                pending.append(pool.submit(one, start))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # an error or an interrupt: do not start the rest
                future.cancel()


def _bar(total: int, show: bool) -> Any:
    """A tqdm bar on stderr (users, users/s, ETA); a silent one when not ``show``."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="user",
        desc="recommend",
        file=sys.stderr,
        disable=not show,
        dynamic_ncols=True,
    )


def _table(frame: pd.DataFrame) -> Any:
    return pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)


# --- the output file or directory, shared with the Spark engine (serving/spark.py) ------------

# What a Spark Parquet output directory holds: data files, the job's marker, checksums (hidden).
_OUTPUT_FILE = re.compile(r"^(part-.*\.parquet|_SUCCESS|\..*\.crc)$")


def prepare_output(output: Path) -> Path:
    """Check that ``output`` may be written and return the staging path next to it.

    An existing output is replaced only when it is Parquet output: a file that starts with
    Parquet's magic bytes, or a directory holding only what Spark's Parquet writer leaves (an
    engine's earlier run); anything else (a directory of other files, a CSV) is refused rather
    than deleted."""
    if (output.exists() or output.is_symlink()) and not _replaceable(output):
        raise DataError(
            "exists and is not Parquet output (a Parquet file or a directory of part files); "
            "choose another output path",
            path=output,
        )
    staging = output.with_name(f"{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(output)
    except OSError as exc:
        raise DataError(f"cannot write the output ({exc.strerror or exc})", path=output) from None
    return staging


def _remove_dead_staging(output: Path) -> None:
    """Remove the staging paths of jobs that died writing ``output`` (the pid in the name is
    gone). A live job's is left alone: two jobs writing one output each publish their own
    finished file, never the other's half-written one."""
    for old in output.parent.glob(f"{glob.escape(output.name)}.partial-*"):
        pid = old.name.removeprefix(f"{output.name}.partial-").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _replaceable(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.is_file():
        try:
            with path.open("rb") as handle:
                return handle.read(4) == b"PAR1"
        except OSError:
            return False  # unreadable: not ours to replace
    if path.is_dir():
        return all(p.is_file() and _OUTPUT_FILE.match(p.name) for p in path.iterdir())
    return False


def publish(staging: Path, output: Path) -> None:
    """Move the finished ``staging`` file or directory to ``output``.

    A file over a file (or over nothing) is one atomic ``os.replace``. A directory cannot be
    renamed over a non-empty one, so a previous output is renamed aside first and removed
    after: in between ``output`` is briefly absent, never partial."""
    if not output.exists() or (staging.is_file() and output.is_file()):
        os.replace(staging, output)
        return
    aside = output.with_name(f".{output.name}.replaced-{os.getpid()}")
    remove(aside)
    os.rename(output, aside)
    os.rename(staging, output)
    remove(aside)


def remove(path: Path) -> None:
    """Delete a file or a directory tree; nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
