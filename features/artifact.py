"""The export artifact contract: the one definition training writes and serving reads.

An artifact is a directory::

    manifest.json        Manifest (below); format_version is checked before anything else
    arrays/<name>.npy    one plain .npy per array (``contract_arrays``), memory-mapped by readers
    tracks.arrow         track metadata, row i = track i (Arrow IPC file, memory-mapped)
    saved_model/         TensorFlow SavedModel, present when manifest.has_history_tower
    index/               the retrieval index over track_embeddings (``features.index``)

Track index ``i`` means the same track in every array (row ``i`` of ``track_embeddings``, column
``i`` of the seen CSR, row ``i`` of tracks.arrow); user index ``u`` likewise.

Everything a server process holds that grows with users or tracks is a memory map of these files,
so N worker processes share one copy through the page cache: ids are found by binary search over
``track_order`` / ``user_order`` (argsorts written by ``write_artifact``; see ``IdLookup``) instead
of per-process dictionaries of millions of Python strings, and the history tower's track table is
the array ``history_embeddings`` instead of a TensorFlow variable restored into every process. A
session's pooled history is the mean of the ``history_embeddings`` rows of its known tracks
(unknown ids are skipped, as the model's masked pooling skips padding); the SavedModel has one
signature, ``query_from_pooled_history`` (also ``serving_default``): ``pooled_history`` float32
``[B, history_dim]`` to ``query_embedding`` float32 ``[B, dim]``, the rest of the query tower
with the user id hidden. Ranking happens outside TensorFlow, in ``features.ranking``, so there is
one top-k routine.

Every ranking (server, batch, offline evaluation) searches the retrieval index built at export;
``manifest.index`` is its ``IndexInfo``: ``backend`` (``exact`` or ``scann``), the ``params`` it
is searched with, ``build_seconds``, and ``recall_at_10`` / ``recall_at_100`` against exact search
measured on ``sample_users`` known users' query vectors. ``index/`` holds what the backend saved:
nothing for ``exact`` (the index is ``track_embeddings`` itself), ScaNN's files plus
``tracktower_index.json`` (format version, track count, dimension, build parameters, written last)
for ``scann``. No index file holds a copy of the embeddings: ScaNN's candidates are rescored
against the memory-mapped ``track_embeddings``, so every server process shares one copy. The
index is read with ``read_index`` and checked against the manifest and the embeddings first; it
is never rebuilt at load.

Ids are stored as fixed-width unicode (``<U``) arrays: ``.npy`` cannot memory-map object arrays,
and loading those would need pickle. The width is the longest id, so one very long id costs
``4 x width`` bytes for every row.

This module imports no TensorFlow and no training code: serving, the MLflow pyfunc and the test
fixtures all read and write through it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tracktower.features.errors import DataError, one_line
from tracktower.features.index.base import IndexInfo, RetrievalIndex, load_index

__all__ = [
    "ARRAYS",
    "ARRAYS_DIR",
    "FORMAT_VERSION",
    "HISTORY_ARRAY",
    "HISTORY_INPUT",
    "HISTORY_OUTPUT",
    "HISTORY_SIGNATURE",
    "INDEX_DIR",
    "KNOWN_TOP_ARRAYS",
    "MANIFEST_FILE",
    "ORDER_ARRAYS",
    "PYFUNC_ARTIFACT_KEY",
    "SAVED_MODEL_DIR",
    "TRACKS_FILE",
    "TRACK_COLUMNS",
    "ArraySpec",
    "DatasetInfo",
    "IdLookup",
    "Manifest",
    "TrackMetadata",
    "array_file",
    "contract_arrays",
    "read_arrays",
    "read_index",
    "read_manifest",
    "read_track_metadata",
    "seen_matrix",
    "update_manifest",
    "write_artifact",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 4
MANIFEST_FILE = "manifest.json"
TRACKS_FILE = "tracks.arrow"
SAVED_MODEL_DIR = "saved_model"
INDEX_DIR = "index"
ARRAYS_DIR = "arrays"
# Block size of the finite-embeddings check (see _check_finite).
_FINITE_BLOCK_BYTES = 16 << 20
# Key of the artifact directory in the MLflow pyfunc model's ``artifacts``.
PYFUNC_ARTIFACT_KEY = "artifact"
HISTORY_SIGNATURE = "query_from_pooled_history"
HISTORY_INPUT = "pooled_history"
HISTORY_OUTPUT = "query_embedding"
# Ids compared per block by the order check (``_check_order``): bounded temporary memory.
_ORDER_BLOCK = 1 << 16
# tracks.arrow: track_id is required, the others are kept when the catalogue has them.
TRACK_COLUMNS = ("track_id", "title", "artist", "album", "year")


@dataclass(frozen=True)
class ArraySpec:
    """One array: ``dtype`` ``"U"`` means any fixed-width unicode; ``shape`` names dimensions:
    num_tracks, num_users (+ 1) and dim (the manifest's ``embedding_dim``) come from the
    manifest, nnz (seen user-track pairs) is the length of ``seen_indices``."""

    name: str
    dtype: str
    shape: tuple[str, ...]
    meaning: str


ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("track_ids", "U", ("num_tracks",), "candidate ids; index i = track i"),
    ArraySpec("track_embeddings", "float32", ("num_tracks", "dim"), "candidate tower output"),
    ArraySpec("user_ids", "U", ("num_users",), "known user ids; index u = user u"),
    ArraySpec("user_embeddings", "float32", ("num_users", "dim"), "known users' query vectors"),
    ArraySpec("seen_indptr", "int64", ("num_users + 1",), "CSR row pointers of seen tracks"),
    ArraySpec("seen_indices", "int32", ("nnz",), "CSR track indices: excluded from rankings"),
    ArraySpec("popular", "int32", ("num_tracks",), "every track index, most popular first"),
    ArraySpec("popular_scores", "float32", ("num_tracks",), "distinct users per popular[i]"),
)
# Present exactly when manifest.has_history_tower; given to write_artifact like ARRAYS.
HISTORY_ARRAY = ArraySpec(
    "history_embeddings",
    "float32",
    ("num_tracks", "history_dim"),
    "the query tower's track table; a session's pooled history is the mean of its rows",
)
# Present exactly when manifest.known_top_k > 0: every known user's list, computed at export
# through the index with seen tracks excluded (rows padded with -1 / -inf), so a server answers a
# known user with a slice of a shared memory map instead of a search per request.
KNOWN_TOP_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("known_top_indices", "int32", ("num_users", "known_top_k"), "top tracks, best first"),
    ArraySpec("known_top_scores", "float32", ("num_users", "known_top_k"), "their scores"),
)
# Derived from the ids by write_artifact (callers never pass them).
ORDER_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("track_order", "int64", ("num_tracks",), "argsort of track_ids (IdLookup)"),
    ArraySpec("user_order", "int64", ("num_users",), "argsort of user_ids (IdLookup)"),
)
_ORDER_OF = {"track_order": "track_ids", "user_order": "user_ids"}


class DatasetInfo(BaseModel):
    """What the model was trained on; ``fingerprint`` is ``features.dataset.fingerprint``."""

    model_config = ConfigDict(extra="allow")
    fingerprint: str
    rows: int
    users: int
    tracks: int


class Manifest(BaseModel):
    """manifest.json. ``model_version`` is set by ``update_manifest`` once registered;
    ``index`` is the retrieval index's ``IndexInfo.to_dict()`` (see the module docstring)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    format_version: int
    model_name: str
    model_version: str | None = None
    run_id: str | None = None
    created_at: str
    config: dict[str, Any] = {}
    dataset: DatasetInfo
    metrics: dict[str, Any] = {}
    embedding_dim: int
    has_history_tower: bool = False
    num_users: int
    num_tracks: int
    libraries: dict[str, Any] = {}
    final: bool = False
    index: dict[str, Any]
    # Width of history_embeddings (the query tower's track table), when has_history_tower.
    history_dim: int | None = None
    # Width of the precomputed known-user lists (KNOWN_TOP_ARRAYS); 0: none, searched on demand.
    known_top_k: int = Field(0, ge=0)

    @field_validator("index")
    @classmethod
    def _index_info(cls, value: dict[str, Any]) -> dict[str, Any]:
        return IndexInfo.from_dict(value).to_dict()

    @model_validator(mode="after")
    def _history_dim(self) -> Manifest:
        if self.has_history_tower and (self.history_dim is None or self.history_dim < 1):
            raise ValueError("history_dim (a positive integer) is required with has_history_tower")
        return self

    @property
    def index_info(self) -> IndexInfo:
        return IndexInfo.from_dict(self.index)


def contract_arrays(manifest: Manifest) -> tuple[ArraySpec, ...]:
    """Every array file an artifact with this manifest holds."""
    history = (HISTORY_ARRAY,) if manifest.has_history_tower else ()
    known = KNOWN_TOP_ARRAYS if manifest.known_top_k else ()
    return ARRAYS + history + known + ORDER_ARRAYS


class _ArrayProblem(Exception):
    """An array that breaks the contract; the caller words it for a file or an in-memory array."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def array_file(path: str | Path, name: str) -> Path:
    return Path(path) / ARRAYS_DIR / f"{name}.npy"


# --- writing -------------------------------------------------------------------------------------


def write_artifact(
    out_dir: str | Path,
    *,
    manifest: Manifest,
    arrays: Mapping[str, np.ndarray],
    tracks: pd.DataFrame,
    saved_model: Callable[[Path], None] | None = None,
    index: RetrievalIndex | None = None,
) -> Path:
    """Write a complete artifact at ``out_dir`` (which must not exist) and return it.

    Everything is checked against the contract before anything is written, with the same checks
    ``read_arrays`` applies, so whatever is written can be read. The directory is built under a
    hidden sibling name (``.NAME.*.partial``, removed on any error) and renamed at the end, so
    ``out_dir`` is complete or absent; a killed process may leave the hidden directory behind,
    which has its manifest written last and is skipped by ``serving.resolve``.
    ``saved_model(path)`` must write the SavedModel at ``path`` (inside the staging directory);
    it is required when ``manifest.has_history_tower``. ``index`` is the retrieval index
    ``manifest.index`` describes, saved into ``index/``; it may be omitted only for the exact
    backend, which stores nothing.
    """
    out_dir = Path(out_dir)
    arrays = _with_orders(out_dir, manifest, arrays)
    _check_for_write(out_dir, manifest, arrays, tracks, saved_model)
    _check_index_for_write(out_dir, manifest, index)
    metadata = _aligned_metadata(tracks, arrays["track_ids"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would survive the rename and hide the model from other users.
    staging = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(6)}.partial"
    staging.mkdir()
    try:
        (staging / ARRAYS_DIR).mkdir()
        for spec in contract_arrays(manifest):
            np.save(array_file(staging, spec.name), np.ascontiguousarray(arrays[spec.name]))
        with (
            pa.OSFile(str(staging / TRACKS_FILE), "wb") as sink,
            pa.ipc.new_file(sink, metadata.schema) as writer,
        ):
            writer.write_table(metadata)
        if saved_model is not None:
            saved_model(staging / SAVED_MODEL_DIR)
            if not (staging / SAVED_MODEL_DIR).is_dir():
                raise DataError("the saved_model callback wrote no saved_model/", path=out_dir)
        (staging / INDEX_DIR).mkdir()
        if index is not None:
            index.save(staging / INDEX_DIR)
        _write_json(staging / MANIFEST_FILE, manifest)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _with_orders(
    out_dir: Path, manifest: Manifest, arrays: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``arrays`` plus the ORDER_ARRAYS computed from their ids (stable argsorts)."""
    given = {spec.name for spec in contract_arrays(manifest)} - set(_ORDER_OF)
    missing, extra = sorted(given - set(arrays)), sorted(set(arrays) - given)
    if missing or extra:
        raise DataError(f"arrays missing {missing}, not in the contract {extra}", path=out_dir)
    out = dict(arrays)
    for order, ids in _ORDER_OF.items():
        out[order] = np.argsort(np.asarray(arrays[ids]), kind="stable").astype(np.int64)
    return out


def _aligned_metadata(tracks: pd.DataFrame, track_ids: np.ndarray) -> pa.Table:
    """Metadata with one row per track index (nulls where the catalogue has none), the columns
    of TRACK_COLUMNS it has, as strings (a reader fetches them by row number)."""
    frame = tracks.drop_duplicates("track_id").set_index(tracks["track_id"].astype(str))
    aligned = frame.reindex(pd.Index(np.asarray(track_ids, dtype=str)))
    columns = {"track_id": pa.array(np.asarray(track_ids, dtype=str), type=pa.string())}
    for name in TRACK_COLUMNS[1:]:
        if name in aligned.columns:
            values = aligned[name].astype("string")
            columns[name] = pa.array(values, type=pa.string(), from_pandas=True)
    return pa.table(columns)


def _check_for_write(
    out_dir: Path,
    manifest: Manifest,
    arrays: Mapping[str, np.ndarray],
    tracks: pd.DataFrame,
    saved_model: Callable[[Path], None] | None,
) -> None:
    if out_dir.exists():
        raise DataError("artifact directory already exists", path=out_dir)
    if manifest.format_version != FORMAT_VERSION:
        raise DataError(
            f"manifest format_version {manifest.format_version}, this tracktower writes "
            f"format_version {FORMAT_VERSION}",
            path=out_dir,
        )
    try:
        _check_arrays(arrays, manifest)
    except _ArrayProblem as exc:
        raise DataError(f"array '{exc.name}': {exc.message}", path=out_dir) from None
    if "track_id" not in tracks.columns:
        raise DataError("track metadata has no track_id column", path=out_dir, column="track_id")
    if manifest.has_history_tower and saved_model is None:
        raise DataError("manifest has_history_tower but no saved_model writer given", path=out_dir)


def _check_index_for_write(out_dir: Path, manifest: Manifest, index: RetrievalIndex | None) -> None:
    """The index is the one the manifest describes, over this artifact's tracks."""
    info = manifest.index_info
    if index is None:
        if info.backend != "exact":
            raise DataError(
                f"manifest index is {info.backend} but no index was given", path=out_dir
            )
        return
    got = (index.backend, index.size, index.dim, index.params)
    want = (info.backend, manifest.num_tracks, manifest.embedding_dim, info.params)
    if got != want:
        raise DataError(
            f"index (backend, tracks, dim, params) {got} does not match the manifest's {want}",
            path=out_dir,
        )


def update_manifest(path: str | Path, **fields: Any) -> Manifest:
    """Set manifest fields (e.g. ``model_version`` once registered) and rewrite manifest.json.

    The new file is written beside the old one and swapped in with ``os.replace``, so a reader
    sees either the old or the new manifest, never a partial one.
    """
    current = read_manifest(path)
    try:
        updated = Manifest.model_validate({**current.model_dump(), **fields})
    except ValidationError as exc:
        raise DataError(f"invalid manifest: {one_line(exc)}", path=path) from None
    _write_json(Path(path) / MANIFEST_FILE, updated)
    return updated


def _write_json(file: Path, manifest: Manifest) -> None:
    # Not mkstemp: its 0600 mode would survive os.replace.
    tmp = file.with_name(f".{file.name}.{secrets.token_hex(6)}.tmp")
    try:
        with tmp.open("x", encoding="utf-8") as out:
            out.write(manifest.model_dump_json(indent=2) + "\n")
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- reading -------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of the artifact directory ``path``; another format_version is refused
    before the rest is validated, since an older manifest may not fit today's model at all."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise DataError(f"not an artifact directory: {MANIFEST_FILE} is missing", path=path)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable manifest: {one_line(exc)[:300]}", path=file) from None
    if not isinstance(raw, dict):
        raise DataError("manifest is not a JSON object", path=file)
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"artifact format_version {version}, this tracktower reads format_version "
            f"{FORMAT_VERSION}; re-export the model with this version",
            path=file,
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise DataError(f"invalid manifest: {one_line(exc)}", path=file) from None


def read_arrays(path: str | Path, manifest: Manifest, mmap: bool = True) -> dict[str, np.ndarray]:
    """Every array of the contract, checked against it and against ``manifest``.

    With ``mmap`` the arrays are read-only views of memory-mapped files: pages are read on first
    touch and shared between processes mapping the same file. The checks touch the ids, the CSR,
    the popularity order and, block by block, the embedding matrices (a NaN or inf there would
    rank garbage without an error), so loading reads each file once; the page cache keeps them.
    """
    path = Path(path)
    arrays = {
        spec.name: _load_npy(array_file(path, spec.name), mmap)
        for spec in contract_arrays(manifest)
    }
    try:
        _check_arrays(arrays, manifest)
    except _ArrayProblem as exc:
        raise DataError(exc.message, path=array_file(path, exc.name)) from None
    return arrays


def _load_npy(file: Path, mmap: bool) -> np.ndarray:
    if not file.is_file():
        raise DataError("array file is missing", path=file)
    try:
        loaded = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"unreadable .npy file: {one_line(exc)[:300]}", path=file) from None
    if not isinstance(loaded, np.ndarray):
        raise DataError("not a single .npy array", path=file)
    return np.asarray(loaded)  # a plain ndarray view; it keeps the mapping alive


