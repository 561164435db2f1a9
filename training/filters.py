"""Interaction filters applied before splitting.

A k-core keeps only users and tracks with at least k interactions *in the filtered data*. Removing
a rare track can push a user below the threshold and vice versa, so one pass is not enough: the
filter repeats until nothing changes. Long-tail items with one or two listeners carry no
collaborative signal, blow up the item vocabulary (EASE's Gram is n_items^2) and make held-out
metrics mostly measure unrecoverable misses.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracktower.features.canonical import codes_of, compact
from tracktower.features.errors import DataError


def k_core(
    df: pd.DataFrame, min_user: int = 5, min_track: int = 5, *, unique_pairs: bool = False
) -> pd.DataFrame:
    """Return the rows of ``df`` in its (min_user, min_track)-core, original row order kept.

    Counts are of *distinct* (user, track) pairs, so duplicate rows cannot keep a user alive;
    ``unique_pairs=True`` says the caller has already merged duplicates (the readers do), which
    skips a sort of every row. Id categories left unused by the filter are dropped, so the
    vocabulary stays that of the rows.
    """
    keep = k_core_mask(df, min_user, min_track, unique_pairs=unique_pairs)
    return take_rows(df.copy(deep=False), keep)


def k_core_mask(
    df: pd.DataFrame, min_user: int = 5, min_track: int = 5, *, unique_pairs: bool = False
) -> np.ndarray:
    """Which rows :func:`k_core` keeps. Vectorised: each pass is two ``np.bincount`` over the id
    codes, and passes only shrink a boolean mask, so the cost is O(rows x passes)."""
    for name, value in (("min_user", min_user), ("min_track", min_track)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise DataError(f"k-core {name} must be an integer >= 1, got {value!r}")
    for col in ("user_id", "track_id"):
        if col not in df.columns:
            raise DataError("k-core needs columns user_id and track_id", column=col)
    keep = np.ones(len(df), dtype=bool)
    if len(df) == 0:
        return keep
    u_codes, u_uniques = codes_of(df["user_id"])
    t_codes, t_uniques = codes_of(df["track_id"])
    n_users, n_tracks = len(u_uniques), len(t_uniques)
    distinct = np.ones(len(df), dtype=bool)
    if not unique_pairs:
        pair = u_codes.astype(np.int64) * n_tracks + t_codes
        distinct[:] = False
        distinct[np.unique(pair, return_index=True)[1]] = True
        del pair

    kept = len(df)
    while True:
        counted = keep & distinct
        users = np.bincount(u_codes[counted], minlength=n_users)
        tracks = np.bincount(t_codes[counted], minlength=n_tracks)
        keep &= (users >= min_user)[u_codes] & (tracks >= min_track)[t_codes]
        now = int(keep.sum())
        if now == kept:
            return keep
        kept = now


def take_rows(df: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    """The rows where ``keep``, taken one column at a time *out of* ``df`` (which is left empty):
    at 66M rows, holding one column twice instead of the whole frame saves over a GB."""
    if keep.all():
        return df.reset_index(drop=True)
    out: dict[str, pd.Series] = {}
    for name in list(df.columns):
        column = df.pop(name)
        taken = column[keep].reset_index(drop=True)
        del column
        out[name] = compact(taken) if isinstance(taken.dtype, pd.CategoricalDtype) else taken
    return pd.DataFrame(out, copy=False)
