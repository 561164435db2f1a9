"""Export a trained model as an artifact (``tracktower.features.artifact``), the one serving loads.

Heavy work happens here, once: every known user's query embedding and every candidate embedding is
computed at export, so the server answers known users with one index search and never calls
TensorFlow for them. For users the model has never seen, the query tower is split at its pooling:
the history's track table is exported as the array ``history_embeddings`` (memory-mapped and
shared by every server process, where a SavedModel variable would be restored into each one) and
the SavedModel holds only the rest of the tower (pooled history in, query embedding out). Ranking
is not in the SavedModel: every caller searches the retrieval index built here
(``features.index``), seen tracks excluded.

The index is built from the track embeddings and measured before anything is written: its
recall@10/@100 against exact search on the real query vectors of a seeded sample of known users
goes into the manifest, and an index below the configured recall floor fails the export (so it
is never registered). Nothing rebuilds it later: the server, batch scoring and offline
evaluation load it from the artifact.
"""

from __future__ import annotations

import logging
import platform
import time
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
from tracktower.features.index import IndexInfo, RetrievalIndex, build_index, top_lists
from tracktower.features.tf import tf
from tracktower.training import evaluate
from tracktower.training.config import IndexConfig
from tracktower.training.model import TwoTowerModel, query_head

log = logging.getLogger(__name__)
_LIBRARIES = ("tensorflow", "tf-keras", "tensorflow-recommenders", "mlflow", "numpy", "tracktower")


class HistoryModule(tf.Module):
    """Pooled history → the rest of the query tower, with the user id hidden (the OOV user row,
    copied: the SavedModel holds the MLP and that one row, no embedding table)."""

    def __init__(self, model: TwoTowerModel) -> None:
        super().__init__()
        tower = model.query_tower
        self.cfg = tower.cfg
        self.mlp = tower.mlp
        self.oov_user = (
            tf.Variable(tower.user_embedding.embeddings[0], trainable=False, name="oov_user")
            if tower.user_embedding is not None
            else None
        )
        width = model.cfg.embedding_dim
        self.query_from_pooled_history = tf.function(
            self._query,
            input_signature=[tf.TensorSpec([None, width], tf.float32, name=artifact.HISTORY_INPUT)],
        )

    def _query(self, pooled: tf.Tensor) -> dict[str, tf.Tensor]:
        user = None
        if self.oov_user is not None:
            user = tf.tile(self.oov_user[None, :], [tf.shape(pooled)[0], 1])
        return {artifact.HISTORY_OUTPUT: query_head(self.cfg, self.mlp, user, pooled)}


def history_table(model: TwoTowerModel) -> np.ndarray:
    """The query tower's track table, row i = track index i (the OOV row dropped)."""
    table = model.query_tower.track_embedding.embeddings.numpy()
    return np.ascontiguousarray(table[1:], dtype=np.float32)


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


def _arrays(inputs: ExportInputs) -> dict[str, np.ndarray]:
    known = sp.csr_matrix(inputs.known, copy=True)
    known.sum_duplicates()  # canonical: sorted, unique track indices per user
    counts = popularity(known)
    order = popularity_order(counts)
    users = np.arange(len(inputs.user_ids))
    history = (
        {artifact.HISTORY_ARRAY.name: history_table(inputs.model)}
        if inputs.model.cfg.use_history
        else {}
    )
    started = time.perf_counter()
    user_embeddings = evaluate.user_embeddings(inputs.model, known, users)
    log.info("export: %d user embeddings in %.1f s", len(users), time.perf_counter() - started)
    return {
        **history,
        "track_ids": np.asarray(inputs.track_ids, dtype=str),
        "track_embeddings": evaluate.track_embeddings(inputs.model),
        "user_ids": np.asarray(inputs.user_ids, dtype=str),
        "user_embeddings": user_embeddings,
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
    after retuning this raises a one-line DataError, above ``cfg.recall_target`` it is narrowed."""
    users = arrays["user_embeddings"]
    return build_index(
        arrays["track_embeddings"],
        cfg.backend,
        seed=seed,
        recall_floor=cfg.recall_floor,
        recall_target=cfg.recall_target,
        queries=users if len(users) else None,
        sample_size=cfg.sample_users,
    )


def known_top_lists(
    index: RetrievalIndex, arrays: dict[str, np.ndarray], width: int
) -> dict[str, np.ndarray]:
    """Every known user's top ``width`` (seen excluded) for KNOWN_TOP_ARRAYS."""
    started = time.perf_counter()
    seen = artifact.seen_matrix(arrays)
    indices, scores = top_lists(
        index, arrays["track_embeddings"], arrays["user_embeddings"], width, seen
    )
    log.info(
        "export: top %d lists of %d known users in %.1f s",
        width,
        len(indices),
        time.perf_counter() - started,
    )
    return {"known_top_indices": indices, "known_top_scores": scores}


def export_artifact(inputs: ExportInputs, out_dir: Path) -> Exported:
    """Write the artifact at ``out_dir`` (must not exist; written atomically) and return it with
    its index's description. The index is built and measured first: a failing one writes
    nothing."""
    model = inputs.model
    arrays = _arrays(inputs)
    index, info = build_retrieval_index(arrays, inputs.index, inputs.seed)
    width = min(inputs.index.known_top_k, len(inputs.track_ids))
    if width and len(inputs.user_ids):
        arrays.update(known_top_lists(index, arrays, width))
    else:
        width = 0
    manifest = artifact.Manifest.model_validate(
        {
            **inputs.manifest,
            "format_version": artifact.FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "embedding_dim": int(arrays["track_embeddings"].shape[1]),
            "has_history_tower": bool(model.cfg.use_history),
            "history_dim": model.cfg.embedding_dim if model.cfg.use_history else None,
            "num_users": len(inputs.user_ids),
            "num_tracks": len(inputs.track_ids),
            "libraries": _library_versions(),
            "index": info.to_dict(),
            "known_top_k": width,
        }
    )
    module = HistoryModule(model)

    def save(path: Path) -> None:
        signature = module.query_from_pooled_history
        tf.saved_model.save(
            module,
            str(path),
            signatures={"serving_default": signature, artifact.HISTORY_SIGNATURE: signature},
        )

    path = artifact.write_artifact(
        out_dir,
        manifest=manifest,
        arrays=arrays,
        # write_artifact aligns it to the track index (missing tracks get nulls).
        tracks=inputs.tracks if inputs.tracks is not None else pd.DataFrame({"track_id": []}),
        saved_model=save if model.cfg.use_history else None,
        index=index,
    )
    return Exported(path, info)
