"""Exact offline evaluation: brute-force scores over all tracks, with an explicit exclusion set.

Brute force costs users x tracks, so callers bound the users: per-epoch validation scores a
seeded sample of ``train.max_val_users``, which ``sampling`` (``eval.max_pairs``) cuts further
when given; the test of a trained model goes through the artifact's retrieval index instead
(``stages.evaluate_artifact``).

Query embeddings come from :func:`tracktower.training.pipeline.history_rows`, the history encoding
training uses, and the ranking is ``tracktower.features.ranking`` — the same routine the server
calls — so offline metrics describe exactly what is served. The exclusion set is always passed by
the caller, so every system in a comparison can be scored against the same one.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import scipy.sparse as sp

from tracktower.features.ranking import score_chunks
from tracktower.features.tf import tf
from tracktower.training.metrics import (
    Sampling,
    ranking_metrics,
    sample_users,
    users_with_heldout,
)
from tracktower.training.model import TwoTowerModel
from tracktower.training.pipeline import history_rows

# Users per query-tower call at most, and history slots (users x the batch's longest history)
# per call: the tower gathers a [slots, dim] float32 block and masks it (a second one), so this
# bounds both (1M x 128: 512 MB each).
MAX_USERS = 16384
MAX_SLOTS = 1 << 20
_QUERY_FNS: weakref.WeakKeyDictionary[TwoTowerModel, Any] = weakref.WeakKeyDictionary()


def track_embeddings(model: TwoTowerModel) -> np.ndarray:
    """Candidate embeddings for every known track, row i = track index i (the OOV row dropped)."""
    out = []
    for start in range(1, model.n_tracks + 1, 8192):
        idx = tf.range(start, min(start + 8192, model.n_tracks + 1), dtype=tf.int32)
        out.append(model.candidate_tower(idx).numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def user_embeddings(model: TwoTowerModel, known: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    """Query embeddings for user indices (0-based), from their id and their whole ``known`` row.

    Histories are never capped (only training subsamples). Users go through the tower in order
    of history length, so each batch is padded to about its own users' length (at MPD shape a
    batch of random users is padded to its heaviest user's 1,000 tracks) and batches can be
    large (``MAX_USERS``, ``MAX_SLOTS``); the tower runs as one traced function, not eagerly.
    """
    known = sp.csr_matrix(known)
    users = np.asarray(users, dtype=np.int64)
    out = np.zeros((len(users), model.output_dim), np.float32)
    lengths = np.diff(known.indptr)[users]
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    tower = _query_fn(model)
    start = 0
    while start < len(order):
        stop = _batch_end(sorted_lengths, start)
        picked = order[start:stop]
        batch = users[picked]
        embedded = tower(
            tf.constant(batch.astype(np.int32) + 1), tf.constant(history_rows(known, batch))
        )
        out[picked] = embedded.numpy()
        start = stop
    return out


def _batch_end(sorted_lengths: np.ndarray, start: int) -> int:
    """The end of the batch from ``start``: as many users as MAX_USERS and MAX_SLOTS allow
    (ascending lengths, so the last user's is the batch's padded width), at least one."""
    lo, hi = start + 1, min(start + MAX_USERS, len(sorted_lengths))
    while lo < hi:  # the largest stop with (stop - start) x width <= MAX_SLOTS
        mid = (lo + hi + 1) // 2
        if (mid - start) * max(int(sorted_lengths[mid - 1]), 1) <= MAX_SLOTS:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _query_fn(model: TwoTowerModel) -> Any:
    """The query tower as a traced function of (user ids, padded histories), one per model:
    any batch and width reuse one trace."""
    fn = _QUERY_FNS.get(model)
    if fn is None:
        ref = weakref.ref(model)  # the cached function must not keep its model alive

        def query(user: tf.Tensor, history: tf.Tensor) -> tf.Tensor:
            tower = ref().query_tower  # type: ignore[union-attr]
            return tf.cast(tower({"user": user, "history": history}), tf.float32)

        fn = tf.function(
            query,
            input_signature=[
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, None], tf.int32),
            ],
        )
        _QUERY_FNS[model] = fn
    return fn


def evaluate_embeddings(
    queries: np.ndarray,
    candidates: np.ndarray,
    users: np.ndarray,
    truth: sp.csr_matrix,
    unknown: np.ndarray | None,
    ks: list[int],
    *,
    exclude: sp.csr_matrix,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics for ``users`` (row i of ``queries`` is user ``users[i]``) against their ``truth``
    rows, never recommending what their ``exclude`` rows hold; ``bootstrap``/``seed`` as in
    ``metrics.ranking_metrics``. Exact: every candidate is scored, so callers bound ``users``."""
    k = max(ks)
    tops = [idx for idx, _ in score_chunks(queries, candidates, k, sp.csr_matrix(exclude)[users])]
    top = np.concatenate(tops) if tops else np.zeros((0, k), np.int64)
    return ranking_metrics(
        top,
        truth[users],
        unknown[users] if unknown is not None else None,
        ks,
        n_items=candidates.shape[0],
        bootstrap=bootstrap,
        seed=seed,
    )


def evaluate_model(
    model: TwoTowerModel,
    known: sp.csr_matrix,
    truth: sp.csr_matrix,
    unknown: np.ndarray | None,
    ks: list[int],
    *,
    exclude: sp.csr_matrix,
    users: np.ndarray | None = None,
    sampling: Sampling | None = None,
) -> dict[str, float]:
    """``known`` is what the query tower reads as each user's history, ``exclude`` what may not
    be recommended; ``users`` defaults to those with held-out tracks (the only ones averaged).

    ``sampling`` (``EvalConfig``): above its pair budget (users x tracks) only a seeded sample of
    ``users`` is scored (``metrics.sample_users``), and the result adds ``eval_users``,
    ``eval_sampled`` and bootstrap intervals; None scores every one of ``users``.
    """
    if users is None:
        users = users_with_heldout(truth, unknown)
    sample = sample_users(users, model.n_tracks, sampling)
    if len(sample.users) == 0:
        return {}
    metrics = evaluate_embeddings(
        user_embeddings(model, known, sample.users),
        track_embeddings(model),
        sample.users,
        truth,
        unknown,
        ks,
        exclude=exclude,
        bootstrap=sampling.bootstrap if sampling is not None else 0,
        seed=sampling.seed if sampling is not None else 0,
    )
    if sampling is not None:
        metrics.update(sample.as_metrics())
    return metrics
