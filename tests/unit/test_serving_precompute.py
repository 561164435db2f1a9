"""Precomputed known-user lists must rank exactly like scoring every request from scratch.

The integer-embedding artifacts make every score exact whatever BLAS kernel sums it and tie most
of them, so precomputed (matrix-matrix, at load) and per-request (matrix-vector) results can be
compared bit for bit, tie-break included. The Gaussian artifact checks the realistic case, where
the two kernels may round the last bit differently: same tracks, scores equal to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builders import (
    brute_force,
    cached_artifact,
    fake_arrays,
    seen_of,
    track_id,
    user_id,
    write_fake_artifact,
)
from fastapi.testclient import TestClient

from tracktower.serving.app import create_app
from tracktower.serving.artifact import Recommendation, Recommender
from tracktower.serving.settings import Settings

USERS, TRACKS, DIM, WIDTH = 60, 80, 4, 12


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tied") / "artifact"
    return write_fake_artifact(out, USERS, TRACKS, DIM, with_history_tower=False, integer=True)


class Counting:
    """Wraps ``Recommender._score`` (the per-request path) to count how often it runs."""

    def __init__(self, rec: Recommender, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        score = rec._score

        def counted(*args: Any, **kwargs: Any) -> Recommendation:
            self.calls += 1
            return score(*args, **kwargs)

        monkeypatch.setattr(rec, "_score", counted)


def _exclude_sets(full: Recommender, user: str, rng: np.random.Generator) -> Iterator[list[str]]:
    """No excludes; a few from the top; enough to exhaust the precomputed row; random ids."""
    ranked = [item.track_id for item in full.recommend(user, WIDTH + 5).items]
    yield []
    yield [ranked[0], ranked[3], "no-such-track"]
    yield ranked[: WIDTH - 2]  # drops most of the row: k > 2 falls back to full scoring
    yield [track_id(int(i)) for i in rng.choice(TRACKS, size=10, replace=False)]


def test_tied_scores_are_identical(tied: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pre = Recommender.load(tied, precompute_k=WIDTH)
    full = Recommender.load(tied)
    assert (pre.precomputed_k, full.precomputed_k) == (WIDTH, 0)
    fallback = Counting(pre, monkeypatch)
    arrays = fake_arrays(USERS, TRACKS, DIM, integer=True)
    rng = np.random.default_rng(7)
    served = 0
    for u in range(USERS):
        user = user_id(u)
        for excludes in _exclude_sets(full, user, rng):
            for k in (1, 3, 10, WIDTH):
                got = pre.recommend(user, k, exclude_track_ids=excludes)
                assert got == full.recommend(user, k, exclude_track_ids=excludes), (u, k, excludes)
                served += 1
        excluded = seen_of(arrays, u) | {int(t[1:]) for t in excludes if t.startswith("t")}
        expected = brute_force(arrays, arrays["user_embeddings"][u], WIDTH, excluded)
        assert [item.track_id for item in got.items] == expected  # ties by lower index
        recent = [pre.recommend(user, 2).items[0].track_id]
        assert pre.recommend(user, 5, recent_track_ids=recent) == full.recommend(
            user, 5, recent_track_ids=recent
        )
    assert 0 < fallback.calls < served / 2  # both paths ran, the precomputed one mostly
    scores = [item.score for item in pre.recommend(user_id(0), WIDTH).items]
    assert len(set(scores)) < len(scores)  # the fixture really has ties


def test_k_above_the_precomputed_width_scores_in_full(
    tied: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pre = Recommender.load(tied, precompute_k=WIDTH)
    fallback = Counting(pre, monkeypatch)
    full = Recommender.load(tied)
    assert pre.recommend(user_id(5), WIDTH + 1) == full.recommend(user_id(5), WIDTH + 1)
    assert fallback.calls == 1


def test_batch_slices_the_precomputed_lists(tied: Path) -> None:
    pre = Recommender.load(tied, precompute_k=WIDTH)
    full = Recommender.load(tied)
    users = [user_id(3), "stranger", user_id(0), user_id(3), user_id(59)]
    for k in (1, WIDTH, WIDTH + 4):
        a, b = pre.top_k_batch(users, k), full.top_k_batch(users, k)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
        assert pre.recommend_batch(users, k) == [pre.recommend(user, k) for user in users]


def test_small_catalogue_rows_that_hold_every_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row ending in -1 already lists all a user's candidates: excludes never need a rescore."""
    path = write_fake_artifact(tmp_path / "a", 30, 8, 3, with_history_tower=False, integer=True)
    pre = Recommender.load(path, precompute_k=6)
    full = Recommender.load(path)
    fallback = Counting(pre, monkeypatch)
    complete = 0
    for u in range(30):
        user = user_id(u)
        complete += int(pre._pre_indices[u, -1] < 0)
        for excludes in ([], [track_id(0), track_id(1)], [track_id(i) for i in range(5)]):
            for k in (1, 4, 6, 50):
                got = pre.recommend(user, k, exclude_track_ids=excludes)
                assert got == full.recommend(user, k, exclude_track_ids=excludes)
    assert complete > 0
    # k=50 > 6 columns is scored per request; everything else came from the rows.
    assert fallback.calls <= 30 * 3 + sum(int(pre._pre_indices[u, -1] >= 0) for u in range(30)) * 3


