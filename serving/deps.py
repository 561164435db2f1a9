"""FastAPI dependencies: everything a router needs comes from ``app.state``, never a global.

Keeping state on the app (set once by the lifespan) is what lets tests build several independent
apps, each with its own injected recommender, in one process. The dependencies are ``async``
because FastAPI runs sync ones in the threadpool: four thread hops per request for a getattr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

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


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_recommender(request: Request) -> Recommender:
    recommender: Recommender | None = request.app.state.recommender
    if recommender is None:
        raise ApiError(503, "not_ready", "model is not loaded yet")
    return recommender


async def get_loaded_model(request: Request) -> LoadedModel:
    model: LoadedModel | None = request.app.state.model
    if model is None:
        raise ApiError(503, "not_ready", "model is not loaded yet")
    return model


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
LoadedModelDep = Annotated[LoadedModel, Depends(get_loaded_model)]
