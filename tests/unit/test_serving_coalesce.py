"""Coalesced POST scoring: recommend_many answers as recommend does, the Coalescer batches
under load, keeps each answer with its request, and isolates failures."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

import numpy as np
import pytest
from builders import cached_artifact, track_id, user_id

from tracktower.serving.artifact import Item, Query, Recommendation, Recommender
from tracktower.serving.coalesce import Coalescer


def _mixed_queries() -> list[Query]:
    recent = [track_id(i) for i in (3, 17, 150, 151)]
    other = [track_id(i) for i in (40, 41, 42, 90, 91, 92)]
    return [
        Query("new-a", 10, (), recent),
        Query(user_id(1), 10),
        Query("new-b", 10, (), other),  # same k, another exclusion count: another search
        Query("new-c", 5, (track_id(7),), recent),  # another k
        Query(user_id(2), 200, (track_id(0),)),  # known, wider than any list: searched
        Query("stranger", 4, (track_id(0),)),  # popular
        Query("new-d", 10, (), ["unknown-track"]),  # nothing known: popular
        Query("new-e", 10, (), list(reversed(recent))),
    ]


def _same(a: Recommendation, b: Recommendation) -> None:
    assert a.source == b.source
    assert [i.track_id for i in a.items] == [i.track_id for i in b.items]
    np.testing.assert_allclose(
        [i.score for i in a.items], [i.score for i in b.items], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_recommend_many_answers_each_query_as_recommend_does(
    tmp_path_factory: pytest.TempPathFactory, backend: str
) -> None:
    n_tracks = 200 if backend == "exact" else 3000
    path = cached_artifact(
        tmp_path_factory, n_tracks=n_tracks, with_history_tower=True, index_backend=backend
    )
    rec = Recommender.load(path)
    queries = _mixed_queries()
    together = rec.recommend_many(queries)
    assert [r.source for r in together] == [
        "session",
        "model",
        "session",
        "session",
        "model",
        "popular",
        "popular",
        "session",
    ]
    for query, got in zip(queries, together, strict=True):
        _same(got, rec.recommend(*query))
        recent = set(query.recent_track_ids) | set(query.exclude_track_ids)
        assert not recent & {i.track_id for i in got.items}
    # The same session in another order pools to the same query.
    _same(together[0], together[-1])
    with pytest.raises(ValueError, match="k must be >= 1"):
        rec.recommend_many([Query("x", 0)])


class FakeRecommender:
    """Answers a query with one item naming the user; blocks while ``gate`` is clear."""

    def __init__(self, name: str, gate: threading.Event, fail_for: str = "") -> None:
        self.name, self.gate, self.fail_for = name, gate, fail_for
        self.calls: list[list[str]] = []

    def recommend_many(self, queries: list[Query]) -> list[Recommendation]:
        self.gate.wait(5)
        self.calls.append([q.user_id for q in queries])
        if any(q.user_id == self.fail_for for q in queries):
            raise RuntimeError(f"cannot answer {self.fail_for}")
        return [
            Recommendation([Item(f"{self.name}:{q.user_id}", float(q.k), None, None)], "model")
            for q in queries
        ]


def _as_rec(fake: FakeRecommender) -> Recommender:
    return cast(Recommender, fake)


async def _gather(coalescer: Coalescer, asks: list[tuple[FakeRecommender, str]]) -> list[Any]:
    tasks = [
        asyncio.create_task(coalescer.recommend(_as_rec(fake), Query(user, 3)))
        for fake, user in asks
    ]
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_requests_queued_behind_a_busy_slot_share_one_call() -> None:
    gate = threading.Event()
    fake = FakeRecommender("m1", gate)
    coalescer = Coalescer(max_batch=4, max_inflight=1)

    async def scenario() -> list[Any]:
        first = asyncio.create_task(coalescer.recommend(_as_rec(fake), Query("u0", 3)))
        await asyncio.sleep(0.05)  # u0's job is now in its thread, waiting on the gate
        rest = asyncio.create_task(_gather(coalescer, [(fake, f"u{i}") for i in range(1, 10)]))
        await asyncio.sleep(0.05)
        gate.set()
        return [await first, *await rest]

    answers = asyncio.run(scenario())
    assert [a.items[0].track_id for a in answers] == [f"m1:u{i}" for i in range(10)]
    # An idle coalescer starts at once (u0 alone); the queue drains max_batch at a time.
    assert fake.calls == [["u0"], ["u1", "u2", "u3", "u4"], ["u5", "u6", "u7", "u8"], ["u9"]]
    assert (coalescer.batches, coalescer.requests) == (4, 10)


def test_a_failing_request_fails_alone_and_models_are_not_mixed() -> None:
    gate = threading.Event()
    old, new = FakeRecommender("old", gate), FakeRecommender("new", gate, fail_for="bad")
    coalescer = Coalescer(max_batch=8, max_inflight=1)

    async def scenario() -> list[Any]:
        first = asyncio.create_task(coalescer.recommend(_as_rec(old), Query("warm", 3)))
        await asyncio.sleep(0.05)
        asks = [(old, "a"), (new, "b"), (new, "bad"), (old, "c"), (new, "d")]
        rest = asyncio.create_task(_gather(coalescer, asks))
        await asyncio.sleep(0.05)
        gate.set()
        return [await first, *await rest]

    warm, a, b, bad, c, d = asyncio.run(scenario())
    assert [x.items[0].track_id for x in (warm, a, b, c, d)] == [
        "old:warm",
        "old:a",
        "new:b",
        "old:c",
        "new:d",
    ]
    assert isinstance(bad, RuntimeError) and "bad" in str(bad)
    # Each model saw only its own requests: one call for old, the batch then one by one for new.
    assert old.calls == [["warm"], ["a", "c"]]
    assert new.calls == [["b", "bad", "d"], ["b"], ["bad"], ["d"]]


def test_a_request_whose_client_left_does_not_disturb_the_others() -> None:
    gate = threading.Event()
    fake = FakeRecommender("m", gate)
    coalescer = Coalescer(max_batch=8, max_inflight=1)

    async def scenario() -> list[Any]:
        first = asyncio.create_task(coalescer.recommend(_as_rec(fake), Query("u0", 3)))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(coalescer.recommend(_as_rec(fake), Query("gone", 3)))
        stays = asyncio.create_task(coalescer.recommend(_as_rec(fake), Query("stays", 3)))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.set()
        return [await first, await stays]

    first, stays = asyncio.run(scenario())
    assert stays.items[0].track_id == "m:stays" and first.items[0].track_id == "m:u0"
    assert fake.calls == [["u0"], ["stays"]]  # the cancelled request was dropped before scoring


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        Coalescer(max_batch=0, max_inflight=1)
