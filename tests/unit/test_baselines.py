"""Baselines, the k-core filter, the baseline runner's MLflow logging and the baseline CLI."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tracktower.features.errors import DataError
from tracktower.training.baselines import Recommender, make_recommender
from tracktower.training.baselines.ease import EASE
from tracktower.training.baselines.ials import IALS
from tracktower.training.baselines.popular import Popularity
from tracktower.training.filters import k_core


def _random_binary(users: int, items: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((users, items)) < density).astype(np.float32)
    return sp.csr_matrix(dense)


def test_ease_matches_closed_form() -> None:
    x = _random_binary(60, 25, 0.2, seed=1)
    lam = 7.0
    model = EASE(lam, block=8).fit(x)  # block < n exercises the block-wise Gram and mirroring
    dense = x.toarray().astype(np.float64)
    p = np.linalg.inv(dense.T @ dense + lam * np.eye(25))
    expected = -p / np.diag(p)[np.newaxis, :]
    np.fill_diagonal(expected, 0.0)
    assert model.weights is not None
    np.testing.assert_allclose(model.weights, expected, atol=1e-5)
    rows = np.array([0, 3, 59])
    scores = model.score(rows)
    assert scores.dtype == np.float32 and scores.shape == (3, 25)
    np.testing.assert_allclose(scores, dense[rows] @ expected, atol=1e-4)
    assert isinstance(model, Recommender)


def test_ease_recovers_co_occurrence() -> None:
    # Items 0 and 1 always appear together; item 2..5 are noise.
    rows = [[0, 1, 2], [0, 1, 3], [0, 1, 4], [0, 1, 5], [0, 1], [2, 3], [4, 5], [0]]
    x = sp.lil_matrix((len(rows), 6), dtype=np.float32)
    for u, items in enumerate(rows):
        x[u, items] = 1.0
    model = EASE(1.0).fit(x.tocsr())
    scores = model.score(np.array([7]))[0]  # the user who only has item 0
    scores[0] = -np.inf
    assert int(np.argmax(scores)) == 1


def test_ease_refuses_above_item_cap() -> None:
    with pytest.raises(DataError, match=r"max_items=10.*k-core"):
        EASE(10.0, max_items=10).fit(_random_binary(5, 11, 0.5, seed=0))


def test_popularity_counts_distinct_users() -> None:
    x = sp.csr_matrix(np.array([[5.0, 0, 1], [1, 0, 0], [0, 0, 3]], dtype=np.float32))
    model = Popularity().fit(x)
    scores = model.score(np.array([0, 2]))
    np.testing.assert_array_equal(scores, [[2, 0, 2], [2, 0, 2]])
    assert scores.dtype == np.float32


def _clustered(seed: int = 0) -> SimpleNamespace:
    """Two taste clusters; cluster A is larger so popularity favours A's items for everyone."""
    rng = np.random.default_rng(seed)
    users_a, users_b, items_per = 40, 20, 15
    n_items = 2 * items_per
    train = np.zeros((users_a + users_b, n_items), np.float32)
    test = np.zeros_like(train)
    for u in range(users_a + users_b):
        base = 0 if u < users_a else items_per
        picks = base + rng.choice(items_per, size=8, replace=False)
        train[u, picks[:6]] = 1.0
        test[u, picks[6:]] = 1.0
    return SimpleNamespace(
        train=sp.csr_matrix(train),
        test=sp.csr_matrix(test),
        test_unknown=np.zeros(users_a + users_b, np.int64),
        val=sp.csr_matrix(test.shape, dtype=np.float32),
        val_unknown=np.zeros(users_a + users_b, np.int64),
    )


def test_ials_beats_popularity_on_clusters() -> None:
    from tracktower.training.baselines.runner import evaluate_recommender

    enc = _clustered()
    ks = (5, 10, 20)
    pop = evaluate_recommender(Popularity().fit(enc.train), enc, "test", ks)
    ials = IALS(factors=8, regularization=0.1, alpha=10.0, iterations=10, num_threads=1)
    als = evaluate_recommender(ials.fit(enc.train), enc, "test", ks)
    assert als["ndcg_at_10"] > pop["ndcg_at_10"] + 0.1
    assert als["recall_at_10"] >= pop["recall_at_10"]


