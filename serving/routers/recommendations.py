"""Recommendation endpoints: validate against Settings limits, delegate to the Recommender.

Handlers are ``async``, and whatever searches the index runs in a worker thread, so it cannot
stall ``/healthz`` or other requests; only a known user's cached list (a slice, about 0.03 ms) is
answered on the event loop. Measured on 20k users x 24k tracks, 128-d, one BLAS thread, with the
ScaNN index ``auto`` picks there: a known user's search (over-fetch past the seen tracks, exact
rescoring) took 1.0 ms at p50 and 1.9 ms at p99, more than the 1-2 ms at p50 that the hop into
the threadpool (a GIL hand-off) costs on a busy 2-core box, and exact search over that catalogue
3.2 ms; not sub-millisecond, so a cache miss goes to a thread. Every POST (sessions: the
TensorFlow history tower, then a search; request-time excludes) runs in a thread too, through
the app's ``Coalescer`` for sessions: concurrent sessions share one tower call and one search
(see ``serving/coalesce.py``), and a known user's POST never queues behind them; a GET for an
unknown user is a slice of the popularity list and stays on the loop.

The batch handler scores in a worker thread, behind two limits (settings):

* ``max_concurrent_batches``: one more batch than that is answered 503 with ``Retry-After`` at
  once (``limits.BatchGate``). Unbounded, twelve 1,000-user batches stalled ``/healthz`` 3.4 s
  and took 1.57 GB: the thread releases the event loop, but its Python parts hold the GIL.
* ``request_timeout_seconds``: the thread scores ``BATCH_BLOCK`` users at a time and checks the
  deadline before each block. A batch past it stops there and is answered 504; the blocks
  already scored are dropped, and the thread holds its slot until it has stopped, so abandoned
  work never piles up behind the gate. A batch thus runs at most one block past its deadline
  (a batch whose last block ends past it is still answered: its work is done).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tracktower.serving.artifact import Item, Recommendation
from tracktower.serving.artifact import Query as Asked
from tracktower.serving.coalesce import Coalescer
from tracktower.serving.deps import Serving, ServingDep
from tracktower.serving.errors import BATCH_503, NOT_READY_503, ApiError, documented
from tracktower.serving.limits import BatchGate, Deadline, DeadlineExceeded
from tracktower.serving.schemas import (
    K_DESCRIPTION,
    PATH_ID_PATTERN,
    BatchRequest,
    BatchResponse,
    RecommendationResponse,
    RecommendRequest,
    TopK,
    from_settings,
    id_schema,
)
from tracktower.serving.settings import Settings

# Users scored between two deadline checks of a batch (see the module docstring).
BATCH_BLOCK = 64

router = APIRouter(prefix="/v1", tags=["recommendations"])

# Request examples for the API document ("Try it out" pre-fills them): valid under the default
# Settings and any with max_k >= 5 and at least 2 ids per list; the ids are tests/builders' fake
# artifacts'. Any id is valid: an unknown user gets the popular tracks, unknown tracks are ignored.
EXAMPLE_USER = "u00001"
RECOMMEND_EXAMPLES: dict[str, dict[str, Any]] = {
    "user": {"summary": "A user, default k", "value": {"user_id": EXAMPLE_USER}},
    "session": {
        "summary": "A new listener's session, one track left out",
        "value": {
            "user_id": "new-user",
            "k": 5,
            "recent_track_ids": ["t000003", "t000004"],
            "exclude_track_ids": ["t000007"],
        },
    },
}
BATCH_EXAMPLES: dict[str, dict[str, Any]] = {
    "users": {"summary": "Two users", "value": {"user_ids": [EXAMPLE_USER, "u00002"]}},
}


def _k(k: int | None, settings: Settings) -> int:
    if k is None:
        return settings.default_k
    if not 1 <= k <= settings.max_k:
        raise ApiError(422, "out_of_range", f"k must be between 1 and {settings.max_k}", "k")
    return k


def _check_id(value: str, field: str, settings: Settings) -> None:
    if not value.strip():
        raise ApiError(422, "invalid_id", "id must not be empty", field)
    if len(value) > settings.max_id_length:
        raise ApiError(
            422, "invalid_id", f"id longer than {settings.max_id_length} characters", field
        )


def _check_ids(values: Sequence[str], field: str, limit: int, settings: Settings) -> None:
    if len(values) > limit:
        raise ApiError(422, "too_many_items", f"at most {limit} ids allowed", field)
    for i, value in enumerate(values):
        _check_id(value, f"{field}[{i}]", settings)


def _items(items: list[Item], source: str) -> list[dict[str, Any]]:
    """The popularity fallback's numbers are listener counts, not model scores: they go in
    their own field (see ``schemas.RecommendedItem``)."""
    if source == "popular":
        return [
            {"track_id": t, "score": None, "listeners": int(s), "title": ti, "artist": a}
            for t, s, ti, a in items
        ]
    return [{"track_id": t, "score": s, "title": ti, "artist": a} for t, s, ti, a in items]


def _response(user_id: str, rec: Recommendation, serving: Serving) -> Response:
    """Serialised here, once: FastAPI's generic path (jsonable_encoder, then re-validating the
    dict against ``response_model``) cost more than the recommendation itself. The body is built
    from the Recommender's typed output; ``response_model`` on the route still documents it and
    the tests validate responses against it."""
    body = {
        "user_id": user_id,
        "model": serving.model_ref,
        "source": rec.source,
        "items": _items(rec.items, rec.source),
    }
    return Response(json.dumps(body, allow_nan=False), media_type="application/json")


@router.get(
    "/users/{user_id}/recommendations",
    response_model=RecommendationResponse,
    responses=documented(404, 422, 503, overrides={503: NOT_READY_503}),
)
async def user_recommendations(
    user_id: Annotated[
        str,
        Path(
            description="Any user id that is not blank, has no '/' and is not '.' or '..' "
            "(it is one URL path segment; POST takes any id); unknown users get the most "
            "popular tracks.",
            json_schema_extra=id_schema(PATH_ID_PATTERN),
            openapi_examples={"user": {"summary": "A user id", "value": EXAMPLE_USER}},
        ),
    ],
    serving: ServingDep,
    k: Annotated[
        TopK | None,
        Query(description=K_DESCRIPTION, json_schema_extra=from_settings(default="default_k")),
    ] = None,
) -> Response:
    """Top-k for a user; users unknown to the model get the most popular tracks."""
    settings = serving.settings
    _check_id(user_id, "user_id", settings)
    recommender, top = serving.recommender, _k(k, settings)
    rec = recommender.cached(user_id, top)
    if rec is None:
        if recommender.user_index(user_id) is None:
            rec = recommender.recommend(user_id, top)  # popular: a slice of a list
        else:
            rec = await run_in_threadpool(recommender.recommend, user_id, top)
    serving.metrics.count_source(rec.source)
    return _response(user_id, rec, serving)


@router.post(
    "/recommendations",
    response_model=RecommendationResponse,
    responses=documented(400, 422, 503, overrides={503: NOT_READY_503}),
)
async def recommend(
    body: Annotated[RecommendRequest, Body(openapi_examples=RECOMMEND_EXAMPLES)],
    serving: ServingDep,
    request: Request,
) -> Response:
    """Top-k with request-time excludes; ``recent_track_ids`` personalise unknown users."""
    settings = serving.settings
    _check_id(body.user_id, "user_id", settings)
    _check_ids(body.exclude_track_ids, "exclude_track_ids", settings.max_track_ids, settings)
    _check_ids(body.recent_track_ids, "recent_track_ids", settings.max_track_ids, settings)
    query = Asked(body.user_id, _k(body.k, settings), body.exclude_track_ids, body.recent_track_ids)
    recommender = serving.recommender
    if body.recent_track_ids and recommender.user_index(body.user_id) is None:
        # A session: coalesced with concurrent ones (one tower call, one search).
        coalescer: Coalescer = request.app.state.coalescer
        rec = await coalescer.recommend(recommender, query)
    else:  # a known user's excludes, or the popular list: never queued behind sessions
        rec = (await run_in_threadpool(recommender.recommend_many, [query]))[0]
    serving.metrics.count_source(rec.source)
    return _response(body.user_id, rec, serving)


@router.post(
    "/recommendations:batch",
    response_model=BatchResponse,
    responses=documented(400, 422, 503, 504, overrides={503: BATCH_503}),
)
async def recommend_batch(
    body: Annotated[BatchRequest, Body(openapi_examples=BATCH_EXAMPLES)],
    serving: ServingDep,
    request: Request,
) -> Response:
    """Many users in one vectorised scoring pass, off the event loop (see the module)."""
    settings = serving.settings
    if not body.user_ids:
        raise ApiError(422, "invalid_request", "user_ids must not be empty", "user_ids")
    _check_ids(body.user_ids, "user_ids", settings.max_batch_users, settings)
    k = _k(body.k, settings)
    gate: BatchGate = request.app.state.batch_gate
    with gate.slot():
        deadline = Deadline(settings.request_timeout_seconds)
        try:
            payload = await anyio.to_thread.run_sync(
                _score_batch, serving, body.user_ids, k, deadline
            )
        except DeadlineExceeded:
            raise ApiError(
                504,
                "deadline_exceeded",
                f"batch of {len(body.user_ids)} users not scored within "
                f"{settings.request_timeout_seconds:g} s (request_timeout_seconds); "
                "send fewer user_ids per request",
            ) from None
    return Response(payload, media_type="application/json")


def _score_batch(serving: Serving, user_ids: list[str], k: int, deadline: Deadline) -> bytes:
    """The response body, serialised here in the worker thread like the single-user routes'
    (see ``_response``); sources are counted only for a batch that is answered."""
    results: list[dict[str, Any]] = []
    sources: Counter[str] = Counter()
    for start in range(0, len(user_ids), BATCH_BLOCK):
        deadline.check()
        block = user_ids[start : start + BATCH_BLOCK]
        recs = serving.recommender.recommend_batch(block, k)
        for user_id, rec in zip(block, recs, strict=True):
            items = _items(rec.items, rec.source)
            results.append({"user_id": user_id, "source": rec.source, "items": items})
            sources[rec.source] += 1
    for source, n in sources.items():
        serving.metrics.count_source(source, n)
    body = {"model": serving.model_ref, "results": results}
    return json.dumps(body, allow_nan=False).encode()
