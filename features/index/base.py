"""The retrieval index interface: build from candidate embeddings, query top-k for a batch.

In the spirit of ``tfrs.layers.factorized_top_k`` / keras-rs ``Retrieval``, but numpy in and out,
so serving, batch scoring and offline evaluation share it without TensorFlow. Every backend
returns what :func:`tracktower.features.ranking.top_k` returns: ``(indices int64 [B, k], scores
float32 [B, k])``, best first, ties broken by lower candidate index, unfilled slots ``-1`` /
``-inf``. An approximate backend may miss candidates; the scores it does return are exact dot
products, so one ranking can be compared or merged with another.

An index is stored as a directory (``save``) beside the candidate embeddings it was built from,
which are not copied into it: :func:`load_index` gets them from the caller (the artifact's
memory-mapped ``track_embeddings``), so every worker shares one copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from tracktower.features.errors import DataError

__all__ = [
    "BACKENDS",
    "META_FILE",
    "Backend",
    "IndexInfo",
    "RetrievalIndex",
    "check_candidates",
    "check_queries",
    "load_index",
]

Backend = Literal["exact", "scann"]
# Written last by every backend's ``save``: its presence means the index directory is complete.
META_FILE = "tracktower_index.json"
BACKENDS: tuple[str, ...] = ("exact", "scann")


@runtime_checkable
class RetrievalIndex(Protocol):
    """Top-k maximum-inner-product search over ``size`` candidates of dimension ``dim``.

    ``params`` are the JSON-serialisable settings needed to search the saved index the same way
    again (they go into the manifest and are handed back to :func:`load_index`).
    """

    @property
    def backend(self) -> str: ...

    @property
    def params(self) -> dict[str, Any]: ...

    @property
    def size(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def search(
        self, queries: np.ndarray, k: int, *, spare: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(indices int64 [B, k + spare], scores float32 [B, k + spare])`` for float32
        ``queries [B, dim]``: the top k searched as carefully as for k alone, then ``spare``
        more, for a caller that will drop some (excluded tracks). An approximate backend's
        effort grows with k (ScaNN rescores ``reorder_per_k`` x k candidates) but only by
        ``spare`` for the spare results."""
        ...

    def save(self, directory: Path) -> None:
        """Write what :func:`load_index` needs besides the candidates (may be nothing)."""
        ...


@dataclass
class IndexInfo:
    """What was built and how well it retrieves: for the manifest, MLflow and ``/v1/model``.

    ``recall_at_10`` / ``recall_at_100`` are measured against exact search on ``sample_users``
    query vectors; they are ``None`` only when no queries were given to measure on.
    """

    backend: str
    params: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    recall_at_10: float | None = None
    recall_at_100: float | None = None
    sample_users: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, *, where: str = "index") -> IndexInfo:
        """Parse :meth:`to_dict`'s output (e.g. from a manifest); bad input is a DataError."""
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__})
        if unknown or raw.get("backend") not in BACKENDS:
            raise DataError(
                f"{where}: backend must be one of {list(BACKENDS)} and keys among "
                f"{sorted(cls.__dataclass_fields__)}; got backend {raw.get('backend')!r}, "
                f"unknown keys {unknown}"
            )
        if not isinstance(raw.get("params", {}), dict):
            raise DataError(f"{where}.params: expected a JSON object")
        for name in ("build_seconds", "recall_at_10", "recall_at_100", "sample_users"):
            value = raw.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise DataError(f"{where}.{name}: expected a number, got {value!r}")
        return cls(**raw)


def check_candidates(candidates: np.ndarray) -> np.ndarray:
    """``candidates`` as a float32 ``[n, dim]`` array, without copying one that already is
    (a read-only memory map stays a memory map)."""
    cand = np.asarray(candidates)
    if cand.ndim != 2 or cand.shape[0] < 1 or cand.shape[1] < 1:
        raise DataError(f"candidate embeddings must be [tracks >= 1, dim >= 1], got {cand.shape}")
    if cand.dtype != np.float32:
        cand = cand.astype(np.float32)
    return cand


def check_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    """Queries as float32 ``[B, dim]``; a wrong shape is a one-line DataError."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise DataError(f"queries must be float32 [batch, {dim}] for this index, got {q.shape}")
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return q


def load_index(
    directory: str | Path | None,
    backend: str,
    params: dict[str, Any],
    candidates: np.ndarray,
) -> RetrievalIndex:
    """The index saved at ``directory`` by ``backend``'s ``save``, over ``candidates``.

    ``params`` are the ones recorded at build (:attr:`IndexInfo.params`); a missing, truncated
    or mismatched index (other dimension, track count or format) is a one-line DataError. The
    exact backend stores nothing, so its ``directory`` may be None. Backends are imported here,
    on demand, so a process serving an exact index never loads ScaNN.
    """
    if backend == "exact":
        from tracktower.features.index.exact import ExactIndex

        return ExactIndex.load(Path(directory) if directory is not None else None, candidates)
    if backend == "scann":
        from tracktower.features.index.scann_index import ScannIndex

        if directory is None:
            raise DataError("a scann index needs its directory")
        return ScannIndex.load(Path(directory), params, candidates)
    raise DataError(f"unknown index backend {backend!r}; expected one of {list(BACKENDS)}")
