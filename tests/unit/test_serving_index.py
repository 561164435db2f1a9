"""Serving through the artifact's retrieval index: ANN against exact, the lazy bounded cache of
known users' lists, what runs off the event loop, and a bad index at start-up.

The integer-embedding artifacts make every score exact whatever kernel sums it and tie most of
them, so a ScaNN index forced onto a small catalogue and searched at full width (every leaf,
every candidate rescored) must rank bit for bit like exact search, through the over-fetch and
exact-fallback path that an approximate index takes for seen and excluded tracks.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from builders import brute_force, fake_arrays, seen_of, track_id, user_id, write_fake_artifact
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tracktower.features.errors import DataError
from tracktower.features.index import ScannIndex
from tracktower.serving.app import create_app
from tracktower.serving.artifact import Recommender, check_artifact
from tracktower.serving.cli import app as cli
from tracktower.serving.settings import Settings

USERS, TRACKS, DIM = 40, 300, 6
# Every leaf searched and every candidate rescored: ScaNN's answer must be the exact one.
FULL_WIDTH = {"num_leaves": 6, "leaves_to_search": 6, "reorder": TRACKS}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    common: dict[str, Any] = {"integer": True}
    exact = write_fake_artifact(root / "exact", USERS, TRACKS, DIM, True, **common)
    scann = write_fake_artifact(
        root / "scann",
        USERS,
        TRACKS,
        DIM,
        True,
        index_backend="scann",
        index_params=FULL_WIDTH,
        **common,
    )
    return exact, scann


@pytest.fixture(scope="module")
def approximate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ScaNN with its size-derived defaults (10% of the leaves): really approximate."""
    out = tmp_path_factory.mktemp("approx") / "artifact"
    return write_fake_artifact(out, USERS, TRACKS, DIM, False, index_backend="scann")


def _pairs(rec: Any) -> list[tuple[str, float]]:
    return [(item.track_id, item.score) for item in rec.items]


def _exclude_sets(user: int) -> list[list[str]]:
    """None; a few; more than the 256-track over-fetch (exact fallback); unknown ids."""
    rng = np.random.default_rng(user)
    return [
        [],
        [track_id(int(i)) for i in rng.choice(TRACKS, 5, replace=False)],
        [track_id(int(i)) for i in rng.choice(TRACKS, 280, replace=False)],
        ["no-such-track", track_id(3)],
    ]


def test_ann_forced_on_ranks_like_exact(pair: tuple[Path, Path]) -> None:
    exact, scann = Recommender.load(pair[0]), Recommender.load(pair[1])
    assert isinstance(scann.index, ScannIndex) and exact.index.backend == "exact"
    calls = {"fallback": 0}
    search = scann._exact.search

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["fallback"] += 1
        return search(*args, **kwargs)

    scann._exact.search = counted  # type: ignore[method-assign]
    arrays = fake_arrays(USERS, TRACKS, DIM, integer=True)
    for u in range(USERS):
        user = user_id(u)
        for excludes in _exclude_sets(u):
            for k in (1, 10, 50):
                got = scann.recommend(user, k, exclude_track_ids=excludes)
                assert _pairs(got) == _pairs(exact.recommend(user, k, exclude_track_ids=excludes))
            skip = seen_of(arrays, u) | {int(t[1:]) for t in excludes if t[1:].isdigit()}
            want = brute_force(arrays, arrays["user_embeddings"][u], 50, skip)
            assert [item.track_id for item in got.items] == want
    assert calls["fallback"] > 0  # the 280-track excludes went past the over-fetch


def test_ann_session_and_batch_rank_like_exact(pair: tuple[Path, Path]) -> None:
    exact, scann = Recommender.load(pair[0]), Recommender.load(pair[1])
    for recent in (["t000003", "t000004"], [track_id(i) for i in range(0, 280, 7)]):
        a = scann.recommend("stranger", 20, recent_track_ids=recent)
        assert a.source == "session" and _pairs(a) == _pairs(
            exact.recommend("stranger", 20, recent_track_ids=recent)
        )
    users = [user_id(3), "stranger", user_id(0), user_id(3), user_id(39)]
    for k in (1, 10, 400):
        a, b = scann.top_k_batch(users, k), exact.top_k_batch(users, k)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
        assert scann.recommend_batch(users, k) == [scann.recommend(user, k) for user in users]