def test_ials_confidence_scaling() -> None:
    x = sp.csr_matrix(np.array([[0.0, 3.0], [1.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(IALS(alpha=2.0).confidence(x).data, [7.0, 3.0])
    log = IALS(alpha=2.0, scaling="log", eps=1.0).confidence(x).data
    np.testing.assert_allclose(log, 1 + 2 * np.log1p([3.0, 1.0]), rtol=1e-6)


def test_ials_pins_blas_to_one_thread_in_a_fresh_process() -> None:
    """threadpoolctl only limits loaded libraries; implicit loads scipy's OpenBLAS on import.

    Entering the limit before that import left BLAS multi-threaded under implicit's OpenMP pool
    (minutes instead of seconds per fit). A fresh process is needed: in this one scipy.linalg is
    long loaded. implicit's own warning fires when BLAS has more than one thread.
    """
    import subprocess
    import sys

    code = (
        "import warnings, numpy as np, scipy.sparse as sp\n"
        "warnings.simplefilter('error', RuntimeWarning)\n"
        "from tracktower.training.baselines.ials import IALS\n"
        "x = sp.random(50, 40, density=0.2, format='csr', dtype=np.float32, random_state=0)\n"
        "IALS(factors=4, iterations=2).fit(x)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env["OPENBLAS_NUM_THREADS"] = "2"  # what an unconfigured multi-core machine would use
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_make_recommender_rejects_unknown() -> None:
    with pytest.raises(DataError, match="unknown baseline"):
        make_recommender("svd")


def _k_core_reference(df: pd.DataFrame, min_user: int, min_track: int) -> pd.DataFrame:
    while True:
        users = df.groupby("user_id")["track_id"].nunique()
        tracks = df.groupby("track_id")["user_id"].nunique()
        keep = df["user_id"].map(users).ge(min_user) & df["track_id"].map(tracks).ge(min_track)
        if keep.all():
            return df.reset_index(drop=True)
        df = df[keep]


def test_k_core_matches_loop_reference() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    df = pd.DataFrame(
        {
            "user_id": rng.zipf(1.6, n).astype(str),
            "track_id": rng.zipf(1.4, n).astype(str),
            "weight": 1.0,
        }
    )
    df = df.drop_duplicates(["user_id", "track_id"]).reset_index(drop=True)
    for mu, mt in [(2, 2), (3, 5), (5, 3)]:
        got = k_core(df, mu, mt)
        expected = _k_core_reference(df, mu, mt)
        pd.testing.assert_frame_equal(got, expected)
        assert len(got) > 0


def test_k_core_iterates_until_stable() -> None:
    # One pass drops track t3 (1 user); that leaves u2 with 1 track, so u2 goes, then t2 too.
    df = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3", "u3", "u4", "u4"],
            "track_id": ["t1", "t2", "t2", "t3", "t1", "t4", "t1", "t4"],
        }
    )
    out = k_core(df, 2, 2)
    assert set(out["user_id"]) == {"u3", "u4"}
    assert set(out["track_id"]) == {"t1", "t4"}
    pd.testing.assert_frame_equal(out, _k_core_reference(df, 2, 2))


def test_k_core_counts_distinct_pairs_and_validates() -> None:
    df = pd.DataFrame({"user_id": ["a", "a", "a"], "track_id": ["x", "x", "y"]})
    assert len(k_core(df, 3, 1)) == 0  # two distinct tracks only, despite three rows
    with pytest.raises(DataError):
        k_core(df, 0, 1)


def test_min_track_users_prunes_tracks_but_keeps_light_users(tmp_path) -> None:
    from tracktower.training.config import DataConfig, SplitConfig
    from tracktower.training.data import prepare

    rows = [(f"u{u}", f"hit{t}", 1.0) for u in range(8) for t in range(6)]
    rows += [("light", "hit0", 1.0), ("light", "hit1", 1.0), ("light", "rare", 1.0)]
    rows += [("u0", "rare", 1.0), ("solo", "rare2", 1.0)]
    src = tmp_path / "i.parquet"
    pd.DataFrame(rows, columns=["user_id", "track_id", "weight"]).to_parquet(src)
    split = SplitConfig(val_fraction=0.0, test_fraction=0.2)
    data = prepare(DataConfig(interactions=src, min_track_users=3), split)
    kept = data.interactions
    assert set(kept["track_id"]) == {f"hit{t}" for t in range(6)}  # rare tracks gone
    # "light" has 2 tracks left, below any 5-core, and keeps them; "solo" had only a rare track
    assert sorted(kept.loc[kept["user_id"] == "light", "track_id"]) == ["hit0", "hit1"]
    assert "solo" not in set(kept["user_id"])
    with pytest.raises(DataError, match="min_track_users"):
        prepare(DataConfig(interactions=src, min_track_users=50), split)


def _synthetic_interactions(path, users: int = 60, tracks: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = [
        (f"u{u}", f"t{t}", 1.0)
        for u in range(users)
        for t in rng.choice(tracks, size=12, replace=False)
    ]
    pd.DataFrame(rows, columns=["user_id", "track_id", "weight"]).to_parquet(path)


def test_runner_logs_each_grid_point(tmp_path, monkeypatch) -> None:
    import mlflow

    from tracktower.training.baselines.runner import run_baseline
    from tracktower.training.config import DataConfig, SplitConfig
    from tracktower.training.data import prepare

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = tmp_path / "interactions.parquet"
    _synthetic_interactions(src)
    data = prepare(DataConfig(interactions=src), SplitConfig(val_fraction=0.0, test_fraction=0.2))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_baseline(
        "ease",
        data,
        [{"l2": 10.0}, {"l2": 100.0}],
        experiment="baselines-test",
        tracking_uri=uri,
        params={"split": {"seed": 0}},
    )
    assert len(out.results) == 2
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("baselines-test")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["ease λ=10", "ease λ=100"]
    for run in runs:
        metrics = run.data.metrics
        for name in ("recall_at_10", "recall_at_20", "recall_at_50", "recall_at_100"):
            assert f"test_{name}" in metrics
        assert {"test_ndcg_at_10", "test_ndcg_at_100", "fit_seconds"} <= set(metrics)
        assert run.data.params["model"] == "ease"
        assert run.data.params["dataset.fingerprint"] == data.fingerprint
        assert run.data.params["split.seed"] == "0"
        assert run.data.tags["system"] == "ease"
        assert run.info.status == "FINISHED"
    best = [r for r in runs if r.data.tags.get("sweep.best") == "true"]
    assert [r.info.run_id for r in best] == [out.best.run_id]

    # A too-large EASE is refused before any run is started, not as a FAILED run.
    with pytest.raises(DataError, match="max_items"):
        run_baseline(
            "ease",
            data,
            [{"l2": 10.0, "max_items": 5}],
            experiment="baselines-test",
            tracking_uri=uri,
        )
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_baseline_cli_exit_2_on_bad_input(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from tracktower.training.baselines.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    missing = runner.invoke(app, ["--model", "ease", "--interactions", str(tmp_path / "no.csv")])
    assert missing.exit_code == 2
    assert "error:" in missing.stderr and "no.csv" in missing.stderr
    bad_model = runner.invoke(app, ["--model", "svd", "--interactions", "x.csv"])
    assert bad_model.exit_code == 2
    src = tmp_path / "i.parquet"
    _synthetic_interactions(src)
    bad_fraction = runner.invoke(
        app, ["--model", "popular", "--interactions", str(src), "--test-fraction", "1.5"]
    )
    assert bad_fraction.exit_code == 2
    assert "test_fraction" in bad_fraction.stderr
