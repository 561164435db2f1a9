"""FastAPI dependencies: everything a router needs comes from ``app.state``, never a global.

Keeping state on the app (set once by the lifespan) is what lets tests build several independent
apps, each with its own injected recommender, in one process. The routes that serve a model take
ONE dependency, a :class:`Serving` bundle built once by the lifespan: FastAPI resolves every
``Depends`` per request (a recursive solve plus parameter analysis), which cost more than a
known user's recommendation when each route took four. Dependencies are ``async`` because FastAPI
runs sync ones in the threadpool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from tracktower.serving.artifact import Recommender
from tracktower.serving.errors import ApiError
from tracktower.serving.metrics import Metrics
from tracktower.serving.settings import Settings


@dataclass(frozen=True)
class LoadedModel:
    name: str | None
    version: str | None
    uri: str | None


@dataclass(frozen=True, slots=True)
class Serving:
    """What a model-serving route needs, bundled once per loaded model."""

    recommender: Recommender
    model: LoadedModel
    settings: Settings
    metrics: Metrics
    # The response's ``model`` object, built once instead of per response.
    model_ref: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        ref = {"name": self.model.name, "version": self.model.version}
        object.__setattr__(self, "model_ref", ref)


async def get_serving(request: Request) -> Serving:
    """The model bundle, read from ``app.state`` once per request: a hot swap replaces it
    (``serving/swap.py``), and a request in flight finishes on the one it took."""
    serving: Serving | None = request.app.state.serving
    if serving is None:
        raise ApiError(503, "not_ready", "model is not loaded yet")
    return serving


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


ServingDep = Annotated[Serving, Depends(get_serving)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