def test_approximate_results_are_exact_scores_without_excluded_tracks(approximate: Path) -> None:
    rec = Recommender.load(approximate)
    arrays = fake_arrays(USERS, TRACKS, DIM)
    assert rec.index.params["leaves_to_search"] < rec.index.params["num_leaves"]
    for u in range(USERS):
        excludes = _exclude_sets(u)[1]
        got = rec.recommend(user_id(u), 30, exclude_track_ids=excludes)
        rows = [int(item.track_id[1:]) for item in got.items]
        assert len(rows) == 30 and not set(rows) & (
            seen_of(arrays, u) | {int(t[1:]) for t in excludes}
        )
        scores = [item.score for item in got.items]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(
            scores, arrays["track_embeddings"][rows] @ arrays["user_embeddings"][u], rtol=1e-5
        )
    # A batch over-fetches by its largest exclusion count, so an approximate index may return
    # other (equally exact-scored) candidates than for the user alone; seen tracks never.
    users = [user_id(u) for u in range(USERS)]
    for u, rec_u in enumerate(rec.recommend_batch(users, 10)):
        rows = {int(item.track_id[1:]) for item in rec_u.items}
        assert len(rows) == 10 and not rows & seen_of(arrays, u)


@pytest.mark.parametrize("which", [0, 1])
def test_cache_is_lazy_bounded_and_changes_nothing(pair: tuple[Path, Path], which: int) -> None:
    plain = Recommender.load(pair[which])
    cached = Recommender.load(pair[which], cache_users=5, cache_width=20)
    assert (cached.cache_width, cached.cached_users) == (20, 0)  # nothing ranked at load
    for u in range(12):
        user = user_id(u)
        assert cached.cached(user, 10) is None
        for excludes in _exclude_sets(u):
            for k in (1, 10, 20, 21):
                got = cached.recommend(user, k, exclude_track_ids=excludes)
                assert _pairs(got) == _pairs(plain.recommend(user, k, exclude_track_ids=excludes))
        assert cached.cached(user, 10) == plain.recommend(user, 10)
        assert cached.cached(user, 21) is None and cached.cached("stranger", 1) is None
        assert cached.cached_users == min(u + 1, 5)
    assert cached.cached(user_id(0), 5) is None  # least recently used: evicted
    users = [user_id(u) for u in range(USERS)]
    assert cached.recommend_batch(users, 10) == [plain.recommend(u, 10) for u in users]


def test_known_cache_users_setting_and_model_index(pair: tuple[Path, Path]) -> None:
    settings = Settings(model_uri=str(pair[1]), max_k=30, known_cache_users=3)
    with TestClient(create_app(settings)) as client:
        rec: Recommender = client.app.state.recommender  # type: ignore[attr-defined]
        assert (rec.cache_width, rec.cached_users) == (30, 0)
        first = client.get(f"/v1/users/{user_id(7)}/recommendations", params={"k": 5}).json()
        assert rec.cached_users == 1
        again = client.get(f"/v1/users/{user_id(7)}/recommendations", params={"k": 5}).json()
        assert first == again
        for u in range(10):
            client.get(f"/v1/users/{user_id(u)}/recommendations")
        assert rec.cached_users == 3
        index = client.get("/v1/model").json()["index"]
    info = json.loads((pair[1] / "manifest.json").read_text())["index"]
    assert index == info and index["backend"] == "scann"
    assert index["params"]["leaves_to_search"] == 6 and index["recall_at_100"] == 1.0
    assert set(index) == {
        "backend",
        "params",
        "recall_at_10",
        "recall_at_100",
        "build_seconds",
        "sample_users",
    }