def read_index(
    path: str | Path, manifest: Manifest, track_embeddings: np.ndarray
) -> RetrievalIndex:
    """The retrieval index saved in the artifact, over ``track_embeddings`` (the artifact's own,
    from ``read_arrays``: used in place, never copied).

    A missing ``index/`` directory, missing or truncated index files, or an index built for
    another dimension, track count, parameters or index format is a one-line DataError.
    """
    directory = Path(path) / INDEX_DIR
    if not directory.is_dir():
        raise DataError(f"{INDEX_DIR}/ is missing; re-export the model", path=path)
    info = manifest.index_info
    emb = np.asarray(track_embeddings)
    if emb.shape != (manifest.num_tracks, manifest.embedding_dim):
        raise DataError(
            f"track_embeddings {emb.shape} do not match the manifest "
            f"({manifest.num_tracks}, {manifest.embedding_dim})",
            path=path,
        )
    return load_index(directory, info.backend, info.params, emb)


class _StringColumn:
    """Row i of an Arrow string array, read straight from its buffers (offsets, UTF-8 bytes,
    validity bits): about 1 us a row, where a ``take`` call costs tens of microseconds even for
    ten rows, on the path of every recommendation."""

    def __init__(self, column: pa.Array) -> None:
        validity, offsets, data = column.buffers()[:3]
        width = np.int64 if pa.types.is_large_string(column.type) else np.int32
        start = column.offset
        self._offsets = np.frombuffer(offsets, dtype=width)[start : start + len(column) + 1]
        self._data = memoryview(data) if data is not None else memoryview(b"")
        self._validity = (
            memoryview(validity) if validity is not None and column.null_count else None
        )
        self._start = start

    def get(self, rows: list[int]) -> list[str | None]:
        out: list[str | None] = []
        offsets, data, validity = self._offsets, self._data, self._validity
        for i in rows:
            if validity is not None:
                bit = i + self._start
                if not (validity[bit >> 3] >> (bit & 7)) & 1:
                    out.append(None)
                    continue
            lo, hi = offsets[i : i + 2].tolist()
            out.append(str(data[lo:hi], "utf-8"))
        return out


