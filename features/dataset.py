"""Integer encoding of a split: the vocabularies and sparse matrices every model and metric share.

The vocabulary comes from the *training* partition only and is sorted, so index ``i`` means the same
track in training, offline evaluation, the exported artifact and the server. Held-out tracks never
seen in training cannot be recommended by any model; they are dropped from the matrices but
counted, so that recall denominators still include them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from tracktower.features.canonical import codes_of, compact
from tracktower.features.errors import DataError
from tracktower.features.split import TEST, TRAIN, VAL, Split

__all__ = [
    "Encoded",
    "encode",
    "encode_ids",
    "encode_labelled",
    "fingerprint",
    "popularity",
    "popularity_order",
]

_FINGERPRINT_VERSION = b"tracktower-interactions-v2\0"


def fingerprint(df: pd.DataFrame) -> str:
    """sha256 of the interactions as a *set* of rows: independent of row order and dtype width.

    Logged with every run so two runs can be proven to have used identical data. Rows are hashed
    as integer codes into the sorted vocabularies of the ids they hold (each vocabulary hashed
    once), sorted by (user, track, weight, timestamp): ~24 bytes a row, no string per row, so
    66M rows hash in seconds. Version 2: version 1 hashed the id strings of every row.
    """
    missing = [c for c in ("user_id", "track_id") if c not in df.columns]
    if missing:
        raise DataError(f"interactions lack column(s) {', '.join(missing)}", column=missing[0])
    if df["user_id"].isna().any() or df["track_id"].isna().any():
        raise DataError("interactions contain missing ids; read them with features.io first")
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    names = ["user_id", "track_id", "weight", *(["timestamp"] if "timestamp" in df else [])]
    h.update(",".join(names).encode() + len(df).to_bytes(8, "little"))
    columns: list[np.ndarray] = []
    for name in ("user_id", "track_id"):
        codes, vocab = codes_of(compact(df[name]))
        _hash_strings(h, vocab)
        columns.append(codes)
    columns.append(
        df["weight"].to_numpy(dtype=np.float64)
        if "weight" in df
        else np.ones(len(df), dtype=np.float64)
    )
    if "timestamp" in df:
        columns.append(df["timestamp"].to_numpy(dtype=np.int64))
    order = _row_order(columns)
    for values in columns:  # codes hashed as int64 whatever width they are held in
        wide = "<f8" if values.dtype.kind == "f" else "<i8"
        h.update(np.ascontiguousarray(values[order], dtype=wide).tobytes())
    return h.hexdigest()


def _row_order(columns: list[np.ndarray]) -> np.ndarray:
    """Lexicographic row order; the common case, no repeated (user, track), sorts one key."""
    users, tracks = columns[0], columns[1]
    pair = users.astype(np.int64) * (int(tracks.max()) + 1 if len(tracks) else 1) + tracks
    order = np.argsort(pair, kind="stable")
    pair = pair[order]
    if (pair[1:] == pair[:-1]).any():  # ties: weight, timestamp decide
        order = np.lexsort(tuple(reversed(columns)))
    return order


def _hash_strings(h: hashlib._Hash, vocab: pd.Index) -> None:
    """A sorted vocabulary as length-prefixed UTF-8, so ("ab", "c") and ("a", "bc") differ."""
    arr = pa.array(vocab.to_numpy(dtype=object), type=pa.large_string())
    h.update(len(arr).to_bytes(8, "little"))
    if len(arr) == 0:
        return
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    h.update((offsets - offsets[0]).astype("<i8").tobytes())
    if buffers[2] is not None:
        h.update(memoryview(buffers[2])[offsets[0] : offsets[-1]])


@dataclass(frozen=True)
class Encoded:
    """Users x tracks matrices over the training vocabulary (index order = sorted ids)."""

    user_ids: np.ndarray  # <U str [U]
    track_ids: np.ndarray  # <U str [N]
    train: sp.csr_matrix  # float32 [U, N]
    val: sp.csr_matrix
    test: sp.csr_matrix
    val_unknown: np.ndarray  # int64 [U]: held-out tracks absent from training, per user
    test_unknown: np.ndarray
    tracks: pd.DataFrame | None = None  # metadata row i = track index i (NaN when unknown)

    @property
    def known(self) -> sp.csr_matrix:
        """Everything a model is given about each user (train + validation): its history at
        inference and what every system's test lists exclude alike."""
        return sp.csr_matrix(self.train + self.val)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_tracks(self) -> int:
        return len(self.track_ids)

    def user_index(self, ids: object) -> np.ndarray:
        return encode_ids(self.user_ids, ids)

    def track_index(self, ids: object) -> np.ndarray:
        return encode_ids(self.track_ids, ids)


def encode(split: Split, tracks: pd.DataFrame | None = None) -> Encoded:
    """Held-out rows of users absent from train are dropped (no model can score them)."""
    frames = [split.train, split.val, split.test]
    labels = np.repeat(np.array([TRAIN, VAL, TEST], dtype=np.int8), [len(f) for f in frames])
    both = {}
    for name in ("user_id", "track_id"):
        both[name] = pd.concat([f[name].astype("str") for f in frames], ignore_index=True)
    if "weight" in split.train:
        both["weight"] = pd.concat([f["weight"] for f in frames], ignore_index=True)
    return encode_labelled(pd.DataFrame(both), labels, tracks)


