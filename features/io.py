"""Read interaction logs and track metadata into the one canonical frame every later step expects.

Real data arrives as Parquet, CSV/TSV with or without a header, or the Million Playlist Dataset's
JSON slices. Normalising all of them here (ids as categoricals of strings, see
:mod:`~tracktower.features.canonical`; a non-negative float weight; duplicate pairs summed)
means the split, the model and the server never special-case a source, and every malformed
input fails *here* with a one-line :class:`DataError` naming file, column and row instead
of surfacing later as a pandas traceback or a silently wrong model.

Row numbers in errors: for text and JSON files the 1-based data row (header excluded; for MPD
slices the track entry counted across the file's playlists); for Parquet the 0-based row index.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracktower.features.canonical import (
    ColumnMap,
    as_text,
    canonical_interactions,
    check_ids,
    codes_of,
    dedupe_interactions,
)
from tracktower.features.errors import DataError
from tracktower.features.mpd import MPD_GLOB, read_mpd_frames

__all__ = [
    "TRACK_COLUMNS",
    "ColumnMap",
    "occurs_in",
    "read_interactions",
    "read_mpd_slices",
    "read_tracks",
    "vocabulary",
]

TRACK_COLUMNS = ("title", "artist", "album", "genre", "year", "duration_ms")
# Alternative spellings found in public datasets (MPD, MSD song_df.csv) -> canonical name.
_TRACK_ALIASES = {
    "song_id": "track_id",
    "track_name": "title",
    "artist_name": "artist",
    "release": "album",
    "album_name": "album",
}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_PARQUET_MAGIC = b"PAR1"
_MPD_COLUMNS = ColumnMap(user="pid", track="track_uri", timestamp="pos")


def read_interactions(path: str | Path, columns: ColumnMap | None = None) -> pd.DataFrame:
    """Canonical ``user_id, track_id, weight[, timestamp]`` frame, one row per (user, track)."""
    path = Path(path)
    cols = columns or ColumnMap()
    if path.is_dir():
        if _mpd_files(path):
            return read_mpd_slices(path)[0]
        parts = _parquet_files(path)
        # Each file's columns are kept, not its frame, so that _concat can free them one by one.
        frames = [
            _columns(canonical_interactions(_read_parquet(f, cols), f, cols, row_base=0))
            for f in parts
        ]
        return dedupe_interactions(_concat(frames, parts))
    if _is_mpd_file(path):
        return read_mpd_slices(path)[0]
    raw, row_base = _read_file(path, cols)
    frame = canonical_interactions(raw, path, cols, row_base=row_base)
    return dedupe_interactions(_concat([_columns(frame)], [path]))


def read_mpd_slices(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Playlists as users: ``(interactions, tracks)`` from a directory of ``mpd.slice.*.json``.

    ``user_id`` is ``str(pid)``, ``track_id`` the URI without ``spotify:track:``, ``timestamp`` the
    position in the playlist (``pos``, else the list index) so that order survives.
    """
    path = Path(path)
    files = [path] if path.is_file() else _mpd_files(path) if path.is_dir() else []
    if not path.exists():
        raise DataError("no such file or directory", path=path)
    if not files:
        raise DataError(f"no {MPD_GLOB} files in directory", path=path)
    raw, tracks, starts = read_mpd_frames(files)
    try:
        frame = canonical_interactions(raw, files[0], _MPD_COLUMNS, row_base=1)
    except DataError as exc:  # map the global row back to the file it came from
        if exc.row is None:
            raise
        k = int(np.searchsorted(starts, exc.row - 1, side="right")) - 1
        raise DataError(
            exc.message, path=files[k], column=exc.column, row=exc.row - int(starts[k])
        ) from None
    return dedupe_interactions(_concat([_columns(frame)], files[:1])), _normalise_tracks(
        tracks, files[0], row_base=1
    )


def read_tracks(path: str | Path, interactions: pd.DataFrame | None = None) -> pd.DataFrame:
    """``track_id`` plus whichever of :data:`TRACK_COLUMNS` the file has, one row per track.

    Metadata is kept for every track in the file (callers filter to their vocabulary); passing
    ``interactions`` guards against the most common mistake, a tracks file from another dataset.
    """
    path = Path(path)
    if path.is_dir():
        if _mpd_files(path):
            tracks = read_mpd_slices(path)[1]
        else:
            parts = _parquet_files(path)
            tracks = pd.concat(
                [_normalise_tracks(_read_parquet(f), f, row_base=0) for f in parts],
                ignore_index=True,
            ).drop_duplicates("track_id", keep="first", ignore_index=True)
    elif _is_mpd_file(path):
        tracks = read_mpd_slices(path)[1]
    else:
        raw, row_base = _read_file(path, None)
        tracks = _normalise_tracks(raw, path, row_base=row_base)
    if interactions is not None and len(tracks):
        # The distinct ids, not one per interaction row (a 66M-row isin costs minutes).
        known = occurs_in(tracks["track_id"], vocabulary(interactions["track_id"]))
        if not known.any():
            example = tracks["track_id"].iloc[0]
            raise DataError(
                f"none of its {len(tracks)} track ids (e.g. {example!r}) occur in the "
                "interactions; is it the tracks file of another dataset?",
                path=path,
                column="track_id",
            )
    return tracks


