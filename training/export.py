"""Write the self-describing artifact directory that serving loads without any training code.

Heavy work happens here, once: every known user's query embedding and every candidate embedding is
computed at export, so the server answers known users with one matrix-vector product and never calls
TensorFlow on the request path. The SavedModel carries the id vocabularies as ``StringLookup``
layers in front of the same towers, so raw ids in means the same indices as in training.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tracktower.features.tf import tf
from tracktower.training import evaluate
from tracktower.training.model import TwoTowerModel
from tracktower.training.pipeline import gather_history

FORMAT_VERSION = 1
_LIBRARIES = ("tensorflow", "tf-keras", "tensorflow-recommenders", "mlflow", "numpy", "tracktower")


class ServingModule(tf.Module):
    """Raw string ids → indices → towers; the vocabularies travel inside the SavedModel."""

    def __init__(
        self,
        model: TwoTowerModel,
        user_ids: np.ndarray,
        track_ids: np.ndarray,
        table: tf.RaggedTensor,
        candidates: np.ndarray,
        top_k: int,
    ) -> None:
        super().__init__()
        keras = tf.keras
        self.user_lookup = keras.layers.StringLookup(vocabulary=list(user_ids), num_oov_indices=1)
        self.track_lookup = keras.layers.StringLookup(vocabulary=list(track_ids), num_oov_indices=1)
        self.query_tower = model.query_tower
        self.history_values = tf.Variable(table.flat_values, trainable=False)
        self.history_splits = tf.Variable(table.row_splits, trainable=False)
        self.candidates = tf.Variable(candidates, trainable=False)
        self.track_ids = tf.Variable(
            np.asarray(track_ids, dtype=object).astype(bytes), trainable=False
        )
        self.top_k = min(top_k, len(track_ids))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id")])
    def serve(self, user_id: tf.Tensor) -> dict[str, tf.Tensor]:
        user = tf.cast(self.user_lookup(user_id), tf.int32)
        table = tf.RaggedTensor.from_row_splits(self.history_values, self.history_splits)
        query = self.query_tower({"user": user, "history": gather_history(table, user)})
        scores = tf.matmul(query, self.candidates, transpose_b=True)
        top = tf.math.top_k(scores, k=self.top_k)
        return {"track_ids": tf.gather(self.track_ids, top.indices), "scores": top.values}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="track_ids")])
    def query_from_history(self, track_ids: tf.Tensor) -> dict[str, tf.Tensor]:
        # "" padding and unknown tracks both map to index 0, which the pooling masks out.
        history = tf.cast(self.track_lookup(track_ids), tf.int32)
        user = tf.zeros(tf.shape(history)[:1], tf.int32)
        return {"query_embedding": self.query_tower({"user": user, "history": history})}


@dataclass(frozen=True)
class ExportInputs:
    model: TwoTowerModel
    table: tf.RaggedTensor
    user_ids: np.ndarray
    track_ids: np.ndarray
    train: sp.csr_matrix
    tracks: pd.DataFrame | None
    manifest: dict[str, Any]


def _library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _popularity(train: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    counts = np.diff(train.tocsc().indptr).astype(np.float32)
    order = np.lexsort((np.arange(len(counts)), -counts)).astype(np.int32)
    return order, counts[order]


def _track_metadata(track_ids: np.ndarray, tracks: pd.DataFrame | None) -> pd.DataFrame:
    frame = pd.DataFrame({"track_id": track_ids.astype(str)})
    if tracks is None or tracks.empty:
        return frame.assign(title=pd.Series(dtype="string"), artist=pd.Series(dtype="string"))
    keep = [c for c in ("track_id", "title", "artist", "album", "year") if c in tracks.columns]
    return frame.merge(tracks[keep].drop_duplicates("track_id"), on="track_id", how="left")


def export_artifact(inputs: ExportInputs, out_dir: Path, top_k: int) -> Path:
    """Write ``out_dir`` (created; must not exist) and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    model = inputs.model
    n_users = len(inputs.user_ids)
    candidates = evaluate.track_embeddings(model)
    users = evaluate.user_embeddings(model, inputs.table, np.arange(n_users))
    train = inputs.train.tocsr()
    popular, popular_scores = _popularity(train)
    np.savez(
        out_dir / "arrays.npz",
        track_ids=inputs.track_ids.astype(str),
        track_embeddings=candidates,
        user_ids=inputs.user_ids.astype(str),
        user_embeddings=users,
        seen_indptr=train.indptr.astype(np.int64),
        seen_indices=train.indices.astype(np.int32),
        popular=popular,
        popular_scores=popular_scores,
    )
    _track_metadata(inputs.track_ids, inputs.tracks).to_parquet(
        out_dir / "tracks.parquet", index=False
    )
    module = ServingModule(
        model, inputs.user_ids, inputs.track_ids, inputs.table, candidates, top_k
    )
    tf.saved_model.save(
        module,
        str(out_dir / "saved_model"),
        signatures={
            "serving_default": module.serve,
            "query_from_history": module.query_from_history,
        },
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_name": None,
        "model_version": None,
        "run_id": None,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "embedding_dim": int(candidates.shape[1]),
        "top_k": module.top_k,
        "has_history_tower": bool(model.cfg.use_history),
        "num_users": n_users,
        "num_tracks": len(inputs.track_ids),
        "libraries": _library_versions(),
        **inputs.manifest,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return out_dir