def encode_labelled(
    df: pd.DataFrame, labels: np.ndarray, tracks: pd.DataFrame | None = None
) -> Encoded:
    """:func:`encode` of ``df`` split by :func:`~tracktower.features.split.holdout_labels`.

    Works on the id codes: the training vocabulary is the sorted categories used by train rows,
    so a held-out id maps to its index (or -1) by a gather, not a string search per row.
    """
    is_train = labels == TRAIN
    if not is_train.any():
        raise DataError("the training partition is empty")
    user_codes, user_vocab = codes_of(df["user_id"])
    track_codes, track_vocab = codes_of(df["track_id"])
    user_map, user_ids = _vocabulary(user_codes, is_train, user_vocab)
    track_map, track_ids = _vocabulary(track_codes, is_train, track_vocab)
    weights = _weights(df)
    shape = (len(user_ids), len(track_ids))
    parts: list[tuple[sp.csr_matrix, np.ndarray]] = []
    for label in (TRAIN, VAL, TEST):
        rows = labels == label
        u, t = user_map[user_codes[rows]], track_map[track_codes[rows]]
        known_user = u >= 0
        unknown = np.bincount(u[known_user & (t < 0)], minlength=shape[0]).astype(np.int64)
        keep = known_user & (t >= 0)
        parts.append((_csr(u[keep], t[keep], weights[rows][keep], shape), unknown))
    meta = None
    if tracks is not None:
        meta = (
            tracks.drop_duplicates("track_id")
            .set_index("track_id")
            .reindex(pd.Index(track_ids, name="track_id"))
            .reset_index()
        )
    (train, _), (val, val_unknown), (test, test_unknown) = parts
    return Encoded(user_ids, track_ids, train, val, test, val_unknown, test_unknown, meta)


def _vocabulary(
    codes: np.ndarray, is_train: np.ndarray, vocab: pd.Index
) -> tuple[np.ndarray, np.ndarray]:
    """(code -> training index or -1, sorted training ids as ``<U``) of one id column."""
    used = np.bincount(codes[is_train], minlength=len(vocab)) > 0
    index = np.where(used, np.cumsum(used) - 1, -1).astype(np.int32)
    mapping = np.append(index, -1)  # code -1 (missing) maps through the last slot
    ids = np.asarray(vocab[used].to_numpy(dtype=object), dtype=str)
    return mapping, ids


def encode_ids(vocab: np.ndarray, ids: object) -> np.ndarray:
    """int64 index of each id in the sorted ``vocab``, -1 where unknown."""
    values = np.asarray(ids, dtype=str) if not isinstance(ids, np.ndarray) else ids.astype(str)
    if len(vocab) == 0 or values.size == 0:
        return np.full(values.shape, -1, dtype=np.int64)
    pos = np.searchsorted(vocab, values)
    clipped = np.minimum(pos, len(vocab) - 1)
    return np.where(vocab[clipped] == values, clipped, -1).astype(np.int64)


def popularity(train: sp.csr_matrix) -> np.ndarray:
    """Number of distinct training users per track (int64 [N]); stored zeros count as a user."""
    csr = sp.csr_matrix(train)
    csr.sum_duplicates()
    return np.bincount(csr.indices, minlength=csr.shape[1]).astype(np.int64)


def popularity_order(counts: np.ndarray) -> np.ndarray:
    """Track indices (int64), most popular first, ties by lower index: the one order shared by
    the Popularity baseline and the artifact's ``popular`` array, so both rank ties alike."""
    counts = np.asarray(counts)
    return np.lexsort((np.arange(len(counts)), -counts)).astype(np.int64)


def _weights(df: pd.DataFrame) -> np.ndarray:
    if "weight" in df:
        return df["weight"].to_numpy(dtype=np.float32)
    return np.ones(len(df), dtype=np.float32)


def _csr(
    rows: np.ndarray, cols: np.ndarray, data: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    m = sp.csr_matrix((data.astype(np.float32), (rows, cols)), shape=shape, dtype=np.float32)
    m.sum_duplicates()
    return m


def reindex(
    matrix: sp.csr_matrix,
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    unknown: np.ndarray | None = None,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``matrix`` moved onto another vocabulary: row ``r`` becomes ``rows[r]``, column ``c``
    becomes ``cols[c]`` (``-1`` = absent there).

    Rows absent from the target are dropped. Entries whose column is absent are counted per target
    row in the returned ``unknown`` (plus the per-row ``unknown`` passed in), the same convention
    as :func:`encode`: held-out tracks a model cannot know still count in recall's denominator.
    """
    coo = sp.csr_matrix(matrix).tocoo()
    new_rows = np.asarray(rows, dtype=np.int64)[coo.row]
    new_cols = np.asarray(cols, dtype=np.int64)[coo.col]
    kept_row = new_rows >= 0
    out_unknown = np.bincount(new_rows[kept_row & (new_cols < 0)], minlength=shape[0])
    if unknown is not None:
        moved = np.asarray(rows, dtype=np.int64) >= 0
        out_unknown += np.bincount(
            np.asarray(rows)[moved], weights=np.asarray(unknown)[moved], minlength=shape[0]
        ).astype(np.int64)
    keep = kept_row & (new_cols >= 0)
    out = _csr(new_rows[keep], new_cols[keep], coo.data[keep], shape)
    return out, out_unknown.astype(np.int64)
