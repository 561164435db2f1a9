"""Liveness, readiness and Prometheus scrape endpoints (outside /v1: they are not the API)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from tracktower.serving.deps import MetricsDep
from tracktower.serving.errors import ApiError
from tracktower.serving.schemas import ErrorResponse, Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz(request: Request) -> Health:
    """200 while the process is alive, loaded or not: restarting would not help a slow load."""
    loaded = request.app.state.serving is not None
    return Health(status="ok" if loaded else "loading")


@router.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Health:
    """200 while a model is served: from start-up until shutdown, a swap included (the new
    version replaces the old in one step, so there is no moment without one)."""
    if request.app.state.serving is None:
        raise ApiError(503, "not_ready", "model is not loaded yet")
    return Health(status="ok")


@router.get("/metrics", include_in_schema=False)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)