class TrackMetadata:
    """Titles and artists by track index, read from the memory-mapped tracks.arrow (no Python
    object per track: a server fetches the few rows it answers with)."""

    def __init__(self, table: pa.Table | None) -> None:
        self._columns: dict[str, _StringColumn | None] = {"title": None, "artist": None}
        if table is not None:
            for name in self._columns:
                if name in table.column_names:
                    self._columns[name] = _StringColumn(table.column(name).combine_chunks())

    def rows(self, indices: np.ndarray | list[int]) -> tuple[list[Any], list[Any]]:
        """(titles, artists) of the given track indices, None where unknown."""
        rows = np.asarray(indices, dtype=np.int64).tolist()
        out = []
        for name in ("title", "artist"):
            column = self._columns[name]
            out.append([None] * len(rows) if column is None else column.get(rows))
        return out[0], out[1]


def seen_matrix(arrays: Mapping[str, np.ndarray]) -> sp.csr_matrix:
    """The seen tracks as a users x tracks CSR over the arrays themselves (memory maps stay
    maps). Its values are one zero-stride 1: only the stored entries mean anything, and every
    exclusion (``features.ranking.exclude_rows``) reads the indices alone."""
    ones = np.broadcast_to(np.float32(1), (len(arrays["seen_indices"]),))
    shape = (len(arrays["user_ids"]), len(arrays["track_ids"]))
    return sp.csr_matrix((ones, arrays["seen_indices"], arrays["seen_indptr"]), shape=shape)