def vocabulary(ids: pd.Series) -> pd.Index:
    """The distinct ids of a column that occur in it, sorted."""
    codes, vocab = codes_of(ids)
    used = np.bincount(codes[codes >= 0], minlength=len(vocab)) > 0
    return vocab if used.all() else vocab[used]


def occurs_in(ids: pd.Series, vocab: pd.Index) -> np.ndarray:
    """Whether each id is in ``vocab``, hashed by Arrow: pandas' ``isin`` on Arrow-backed
    strings walks Python objects (seconds per million ids)."""
    values = pa.array(pd.Series(ids, dtype="str").array)
    value_set = pa.array(pd.Series(vocab, dtype="str").array)
    return pc.is_in(values, value_set=value_set).to_numpy(zero_copy_only=False)


def _columns(frame: pd.DataFrame) -> dict[str, Any]:
    """A canonical frame's columns, ids as (codes, Arrow categories): a pandas Index caches a
    hash table of Python strings once hashed (~100 B an id), which per file adds up to GBs."""
    out: dict[str, Any] = {}
    for name in frame.columns:
        col = frame[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            out[name] = (col.cat.codes.to_numpy(), pa.array(col.cat.categories.array))
        else:
            out[name] = col.to_numpy()
    return out


def _concat(frames: list[dict[str, Any]], paths: list[Path]) -> pd.DataFrame:
    """The canonical columns of several files as one frame: vocabularies united and sorted,
    codes mapped onto them, numbers concatenated. Each input column is released once copied
    (``frames`` is emptied), so the peak is about one copy of the rows, not two."""
    has_time = ["timestamp" in f for f in frames]
    if any(has_time) and not all(has_time):
        with_time = paths[has_time.index(True)].name
        raise DataError(
            f"no timestamp column, but {with_time} in the same directory has one",
            path=paths[has_time.index(False)],
        )
    names = ["user_id", "track_id", "weight", *(["timestamp"] if all(has_time) else [])]
    out: dict[str, Any] = {}
    for name in names:
        parts = [f.pop(name) for f in frames]
        out[name] = _unite(parts) if name in ("user_id", "track_id") else np.concatenate(parts)
        del parts
    frames.clear()
    return pd.DataFrame(out, copy=False)


def _unite(parts: list[tuple[np.ndarray, pa.Array]]) -> pd.Categorical:
    """One Categorical over the sorted union of the parts' categories (emptying ``parts``);
    ids are looked up by Arrow in one hash table, with no Python string per id and file."""
    local = pa.chunked_array([categories for _, categories in parts])
    united = pc.unique(local)
    united = united.take(pc.array_sort_indices(united))
    lookup = pc.index_in(local, value_set=united).to_numpy()  # local category -> united index
    bounds = np.cumsum([0, *(len(categories) for _, categories in parts)])
    del local
    codes = np.empty(sum(len(c) for c, _ in parts), dtype=np.int32)
    start = 0
    for i, (codes_i, _) in enumerate(parts):
        codes[start : start + len(codes_i)] = lookup[bounds[i] : bounds[i + 1]][codes_i]
        start += len(codes_i)
        parts[i] = (codes_i[:0], parts[i][1])  # free this part's codes now
    vocab = pd.Index(united.to_pandas(), dtype="str")
    return pd.Categorical.from_codes(codes, dtype=pd.CategoricalDtype(vocab))


# --- files -------------------------------------------------------------------------------------


def _mpd_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(MPD_GLOB) if p.is_file())


def _is_mpd_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".json"


def _parquet_files(directory: Path) -> list[Path]:
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix in _PARQUET_SUFFIXES and not p.name.startswith((".", "_"))
    )
    if not files:
        raise DataError(f"directory has no *.parquet or {MPD_GLOB} files", path=directory)
    return files


def _read_file(path: Path, cols: ColumnMap | None) -> tuple[pd.DataFrame, int]:
    """Raw frame plus the number to add to a positional row to get the row reported in errors."""
    if not path.exists():
        raise DataError("no such file", path=path)
    if not path.is_file():
        raise DataError("not a regular file", path=path)
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    if magic == _PARQUET_MAGIC or path.suffix in _PARQUET_SUFFIXES:
        return _read_parquet(path, cols), 0
    return _read_text(path, cols), 1


def _read_parquet(path: Path, cols: ColumnMap | None = None) -> pd.DataFrame:
    """Only the columns ``cols`` can use are decoded (wide exports stay cheap); all of them when
    one is missing, so the error can list what the file does have. String id columns become
    Categoricals straight from Arrow's dictionary encoding: one string per distinct id, not one
    Python object per row."""
    try:
        names = pq.read_schema(path).names
        wanted = None
        ids: list[str] = []
        if cols is not None:
            usable = {cols.user, cols.track, cols.weight, cols.timestamp}
            usable |= {"weight", "plays", "timestamp", "position"}
            if {cols.user, cols.track} <= set(names):
                wanted = [n for n in names if n in usable]
            ids = [n for n in (cols.user, cols.track) if n in names]
        table = pq.read_table(path, columns=wanted)
        frame = pd.DataFrame(
            {
                name: _categorical(column) if name in ids else column.to_pandas()
                for name, column in zip(table.column_names, table.columns, strict=True)
            }
        )
        del table
    except FileNotFoundError:
        raise DataError("no such file", path=path) from None
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"not a readable Parquet file ({reason})", path=path) from None
    if len(frame) == 0:
        raise DataError("file has no rows", path=path)
    return frame


