"""Coalescing concurrent POST recommendations into shared scoring calls.

A session (``recent_track_ids`` of an unknown user) costs a history-tower call and an index
search. The tower call's fixed cost (about 0.5 ms of TensorFlow call machinery for a small MLP)
is paid once per call, not per row, and each trip to a worker thread is a GIL hand-off; eight
connections sending sessions paid both eight times. Here at most ``max_inflight`` scoring jobs
run in worker threads; requests arriving meanwhile queue, and the next job takes them all (up to
``max_batch``) into one :meth:`Recommender.recommend_many` call. There is no timer: a request
that finds a free slot starts a job at once, so an idle server adds no delay and the batch size
follows the load.

A job groups its requests by the recommender each was given, so requests that arrived before a
hot swap finish on the model they started with. If a batch fails as a whole, its requests are
retried one by one, so a request that cannot be answered fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anyio.to_thread

from tracktower.serving.artifact import Query, Recommendation, Recommender

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Waiting:
    recommender: Recommender
    query: Query
    future: asyncio.Future[Recommendation]


class Coalescer:
    """Per app (not per model), used from the event loop only."""

    def __init__(self, max_batch: int, max_inflight: int) -> None:
        if max_batch < 1 or max_inflight < 1:
            raise ValueError(
                f"max_batch and max_inflight must be >= 1: {max_batch}, {max_inflight}"
            )
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._queue: list[_Waiting] = []
        self._inflight = 0
        self._jobs: set[asyncio.Task[None]] = set()  # strong references until each job ends
        self.batches = 0  # jobs run, and requests they answered: the mean batch size
        self.requests = 0

    async def recommend(self, recommender: Recommender, query: Query) -> Recommendation:
        future: asyncio.Future[Recommendation] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(recommender, query, future))
        if self._inflight < self.max_inflight:
            self._start()
        return await future

    def _start(self) -> None:
        batch = [w for w in self._queue[: self.max_batch] if not w.future.done()]
        del self._queue[: self.max_batch]
        if not batch:
            return
        self._inflight += 1
        job = asyncio.get_running_loop().create_task(self._run(batch))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        answers: list[Recommendation | BaseException]
        try:
            answers = await anyio.to_thread.run_sync(_answer, batch)
        except asyncio.CancelledError:  # shutdown: nothing left waiting, nothing new started
            self._inflight -= 1
            for waiting in [*batch, *self._queue]:
                waiting.future.cancel()
            self._queue.clear()
            raise
        except Exception as exc:
            answers = [exc] * len(batch)
        self._inflight -= 1
        self.batches += 1
        self.requests += len(batch)
        while self._queue and self._inflight < self.max_inflight:
            self._start()
        for waiting, answer in zip(batch, answers, strict=True):
            if waiting.future.done():  # its client went away
                continue
            if isinstance(answer, BaseException):
                waiting.future.set_exception(answer)
            else:
                waiting.future.set_result(answer)


def _answer(batch: Sequence[_Waiting]) -> list[Recommendation | BaseException]:
    """In a worker thread: each recommender's requests in one call."""
    answers: list[Recommendation | BaseException | None] = [None] * len(batch)
    groups: dict[int, list[int]] = {}
    for i, waiting in enumerate(batch):
        groups.setdefault(id(waiting.recommender), []).append(i)
    for rows in groups.values():
        recommender = batch[rows[0]].recommender
        try:
            found: list[Recommendation | BaseException] = list(
                recommender.recommend_many([batch[i].query for i in rows])
            )
        except Exception:
            found = [_one(recommender, batch[i].query) for i in rows]
        for i, answer in zip(rows, found, strict=True):
            answers[i] = answer
    return [a for a in answers if a is not None]


def _one(recommender: Recommender, query: Query) -> Recommendation | BaseException:
    try:
        return recommender.recommend_many([query])[0]
    except Exception as exc:
        return exc
