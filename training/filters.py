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

from tracktower.features.errors import DataError


def k_core(df: pd.DataFrame, min_user: int = 5, min_track: int = 5) -> pd.DataFrame:
    """Return the rows of ``df`` in its (min_user, min_track)-core, original row order kept.

    Counts are of *distinct* (user, track) pairs, so duplicate rows cannot keep a user alive.
    Vectorised: each pass is two ``np.bincount`` over integer codes, and passes only shrink a
    boolean mask, so the cost is O(rows x passes) with no re-factorising.
    """
    for name, value in (("min_user", min_user), ("min_track", min_track)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise DataError(f"k-core {name} must be an integer >= 1, got {value!r}")
    for col in ("user_id", "track_id"):
        if col not in df.columns:
            raise DataError("k-core needs columns user_id and track_id", column=col)
    if len(df) == 0:
        return df.reset_index(drop=True)

    u_codes, u_uniques = pd.factorize(df["user_id"], sort=False)
    t_codes, t_uniques = pd.factorize(df["track_id"], sort=False)
    n_users, n_tracks = len(u_uniques), len(t_uniques)
    pair = u_codes.astype(np.int64) * n_tracks + t_codes
    _, first = np.unique(pair, return_index=True)
    distinct = np.zeros(len(df), dtype=bool)
    distinct[first] = True

    keep = np.ones(len(df), dtype=bool)
    while True:
        counted = keep & distinct
        users = np.bincount(u_codes[counted], minlength=n_users)
        tracks = np.bincount(t_codes[counted], minlength=n_tracks)
        new_keep = keep & (users[u_codes] >= min_user) & (tracks[t_codes] >= min_track)
        if new_keep.sum() == keep.sum():
            break
        keep = new_keep
    return df.loc[keep].reset_index(drop=True)
