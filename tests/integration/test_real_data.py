"""The smoke configuration on samples of the real datasets in ../shared/data beats popularity.

Under CI=true a missing ../shared/data fails these tests (see the ``shared_data`` fixture).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tracktower.training import evaluate, stages
from tracktower.training.baselines.popular import Popularity
from tracktower.training.baselines.runner import evaluate_recommender
from tracktower.training.config import load_config
from tracktower.training.data import prepare
from tracktower.training.train import fit

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _beats_popularity(interactions: Path, tracks: Path, *overrides: str) -> tuple[float, float]:
    cfg = load_config(
        SMOKE, [f"data.interactions={interactions}", f"data.tracks={tracks}", *overrides]
    )
    data = prepare(cfg.data, cfg.split)
    enc = data.encoded
    result = fit(cfg, enc, data.track_artist)
    held = stages.heldout(enc)  # one exclusion set for both systems
    model = evaluate.evaluate_model(
        result.model, result.known, held.truth, held.unknown, cfg.eval.ks, exclude=held.exclude
    )["recall_at_20"]
    popular = evaluate_recommender(
        Popularity().fit(enc.train), held.truth, held.unknown, [20], exclude=held.exclude
    )["recall_at_20"]
    return model, popular


def test_mpd_sample_beats_popularity(shared_data: Path, tmp_path: Path):
    mpd = shared_data / "mpd-subset"
    frame = pd.read_parquet(mpd / "interactions.parquet")
    users = frame["user_id"].drop_duplicates()
    keep = users.sample(n=1500, random_state=0)
    frame[frame["user_id"].isin(keep)].to_parquet(tmp_path / "sample.parquet")
    model, popular = _beats_popularity(
        tmp_path / "sample.parquet", mpd / "tracks.parquet", "data.k_core=3"
    )
    assert np.isfinite(model)
    assert model > 1.2 * popular, (model, popular)


def test_msd_sample_with_play_counts_beats_popularity(shared_data: Path):
    msd = shared_data / "msd-sample"
    model, popular = _beats_popularity(
        msd / "interactions.parquet", msd / "tracks.parquet", "train.weighting=log1p"
    )
    assert model > 1.2 * popular, (model, popular)
