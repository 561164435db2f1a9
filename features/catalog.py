"""Track-side features derived from the optional tracks file."""

from __future__ import annotations

import numpy as np
import pandas as pd


def track_artist_index(track_ids: np.ndarray, tracks: pd.DataFrame | None) -> np.ndarray | None:
    """Artist index per track index, shifted by one like every id table (0 = unknown artist).

    Returns an array of length ``len(track_ids) + 1`` (row 0 is the OOV track), or None when no
    artist is known for any track, in which case the candidate tower uses the track id alone.
    """
    if tracks is None or "artist" not in tracks.columns:
        return None
    artists = tracks.drop_duplicates("track_id").set_index("track_id")["artist"]
    names = artists.reindex(pd.Index(np.asarray(track_ids).astype(str))).astype("string")
    names = names.str.strip().replace("", pd.NA)
    if names.isna().all():
        return None
    codes, _ = pd.factorize(names, sort=True, use_na_sentinel=True)
    return np.concatenate([[0], np.where(codes < 0, 0, codes + 1)]).astype(np.int32)
