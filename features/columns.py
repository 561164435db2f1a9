"""The source-column map, on its own so that the experiment config can use it without importing
the readers' heavy dependencies (pandas, pyarrow): a bad config is reported before they load."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ColumnMap"]


class ColumnMap(BaseModel):
    """Names of the source columns, for files whose header differs from the canonical one.

    The one column map: the reader takes it and the experiment config's ``data.columns`` is it,
    so a config can say exactly what the reader understands, and nothing else.

    ``weight=None`` picks ``weight``, else ``plays``, else weighs every row 1. ``timestamp=None``
    picks ``timestamp``, else ``position`` (an ordering key such as a playlist index), else none.
    An explicitly named column must exist.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    user: str = Field("user_id", min_length=1)
    track: str = Field("track_id", min_length=1)
    weight: str | None = Field(None, min_length=1)
    timestamp: str | None = Field(None, min_length=1)
