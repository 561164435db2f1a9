"""Request and response bodies of the HTTP API.

Request bodies are strict (JSON types are not coerced, unknown fields are rejected) so a client bug
such as ``"k": "10"`` or a misspelt field fails loudly instead of being silently reinterpreted.
Limits that depend on Settings (max k, id length, batch size) are checked in the routers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tracktower.features.artifact import DatasetInfo

# Where a recommendation came from: the known user's embedding, the history tower (a session of
# recent tracks), or the popularity fallback. The one definition; serving.artifact imports it.
Source = Literal["model", "popular", "session"]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class RecommendRequest(_Request):
    user_id: str
    k: int | None = None
    exclude_track_ids: list[str] = Field(default_factory=list)
    recent_track_ids: list[str] = Field(default_factory=list)


class BatchRequest(_Request):
    user_ids: list[str]
    k: int | None = None


class ModelRef(BaseModel):
    name: str | None
    version: str | None


class RecommendedItem(BaseModel):
    track_id: str
    score: float
    title: str | None = None
    artist: str | None = None


class RecommendationResponse(BaseModel):
    user_id: str
    model: ModelRef
    source: Source
    items: list[RecommendedItem]


class BatchResult(BaseModel):
    user_id: str
    source: Source
    items: list[RecommendedItem]


class BatchResponse(BaseModel):
    model: ModelRef
    results: list[BatchResult]


class DatasetSummary(DatasetInfo):
    """The manifest's dataset fields; extra manifest keys (e.g. a local source path) are dropped,
    so the API's shape does not change with what an export happens to record."""

    model_config = ConfigDict(extra="ignore")


class IndexSummary(BaseModel):
    """The retrieval index the model ranks with, as built and measured at export: recall@k is
    the share of exact search's top-k it returns, on ``sample_users`` known users' query vectors
    (1.0 for exact search; null when export had no users to measure on)."""

    backend: str
    params: dict[str, Any]
    recall_at_10: float | None
    recall_at_100: float | None
    build_seconds: float
    sample_users: int


class ModelSummary(BaseModel):
    name: str | None
    version: str | None
    uri: str | None
    run_id: str | None
    created_at: str
    format_version: int
    embedding_dim: int
    has_history_tower: bool
    metrics: dict[str, Any]
    dataset: DatasetSummary
    counts: dict[str, int]
    libraries: dict[str, Any]
    index: IndexSummary


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "loading"]