def read_track_metadata(path: str | Path, manifest: Manifest) -> TrackMetadata:
    """The artifact's track metadata, memory-mapped; it must have one row per track, in track
    index order, as ``write_artifact`` writes it."""
    file = Path(path) / TRACKS_FILE
    if not file.is_file():
        log.warning("%s is missing; recommendations carry no title/artist", file)
        return TrackMetadata(None)
    try:
        table = pa.ipc.open_file(pa.memory_map(str(file), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"unreadable track metadata: {one_line(exc)[:300]}", path=file) from None
    if "track_id" not in table.column_names:
        raise DataError("missing column", path=file, column="track_id")
    if table.num_rows != manifest.num_tracks:
        raise DataError(
            f"{table.num_rows} rows, the manifest has {manifest.num_tracks} tracks", path=file
        )
    for name in ("title", "artist"):
        if name in table.column_names and not pa.types.is_string(table.schema.field(name).type):
            raise DataError("expected a string column", path=file, column=name)
    return TrackMetadata(table)


class IdLookup:
    """Id → index by binary search over an id array and its argsort (both memory-mapped):
    O(log n) per id and no Python object per id, so the lookup tables of N server processes
    are one shared copy (a dict of 2.26M track ids is ~250 MB in every process).

    An id longer than the array's fixed width cannot be in it and is answered at once; any other
    is first cast to the array's dtype, so numpy never converts the whole array to compare.
    """

    def __init__(self, ids: np.ndarray, order: np.ndarray) -> None:
        self.ids = ids
        self.order = order
        self._width = ids.dtype.itemsize // 4

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, key: str) -> int | None:
        if not isinstance(key, str) or len(key) > self._width or not len(self.ids):
            return None
        probe = np.array(key, dtype=self.ids.dtype)
        pos = min(int(self.ids.searchsorted(probe, sorter=self.order)), len(self.order) - 1)
        row = int(self.order[pos])
        return row if self.ids[row] == probe else None

    def get_many(self, keys: list[str] | tuple[str, ...] | np.ndarray) -> np.ndarray:
        """Index of each key, -1 where it is unknown (int64)."""
        out = np.full(len(keys), -1, dtype=np.int64)
        fits = [i for i, key in enumerate(keys) if isinstance(key, str) and len(key) <= self._width]
        if not fits or not len(self.ids):
            return out
        probe = np.array([keys[i] for i in fits], dtype=self.ids.dtype)
        pos = np.searchsorted(self.ids, probe, sorter=self.order)
        pos = np.minimum(pos, len(self.order) - 1)
        rows = self.order[pos]
        found = self.ids[rows] == probe
        out[np.asarray(fits)[found]] = rows[found]
        return out