def test_gaussian_embeddings_rank_identically(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = cached_artifact(tmp_path_factory)  # 50 users x 200 tracks x 8 dims
    pre = Recommender.load(path, precompute_k=30)
    full = Recommender.load(path)
    for u in range(50):
        user = user_id(u)
        top = [item.track_id for item in full.recommend(user, 30).items]
        for excludes in ([], top[:3], top[:25]):
            for k in (1, 10, 30):
                a = pre.recommend(user, k, exclude_track_ids=excludes)
                b = full.recommend(user, k, exclude_track_ids=excludes)
                assert [i.track_id for i in a.items] == [i.track_id for i in b.items]
                np.testing.assert_allclose(
                    [i.score for i in a.items], [i.score for i in b.items], rtol=1e-6, atol=1e-6
                )


def test_memory_budget_and_width(tied: Path) -> None:
    assert Recommender.load(tied, precompute_k=10, precompute_max_entries=USERS * 10).precomputed_k
    over = Recommender.load(tied, precompute_k=10, precompute_max_entries=USERS * 10 - 1)
    assert over.precomputed_k == 0
    assert over.recommend(user_id(1), 5) == Recommender.load(tied).recommend(user_id(1), 5)
    wide = Recommender.load(tied, precompute_k=1000)
    assert wide.precomputed_k == TRACKS
    assert wide._pre_indices.dtype == np.int32 and wide._pre_scores.dtype == np.float32
    assert wide._pre_indices.shape == (USERS, TRACKS)


@pytest.mark.parametrize("budget", [0, 50_000_000])
def test_server_precomputes_max_k_within_budget(tied: Path, budget: int) -> None:
    settings = Settings(model_uri=str(tied), max_k=WIDTH, precompute_max_entries=budget)
    full = Recommender.load(tied)
    with TestClient(create_app(settings)) as client:
        rec: Recommender = client.app.state.recommender  # type: ignore[attr-defined]
        assert rec.precomputed_k == (WIDTH if budget else 0)
        for u in (0, 17, 59):
            body = client.post(
                "/v1/recommendations",
                json={"user_id": user_id(u), "k": WIDTH, "exclude_track_ids": [track_id(u)]},
            ).json()
            expected = full.recommend(user_id(u), WIDTH, exclude_track_ids=[track_id(u)])
            assert [(i["track_id"], i["score"]) for i in body["items"]] == [
                (i.track_id, i.score) for i in expected.items
            ]


def test_injected_recommender_is_precomputed_at_startup(tied: Path) -> None:
    rec = Recommender.load(tied)
    rec.precompute(5)
    assert rec.precomputed_k == 5
    rec.precompute(3)  # narrower: kept as is
    assert rec.precomputed_k == 5
    settings = Settings(model_uri="unused", max_k=WIDTH)
    with TestClient(create_app(settings, recommender=rec)) as client:
        assert rec.precomputed_k == WIDTH
        body = client.get(f"/v1/users/{user_id(4)}/recommendations", params={"k": WIDTH}).json()
    expected = Recommender.load(tied).recommend(user_id(4), WIDTH)
    assert [i["track_id"] for i in body["items"]] == [i.track_id for i in expected.items]
