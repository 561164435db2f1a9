"""Reading and validating an export artifact directory (format_version 1, see the contract).

Every inconsistency is reported as a one-line DataError naming the file and array, at startup,
so a bad export never reaches a request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from tracktower.features.errors import DataError

log = logging.getLogger(__name__)

ARRAYS = (
    "track_ids",
    "track_embeddings",
    "user_ids",
    "user_embeddings",
    "seen_indptr",
    "seen_indices",
    "popular",
    "popular_scores",
)


class DatasetInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    fingerprint: str
    rows: int
    users: int
    tracks: int


class Manifest(BaseModel):
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
    top_k: int
    has_history_tower: bool = False
    libraries: dict[str, Any] = {}


def load_manifest(path: Path) -> Manifest:
    file = path / "manifest.json"
    if not file.is_file():
        raise DataError("not an artifact directory: manifest.json is missing", path=path)
    try:
        manifest = Manifest.model_validate(json.loads(file.read_text(encoding="utf-8")))
    except (ValueError, ValidationError) as exc:
        raise DataError(f"invalid manifest: {_first_line(exc)}", path=file) from exc
    if manifest.format_version != 1:
        raise DataError(
            f"unsupported format_version {manifest.format_version} (expected 1)", path=file
        )
    return manifest


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


def load_arrays(path: Path, dim: int) -> dict[str, np.ndarray]:
    file = path / "arrays.npz"
    if not file.is_file():
        raise DataError("arrays.npz is missing", path=path)
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ARRAYS if name in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable arrays: {_first_line(exc)}", path=file) from exc
    missing = [name for name in ARRAYS if name not in arrays]
    if missing:
        raise DataError(f"missing arrays {missing}", path=file)
    n, u = len(arrays["track_ids"]), len(arrays["user_ids"])
    if n == 0:
        raise DataError("artifact has no candidate tracks", path=file, column="track_ids")
    for name in ("track_ids", "user_ids"):
        if len(np.unique(arrays[name])) != len(arrays[name]):
            raise DataError("duplicate ids", path=file, column=name)
    expected = {
        "track_embeddings": (n, dim),
        "user_embeddings": (u, dim),
        "seen_indptr": (u + 1,),
        "popular": (n,),
        "popular_scores": (n,),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise DataError(
                f"expected shape {shape}, got {arrays[name].shape}", path=file, column=name
            )
    indptr, indices = arrays["seen_indptr"], arrays["seen_indices"]
    if indptr[-1] != len(indices) or (len(indices) and (indices.min() < 0 or indices.max() >= n)):
        raise DataError("seen CSR is inconsistent with track_ids", path=file, column="seen_indices")
    return arrays


def load_metadata(path: Path, track_ids: np.ndarray) -> tuple[list[str | None], list[str | None]]:
    """Titles and artists aligned to candidate index (None where the artifact has no metadata)."""
    file = path / "tracks.parquet"
    if not file.is_file():
        log.warning("%s is missing; recommendations carry no title/artist", file)
        return [None] * len(track_ids), [None] * len(track_ids)
    tracks = pd.read_parquet(file)
    if "track_id" not in tracks.columns:
        raise DataError("missing column", path=file, column="track_id")
    tracks = tracks.drop_duplicates("track_id").set_index(tracks["track_id"].astype(str))
    aligned = tracks.reindex(pd.Index(track_ids.astype(str)))

    def column(name: str) -> list[str | None]:
        if name not in aligned.columns:
            return [None] * len(track_ids)
        return [None if pd.isna(v) else str(v) for v in aligned[name].tolist()]

    return column("title"), column("artist")


def load_history_tower(path: Path) -> Callable[[list[str]], np.ndarray]:
    from tracktower.features.tf import tf

    saved = path / "saved_model"
    if not saved.is_dir():
        raise DataError("manifest has_history_tower but saved_model/ is missing", path=path)
    loaded = tf.saved_model.load(str(saved))
    if "query_from_history" not in loaded.signatures:
        raise DataError("saved_model has no 'query_from_history' signature", path=saved)
    fn = loaded.signatures["query_from_history"]

    def query(track_ids: list[str]) -> np.ndarray:
        out = fn(track_ids=tf.constant([track_ids], dtype=tf.string))
        return np.asarray(out["query_embedding"].numpy()[0], dtype=np.float32)

    query.keep_alive = loaded  # type: ignore[attr-defined]  # the signature needs its module alive
    return query