# --- checks shared by writer and reader ----------------------------------------------------------


def _check_arrays(arrays: Mapping[str, np.ndarray], manifest: Manifest) -> None:
    """Dtypes and shapes per ARRAYS, then what the server relies on: unique ids, a valid CSR
    over the tracks, and ``popular`` a most-popular-first permutation of the tracks."""
    if manifest.num_tracks == 0:
        raise _ArrayProblem("track_ids", "artifact has no candidate tracks")
    dims = {
        "num_tracks": manifest.num_tracks,
        "num_users": manifest.num_users,
        "num_users + 1": manifest.num_users + 1,
        "dim": manifest.embedding_dim,
        "nnz": len(arrays["seen_indices"]),
        "history_dim": manifest.history_dim or 0,
        "known_top_k": manifest.known_top_k,
    }
    specs = contract_arrays(manifest)
    for spec in specs:
        _check_spec(spec, arrays[spec.name], dims)
    for order, ids in _ORDER_OF.items():
        _check_order(ids, arrays[ids], order, arrays[order])
    _check_csr(arrays["seen_indptr"], arrays["seen_indices"], manifest.num_tracks)
    _check_popular(arrays["popular"], arrays["popular_scores"], manifest.num_tracks)
    if manifest.known_top_k:
        _check_known_top(arrays["known_top_indices"], arrays["known_top_scores"], manifest)
    for spec in specs:
        if spec.dtype == "float32" and len(spec.shape) == 2:
            _check_finite(spec.name, arrays[spec.name])


