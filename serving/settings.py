"""Server configuration, read once from ``TRACKTOWER_*`` environment variables.

Environment variables (rather than CLI flags) are the one channel that reaches every uvicorn worker
process, so ``tracktower serve`` writes its options into the environment and each worker's app
factory reads them back here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# An API key is a bearer token (RFC 6750's token68 characters) long enough not to be guessed.
MIN_API_KEY_LENGTH = 16
_API_KEY = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def default_model_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tracktower/models``, else ``~/.cache/tracktower/models``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tracktower" / "models"


class Settings(BaseSettings):
    # Errors never echo a value: one of them may be an API key.
    model_config = SettingsConfigDict(
        env_prefix="TRACKTOWER_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    model_uri: str = "models:/tracktower@champion"
    tracking_uri: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    # With workers > 1: how long a starting worker may take to load its model and start serving
    # before the supervisor gives up on it (kills and replaces it). While it starts it is not
    # held to the health-check timeout below, which a load holding the GIL (TensorFlow's import,
    # a busy machine) easily exceeds.
    worker_startup_timeout_seconds: float = Field(default=300.0, gt=0)
    # With workers > 1, once a worker serves: it must answer the supervisor's ping within this
    # many seconds or it is killed and replaced (uvicorn's timeout_worker_healthcheck).
    worker_healthcheck_timeout_seconds: int = Field(default=5, ge=1)

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
    # Known users' top-max_k lists kept per worker after their first request, least recently
    # used dropped first (8 bytes per entry: 40 MB at 50,000 users and max_k 100); a hit is a
    # slice answered on the event loop, a miss one index search in a thread. 0 disables it.
    # Filled lazily: start-up ranks nobody.
    known_cache_users: int = Field(default=50_000, ge=0)
    # One log line per request costs more CPU than a known user's recommendation; errors and
    # startup are still logged, and per-route counts and latencies are in /metrics.
    access_log: bool = False
    # --- authentication (see serving/auth.py) ---
    # Comma-separated in TRACKTOWER_API_KEYS; empty (the default) turns authentication off.
    # Several keys let a key be rotated without downtime: add the new one, move the clients,
    # drop the old one. Only through the environment: a CLI flag would show in `ps`.
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # `tracktower serve` refuses a non-loopback address without api_keys unless this is set
    # (something in front of the server authenticates, e.g. a gateway on a private network).
    allow_unauthenticated: bool = False
    # With api_keys set: /metrics needs a key too (Prometheus sends one with `authorization`
    # in its scrape config); request counts and the model version are not for everyone.
    metrics_public: bool = False
    # With api_keys set: /docs and /openapi.json stay open. They describe an API whose source
    # is public, and a browser cannot send a key to load the page itself; "Authorize" there
    # takes the key for the calls it makes.
    docs_public: bool = True

    # --- limits (see serving/limits.py) ---
    # Request line plus headers; over it the answer is 431, an incomplete head is cut off
    # as soon as it passes the limit. 16 KiB is what uvicorn's h11 parser allows by default.
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    max_headers: int = Field(default=100, ge=1)
    # From a request's first byte (or the connection opening) to the last byte of its body:
    # a slow or stalled client is disconnected (408 if its head was incomplete).
    read_timeout_seconds: float = Field(default=10.0, gt=0)
    # An idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive).
    keep_alive_timeout_seconds: int = Field(default=5, ge=1)
    # uvicorn's limit_concurrency, per worker: over this many open connections or requests in
    # progress, a new request gets 503 busy (JSON, Retry-After; serving/protocol.py) and its
    # connection is closed. None: no limit.
    max_connections: int | None = Field(default=1000, ge=1)
    # On SIGTERM, requests in flight get this long to finish before they are cancelled.
    graceful_shutdown_seconds: int = Field(default=15, ge=0)
    # Batch requests scored at once per worker, off the event loop; one more is answered 503
    # with Retry-After at once instead of queueing behind them.
    max_concurrent_batches: int = Field(default=2, ge=1)
    # POST recommendations (sessions, request-time excludes) are scored by at most this many
    # worker threads at once; requests arriving meanwhile are coalesced, up to
    # coalesce_max_batch per call (serving/coalesce.py). Measured at MPD shape, 8 connections
    # of sessions on 2 cores: 1 -> 445 req/s, p99 24 ms; 2 -> 402, 37 ms; 3 -> 325, 51 ms
    # (fewer jobs, bigger batches: the per-call costs are what coalescing saves).
    coalesce_max_inflight: int = Field(default=1, ge=1)
    coalesce_max_batch: int = Field(default=32, ge=1)
    # Deadline of a batch request, from when its handler starts: scoring stops at the next
    # block of users and the answer is 504 (see routers/recommendations.py).
    request_timeout_seconds: float = Field(default=10.0, gt=0)

    # FastAPI's native OpenTelemetry instrumentation (spans and metrics through the global OTel
    # providers). Off by default: Prometheus (/metrics) is the monitoring here, and the per-request
    # checks cost ~20 us even with no provider configured.
    opentelemetry: bool = False

    # --- following the model's alias, and the per-host model cache (see serving/swap.py) ---
    # Seconds between looks at the alias of a models:/NAME@ALIAS model_uri; when it has moved,
    # the new version is loaded and checked off the request path and swapped in. 0 disables
    # it; a version-pinned URI, a run or a local path is never polled.
    model_poll_seconds: float = Field(default=30.0, ge=0)
    # A new version whose index recall@100 (measured at export, in the manifest) is below this
    # is refused; the default is export's own floor (features.index.DEFAULT_RECALL_FLOOR).
    model_recall_floor: float = Field(default=0.95, gt=0, le=1)
    # Where registry versions are downloaded, once per host (serving/resolve.py).
    model_cache_dir: Path = Field(default_factory=default_model_cache_dir)
    # Versions kept per registered model in model_cache_dir, most recently used first.
    model_cache_keep: int = Field(default=3, ge=1)
    # The version of the alias to load first (`tracktower serve` sets it to what it resolved,
    # so every worker starts on the same version even if the alias moves meanwhile); the
    # alias is followed from there.
    model_start_version: str | None = Field(default=None, pattern=r"^\d+$")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: Any) -> Any:
        """``"k1, k2,"`` → ``("k1", "k2")``: blanks around and between keys are dropped, a
        duplicate is kept once, and a key that is too short or holds characters a header
        cannot carry unchanged is refused by position (never echoed: it is a secret)."""
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple):
            return value
        keys: list[str] = []
        for item in value:
            key = item.get_secret_value() if isinstance(item, SecretStr) else item
            if not isinstance(key, str):
                return value  # let pydantic report the type
            key = key.strip()
            if key and key not in keys:
                keys.append(key)
        for position, key in enumerate(keys, start=1):
            if len(key) < MIN_API_KEY_LENGTH or not _API_KEY.fullmatch(key):
                raise ValueError(
                    f"API key {position} must be at least {MIN_API_KEY_LENGTH} characters of "
                    "A-Z a-z 0-9 - . _ ~ + / (e.g. python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))')"
                )
        return tuple(keys)

    @field_validator("model_cache_dir", mode="after")
    @classmethod
    def _expand_cache_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @model_validator(mode="after")
    def _default_k_within_max(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        return self
