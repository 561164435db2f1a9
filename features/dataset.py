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
import pyarrow.compute as pc
import scipy.sparse as sp

from tracktower.features.errors import DataError
from tracktower.features.split import Split

__all__ = ["Encoded", "encode", "encode_ids", "fingerprint", "popularity", "popularity_order"]

_FINGERPRINT_VERSION = b"tracktower-interactions-v1\0"


def fingerprint(df: pd.DataFrame) -> str:
    """sha256 of the interactions as a *set* of rows: independent of row order and dtype width.

    Logged with every run so two runs can be proven to have used identical data. Sorting and
    hashing run on Arrow buffers, since this is called on every training run (~0.5 s for 700k rows).
    """
    missing = [c for c in ("user_id", "track_id") if c not in df.columns]
    if missing:
        raise DataError(f"interactions lack column(s) {', '.join(missing)}", column=missing[0])
    columns = {
        "user_id": pa.array(df["user_id"].astype("str"), type=pa.large_string()),
        "track_id": pa.array(df["track_id"].astype("str"), type=pa.large_string()),
        "weight": pa.array(
            df["weight"].to_numpy(dtype=np.float64)
            if "weight" in df
            else np.ones(len(df), dtype=np.float64)
        ),
    }
    if "timestamp" in df:
        columns["timestamp"] = pa.array(df["timestamp"].to_numpy(dtype=np.int64))
    table = pa.table(columns)
    if table["user_id"].null_count or table["track_id"].null_count:
        raise DataError("interactions contain missing ids; read them with features.io first")
    order = pc.sort_indices(table, sort_keys=[(name, "ascending") for name in columns])
    table = table.take(order).combine_chunks()
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    h.update(",".join(columns).encode() + len(table).to_bytes(8, "little"))
    for name in columns:
        _hash_column(h, table[name].combine_chunks())
    return h.hexdigest()


def _hash_column(h: hashlib._Hash, arr: pa.Array) -> None:
    """Hash the logical content only (offsets rebased, data sliced): buffer capacity and array
    offsets differ between otherwise equal arrays."""
    if not pa.types.is_large_string(arr.type):
        h.update(np.ascontiguousarray(arr.to_numpy(zero_copy_only=False)).tobytes())
        return
    buffers = arr.buffers()
    if len(arr) == 0:
        return
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
    if len(split.train) == 0:
        raise DataError("the training partition is empty")
    user_codes, user_vocab = pd.factorize(split.train["user_id"], sort=True)
    track_codes, track_vocab = pd.factorize(split.train["track_id"], sort=True)
    user_ids = np.asarray(user_vocab, dtype=str)
    track_ids = np.asarray(track_vocab, dtype=str)
    shape = (len(user_ids), len(track_ids))
    train = _csr(user_codes, track_codes, _weights(split.train), shape)
    val, val_unknown = _held_out(split.val, user_ids, track_ids)
    test, test_unknown = _held_out(split.test, user_ids, track_ids)
    meta = None
    if tracks is not None:
        meta = (
            tracks.drop_duplicates("track_id")
            .set_index("track_id")
            .reindex(pd.Index(track_ids, name="track_id"))
            .reset_index()
        )
    return Encoded(user_ids, track_ids, train, val, test, val_unknown, test_unknown, meta)


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


def _held_out(
    df: pd.DataFrame, user_ids: np.ndarray, track_ids: np.ndarray
) -> tuple[sp.csr_matrix, np.ndarray]:
    shape = (len(user_ids), len(track_ids))
    u = encode_ids(user_ids, df["user_id"].to_numpy()) if len(df) else np.zeros(0, np.int64)
    t = encode_ids(track_ids, df["track_id"].to_numpy()) if len(df) else np.zeros(0, np.int64)
    known_user = u >= 0
    unknown = np.bincount(u[known_user & (t < 0)], minlength=shape[0]).astype(np.int64)
    keep = known_user & (t >= 0)
    weights = _weights(df)[keep] if len(df) else np.zeros(0, np.float32)
    return _csr(u[keep], t[keep], weights, shape), unknown


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