def _check_spec(spec: ArraySpec, array: np.ndarray, dims: dict[str, int]) -> None:
    if spec.dtype == "U":
        if array.dtype.kind != "U":
            raise _ArrayProblem(spec.name, f"expected fixed-width unicode (<U), got {array.dtype}")
    elif array.dtype != np.dtype(spec.dtype):
        raise _ArrayProblem(spec.name, f"expected dtype {spec.dtype}, got {array.dtype}")
    expected = tuple(dims[d] for d in spec.shape)
    if array.shape != expected:
        symbols = ", ".join(spec.shape)
        raise _ArrayProblem(
            spec.name,
            f"expected shape {expected} ({symbols}, from the manifest), got {array.shape}",
        )


def _check_order(name: str, ids: np.ndarray, order_name: str, order: np.ndarray) -> None:
    """``order`` is a permutation that sorts ``ids`` strictly (so the ids are unique), checked
    in blocks so a memory-mapped id array is never copied whole."""
    n = len(ids)
    if n and (order.min() < 0 or order.max() >= n):
        raise _ArrayProblem(order_name, f"index outside [0, {n})")
    for start in range(0, max(n - 1, 0), _ORDER_BLOCK):
        block = ids[order[start : start + _ORDER_BLOCK + 1]]
        if not (block[1:] > block[:-1]).all():
            j = start + int(np.argmin(block[1:] > block[:-1]))
            if ids[order[j]] == ids[order[j + 1]]:
                raise _ArrayProblem(name, f"duplicate id {str(ids[order[j]])[:80]!r}")
            raise _ArrayProblem(order_name, f"does not sort {name} (position {j})")


