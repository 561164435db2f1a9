"""Approximate search with ScaNN: candidate generation by ScaNN, exact rescoring by us.

ScaNN (``scann==1.4.2``, numpy API, imported through :mod:`.scann_import` so TensorFlow stays
out) partitions the candidates into ``num_leaves`` k-means leaves and scores the
``leaves_to_search`` leaves nearest to a query with anisotropic 4-bit product quantization (AH).
ScaNN's own exact reordering is *not* used: it would store a second float32 copy of every
embedding inside the index (1.2 GB at 2.26M x 128) and load it into each worker's private memory.
Instead ScaNN returns the ``rescore_width(k)`` best quantized candidates and they are rescored
here with exact dot products against the caller's candidate matrix (the artifact's memory-mapped
``track_embeddings``, shared by all workers), then ranked by :func:`ranking.top_k`. So the scores
returned are exact and the order follows the ranking contract (score descending, then lower
index) among the retrieved candidates; an approximate result can only *miss* candidates. Scores
can differ from :class:`ExactIndex`'s in the last float32 bit (matrix-vector vs matrix-matrix
kernels sum in different orders).

Parameters come from the catalogue size (:func:`default_params`, rule documented there); builds
are reproducible for a seed (k-means++ initialisation; ScaNN's random initialisation ignores the
seed).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tracktower.features import ranking
from tracktower.features.errors import DataError, one_line
from tracktower.features.index.base import META_FILE, check_candidates, check_queries
from tracktower.features.index.scann_import import scann_ops_pybind

__all__ = ["META_FILE", "ScannIndex", "default_params"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_LEAVES = 2048
MIN_LEAF_SIZE = 50  # ScaNN's min_cluster_size default; fewer leaves on tiny catalogues
SEARCH_FRACTION = 0.1  # leaves searched per query, before any retuning
TRAINING_SAMPLE = 200_000
PARALLEL_MIN_BATCH = 256  # below this one ScaNN thread answers; above, ScaNN's thread pool
RESCORE_BUDGET = 1 << 22  # floats gathered per rescoring block (16 MB)
BUILD_KEYS = (
    "num_leaves",
    "training_sample_size",
    "dims_per_block",
    "anisotropic_threshold",
    "seed",
)
SEARCH_KEYS = ("leaves_to_search", "reorder", "reorder_per_k")


def default_params(n: int, seed: int = 0) -> dict[str, Any]:
    """Parameters for ``n`` candidates, following ScaNN's guidance for tree + AH.

    * ``num_leaves`` = round(sqrt(n)) (about sqrt(n) points per leaf, ScaNN's rule of thumb),
      capped at 2048 (training cost grows with leaves x sample) and at n / 50 (ScaNN's minimum
      leaf size), at least 1.
    * ``leaves_to_search`` = 10% of the leaves, rounded up: recall@100 0.987 at 1M clustered
      128-d vectors in ``benchmarks/index_crossover.py``; retuning doubles it.
    * ``reorder`` / ``reorder_per_k``: a query for k is rescored exactly on
      max(reorder, reorder_per_k x k) quantized candidates (250 / 4: 400 for k = 100; in
      exploratory runs on noisier 100k x 128 data, width 200 had 2-4 points less recall@100
      than 400 at the same leaves).
    * ``training_sample_size`` = min(n, 200,000) points for the k-means tree.
    * AH: 2 dimensions per 4-bit block, anisotropic threshold 0.2 (ScaNN's defaults for dot
      product).
    """
    num_leaves = max(1, min(round(math.sqrt(n)), MAX_LEAVES, n // MIN_LEAF_SIZE))
    return {
        "num_leaves": num_leaves,
        "leaves_to_search": max(1, math.ceil(num_leaves * SEARCH_FRACTION)),
        "reorder": 250,
        "reorder_per_k": 4,
        "training_sample_size": min(n, TRAINING_SAMPLE),
        "dims_per_block": 2,
        "anisotropic_threshold": 0.2,
        "seed": seed,
    }


class ScannIndex:
    """A ScaNN searcher plus the candidate matrix it rescores against; see the module docstring.

    Build with :meth:`build`, read with :meth:`load`; the constructor is for those two.
    """

    backend = "scann"

    def __init__(self, searcher: Any, candidates: np.ndarray, params: Mapping[str, Any]) -> None:
        self._searcher = searcher
        self._candidates = candidates
        self._params = _check_params(params, len(candidates))

    @classmethod
    def build(
        cls,
        candidates: np.ndarray,
        params: Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        threads: int = 0,
    ) -> ScannIndex:
        """Train an index on ``candidates``; ``params`` override :func:`default_params`.

        ``threads`` is ScaNN's training thread count (0: all cores). Non-finite embeddings are
        refused: k-means and the quantizer would silently train on them.
        """
        cand = check_candidates(candidates)
        p = {**default_params(len(cand), seed), **(params or {})}
        p = _check_params(p, len(cand))
        if not np.isfinite(cand).all():
            raise DataError("candidate embeddings contain NaN or infinite values")
        pybind = scann_ops_pybind()
        builder = (
            pybind.builder(cand, 10, "dot_product")
            .tree(
                num_leaves=p["num_leaves"],
                num_leaves_to_search=p["leaves_to_search"],
                training_sample_size=p["training_sample_size"],
                min_partition_size=min(MIN_LEAF_SIZE, len(cand)),
                random_init=False,
            )
            .score_ah(
                p["dims_per_block"],
                anisotropic_quantization_threshold=p["anisotropic_threshold"],
            )
        )
        config = _seeded(builder.create_config(), p["seed"])
        return cls(pybind.create_searcher(cand, config, threads), cand, p)

    @classmethod
    def load(cls, directory: Path, params: Mapping[str, Any], candidates: np.ndarray) -> ScannIndex:
        """The index :meth:`save` wrote at ``directory``, searching with ``params``.

        Checks the track count, dimension and build parameters against ``candidates`` and
        ``params`` before ScaNN reads anything; every failure is a one-line DataError.
        """
        cand = check_candidates(candidates)
        p = _check_params(params, len(cand))
        _check_meta(directory, cand, p)
        try:
            searcher = scann_ops_pybind().load_searcher(
                str(directory), assets_backcompat_shim=False
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise DataError(
                f"unreadable ScaNN index: {one_line(exc)[:300]}", path=directory
            ) from None
        if searcher.size() != len(cand):
            raise DataError(
                f"ScaNN index holds {searcher.size()} tracks, the artifact has {len(cand)}",
                path=directory,
            )
        return cls(searcher, cand, p)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def size(self) -> int:
        return int(self._candidates.shape[0])

    @property
    def dim(self) -> int:
        return int(self._candidates.shape[1])

    def with_search_params(self, **changes: int) -> ScannIndex:
        """The same trained index searched with other ``leaves_to_search`` / ``reorder`` /
        ``reorder_per_k`` (no retraining: these are query-time settings)."""
        bad = sorted(set(changes) - set(SEARCH_KEYS))
        if bad:
            raise ValueError(f"only {SEARCH_KEYS} can change after build, got {bad}")
        return ScannIndex(self._searcher, self._candidates, {**self._params, **changes})

    def rescore_width(self, k: int) -> int:
        """How many quantized candidates a query for ``k`` rescores exactly."""
        p = self._params
        return min(self.size, max(p["reorder"], p["reorder_per_k"] * k, k))

    def search(
        self, queries: np.ndarray, k: int, *, spare: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-(k + spare); exact scores, ranking.top_k's order and padding (module
        doc). The spare results widen the rescoring by ``spare``, not by ``reorder_per_k`` x
        spare (see ``RetrievalIndex.search``)."""
        q = check_queries(queries, self.dim, k)
        if spare < 0:
            raise ValueError(f"spare must be >= 0, got {spare}")
        if len(q) == 0:
            return np.empty((0, k + spare), dtype=np.int64), np.empty((0, k + spare), np.float32)
        width = min(self.size, self.rescore_width(k) + spare)
        ids, dist = self._retrieve(np.ascontiguousarray(q), width)
        return self._rescore(q, ids, dist, k + spare)

    def _retrieve(self, q: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """ScaNN's ``width`` best quantized candidates per query (NaN distance = no candidate)."""
        leaves = self._params["leaves_to_search"]
        if len(q) < PARALLEL_MIN_BATCH:
            return self._searcher.search_batched(
                q, final_num_neighbors=width, leaves_to_search=leaves
            )
        return self._searcher.search_batched_parallel(
            q, final_num_neighbors=width, leaves_to_search=leaves
        )

    def _rescore(
        self, q: np.ndarray, ids: np.ndarray, dist: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact dot products of the retrieved candidates, ranked by ``ranking.top_k``.

        Each row's ids are sorted ascending first, so top_k's lower-position tie-break is the
        contract's lower-index tie-break; padding and duplicate ids score ``-inf`` (dropped).
        """
        n, width = self.size, ids.shape[1]
        indices = np.empty((len(q), k), dtype=np.int64)
        scores = np.empty((len(q), k), dtype=np.float32)
        step = max(1, RESCORE_BUDGET // (width * self.dim))
        for start in range(0, len(q), step):
            rows = slice(start, start + step)
            cand = ids[rows].astype(np.int64)
            cand[np.isnan(dist[rows])] = n
            cand.sort(axis=1)
            invalid = cand >= n
            invalid[:, 1:] |= cand[:, 1:] == cand[:, :-1]
            # np.take: the same rows as fancy indexing, about twice as fast on a large table
            gathered = np.take(self._candidates, np.minimum(cand, n - 1), axis=0)
            exact = np.matmul(gathered, q[rows, :, None])[..., 0]
            exact[invalid] = -np.inf
            local, top = ranking.top_k(exact, k)
            picked = np.take_along_axis(cand, np.maximum(local, 0), axis=1)
            indices[rows] = np.where(local >= 0, picked, -1)
            scores[rows] = top
        return indices, scores

    def save(self, directory: Path) -> None:
        """ScaNN's files (paths relative, so the directory can be moved) and, last, META_FILE
        with what :meth:`load` checks. ``directory`` must be absent or empty."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise DataError("index directory is not empty", path=directory)
        self._searcher.serialize(str(directory), relative_path=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "backend": self.backend,
            "num_tracks": self.size,
            "dim": self.dim,
            "scann_version": importlib.metadata.version("scann"),
            "build": {key: self._params[key] for key in BUILD_KEYS},
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _seeded(config: str, seed: int) -> str:
    """ScaNN's text config with the k-means and quantizer seeds set (the builder has no knob)."""
    from google.protobuf import text_format
    from scann.proto import scann_pb2

    parsed = text_format.Parse(config, scann_pb2.ScannConfig())
    parsed.partitioning.clustering_seed = seed
    parsed.hash.asymmetric_hash.clustering_seed = seed + 1
    parsed.hash.asymmetric_hash.sampling_seed = seed + 1
    return str(text_format.MessageToString(parsed))


_PARAM_TYPES: dict[str, type] = {
    "num_leaves": int,
    "leaves_to_search": int,
    "reorder": int,
    "reorder_per_k": int,
    "training_sample_size": int,
    "dims_per_block": int,
    "anisotropic_threshold": float,
    "seed": int,
}


def _check_params(params: Mapping[str, Any], n: int) -> dict[str, Any]:
    """Every parameter present, of its type and in range (index params come from manifests)."""
    missing = sorted(set(_PARAM_TYPES) - set(params))
    unknown = sorted(set(params) - set(_PARAM_TYPES))
    if missing or unknown:
        raise DataError(f"scann index params: missing {missing}, unknown {unknown}")
    out: dict[str, Any] = {}
    for key, kind in _PARAM_TYPES.items():
        value = params[key]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (kind is int and value != int(value)):
            raise DataError(f"scann index params: {key} must be {kind.__name__}, got {value!r}")
        out[key] = kind(value)
    positive = [key for key in _PARAM_TYPES if key not in ("seed", "anisotropic_threshold")]
    if any(out[key] < 1 for key in positive) or out["num_leaves"] > n:
        raise DataError(f"scann index params: {positive} must be >= 1 and num_leaves <= {n}")
    if out["leaves_to_search"] > out["num_leaves"]:
        raise DataError("scann index params: leaves_to_search must be <= num_leaves")
    return out


def _check_meta(directory: Path, cand: np.ndarray, params: Mapping[str, Any]) -> None:
    """META_FILE against the candidates and the build parameters recorded at export."""
    file = Path(directory) / META_FILE
    if not file.is_file():
        raise DataError(f"not a complete ScaNN index: {META_FILE} is missing", path=directory)
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        got = (meta["format_version"], meta["num_tracks"], meta["dim"], meta["build"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"unreadable index metadata: {one_line(exc)[:200]}", path=file) from None
    if got[0] != FORMAT_VERSION:
        raise DataError(
            f"index format_version {got[0]}, this tracktower reads {FORMAT_VERSION}; re-export",
            path=file,
        )
    for name, have, want in (("num_tracks", got[1], len(cand)), ("dim", got[2], cand.shape[1])):
        if have != want:
            raise DataError(f"index built for {name} {have}, the artifact has {want}", path=file)
    build = {key: params[key] for key in BUILD_KEYS}
    if got[3] != build:
        raise DataError(f"index built with {got[3]}, the manifest says {build}", path=file)
    installed = importlib.metadata.version("scann")
    if meta.get("scann_version") != installed:
        log.warning("index written by scann %s, loaded by %s", meta.get("scann_version"), installed)
