"""The export artifact contract: the one definition training writes and serving reads.

An artifact is a directory::

    manifest.json        Manifest (below); format_version is checked before anything else
    arrays/<name>.npy    one plain .npy per array in ARRAYS, so a server can memory-map each one
    tracks.parquet       track metadata: track_id, optional title/artist/album/year
    saved_model/         TensorFlow SavedModel, present when manifest.has_history_tower
    index/               the retrieval index over track_embeddings (``features.index``)

Track index ``i`` means the same track in every array (row ``i`` of ``track_embeddings``, column
``i`` of the seen CSR); user index ``u`` likewise. The SavedModel has one signature,
``query_from_history`` (also ``serving_default``): string track ids ``[B, L]``, ``""`` as
padding, to ``query_embedding`` float32 ``[B, dim]``; ranking happens outside TensorFlow, in
``features.ranking``, so there is one top-k routine.

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
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tracktower.features.errors import DataError, one_line
from tracktower.features.index.base import IndexInfo, RetrievalIndex, load_index

__all__ = [
    "ARRAYS",
    "ARRAYS_DIR",
    "FORMAT_VERSION",
    "HISTORY_INPUT",
    "HISTORY_OUTPUT",
    "HISTORY_SIGNATURE",
    "INDEX_DIR",
    "MANIFEST_FILE",
    "PYFUNC_ARTIFACT_KEY",
    "SAVED_MODEL_DIR",
    "TRACKS_FILE",
    "TRACK_COLUMNS",
    "ArraySpec",
    "DatasetInfo",
    "Manifest",
    "array_file",
    "read_arrays",
    "read_index",
    "read_manifest",
    "read_track_metadata",
    "update_manifest",
    "write_artifact",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"
TRACKS_FILE = "tracks.parquet"
SAVED_MODEL_DIR = "saved_model"
INDEX_DIR = "index"
ARRAYS_DIR = "arrays"
# Block size of the finite-embeddings check (see _check_finite).
_FINITE_BLOCK_BYTES = 16 << 20
# Key of the artifact directory in the MLflow pyfunc model's ``artifacts``.
PYFUNC_ARTIFACT_KEY = "artifact"
HISTORY_SIGNATURE = "query_from_history"
HISTORY_INPUT = "track_ids"
HISTORY_OUTPUT = "query_embedding"
# tracks.parquet: track_id is required, the others are kept when the catalogue has them.
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

    @field_validator("index")
    @classmethod
    def _index_info(cls, value: dict[str, Any]) -> dict[str, Any]:
        return IndexInfo.from_dict(value).to_dict()

    @property
    def index_info(self) -> IndexInfo:
        return IndexInfo.from_dict(self.index)


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
    _check_for_write(out_dir, manifest, arrays, tracks, saved_model)
    _check_index_for_write(out_dir, manifest, index)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would survive the rename and hide the model from other users.
    staging = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(6)}.partial"
    staging.mkdir()
    try:
        (staging / ARRAYS_DIR).mkdir()
        for spec in ARRAYS:
            np.save(array_file(staging, spec.name), np.ascontiguousarray(arrays[spec.name]))
        tracks.to_parquet(staging / TRACKS_FILE, index=False)
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
    names = {spec.name for spec in ARRAYS}
    missing, extra = sorted(names - set(arrays)), sorted(set(arrays) - names)
    if missing or extra:
        raise DataError(f"arrays missing {missing}, not in the contract {extra}", path=out_dir)
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
    arrays = {spec.name: _load_npy(array_file(path, spec.name), mmap) for spec in ARRAYS}
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


def read_track_metadata(
    path: str | Path, track_ids: np.ndarray
) -> tuple[list[str | None], list[str | None]]:
    """Titles and artists aligned to track index (None where the artifact has no metadata)."""
    file = Path(path) / TRACKS_FILE
    if not file.is_file():
        log.warning("%s is missing; recommendations carry no title/artist", file)
        return [None] * len(track_ids), [None] * len(track_ids)
    try:
        tracks = pd.read_parquet(file)
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable track metadata: {one_line(exc)[:300]}", path=file) from None
    if "track_id" not in tracks.columns:
        raise DataError("missing column", path=file, column="track_id")
    tracks = tracks.drop_duplicates("track_id").set_index(tracks["track_id"].astype(str))
    aligned = tracks.reindex(pd.Index(np.asarray(track_ids, dtype=str)))

    def column(name: str) -> list[str | None]:
        if name not in aligned.columns:
            return [None] * len(track_ids)
        return [None if pd.isna(v) else str(v) for v in aligned[name].tolist()]

    return column("title"), column("artist")


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
    }
    for spec in ARRAYS:
        _check_spec(spec, arrays[spec.name], dims)
    for name in ("track_ids", "user_ids"):
        if len(np.unique(arrays[name])) != len(arrays[name]):
            raise _ArrayProblem(name, "duplicate ids")
    _check_csr(arrays["seen_indptr"], arrays["seen_indices"], manifest.num_tracks)
    _check_popular(arrays["popular"], arrays["popular_scores"], manifest.num_tracks)
    for name in ("track_embeddings", "user_embeddings"):
        _check_finite(name, arrays[name])


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
