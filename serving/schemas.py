"""Request and response bodies of the HTTP API, and the constraints the OpenAPI document states.

Request bodies are strict (JSON types are not coerced, unknown fields are rejected) so a client bug
such as ``"k": "10"`` or a misspelt field fails loudly instead of being silently reinterpreted.

The value constraints (k's range, what an id may be, list lengths) are enforced in the routers,
with error codes a client can act on; here they are only *stated*, as JSON Schema keywords in
``json_schema_extra``, so that the OpenAPI document is exactly as strict as the server. The
limits that come from Settings are written as ``{SETTINGS_KEY: {keyword: setting_name}}`` and
filled in for each app by :func:`tracktower.serving.docs.describe_api`; the schemathesis test
(tests/integration/test_openapi_schemathesis.py) fails if the two ever disagree.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from tracktower.features.artifact import DatasetInfo

# Where a recommendation came from: the known user's embedding, the history tower (a session of
# recent tracks), or the popularity fallback. The one definition; serving.artifact imports it.
Source = Literal["model", "popular", "session"]

# Marks JSON Schema keywords whose values are Settings fields: {"maximum": "max_k"}.
SETTINGS_KEY = "x-tracktower-settings"

# The characters for which Python's str.isspace() is true (what the routers' ``not id.strip()``
# tests), spelt out because ``\s`` means a different set in ECMA-262 regexes (which OpenAPI
# specifies) and in Rust's: this way every validator reading the document agrees with the server.
SPACE_CHARS = (
    r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
)
# An id in a JSON body: any string with a non-blank character (patterns are searched, not
# anchored).
ID_PATTERN = f"[^{SPACE_CHARS}]"
# A user id in the URL path must also be one path segment: no "/" (the route would not match,
# 404), and not "." or ".." (HTTP clients resolve those as dot-segments before sending, so the
# request reaches another path). The alternatives: a character that is neither "/", "." nor
# blank; only dots and blanks, at least one of each, starting with a blank or with a dot; three
# dots or more.
PATH_ID_PATTERN = (
    f"^(?:[^/]*[^/.{SPACE_CHARS}][^/]*"
    f"|[{SPACE_CHARS}][{SPACE_CHARS}.]*\\.[{SPACE_CHARS}.]*"
    f"|\\.[{SPACE_CHARS}.]*[{SPACE_CHARS}][{SPACE_CHARS}.]*"
    r"|\.{3,})$"
)


def from_settings(**keywords: str) -> dict[str, Any]:
    """JSON Schema keywords whose values are the named Settings fields of the app serving it."""
    return {SETTINGS_KEY: keywords}


def id_schema(pattern: str = ID_PATTERN) -> dict[str, Any]:
    """What the routers' ``_check_id`` accepts: non-blank, at most ``max_id_length`` characters."""
    return {"minLength": 1, "pattern": pattern, **from_settings(maxLength="max_id_length")}


# k where a request gives it: 1..max_k (the routers check it); absent or null means default_k.
K_SCHEMA: dict[str, Any] = {"minimum": 1, **from_settings(maximum="max_k")}
K_DESCRIPTION = "How many tracks to return, 1 to max_k; default_k when left out (or null)."


def _integral(value: Any) -> Any:
    """A JSON number with no fractional part is an integer (JSON Schema says so: ``10.0`` is a
    valid ``integer``), so ``"k": 10.0`` is taken as 10; ``10.5``, ``"10"`` and ``true`` are
    still refused by the strict int that follows."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


UserId = Annotated[
    str,
    Field(
        json_schema_extra=id_schema(),
        description="Any user id; unknown users get the popular tracks.",
    ),
]
TrackId = Annotated[str, Field(json_schema_extra=id_schema())]
TopK = Annotated[int, BeforeValidator(_integral), Field(json_schema_extra=K_SCHEMA)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class RecommendRequest(_Request):
    user_id: UserId
    k: TopK | None = Field(
        default=None,
        description=K_DESCRIPTION,
        json_schema_extra=from_settings(default="default_k"),
    )
    exclude_track_ids: list[TrackId] = Field(
        default_factory=list,
        description="Tracks to leave out of this answer, besides the ones the user has played; "
        "at most max_track_ids, unknown ids are ignored.",
        json_schema_extra=from_settings(maxItems="max_track_ids"),
    )
    recent_track_ids: list[TrackId] = Field(
        default_factory=list,
        description="A session of recently played tracks, used (when the model has a history "
        "tower) to personalise a user the model does not know; at most max_track_ids, unknown "
        "ids are ignored; they are not recommended back.",
        json_schema_extra=from_settings(maxItems="max_track_ids"),
    )


class BatchRequest(_Request):
    user_ids: list[UserId] = Field(
        description="1 to max_batch_users user ids; each is answered like the GET route would.",
        json_schema_extra={"minItems": 1, **from_settings(maxItems="max_batch_users")},
    )
    k: TopK | None = Field(
        default=None,
        description=K_DESCRIPTION,
        json_schema_extra=from_settings(default="default_k"),
    )


class ModelRef(BaseModel):
    name: str | None
    version: str | None = Field(description="Registry version; null for an unregistered model.")


class RecommendedItem(BaseModel):
    """One track. ``score`` and ``listeners`` are on different scales, so never in one field:
    a model's answer has scores, the popularity fallback has listener counts."""

    track_id: str
    score: float | None = Field(
        description="The model's score for the track: the dot product of the query embedding "
        "(the user's, or the session's) and the track's. Higher is better; comparable only "
        "within one model version. Null when source is 'popular'."
    )
    listeners: int | None = Field(
        default=None,
        description="Only when source is 'popular' (then the items are in this order): how "
        "many distinct users played the track in the model's training data.",
    )
    title: str | None = None
    artist: str | None = None


class RecommendationResponse(BaseModel):
    user_id: str
    model: ModelRef
    source: Source = Field(
        description="'model': the user's embedding; 'session': the history tower, from "
        "recent_track_ids; 'popular': the fallback for users the model cannot score."
    )
    items: list[RecommendedItem]


class BatchResult(BaseModel):
    user_id: str
    source: Source
    items: list[RecommendedItem]


class BatchResponse(BaseModel):
    model: ModelRef
    results: list[BatchResult] = Field(description="One per requested user, in request order.")


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
    code: str = Field(
        description="Machine-readable: e.g. invalid_request, invalid_id, out_of_range, "
        "too_many_items, malformed_json, unauthorized, not_found, payload_too_large, "
        "request_header_fields_too_large, not_ready, busy, deadline_exceeded, internal_error."
    )
    message: str = Field(description="For people: what is wrong and what was expected.")
    field: str | None = Field(
        default=None,
        description="The offending request field, e.g. 'k' or 'user_ids[3]'; null when none.",
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "loading"]
