"""From encoded interactions to batched ``tf.data`` input, with no per-example Python.

Examples are integer arrays computed once. Each batch gathers its users' listening histories from a
dense table (:func:`history_rows`, the encoding inference uses too) with plain gathers, which are
much cheaper than ragged ops, drops the target track from its own history (otherwise the model
learns to look the answer up), and subsamples long histories.
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


def history_rows(
    known: sp.csr_matrix, users: np.ndarray, cap: int | None = None, seed: int = 0
) -> np.ndarray:
    """Row i: user ``users[i]``'s track indices (+1) as int32, right-padded with 0.

    The one history encoding, shared by training (a table of every user, capped) and inference
    (a batch of users at a time, uncapped, so a served history forgets nothing). The width is the
    longest selected history, at least 1 and at most ``cap``. With ``cap``, each row is in a
    seeded random order and truncated, so a heavier user keeps a uniform random ``cap`` of their
    tracks: that bounds the training table at ``users x cap`` whatever the heaviest history.
    """
    sub = sp.csr_matrix(known)[np.asarray(users, dtype=np.int64)]
    lengths = np.diff(sub.indptr)
    longest = max(int(lengths.max(initial=0)), 1)
    width = longest if cap is None else min(longest, cap)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    first = np.repeat(sub.indptr[:-1], lengths)
    if cap is None:
        rank = np.arange(sub.nnz) - first
    else:
        keys = np.random.default_rng(seed).random(sub.nnz)
        order = np.lexsort((keys, rows))
        rank = np.empty(sub.nnz, dtype=np.int64)
        rank[order] = np.arange(sub.nnz) - first
    keep = rank < width
    out = np.zeros((len(lengths), width), dtype=np.int32)
    out[rows[keep], rank[keep]] = sub.indices[keep] + 1
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
    train: sp.csr_matrix,
    *,
    batch_size: int,
    history_max_len: int,
    user_id_dropout: float,
    seed: int,
) -> tf.data.Dataset:
    """Shuffled batches with each example's history attached.

    The histories table holds up to ``4 x history_max_len`` tracks per user, so each epoch can
    still draw a different ``history_max_len`` subset while the table stays bounded.
    """
    histories = history_rows(train, np.arange(train.shape[0]), 4 * history_max_len, seed)
    # Row 0 stands for the unknown user, so the examples' +1-shifted user ids index it directly.
    table = np.concatenate([np.zeros((1, histories.shape[1]), np.int32), histories])
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
