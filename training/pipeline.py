"""From encoded interactions to batched ``tf.data`` input, in memory that does not grow with
the number of training rows, and with no per-example Python.

The examples are written once, in a seeded random order, to an anonymous scratch file
(:func:`make_examples`; 12 bytes per row, on disk, unlinked from the start so that nothing is
left behind even by a killed run) and read back through a memory map in groups of
``shuffle_buffer`` rows: each epoch reads the groups in a new order and permutes each one
(seeded, so every worker of a multi-worker job draws the same order and keeps its own share).
The track's log sampling probability comes from a per-track table, not from the examples.

When the model reads histories, each batch gathers its users' tracks from a table of
``users x (history_max_len + 1)`` (:func:`history_rows`, the encoding inference uses too) with
plain gathers, and drops the target track from its own history (otherwise the model learns to
look the answer up). Without histories, a batch is three columns and a lookup.
"""

from __future__ import annotations

import mmap
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from tracktower.features.tf import tf

# Rows handled at once while writing the examples or building the history table: bounds the
# transient memory of both, whatever the number of rows.
_CHUNK = 1 << 20
# Rows per block read from the scratch file; a group of blocks fills the shuffle buffer.
BLOCK_ROWS = 1 << 16


@dataclass(frozen=True)
class Examples:
    """One row per (user, track) training interaction, indices already shifted by +1 (0 = OOV),
    in a seeded random order: ``rows`` is ``[n, 3]`` int32 (user, track, the float32 weight's
    bits), a memory map of an anonymous scratch file when ``n > 0``. ``track_log_q[t]`` is the
    log sampling probability of track ``t`` (+1) among the examples (row 0 unused)."""

    rows: np.ndarray
    track_log_q: np.ndarray  # float32, n_tracks + 1

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def user(self) -> np.ndarray:
        return self.rows[:, 0]

    @property
    def track(self) -> np.ndarray:
        return self.rows[:, 1]

    @property
    def weight(self) -> np.ndarray:
        return self.rows[:, 2].view(np.float32)


def _weights(raw: np.ndarray, weighting: str) -> np.ndarray:
    raw = raw.astype(np.float64)
    if weighting == "none":
        return np.ones_like(raw)
    if weighting == "log1p":
        return 1.0 + np.log1p(np.maximum(raw - 1.0, 0.0))
    if weighting == "raw":
        return raw
    raise ValueError(f"unknown weighting {weighting!r}")  # pragma: no cover - config validates


def make_examples(
    train: sp.csr_matrix,
    weighting: str,
    *,
    seed: int = 0,
    scratch_dir: Path | None = None,
    user_weight_power: float = 0.0,
) -> Examples:
    """The examples of ``train``, weights scaled to mean 1, shuffled once with ``seed`` and
    written to an unlinked temporary file in ``scratch_dir`` (the system's temp directory when
    None); the file's space is freed when the returned memory map is.

    ``user_weight_power`` p multiplies each example's weight by ``n_u ** -p`` (n_u: its user's
    training rows): at 0 a user counts as many times as they have rows, at 1 every user counts
    once, as in the per-user averages the metrics take.

    Built a chunk at a time: besides the file, only the permutation (4 bytes per row) is held.
    """
    train = sp.csr_matrix(train)
    n = int(train.nnz)
    counts = np.bincount(train.indices, minlength=train.shape[1]).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_q = np.log(counts / max(counts.sum(), 1.0))
    track_log_q = np.concatenate([[0.0], log_q]).astype(np.float32)
    if n == 0:
        return Examples(np.zeros((0, 3), np.int32), track_log_q)
    row_len = np.diff(train.indptr).astype(np.float64)

    def user_of(positions: np.ndarray) -> np.ndarray:
        """The user row of each of ``positions`` in the CSR data."""
        return np.searchsorted(train.indptr, positions, side="right") - 1

    def weights(positions: np.ndarray, user: np.ndarray | None) -> np.ndarray:
        """The weights, before scaling, of the rows at ``positions`` (``user``: their users,
        needed only with a user weight power)."""
        weight = _weights(train.data[positions], weighting)
        if user_weight_power and user is not None:
            weight = weight * row_len[user] ** -user_weight_power
        return weight

    total = 0.0
    for i in range(0, n, _CHUNK):
        positions = np.arange(i, min(i + _CHUNK, n))
        total += float(weights(positions, user_of(positions) if user_weight_power else None).sum())
    scale = 1.0 / max(total / n, 1e-12)
    order = np.arange(n, dtype=np.int64 if n >= 2**31 else np.int32)
    np.random.default_rng(seed).shuffle(order)
    with tempfile.TemporaryFile(dir=scratch_dir) as handle:
        rows = np.memmap(handle, dtype=np.int32, mode="w+", shape=(n, 3))
    for i in range(0, n, _CHUNK):
        pick = order[i : i + _CHUNK]
        user = user_of(pick)
        weight = weights(pick, user)
        rows[i : i + len(pick), 0] = user + 1
        rows[i : i + len(pick), 1] = train.indices[pick] + 1
        rows[i : i + len(pick), 2] = (weight * scale).astype(np.float32).view(np.int32)
    del order
    rows.flush()
    mapped = getattr(rows, "_mmap", None)  # numpy's mmap.mmap: no public accessor
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)  # written pages leave the RSS (they are in the file)
    return Examples(rows, track_log_q)


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


