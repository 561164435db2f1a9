"""From encoded interactions to batched ``tf.data`` input, with no per-example Python.

Examples are integer arrays computed once. Each batch gathers its users' listening histories from a
dense table in one vectorised step, drops the target track from its own history (otherwise the
model learns to look the answer up), and subsamples long histories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from tracktower.features.tf import tf


@dataclass(frozen=True)
class Examples:
    """One row per (user, track) training interaction, indices already shifted by +1 (0 = OOV)."""

    user: np.ndarray  # int32
    track: np.ndarray  # int32
    weight: np.ndarray  # float32, mean 1
    log_q: np.ndarray  # float32, log sampling probability of the track among examples

    def __len__(self) -> int:
        return len(self.user)


def make_examples(train: sp.csr_matrix, weighting: str) -> Examples:
    coo = train.tocoo()
    user = coo.row.astype(np.int32) + 1
    track = coo.col.astype(np.int32) + 1
    raw = coo.data.astype(np.float64)
    if weighting == "none":
        weight = np.ones_like(raw)
    elif weighting == "log1p":
        weight = 1.0 + np.log1p(np.maximum(raw - 1.0, 0.0))
    elif weighting == "raw":
        weight = raw
    else:  # pragma: no cover - validated by the config model
        raise ValueError(f"unknown weighting {weighting!r}")
    weight = weight / max(weight.mean(), 1e-12)
    counts = np.bincount(coo.col, minlength=train.shape[1]).astype(np.float64)
    log_q = np.log(counts[coo.col] / counts.sum())
    return Examples(user, track, weight.astype(np.float32), log_q.astype(np.float32))


def auto_batch_size(n_examples: int) -> int:
    """About 300 steps per epoch, as a power of two between 256 and 8192.

    In-batch softmax wants big batches (more negatives), but tiny datasets need enough steps per
    epoch to learn; the rule scales with the data instead of being tuned to one dataset.
    """
    target = max(n_examples / 300.0, 1.0)
    size = 2 ** round(float(np.log2(target)))
    return int(min(max(size, 256), 8192))


def history_table(train: sp.csr_matrix) -> tf.RaggedTensor:
    """Row u+1 holds user u's training track indices (+1); row 0 (unknown user) is empty."""
    train = train.tocsr()
    lengths = np.diff(train.indptr).astype(np.int64)
    values = (train.indices.astype(np.int32) + 1) if train.nnz else np.zeros(0, np.int32)
    splits = np.concatenate([[0, 0], np.cumsum(lengths)]).astype(np.int64)
    return tf.RaggedTensor.from_row_splits(tf.constant(values), tf.constant(splits))


def gather_history(table: tf.RaggedTensor, user: tf.Tensor) -> tf.Tensor:
    """Full histories, right-padded with 0: what inference and export use."""
    return tf.gather(table, user).to_tensor(default_value=0)


def history_matrix(train: sp.csr_matrix, cap: int, seed: int) -> np.ndarray:
    """Dense ``[users + 1, L]`` track indices (+1, 0-padded), built once for the training input.

    Dense rows let each batch pick its histories with plain gathers instead of ragged ops, which
    were the input pipeline's main cost. Users with more than ``cap`` tracks keep a seeded random
    ``cap`` of them, which bounds memory at ``users x cap`` whatever the heaviest user's history.
    """
    train = train.tocsr()
    lengths = np.diff(train.indptr)
    width = int(min(max(lengths.max(initial=0), 1), cap))
    rows = np.repeat(np.arange(train.shape[0]), lengths)
    keys = np.random.default_rng(seed).random(train.nnz)
    order = np.lexsort((keys, rows))
    rank = np.empty(train.nnz, dtype=np.int64)
    rank[order] = np.arange(train.nnz) - np.repeat(train.indptr[:-1], lengths)
    keep = rank < width
    out = np.zeros((train.shape[0] + 1, width), dtype=np.int32)
    out[rows[keep] + 1, rank[keep]] = train.indices[keep] + 1
    return out


def _training_history(
    table: tf.Tensor, user: tf.Tensor, track: tf.Tensor, max_len: int
) -> tf.Tensor:
    """A uniform random subset of at most ``max_len`` of the user's tracks, the target removed."""
    hist = tf.gather(table, user)
    valid = tf.logical_and(hist > 0, tf.not_equal(hist, tf.expand_dims(track, 1)))
    if hist.shape[1] is not None and hist.shape[1] <= max_len:
        return tf.where(valid, hist, tf.zeros_like(hist))
    keys = tf.where(valid, tf.random.uniform(tf.shape(hist)), 2.0)
    _, pick = tf.math.top_k(-keys, k=max_len)
    hist = tf.gather(hist, pick, batch_dims=1)
    valid = tf.gather(valid, pick, batch_dims=1)
    return tf.where(valid, hist, tf.zeros_like(hist))


def training_dataset(
    examples: Examples,
    table: np.ndarray,
    *,
    batch_size: int,
    history_max_len: int,
    user_id_dropout: float,
    seed: int,
) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(
        {
            "user": examples.user,
            "track": examples.track,
            "weight": examples.weight,
            "log_q": examples.log_q,
        }
    )
    table_t = tf.constant(table)
    ds = ds.shuffle(len(examples), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=len(examples) >= batch_size)

    def add_history(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = dict(batch)
        out["history"] = _training_history(table_t, batch["user"], batch["track"], history_max_len)
        if user_id_dropout > 0:
            hide = tf.random.uniform(tf.shape(batch["user"])) < user_id_dropout
            out["user"] = tf.where(hide, tf.zeros_like(batch["user"]), batch["user"])
        return out

    return ds.map(add_history, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
