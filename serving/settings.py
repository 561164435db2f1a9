"""Server configuration, read once from ``TRACKTOWER_*`` environment variables.

Environment variables (rather than CLI flags) are the one channel that reaches every uvicorn worker
process, so ``tracktower serve`` writes its options into the environment and each worker's app
factory reads them back here.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRACKTOWER_", extra="ignore", frozen=True)

    model_uri: str = "models:/tracktower@champion"
    tracking_uri: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)

    max_k: int = Field(default=100, ge=1)
    default_k: int = Field(default=10, ge=1)
    max_batch_users: int = Field(default=1000, ge=1)
    max_id_length: int = Field(default=256, ge=1)
    # Bounds exclude_track_ids / recent_track_ids so one request cannot make the server hash an
    # arbitrarily long list.
    max_track_ids: int = Field(default=1000, ge=0)
    # Rejects oversized bodies (413) before they are parsed; 1 MiB fits the largest valid request.
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # BLAS threads per worker process; 0 leaves the library default (see limit_blas_threads).
    blas_threads: int = Field(default=1, ge=0)
    # Known users' top max_k lists are computed once at start-up when users x max_k stays under
    # this many entries (8 bytes each: int32 index + float32 score, so 400 MB at the default);
    # above it every request is scored on the fly. 0 disables the precomputation.
    precompute_max_entries: int = Field(default=50_000_000, ge=0)
    # One log line per request costs more CPU than a precomputed recommendation; errors and
    # startup are still logged, and per-route counts and latencies are in /metrics.
    access_log: bool = False
    # FastAPI's native OpenTelemetry instrumentation (spans and metrics through the global OTel
    # providers). Off by default: Prometheus (/metrics) is the monitoring here, and the per-request
    # checks cost ~20 us even with no provider configured.
    opentelemetry: bool = False

    @model_validator(mode="after")
    def _default_k_within_max(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        return self