def history_table(train: sp.csr_matrix, width: int, seed: int) -> np.ndarray:
    """``history_rows`` of every user with ``cap=width``, behind a row 0 of zeros for the
    unknown user (so the +1-shifted user ids index it directly): ``(users + 1) x width`` int32
    at most, built a chunk of users at a time so its transient memory stays bounded too."""
    train = sp.csr_matrix(train)
    longest = int(np.diff(train.indptr).max(initial=0))
    table = np.zeros((train.shape[0] + 1, max(min(longest, width), 1)), np.int32)
    step = max(_CHUNK // max(width, 1), 1)
    for i, start in enumerate(range(0, train.shape[0], step)):
        users = np.arange(start, min(start + step, train.shape[0]))
        part = history_rows(train, users, width, seed=seed + 7919 * i)
        table[start + 1 : start + 1 + len(users), : part.shape[1]] = part
    return table


def _training_history(
    table: tf.Tensor, user: tf.Tensor, track: tf.Tensor, max_len: int
) -> tf.Tensor:
    """The user's (at most ``max_len + 1``) table tracks with the target removed, ``max_len``
    wide: a target among the first ``max_len`` is replaced by the last column, so a user with
    more tracks still shows ``max_len`` of them. Zeros are padding, wherever they fall."""
    hist = tf.gather(table, user)
    width = hist.shape[1]
    is_target = tf.equal(hist[:, :max_len], tf.expand_dims(track, 1))
    if width is not None and width <= max_len:
        return tf.where(is_target, tf.zeros_like(hist), hist)
    return tf.where(is_target, hist[:, max_len:], hist[:, :max_len])


def steps_per_epoch(n_examples: int, batch_size: int, max_steps: int | None = None) -> int:
    """Full batches in one pass (one partial batch when there are fewer examples than a
    batch), capped at ``max_steps``."""
    steps = max(n_examples // batch_size, 1)
    return steps if max_steps is None else min(steps, max_steps)


def _groups(examples: Examples, group_rows: int, seed: int) -> tf.data.Dataset:
    """``[rows, 3]`` int32 tensors of about ``group_rows`` examples each: every epoch, blocks
    of the scratch file in a new seeded order, a few blocks to a group, each group permuted
    with its own seed (drawn from a seeded stream, so the same on every worker)."""
    block = max(min(BLOCK_ROWS, group_rows), 1)
    n_blocks = -(-len(examples) // block)
    per_group = max(group_rows // block, 1)
    # Weakly: TensorFlow keeps every numpy_function of an eager program for the life of the
    # process, and a strong reference would keep the scratch file with it. The dataset that
    # training_dataset returns holds the map (so its iterators do too).
    examples_ref = weakref.ref(examples.rows)

    def read(ids: np.ndarray, group_seed: np.int64) -> np.ndarray:
        rows = examples_ref()
        if rows is None:  # pragma: no cover - the returned dataset holds them
            raise RuntimeError("the training examples were released before their dataset")
        parts = [rows[int(i) * block : (int(i) + 1) * block] for i in ids]
        got = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
        return got[np.random.default_rng(int(group_seed) & (2**63 - 1)).permutation(len(got))]

    def load(ids: tf.Tensor, group_seed: tf.Tensor) -> tf.Tensor:
        got = tf.numpy_function(read, [ids, group_seed], tf.int32, stateful=False)
        got.set_shape([None, 3])
        return got

    ids = tf.data.Dataset.range(n_blocks).shuffle(
        n_blocks, seed=seed, reshuffle_each_iteration=True
    )
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip(ids.batch(per_group), seeds).map(
        load, num_parallel_calls=2, deterministic=True
    )


def training_dataset(
    examples: Examples,
    train: sp.csr_matrix,
    *,
    batch_size: int,
    history_max_len: int,
    user_id_dropout: float,
    seed: int,
    history_dropout: float = 0.0,
    shuffle_buffer: int = 1 << 18,
    with_history: bool = True,
    max_steps: int | None = None,
) -> tf.data.Dataset:
    """Shuffled batches of ``user``, ``track``, ``weight``, ``log_q`` (and ``history`` when the
    model reads it), :func:`steps_per_epoch` of them per pass, each pass in a new order.

    Memory: ``shuffle_buffer`` examples in flight, the per-track ``log_q`` table and, with
    histories, the ``users x (history_max_len + 1)`` table; never the examples themselves.
    A heavy user's table row is one seeded random subset of their tracks, the same every epoch.
    ``history_dropout`` hides that fraction of each example's history tracks (padding from then
    on), drawn again at every step.
    """
    steps = steps_per_epoch(len(examples), batch_size, max_steps)
    log_q = tf.constant(examples.track_log_q)
    table = tf.constant(history_table(train, history_max_len + 1, seed)) if with_history else None

    def to_batch(rows: tf.Tensor) -> dict[str, tf.Tensor]:
        user, track = rows[:, 0], rows[:, 1]
        out = {
            "user": user,
            "track": track,
            "weight": tf.bitcast(rows[:, 2], tf.float32),
            "log_q": tf.gather(log_q, track),
        }
        if table is not None:
            hist = _training_history(table, user, track, history_max_len)
            if history_dropout > 0:
                keep = tf.random.uniform(tf.shape(hist)) >= history_dropout
                hist = tf.where(keep, hist, tf.zeros_like(hist))
            out["history"] = hist
        if user_id_dropout > 0:
            hide = tf.random.uniform(tf.shape(user)) < user_id_dropout
            out["user"] = tf.where(hide, tf.zeros_like(user), user)
        return out

    ds = _groups(examples, max(shuffle_buffer, batch_size), seed)
    ds = ds.rebatch(batch_size, drop_remainder=len(examples) >= batch_size).take(steps)
    ds = ds.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    ds._tracktower_examples = examples.rows  # see _groups: what keeps the scratch file alive
    return ds
