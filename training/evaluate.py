"""Exact offline evaluation: brute-force scores over all tracks, each user's train tracks excluded.

The embeddings computed here for known users are the ones the export ships, and the ranking is
``tracktower.features.ranking`` — the same routine the server calls — so offline metrics describe
exactly what is served.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from tracktower.features.ranking import score_chunks
from tracktower.features.tf import tf
from tracktower.training.metrics import ranking_metrics
from tracktower.training.model import TwoTowerModel
from tracktower.training.pipeline import gather_history

_BATCH = 1024


def track_embeddings(model: TwoTowerModel) -> np.ndarray:
    """Candidate embeddings for every known track, row i = track index i (the OOV row dropped)."""
    out = []
    for start in range(1, model.n_tracks + 1, 8192):
        idx = tf.range(start, min(start + 8192, model.n_tracks + 1), dtype=tf.int32)
        out.append(model.candidate_tower(idx).numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def user_embeddings(model: TwoTowerModel, table: tf.RaggedTensor, users: np.ndarray) -> np.ndarray:
    """Query embeddings for user indices (0-based), from their id and full training history."""
    out = []
    for start in range(0, len(users), _BATCH):
        u = tf.constant(users[start : start + _BATCH].astype(np.int32) + 1)
        feats = {"user": u, "history": gather_history(table, u)}
        out.append(model.query_tower(feats).numpy())
    if not out:
        return np.zeros((0, model.output_dim), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def evaluate_embeddings(
    queries: np.ndarray,
    candidates: np.ndarray,
    users: np.ndarray,
    train: sp.csr_matrix,
    truth: sp.csr_matrix,
    unknown: np.ndarray | None,
    ks: list[int],
) -> dict[str, float]:
    """Metrics for ``users`` (rows of ``queries``) against held-out ``truth`` rows."""
    k = max(ks)
    exclude = train[users]
    tops = [idx for idx, _ in score_chunks(queries, candidates, k, exclude)]
    top = np.concatenate(tops) if tops else np.zeros((0, k), np.int64)
    return ranking_metrics(
        top,
        truth[users],
        unknown[users] if unknown is not None else None,
        ks,
        n_items=candidates.shape[0],
    )


def users_with_truth(truth: sp.csr_matrix, unknown: np.ndarray | None) -> np.ndarray:
    held = np.diff(truth.indptr)
    if unknown is not None:
        held = held + unknown
    return np.flatnonzero(held > 0)


def evaluate_model(
    model: TwoTowerModel,
    table: tf.RaggedTensor,
    train: sp.csr_matrix,
    truth: sp.csr_matrix,
    unknown: np.ndarray | None,
    ks: list[int],
    users: np.ndarray | None = None,
) -> dict[str, float]:
    if users is None:
        users = users_with_truth(truth, unknown)
    if len(users) == 0:
        return {}
    return evaluate_embeddings(
        user_embeddings(model, table, users),
        track_embeddings(model),
        users,
        train,
        truth,
        unknown,
        ks,
    )
