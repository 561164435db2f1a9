"""Export a trained model as an artifact (``tracktower.features.artifact``), the one serving loads.

Heavy work happens here, once: every known user's query embedding and every candidate embedding is
computed at export, so the server answers known users with one matrix-vector product and never calls
TensorFlow for them. The SavedModel holds only what cannot be precomputed, the history tower for
users the model has never seen (raw track ids in, query embedding out); its ``StringLookup`` carries
the track vocabulary, so raw ids mean the same indices as in training. Ranking is not in the
SavedModel: every caller searches the retrieval index built here (``features.index``), seen tracks
excluded.

The index is built from the track embeddings and measured before anything is written: its
recall@10/@100 against exact search on the real query vectors of a seeded sample of known users
goes into the manifest, and an index below the configured recall floor fails the export (so it
is never registered). Nothing rebuilds it later: the server, batch scoring and offline
evaluation load it from the artifact.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tracktower.features import artifact
from tracktower.features.dataset import popularity, popularity_order
from tracktower.features.index import IndexInfo, RetrievalIndex, build_index
from tracktower.features.tf import tf
from tracktower.training import evaluate
from tracktower.training.config import IndexConfig
from tracktower.training.model import TwoTowerModel

_LIBRARIES = ("tensorflow", "tf-keras", "tensorflow-recommenders", "mlflow", "numpy", "tracktower")


class HistoryModule(tf.Module):
    """Raw track ids → indices → query tower, with the user id hidden (index 0, the OOV row)."""

    def __init__(self, model: TwoTowerModel, track_ids: np.ndarray) -> None:
        super().__init__()
        self.track_lookup = tf.keras.layers.StringLookup(
            vocabulary=list(track_ids), num_oov_indices=1
        )
        self.query_tower = model.query_tower

    @tf.function(
        input_signature=[tf.TensorSpec([None, None], tf.string, name=artifact.HISTORY_INPUT)]
    )
    def query_from_history(self, track_ids: tf.Tensor) -> dict[str, tf.Tensor]:
        # "" padding and unknown tracks both map to index 0, which the pooling masks out.
        history = tf.cast(self.track_lookup(track_ids), tf.int32)
        user = tf.zeros(tf.shape(history)[:1], tf.int32)
        return {artifact.HISTORY_OUTPUT: self.query_tower({"user": user, "history": history})}


@dataclass(frozen=True)
class ExportInputs:
    """``known``: every interaction the model was given (users x tracks, the training
    vocabularies); it is the histories behind the user embeddings and the seen tracks serving
    excludes. ``manifest``: the caller's manifest fields (model_name, run_id, config, dataset,
    metrics, final); what export computes itself cannot be overridden. ``index``: how the
    retrieval index is chosen and measured; ``seed`` draws its recall sample and seeds its
    build."""

    model: TwoTowerModel
    user_ids: np.ndarray
    track_ids: np.ndarray
    known: sp.csr_matrix
    tracks: pd.DataFrame | None
    manifest: dict[str, Any]
    index: IndexConfig = field(default_factory=IndexConfig)
    seed: int = 0


@dataclass(frozen=True)
class Exported:
    """The written artifact and what its index is (for MLflow: see ``stages.log_index``)."""

    path: Path
    index: IndexInfo


def _library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _track_metadata(track_ids: np.ndarray, tracks: pd.DataFrame | None) -> pd.DataFrame:
    frame = pd.DataFrame({"track_id": track_ids.astype(str)})
    if tracks is None or tracks.empty:
        return frame.assign(title=pd.Series(dtype="string"), artist=pd.Series(dtype="string"))
    keep = [c for c in artifact.TRACK_COLUMNS if c in tracks.columns]
    return frame.merge(tracks[keep].drop_duplicates("track_id"), on="track_id", how="left")


def _arrays(inputs: ExportInputs) -> dict[str, np.ndarray]:
    known = sp.csr_matrix(inputs.known, copy=True)
    known.sum_duplicates()  # canonical: sorted, unique track indices per user
    counts = popularity(known)
    order = popularity_order(counts)
    users = np.arange(len(inputs.user_ids))
    return {
        "track_ids": np.asarray(inputs.track_ids, dtype=str),
        "track_embeddings": evaluate.track_embeddings(inputs.model),
        "user_ids": np.asarray(inputs.user_ids, dtype=str),
        "user_embeddings": evaluate.user_embeddings(inputs.model, known, users),
        "seen_indptr": known.indptr.astype(np.int64),
        "seen_indices": known.indices.astype(np.int32),
        "popular": order.astype(np.int32),
        "popular_scores": counts[order].astype(np.float32),
    }


def build_retrieval_index(
    arrays: dict[str, np.ndarray], cfg: IndexConfig, seed: int
) -> tuple[RetrievalIndex, IndexInfo]:
    """The index over the track embeddings, its recall measured on a seeded sample of the known
    users' query vectors (all when fewer than ``cfg.sample_users``); below ``cfg.recall_floor``
    after retuning this raises a one-line DataError."""
    users = arrays["user_embeddings"]
    return build_index(
        arrays["track_embeddings"],
        cfg.backend,
        seed=seed,
        recall_floor=cfg.recall_floor,
        queries=users if len(users) else None,
        sample_size=cfg.sample_users,
    )


def export_artifact(inputs: ExportInputs, out_dir: Path) -> Exported:
    """Write the artifact at ``out_dir`` (must not exist; written atomically) and return it with
    its index's description. The index is built and measured first: a failing one writes
    nothing."""
    model = inputs.model
    arrays = _arrays(inputs)
    index, info = build_retrieval_index(arrays, inputs.index, inputs.seed)
    manifest = artifact.Manifest.model_validate(
        {
            **inputs.manifest,
            "format_version": artifact.FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "embedding_dim": int(arrays["track_embeddings"].shape[1]),
            "has_history_tower": bool(model.cfg.use_history),
            "num_users": len(inputs.user_ids),
            "num_tracks": len(inputs.track_ids),
            "libraries": _library_versions(),
            "index": info.to_dict(),
        }
    )
    module = HistoryModule(model, inputs.track_ids)

    def save(path: Path) -> None:
        signature = module.query_from_history
        tf.saved_model.save(
            module,
            str(path),
            signatures={"serving_default": signature, artifact.HISTORY_SIGNATURE: signature},
        )

    path = artifact.write_artifact(
        out_dir,
        manifest=manifest,
        arrays=arrays,
        tracks=_track_metadata(inputs.track_ids, inputs.tracks),
        saved_model=save,
        index=index,
    )
    return Exported(path, info)
