"""Load, filter, split and encode a dataset once, the same way for the model and every baseline.

All validation happens here, before any MLflow run starts, so bad input never leaves a half-logged
run behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tracktower.features import io
from tracktower.features.catalog import track_artist_index
from tracktower.features.dataset import Encoded, encode, fingerprint
from tracktower.features.errors import DataError
from tracktower.features.split import Split, holdout
from tracktower.training.config import DataConfig, SplitConfig
from tracktower.training.filters import k_core

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    interactions: pd.DataFrame
    tracks: pd.DataFrame | None
    split: Split
    encoded: Encoded
    fingerprint: str
    source: str
    track_artist: np.ndarray | None
    final: bool = False  # no test split: only a small validation slice for early stopping

    @property
    def stats(self) -> dict[str, int]:
        return {
            "rows": len(self.interactions),
            "users": len(self.encoded.user_ids),
            "tracks": len(self.encoded.track_ids),
            "train_rows": len(self.split.train),
            "val_rows": len(self.split.val),
            "test_rows": len(self.split.test),
        }


def prepare(data: DataConfig, split: SplitConfig, *, final: bool = False) -> Prepared:
    """``final`` keeps no test split: only a small validation slice for early stopping."""
    if data.interactions is None:
        raise DataError(
            "no interactions given: pass --interactions PATH or set data.interactions in the config"
        )
    path = Path(data.interactions)
    tracks: pd.DataFrame | None = None
    if path.is_dir() and any(path.glob("mpd.slice.*.json")):
        # MPD slices carry their own track metadata: parse the JSON once for both.
        interactions, tracks = io.read_mpd_slices(path)
    else:
        interactions = io.read_interactions(path, data.columns)
    if "weight" in interactions and not (interactions["weight"] > 0).any():
        raise DataError("every weight is 0: there is no interaction to learn from", path=path)
    if data.tracks:
        tracks = io.read_tracks(Path(data.tracks), interactions)
    min_user, min_track = max(data.k_core, 1), max(data.k_core, data.min_track_users, 1)
    if min_track > 1 or min_user > 1:
        before = len(interactions)
        interactions = k_core(interactions, min_user, min_track)
        log.info(
            "filter (users >= %d, tracks >= %d listeners): %d → %d interactions",
            min_user,
            min_track,
            before,
            len(interactions),
        )
        if interactions.empty:
            raise DataError(
                f"no interactions survive the filter (data.k_core={data.k_core}, "
                f"data.min_track_users={data.min_track_users})",
                path=path,
            )
    parts = holdout(
        interactions,
        val_fraction=split.final_val_fraction if final else split.val_fraction,
        test_fraction=0.0 if final else split.test_fraction,
        min_user_interactions=split.min_user_interactions,
        seed=split.seed,
    )
    if not final and parts.test.empty:
        raise DataError(
            f"no user has the {split.min_user_interactions} interactions needed to hold some out "
            f"for testing ({len(interactions)} interactions in all); lower "
            "split.min_user_interactions or provide more data",
            path=path,
        )
    encoded = encode(parts)
    return Prepared(
        interactions=interactions,
        tracks=tracks,
        split=parts,
        encoded=encoded,
        fingerprint=fingerprint(interactions),
        source=str(path),
        track_artist=track_artist_index(encoded.track_ids, tracks),
        final=final,
    )