def _check_known_top(indices: np.ndarray, scores: np.ndarray, manifest: Manifest) -> None:
    if indices.size and (indices.min() < -1 or indices.max() >= manifest.num_tracks):
        raise _ArrayProblem("known_top_indices", f"track index outside [-1, {manifest.num_tracks})")
    if scores.size and np.isnan(scores).any():
        raise _ArrayProblem("known_top_scores", "NaN scores")


def _check_csr(indptr: np.ndarray, indices: np.ndarray, n_tracks: int) -> None:
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise _ArrayProblem("seen_indptr", "not CSR row pointers (must start at 0, never decrease)")
    if indptr[-1] != len(indices):
        raise _ArrayProblem(
            "seen_indices", f"{len(indices)} entries but seen_indptr ends at {indptr[-1]}"
        )
    if len(indices) and (indices.min() < 0 or indices.max() >= n_tracks):
        raise _ArrayProblem("seen_indices", f"track index outside [0, {n_tracks})")


def _check_finite(name: str, matrix: np.ndarray) -> None:
    """Every embedding is finite, checked in row blocks of about ``_FINITE_BLOCK_BYTES`` so a
    large memory-mapped matrix is never copied whole (``isfinite`` of a block is a bool copy).
    Runs after the shape checks, so ``matrix`` is 2-D."""
    rows = max(1, _FINITE_BLOCK_BYTES // max(1, matrix.itemsize * matrix.shape[1]))
    for start in range(0, len(matrix), rows):
        block = matrix[start : start + rows]
        finite = np.isfinite(block)
        if not finite.all():
            row, col = (int(v) for v in np.argwhere(~finite)[0])
            raise _ArrayProblem(
                name,
                f"row {start + row} is not finite ({block[row, col]} in column {col}); the "
                "model diverged or the file is corrupt",
            )


def _check_popular(popular: np.ndarray, scores: np.ndarray, n_tracks: int) -> None:
    if popular.min() < 0 or popular.max() >= n_tracks:
        raise _ArrayProblem("popular", f"track index outside [0, {n_tracks})")
    if np.any(np.bincount(popular, minlength=n_tracks) != 1):
        raise _ArrayProblem("popular", "not a permutation of the track indices")
    if np.any(np.diff(scores) > 0) or np.isnan(scores).any():
        raise _ArrayProblem("popular_scores", "not in non-increasing order")
