"""Load, filter, split and encode a dataset once, the same way for the model and every baseline.

All validation happens here, before any MLflow run starts, so bad input never leaves a half-logged
run behind. Every step is columnar on integer id codes (see :mod:`tracktower.features.canonical`),
so the Million Playlist Dataset's 66M rows are prepared in a few GB: the rows are held once, the
split as one int8 label per row.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tracktower.features import io
from tracktower.features.catalog import track_artist_index
from tracktower.features.dataset import Encoded, encode_labelled, fingerprint
from tracktower.features.errors import DataError
from tracktower.features.split import TEST, TRAIN, VAL, Split, holdout_labels, partition
from tracktower.training.config import DataConfig, SplitConfig
from tracktower.training.filters import k_core_mask, take_rows

log = logging.getLogger(__name__)


@contextmanager
def _step(name: str) -> Iterator[None]:
    """Log how long a step of prepare took and the peak memory so far: at 66M rows, which step
    is slow or large matters."""
    started = time.perf_counter()
    yield
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    log.info(
        "prepare: %s took %.1f s (peak RSS so far %.2f GB)",
        name,
        time.perf_counter() - started,
        peak,
    )


@dataclass(frozen=True)
class Prepared:
    # Canonical rows after filtering; ids are categoricals (int codes + a sorted vocabulary).
    interactions: pd.DataFrame
    tracks: pd.DataFrame | None
    labels: np.ndarray  # int8 per interactions row: split.TRAIN, split.VAL or split.TEST
    encoded: Encoded
    fingerprint: str
    source: str
    track_artist: np.ndarray | None
    final: bool = False  # no test split: only a small validation slice for early stopping

    @property
    def split(self) -> Split:
        """The partitions as frames, built on each call (they copy the rows: small data only)."""
        return partition(self.interactions, self.labels)

    @property
    def stats(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=3)
        return {
            "rows": len(self.interactions),
            "users": len(self.encoded.user_ids),
            "tracks": len(self.encoded.track_ids),
            "train_rows": int(counts[TRAIN]),
            "val_rows": int(counts[VAL]),
            "test_rows": int(counts[TEST]),
        }


def prepare(data: DataConfig, split: SplitConfig, *, final: bool = False) -> Prepared:
    """``final`` keeps no test split: only a small validation slice for early stopping."""
    if data.interactions is None:
        raise DataError(
            "no interactions given: pass --interactions PATH or set data.interactions in the config"
        )
    path = Path(data.interactions)
    tracks: pd.DataFrame | None = None
    with _step("read interactions"):
        if path.is_dir() and any(path.glob("mpd.slice.*.json")):
            # MPD slices carry their own track metadata: parse the JSON once for both.
            interactions, tracks = io.read_mpd_slices(path)
        else:
            interactions = io.read_interactions(path, data.columns)
    if "weight" in interactions and not (interactions["weight"] > 0).any():
        raise DataError("every weight is 0: there is no interaction to learn from", path=path)
    if data.tracks:
        with _step("read tracks"):
            tracks = io.read_tracks(Path(data.tracks), interactions)
    min_user, min_track = max(data.k_core, 1), max(data.k_core, data.min_track_users, 1)
    if min_track > 1 or min_user > 1:
        before = len(interactions)
        with _step("filter"):
            keep = k_core_mask(interactions, min_user, min_track, unique_pairs=True)
            interactions = take_rows(interactions, keep)  # empties the unfiltered frame
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
    with _step("split"):
        labels = holdout_labels(
            interactions,
            val_fraction=split.final_val_fraction if final else split.val_fraction,
            test_fraction=0.0 if final else split.test_fraction,
            min_user_interactions=split.min_user_interactions,
            seed=split.seed,
        )
    if not final and not (labels == TEST).any():
        raise DataError(
            f"no user has the {split.min_user_interactions} interactions needed to hold some out "
            f"for testing ({len(interactions)} interactions in all); lower "
            "split.min_user_interactions or provide more data",
            path=path,
        )
    with _step("fingerprint"):
        digest = fingerprint(interactions)
    with _step("encode"):
        encoded = encode_labelled(interactions, labels)
    return Prepared(
        interactions=interactions,
        tracks=tracks,
        labels=labels,
        encoded=encoded,
        fingerprint=digest,
        source=str(path),
        track_artist=track_artist_index(encoded.track_ids, tracks),
        final=final,
    )