def test_scoring_requests_run_off_the_event_loop(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions, excludes and cache misses are searched in a worker thread, a cache hit is not."""
    rec = Recommender.load(pair[0])
    where: list[bool] = []
    recommend, recommend_many, cached = rec.recommend, rec.recommend_many, rec.cached

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def spy(*args: Any, **kwargs: Any) -> Any:
        where.append(on_loop())
        return recommend(*args, **kwargs)

    def spy_many(*args: Any, **kwargs: Any) -> Any:  # POSTs, through the coalescer
        where.append(on_loop())
        return recommend_many(*args, **kwargs)

    monkeypatch.setattr(rec, "recommend", spy)
    monkeypatch.setattr(rec, "recommend_many", spy_many)
    with TestClient(create_app(Settings(model_uri="unused", max_k=20), recommender=rec)) as c:
        c.post("/v1/recommendations", json={"user_id": "new", "recent_track_ids": ["t000001"]})
        c.post("/v1/recommendations", json={"user_id": user_id(1), "exclude_track_ids": ["t1"]})
        c.get(f"/v1/users/{user_id(2)}/recommendations")  # miss: searched in a thread
        assert where == [False] * 4  # 2 POSTs; the GET's recommend, which calls recommend_many
        assert c.get(f"/v1/users/{user_id(2)}/recommendations").status_code == 200
        assert where == [False] * 4  # the hit never reached recommend
        assert cached(user_id(2), 10) is not None


BROKEN = [
    ("missing dir", "index/ is missing"),
    ("truncated", "unreadable ScaNN index"),
    ("dim", "index built for dim 9, the artifact has 6"),
    ("tracks", f"index built for num_tracks {TRACKS - 1}, the artifact has {TRACKS}"),
    ("version", "index format_version 99"),
]


def _break(src: Path, dst: Path, edit: str) -> Path:
    path = Path(shutil.copytree(src, dst))
    index_dir = path / "index"
    meta = index_dir / "tracktower_index.json"
    if edit == "missing dir":
        shutil.rmtree(index_dir)
    elif edit == "truncated":
        hashed = index_dir / "hashed_dataset.npy"
        hashed.write_bytes(hashed.read_bytes()[: hashed.stat().st_size // 2])
    else:
        key, value = {
            "dim": ("dim", 9),
            "tracks": ("num_tracks", TRACKS - 1),
            "version": ("format_version", 99),
        }[edit]
        meta.write_text(json.dumps({**json.loads(meta.read_text()), key: value}))
    return path


@pytest.mark.parametrize(("edit", "match"), BROKEN)
def test_bad_index_fails_start_up_in_one_line(
    approximate: Path, tmp_path: Path, edit: str, match: str
) -> None:
    path = _break(approximate, tmp_path / "a", edit)
    for load in (Recommender.load, check_artifact):
        with pytest.raises(DataError, match=match) as info:
            load(path)
        assert "\n" not in str(info.value)
    # The server never becomes ready; uvicorn gets the one line, not a traceback.
    app = create_app(Settings(model_uri=str(path)))
    messages: list[dict[str, Any]] = []

    async def start() -> None:
        inbox = [{"type": "lifespan.startup"}]

        async def receive() -> dict[str, Any]:
            return inbox.pop(0)

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        with pytest.raises(DataError, match=match):
            await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    anyio.run(start)
    failed = [m for m in messages if m["type"] == "lifespan.startup.failed"]
    assert len(failed) == 1 and failed[0]["message"].startswith("error: cannot load model: ")
    assert "\n" not in failed[0]["message"] and "Traceback" not in failed[0]["message"]
    assert app.state.recommender is None
    # `tracktower recommend` (batch scoring) says the same: one error line, exit 2.
    users = tmp_path / "users.txt"
    users.write_text("u00001\n")
    args = ["recommend", "--model", str(path), "--users", str(users)]
    result = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_lists_precomputed_at_export_answer_like_a_search(tmp_path: Path, backend: str) -> None:
    """Known users' lists stored in the artifact give what searching them would: single
    requests (cache hits, excludes, k past the lists), batches, and /v1 answers on the event
    loop; the approximate index included (its over-fetch width does not depend on the batch)."""
    common: dict[str, Any] = {"index_backend": backend, "integer": True}  # exact sums
    plain = Recommender.load(
        write_fake_artifact(tmp_path / "a", USERS, TRACKS, DIM, False, **common)
    )
    lists = Recommender.load(
        write_fake_artifact(tmp_path / "b", USERS, TRACKS, DIM, False, known_top_k=60, **common)
    )
    plain.configure_cache(USERS, 60)
    lists.configure_cache(0, 0)  # no cache at all: the stored lists alone
    assert lists.manifest.known_top_k == 60 and plain.manifest.known_top_k == 0
    users = [user_id(u) for u in range(USERS)]
    for k in (1, 10, 60, 61):
        # ScaNN answers a batch of one through another code path than a larger batch, which
        # on this tiny catalogue can pick other leaves (on real data they agree): the stored
        # lists were searched in batches, so single requests are compared on the exact index.
        for user in users if backend == "exact" else []:
            for excludes in _exclude_sets(int(user[1:]))[:2]:
                want = plain.recommend(user, k, exclude_track_ids=excludes)
                assert lists.recommend(user, k, exclude_track_ids=excludes) == want
        assert lists.recommend_batch([*users, "stranger"], k) == plain.recommend_batch(
            [*users, "stranger"], k
        )
    hit = lists.cached(users[0], 10)
    assert hit is not None and hit == plain.recommend_batch(users[:2], 10)[0]
    assert lists.cached(users[0], 61) is None and lists.cached("stranger", 10) is None
