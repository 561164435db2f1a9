"""Synthetic data: seeded, realistic in shape, and learnable well beyond popularity (no TF here)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tracktower.features import dataset, io, ranking, split, synth
from tracktower.features.errors import DataError
from tracktower.training.metrics import ranking_metrics

Generated = tuple[pd.DataFrame, pd.DataFrame, float]


@pytest.fixture(scope="module")
def default_data() -> Generated:
    start = time.perf_counter()
    interactions, tracks = synth.generate()
    return interactions, tracks, time.perf_counter() - start


def test_same_seed_same_frames_other_seed_other_frames() -> None:
    a = synth.generate(users=200, tracks=400, seed=7)
    b = synth.generate(users=200, tracks=400, seed=7)
    c = synth.generate(users=200, tracks=400, seed=8)
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert not a[0].equals(c[0])


def test_default_size_is_canonical(
    default_data: Generated,
) -> None:
    interactions, tracks, _ = default_data
    assert list(interactions.columns) == ["user_id", "track_id", "weight", "timestamp"]
    assert interactions["weight"].dtype == np.float64 and (interactions["weight"] >= 1).all()
    assert interactions["timestamp"].dtype == np.int64
    assert not interactions.duplicated(["user_id", "track_id"]).any()
    assert interactions["user_id"].nunique() == 2000
    assert len(tracks) == 5000 and tracks["track_id"].is_unique
    assert {"title", "artist", "album", "genre", "year", "duration_ms"} <= set(tracks.columns)
    assert tracks["title"].str.len().min() > 0


def test_structure_is_realistic(default_data: Generated) -> None:
    interactions, tracks, _ = default_data
    per_user = interactions.groupby("user_id").size()
    assert (per_user >= 10).mean() > 0.8  # most users are usable for training and evaluation
    assert per_user.max() > 4 * per_user.median()  # long-tailed activity
    per_track = interactions.groupby("track_id").size().sort_values(ascending=False)
    top_share = per_track.iloc[: len(per_track) // 100].sum() / per_track.sum()
    assert top_share > 0.08  # the top 1 % of tracks draw a clearly outsized share
    assert tracks.groupby("artist").size().median() >= 4  # artists have several tracks
    assert tracks.groupby("artist")["genre"].nunique().max() == 1
    # Users concentrate on one or two genres.
    genre = interactions["track_id"].map(tracks.set_index("track_id")["genre"])
    counts = interactions.assign(genre=genre).groupby(["user_id", "genre"]).size()
    ranked = counts.sort_values(ascending=False).groupby(level=0).head(2)
    top2 = ranked.groupby(level=0).sum() / per_user
    assert top2.mean() > 0.8
    assert interactions["weight"].max() > 10  # play counts are long-tailed too


def test_written_files_read_back_identically(tmp_path: Path) -> None:
    paths = synth.write(tmp_path / "synth", users=100, tracks=300, seed=1)
    interactions, tracks = synth.generate(users=100, tracks=300, seed=1)
    read = io.read_interactions(paths[0])
    assert dataset.fingerprint(read) == dataset.fingerprint(interactions)
    assert len(io.read_tracks(paths[1], read)) == len(tracks)


def test_cluster_signal_beats_popularity(
    default_data: Generated,
) -> None:
    """Item-item co-occurrence learned from train must reach >= 2.5x popularity's Recall@20."""
    interactions, _, _ = default_data
    enc = dataset.encode(split.holdout(interactions, seed=0))
    users = np.flatnonzero(np.diff(enc.test.indptr) + enc.test_unknown > 0)
    seen = sp.csr_matrix(enc.train, copy=True)
    seen.data[:] = 1.0

    pop = dataset.popularity(enc.train).astype(np.float32)
    pop_top, _ = ranking.top_k(np.tile(pop, (len(users), 1)), 20, enc.train, users)
    co = (seen.T @ seen).toarray().astype(np.float32)
    norm = np.sqrt(np.maximum(np.diag(co), 1.0))
    np.fill_diagonal(co, 0.0)
    item_sim = co / norm[:, None] / norm[None, :]  # cosine item-item similarity
    ii_top, _ = ranking.top_k(np.asarray(seen[users] @ item_sim), 20, enc.train, users)

    truth, unknown = enc.test[users], enc.test_unknown[users]
    pop_recall = ranking_metrics(pop_top, truth, unknown, (20,))["recall_at_20"]
    ii_recall = ranking_metrics(ii_top, truth, unknown, (20,))["recall_at_20"]
    assert pop_recall > 0.03, "popularity should remain a fair baseline"
    assert ii_recall >= 2.5 * pop_recall, (ii_recall, pop_recall)


def test_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="tracks"):
        synth.generate(users=10, tracks=1)


def test_sharded_writer_is_seeded_readable_and_structured(tmp_path: Path) -> None:
    kwargs = {"users": 900, "tracks": 2000, "seed": 4, "chunk_users": 400}
    done = synth.write_sharded(tmp_path / "a", **kwargs)
    again = synth.write_sharded(tmp_path / "b", **kwargs)
    shards = sorted(p.name for p in done.interactions.iterdir())
    assert shards == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert done.shards == 3 and done.users == 900 and done.catalogue == 2000
    read = io.read_interactions(done.interactions)
    assert len(read) == done.rows  # each user's repeats merged in its own shard: nothing left
    assert read["user_id"].nunique() == 900 and read["track_id"].nunique() == done.tracks_heard
    assert dataset.fingerprint(read) == dataset.fingerprint(
        io.read_interactions(again.interactions)
    )
    tracks = io.read_tracks(done.tracks, read)
    assert len(tracks) == 2000 and {"artist", "genre"} <= set(tracks.columns)
    per_user = read.groupby("user_id", observed=True).size()
    assert per_user.min() >= 1 and per_user.max() > 4 * per_user.median()
    genre = read["track_id"].map(tracks.set_index("track_id")["genre"]).astype("str")
    counts = read.assign(genre=genre).groupby(["user_id", "genre"], observed=True).size()
    top2 = counts.sort_values(ascending=False).groupby(level=0).head(2).groupby(level=0).sum()
    assert (top2 / per_user).mean() > 0.8  # the generator's taste clusters, as in generate()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["interactions", "tracks.parquet"]


def test_sharded_writer_replaces_output_and_clears_dead_staging(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    stale = tmp_path / f".synth-{dead}-00000000.partial" / "interactions"
    stale.mkdir(parents=True)
    synth.write_sharded(tmp_path, users=50, tracks=100, seed=1)
    first = io.read_interactions(tmp_path / "interactions")
    assert not stale.parent.exists()
    synth.write_sharded(tmp_path, users=60, tracks=100, seed=1)
    assert io.read_interactions(tmp_path / "interactions")["user_id"].nunique() == 60
    assert len(first["user_id"].cat.categories) == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interactions", "tracks.parquet"]
    with pytest.raises(DataError):
        synth.write_sharded(tmp_path / "tracks.parquet", users=5, tracks=10)