def _categorical(column: pa.ChunkedArray) -> pd.Series | pd.Categorical:
    """A string column as a Categorical (nulls as code -1); other types as they are, for the
    id checks to convert (numbers) or reject."""
    kind = column.type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        return column.to_pandas()
    encoded = pc.dictionary_encode(column).combine_chunks()
    codes = encoded.indices.fill_null(-1).to_numpy().astype(np.int64, copy=False)
    categories = pd.Index(encoded.dictionary.to_pandas())
    return pd.Categorical.from_codes(codes, categories=categories)


def _read_text(path: Path, cols: ColumnMap | None) -> pd.DataFrame:
    """CSV/TSV, delimiter sniffed from the first line; ``cols=None`` means a header is required."""
    data = path.read_bytes()
    first_raw = data.split(b"\n", 1)[0].rstrip(b"\r")
    first = first_raw.decode("utf-8", errors="replace").lstrip("\ufeff")
    sep = "\t" if "\t" in first or (path.suffix == ".tsv" and "," not in first) else ","
    fields = [f.strip().strip('"') for f in first.split(sep)]
    header = True if cols is None else _looks_like_header(fields, cols)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        bad = data[exc.start : exc.start + 1].hex()
        row = line - 1 if header else line
        raise DataError(
            f"not UTF-8 text (byte 0x{bad} on line {line}); re-encode the file as UTF-8",
            path=path,
            row=row if row >= 1 else None,
        ) from None
    if not text.strip():
        raise DataError("file is empty", path=path)
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            header=0 if header else None,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL,
            engine="c",
        )
    except (pd.errors.ParserError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0]
        match = re.search(r"line (\d+)", msg)
        bad_row = int(match.group(1)) - (1 if header else 0) if match else None
        raise DataError(f"malformed {_sep_name(sep)} ({msg})", path=path, row=bad_row) from None
    if len(frame) == 0:
        raise DataError("file has a header but no data rows", path=path)
    if not header:
        positional = ["user_id", "track_id", "weight", "timestamp"]
        if frame.shape[1] < 2:
            raise DataError(
                f"expected at least 2 {_sep_name(sep)} columns (user, track[, weight]); "
                f"found {frame.shape[1]}",
                path=path,
            )
        frame.columns = positional[: frame.shape[1]] + [
            f"column_{i + 1}" for i in range(len(positional), frame.shape[1])
        ]
    else:
        frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _sep_name(sep: str) -> str:
    return "tab-separated" if sep == "\t" else "comma-separated"


def _looks_like_header(fields: list[str], cols: ColumnMap) -> bool:
    """A first line naming a known column, or with a non-numeric third field, is a header."""
    known = {cols.user, cols.track, cols.weight, cols.timestamp}
    known |= {"user_id", "track_id", "weight", "plays", "timestamp", "position"}
    if any(f in known for f in fields):
        return True
    if len(fields) >= 3:
        try:
            float(fields[2])
        except ValueError:
            return True
    return False


# --- tracks ------------------------------------------------------------------------------------


def _normalise_tracks(raw: pd.DataFrame, path: Path, *, row_base: int) -> pd.DataFrame:
    frame = raw.rename(columns={c: str(c).strip() for c in raw.columns})
    renames = {a: c for a, c in _TRACK_ALIASES.items() if a in frame and c not in frame}
    frame = frame.rename(columns=renames)
    if "track_id" not in frame:
        present = ", ".join(map(str, frame.columns)) or "none"
        raise DataError(
            f"missing required column 'track_id'; columns present: {present}",
            path=path,
            column="track_id",
        )
    out = pd.DataFrame({"track_id": check_ids(frame["track_id"], path, "track_id", row_base)})
    for name in TRACK_COLUMNS:
        if name not in frame:
            continue
        col = frame[name]
        if name in ("year", "duration_ms"):
            out[name] = _optional_int(col, path, name, row_base)
        else:
            text = as_text(col, path, name, row_base).where(col.notna())
            out[name] = text.where(text.str.strip() != "")
    return out.drop_duplicates("track_id", keep="first", ignore_index=True)


def _optional_int(col: pd.Series, path: Path, name: str, row_base: int) -> pd.Series:
    """Nullable integers; blanks and the 0 that some datasets use for "unknown" become missing."""
    blank = col.isna() | (as_text(col, path, name, row_base).str.strip() == "")
    values = pd.to_numeric(col.where(~blank), errors="coerce")
    bad = values.isna() & ~blank
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"expected a number, got {col.iloc[i]!r}", path=path, column=name, row=i + row_base
        )
    values = values.where(values > 0)
    return values.round().astype("Int64")
