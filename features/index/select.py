"""Choosing, building and validating the index an artifact ships with.

``auto`` picks exact search below :data:`AUTO_MIN_TRACKS` candidates and ScaNN at or above it.
When query vectors are given (export passes the known users'), the built index's recall against
exact search is measured on a seeded sample of them; below ``recall_floor`` the index is searched
wider (query-time settings only, no retraining) a bounded number of times, and if it still falls
short the build fails with the measured recall. An index is never returned unmeasured when
queries were given.

Above ``recall_target`` the search is narrowed instead: ``leaves_to_search`` is halved while the
measured recall@100 stays at or above the target, and the narrowest setting that held is kept.
The size rule's 10% of leaves is a safe start, not a cheap one: at 2.26M clustered tracks it
measured recall@100 0.991 at 151 of 1,504 leaves and 0.988 at 25, while ScaNN's candidate search
took 1.0 ms and 0.24 ms per query. Every narrowing step is measured against the same exact
answers, so it costs one approximate pass over the sample, not another exact search.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from tracktower.features.errors import DataError
from tracktower.features.index.base import IndexInfo, RetrievalIndex, check_candidates
from tracktower.features.index.exact import ExactIndex
from tracktower.features.index.recall import MIN_SAMPLE, recall_against, sample_rows
from tracktower.features.index.scann_index import ScannIndex

__all__ = [
    "AUTO_MIN_TRACKS",
    "DEFAULT_RECALL_FLOOR",
    "DEFAULT_RECALL_TARGET",
    "MAX_RETUNES",
    "build_index",
    "choose_backend",
]

log = logging.getLogger(__name__)

# The measured crossover (benchmarks/index_crossover.py -> benchmarks/results/index_crossover.json,
# 128-d clustered embeddings, 2 shared cores, one BLAS thread, k = 10): single-query p50 exact /
# ScaNN was 0.25 / 0.55 ms at 3,000 tracks, 0.46 / 0.41 ms at 10,000 (recall@100 1.000) and
# 4.2 / 0.42 ms at 30,000; from 10,000 on ScaNN wins at every measured size (97 / 1.0 ms at 1M,
# recall@100 0.987), so 10,000 is the smallest measured size from which ScaNN is faster.
AUTO_MIN_TRACKS = 10_000
DEFAULT_RECALL_FLOOR = 0.95
# Narrowing stops above this, leaving a margin over the floor for the sample's noise (about
# +-0.005 at 1,000 users) and for queries that differ from the sampled ones (sessions).
DEFAULT_RECALL_TARGET = 0.98
MAX_RETUNES = 4  # each doubles leaves_to_search and the rescoring width: 10% of leaves -> all
RECALL_KS = (10, 100)


def choose_backend(n_tracks: int, backend: str = "auto") -> Literal["exact", "scann"]:
    """The backend ``backend`` means for ``n_tracks`` candidates (``auto``: by the crossover)."""
    if backend == "auto":
        return "exact" if n_tracks < AUTO_MIN_TRACKS else "scann"
    if backend == "exact":
        return "exact"
    if backend == "scann":
        return "scann"
    raise DataError(f"index backend must be one of auto, exact, scann; got {backend!r}")


def build_index(
    candidates: np.ndarray,
    backend: Literal["auto", "exact", "scann"] = "auto",
    *,
    seed: int = 0,
    recall_floor: float = DEFAULT_RECALL_FLOOR,
    recall_target: float = DEFAULT_RECALL_TARGET,
    queries: np.ndarray | None = None,
    sample_size: int = MIN_SAMPLE,
    params: Mapping[str, Any] | None = None,
    max_retunes: int = MAX_RETUNES,
    threads: int = 0,
) -> tuple[RetrievalIndex, IndexInfo]:
    """Build the index for ``candidates`` and say what it is and how well it retrieves.

    ``queries``: real query vectors (e.g. every known user's); recall@10/@100 are measured on a
    sample of ``sample_size`` of them drawn with ``seed``. ``params`` override ScaNN's
    size-derived defaults (a ``leaves_to_search`` given there is never narrowed toward
    ``recall_target``, only widened to reach ``recall_floor``); ``threads`` is ScaNN's training
    thread count (0: all cores). Exact search is the reference recall is measured against, so
    its recall is 1 by definition and is reported without being computed.
    """
    cand = check_candidates(candidates)
    chosen = choose_backend(len(cand), backend)
    sample = None
    if queries is not None:
        sample = np.asarray(queries, dtype=np.float32)
        if sample.ndim != 2 or sample.shape[1] != cand.shape[1] or len(sample) == 0:
            raise DataError(
                f"recall queries must be [users >= 1, {cand.shape[1]}], got {sample.shape}"
            )
        sample = sample[sample_rows(len(sample), seed, sample_size)]
    if chosen == "exact":
        start = time.perf_counter()
        exact = ExactIndex(cand)
        measured = sample is not None
        info = IndexInfo(
            "exact",
            {},
            time.perf_counter() - start,
            1.0 if measured else None,
            1.0 if measured else None,
            0 if sample is None else len(sample),
        )
        return exact, info
    # Search settings the caller chose are kept as given, never narrowed.
    chosen_search = params is not None and "leaves_to_search" in params
    floors = (recall_floor, math.inf if chosen_search else max(recall_floor, recall_target))
    return _build_scann(cand, sample, seed, floors, params, max_retunes, threads)


def _build_scann(
    cand: np.ndarray,
    sample: np.ndarray | None,
    seed: int,
    floors: tuple[float, float],
    params: Mapping[str, Any] | None,
    max_retunes: int,
    threads: int,
) -> tuple[RetrievalIndex, IndexInfo]:
    """``floors``: the recall@100 the index must reach, and the one narrowing keeps."""
    recall_floor, recall_target = floors
    start = time.perf_counter()
    index = ScannIndex.build(cand, params, seed=seed, threads=threads)
    seconds = time.perf_counter() - start
    log.info("built a ScaNN index over %d tracks in %.1f s: %s", len(cand), seconds, index.params)
    if sample is None:
        return index, IndexInfo("scann", index.params, seconds)
    exact = ExactIndex(cand)
    truth, _ = exact.search(sample, max(RECALL_KS))
    for attempt in range(max_retunes + 1):
        recall = recall_against(index, exact, sample, truth, RECALL_KS)
        log.info("ScaNN %s: recall %s on %d queries", index.params, recall, len(sample))
        if recall["recall_at_100"] >= recall_floor:
            index, recall = _narrowest(index, exact, sample, truth, recall, recall_target)
            info = IndexInfo(
                "scann",
                index.params,
                seconds,
                recall["recall_at_10"],
                recall["recall_at_100"],
                len(sample),
            )
            return index, info
        if attempt < max_retunes:
            index = _wider(index)
    p = index.params
    raise DataError(
        f"ScaNN index recall@100 {recall['recall_at_100']:.4f} on {len(sample)} queries is below "
        f"the floor {recall_floor} after {max_retunes} retunes (leaves_to_search "
        f"{p['leaves_to_search']}/{p['num_leaves']}, reorder {p['reorder']}); use the exact "
        f"backend or lower the floor"
    )


def _narrowest(
    index: ScannIndex,
    exact: ExactIndex,
    sample: np.ndarray,
    truth: np.ndarray,
    recall: dict[str, float],
    target: float,
) -> tuple[ScannIndex, dict[str, float]]:
    """The index with the fewest leaves searched (halving) whose recall@100 stays >= target,
    and its recall; the index as given when narrowing loses recall at once."""
    while recall["recall_at_100"] >= target and index.params["leaves_to_search"] > 1:
        narrower = index.with_search_params(leaves_to_search=index.params["leaves_to_search"] // 2)
        measured = recall_against(narrower, exact, sample, truth, RECALL_KS)
        log.info("ScaNN %s: recall %s (narrowed)", narrower.params, measured)
        if measured["recall_at_100"] < target:
            break
        index, recall = narrower, measured
    return index, recall


def _wider(index: ScannIndex) -> ScannIndex:
    """The same ScaNN index searched twice as wide: more leaves, more candidates rescored."""
    p = index.params
    return index.with_search_params(
        leaves_to_search=min(p["num_leaves"], 2 * p["leaves_to_search"]),
        reorder=2 * p["reorder"],
        reorder_per_k=2 * p["reorder_per_k"],
    )
