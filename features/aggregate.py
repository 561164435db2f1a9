"""Coarser views of an interaction log: the same users, with artists (not tracks) as the items.

An artist-level log has another shape than a track-level one (a few thousand items, dense rows,
heavy counts), which is the shape on which the track-level defaults were found not to hold
(issue 12). Building it from a track log that is already at hand gives the quality benchmark a
dataset of that shape without a second download.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracktower.features.errors import DataError

__all__ = ["to_artist_level"]


def to_artist_level(interactions: pd.DataFrame, tracks: pd.DataFrame) -> pd.DataFrame:
    """``user_id, track_id, weight`` with ``track_id`` an artist and ``weight`` how many distinct
    tracks of that artist the user has.

    Distinct tracks, not rows: a track listed twice is still one track of the artist, so the
    weight measures how much of the artist a user holds rather than repeats. Interactions whose
    track is missing from ``tracks`` or has no artist are dropped (they name no item here); all of
    it is columnar (a categorical gather and one group-by), with no Python per row.
    """
    for name, frame, column in (
        ("interactions", interactions, "user_id"),
        ("interactions", interactions, "track_id"),
        ("tracks", tracks, "track_id"),
        ("tracks", tracks, "artist"),
    ):
        if column not in frame.columns:
            raise DataError(
                f"{name} lack column '{column}', needed for an artist-level aggregate",
                column=column,
            )
    pairs = interactions[["user_id", "track_id"]].drop_duplicates()
    artist_of = _artist_lookup(tracks)
    track_codes = pd.Categorical(pairs["track_id"].astype("str"), categories=artist_of.index)
    artist = pd.Categorical.from_codes(
        np.where(track_codes.codes >= 0, artist_of.cat.codes.to_numpy()[track_codes.codes], -1),
        categories=artist_of.cat.categories,
    )
    known = artist.codes >= 0
    if not known.any():
        raise DataError(
            "no interaction's track has an artist in the tracks table; is it the tracks file "
            "of another dataset?",
            column="artist",
        )
    frame = pd.DataFrame({"user_id": pairs["user_id"].to_numpy()[known], "track_id": artist[known]})
    counts = frame.groupby(["user_id", "track_id"], observed=True, sort=True).size()
    out = counts.rename("weight").reset_index()
    out["user_id"] = out["user_id"].astype("str")
    out["track_id"] = out["track_id"].astype("str")
    out["weight"] = out["weight"].astype("float32")
    return out


def _artist_lookup(tracks: pd.DataFrame) -> pd.Series:
    """Categorical artist per track id (first row of a repeated id), blank artists left out."""
    rows = tracks[["track_id", "artist"]].dropna()
    rows = rows.assign(
        track_id=rows["track_id"].astype("str"), artist=rows["artist"].astype("str").str.strip()
    )
    rows = rows[rows["artist"] != ""].drop_duplicates("track_id")
    return pd.Series(pd.Categorical(rows["artist"]), index=pd.Index(rows["track_id"]))
