"""Tune baselines on validation, score the choice on test exactly like the two-tower model, and
log every grid point to MLflow.

Scores come from the baseline, but the top-k is ``features.ranking``'s (same row blocks, same
tie-break) and the metrics are ``training.metrics.ranking_metrics``: the same code the two-tower
evaluation and the server use, so a baseline can never look better (or worse) because of its own
ranking. The one exception, a baseline that ranks without scoring every track
(:class:`RanksDirectly`, the popularity baseline at catalogue scale), must return exactly the
lists ``ranking.top_k`` would, which its unit test checks against brute force. What the lists
may not contain is passed in explicitly, and defaults to what the two-tower test excludes
(``Encoded.known``).

Hyper-parameters are chosen on VAL, never on TEST (issue 12): a baseline tuned on its own test
split would be flattered exactly as much as a two-tower model tuned that way.
"""

from __future__ import annotations

import itertools
import resource
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from tracktower.features import ranking
from tracktower.features.errors import DataError
from tracktower.training.baselines import Recommender, make_recommender
from tracktower.training.metrics import (
    DEFAULT_KS,
    Sampling,
    ranking_metrics,
    sample_users,
    users_with_heldout,
)

if TYPE_CHECKING:
    from tracktower.training.data import Prepared

__all__ = [
    "DEFAULTS",
    "FOCUSED_GRIDS",
    "GRIDS",
    "GRID_SIZES",
    "QUICK_GRIDS",
    "BaselineResults",
    "GridResult",
    "RanksDirectly",
    "count_share",
    "evaluate_recommender",
    "grid_for",
    "run_baseline",
    "run_name_for",
    "selection_key",
]

# Grid points are compared on VAL by this metric, ties broken by the second (both un-prefixed).
SELECT_METRIC = "recall_at_20"
TIE_METRIC = "ndcg_at_10"
# A selected model at most this large is kept in memory for its TEST scoring; a larger one (EASE:
# n^2 floats) is refitted instead (every fit is deterministic), so at most one is ever alive.
KEEP_BYTES = 256 << 20

# Default hyper-parameters (``--no-grid``) and the documented grids (benchmarks/README.md explains
# the choice). Every point is fitted on TRAIN and compared on VAL; only the one chosen is scored
# on TEST. EASE's lambda is relative to Gram entries (co-occurrence counts): 50..2000 spans both
# benchmark datasets' good regions. iALS's regularization in implicit is absolute (not scaled by
# the number of interactions) and alpha sets the confidence of observed pairs; the issue's
# hidden-dataset optimum (512 factors, regularization 100, alpha 40, binary confidence) is a grid
# point. RP3beta's grid is Dacrema et al.'s region around alpha 1, beta 0.5.
DEFAULTS: dict[str, dict[str, Any]] = {
    "popular": {},
    "ease": {"l2": 100.0},
    "ials": {
        "factors": 256,
        "regularization": 100.0,
        "alpha": 40.0,
        "iterations": 15,
        "scaling": "binary",
    },
    "rp3beta": {"alpha": 0.5, "beta": 0.3, "neighbors": 200},  # the grid's VAL optimum on MPD
}


def _ials_grid(
    factors: Sequence[int], regs: Sequence[float], alphas: Sequence[float]
) -> list[dict[str, Any]]:
    return [
        {"factors": f, "regularization": r, "alpha": a, "iterations": 15, "scaling": "binary"}
        for f, r, a in itertools.product(factors, regs, alphas)
    ]


def _rp3beta_grid(
    alphas: Sequence[float], betas: Sequence[float], neighbors: Sequence[int]
) -> list[dict[str, Any]]:
    return [
        {"alpha": a, "beta": b, "neighbors": k}
        for a, b, k in itertools.product(alphas, betas, neighbors)
    ]


# Measured on MPD 5-core (6.4k users x 23k tracks, 307k TRAIN rows at val 0.1 / test 0.2, the
# 2 shared cores, 2026-11-29). iALS fits: 64 factors 2-3 s, 128 4-5 s, 256 8-9 s, 512 24-32 s;
# VAL scoring 2-3 s a point; the 32-point grid below took 402 s (fits + VAL), under the
# 15-minute bound for one peer, so it is complete rather than coarse-to-fine. Its VAL optimum
# there was 512 factors, regularization 100, alpha 40, binary (val R@20 0.171; next 0.166).
# On count data (:func:`grid_for`) each point also runs with log confidence (64 points).
# RP3beta: 10-17 s a fit, 6-8 s VAL scoring (sparse W), the 18 points 363 s.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "popular": [{}],
    "ease": [{"l2": v} for v in (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)],
    "ials": _ials_grid((64, 128, 256, 512), (1.0, 10.0, 100.0, 300.0), (10.0, 40.0)),
    "rp3beta": _rp3beta_grid((0.5, 0.8, 1.0), (0.0, 0.3, 0.5), (100, 200)),
}
# A third of the full grids' time on MPD 5-core (EASE's 23k x 23k inverse is ~80 s a point
# there), for repeating the benchmark over split seeds on 2 cores: the points around the full
# grids' VAL choices on MPD seed 0 (EASE 200-500, iALS 512 / 100 / 40, RP3beta 0.5 / 0.3 / 200),
# still reaching 512 factors and regularization 300.
FOCUSED_GRIDS: dict[str, list[dict[str, Any]]] = {
    "popular": [{}],
    "ease": [{"l2": v} for v in (100.0, 200.0, 500.0, 1000.0)],
    "ials": _ials_grid((128, 512), (10.0, 100.0, 300.0), (10.0, 40.0)),
    "rp3beta": _rp3beta_grid((0.5, 0.8, 1.0), (0.3, 0.5), (200,)),
}
QUICK_GRIDS: dict[str, list[dict[str, Any]]] = {
    "popular": [{}],
    "ease": [{"l2": v} for v in (100.0, 500.0)],
    "ials": _ials_grid((64,), (10.0, 100.0), (40.0,)),
    "rp3beta": _rp3beta_grid((1.0,), (0.0, 0.5), (100,)),
}


# Count confidence is tried when at least this share of the stored TRAIN weights differ from
# the most common one: msd-sample (play counts) 42%; MPD 5-core 1.2% (a track twice in one
# playlist), where doubling the grid would only spend time.
COUNT_SHARE = 0.1


def count_share(train: sp.csr_matrix) -> float:
    """Share of stored weights that differ from the most common weight (0 for 0/1 data)."""
    data = np.asarray(train.data)
    if data.size == 0:
        return 0.0
    _, counts = np.unique(data, return_counts=True)
    return 1.0 - float(counts.max()) / data.size


GRID_SIZES: dict[str, dict[str, list[dict[str, Any]]]] = {
    "full": GRIDS,
    "focused": FOCUSED_GRIDS,
    "quick": QUICK_GRIDS,
}


def grid_for(
    name: str, train: sp.csr_matrix, *, quick: bool = False, size: str = "full"
) -> list[dict[str, Any]]:
    """The documented grid of ``name`` for this TRAIN matrix (``size``: a key of
    :data:`GRID_SIZES`; ``quick`` is ``size="quick"``): on count data
    (:func:`count_share` >= :data:`COUNT_SHARE`) every iALS point is tried with binary and with
    log confidence, 1 + alpha * log1p(w), since which one wins depends on how heavy the counts'
    tail is; on (nearly) 0/1 data the two would differ only by a rescaled alpha, so binary alone
    is tried."""
    if name not in GRIDS:
        raise DataError(f"unknown baseline {name!r}; expected one of {', '.join(GRIDS)}")
    if size not in GRID_SIZES:
        raise DataError(f"unknown grid size {size!r}; expected one of {', '.join(GRID_SIZES)}")
    points = [dict(p) for p in GRID_SIZES["quick" if quick else size][name]]
    if name == "ials" and count_share(train) >= COUNT_SHARE:
        points += [{**p, "scaling": "log"} for p in points if p.get("scaling") == "binary"]
    return points


@runtime_checkable
class RanksDirectly(Protocol):
    """A baseline whose lists need not score every track (``Popularity``): ``top_k`` returns
    exactly what ``ranking.top_k(score(user_rows), k, exclude, rows=user_rows)`` would, and the
    runner then uses it instead of :meth:`Recommender.score`."""

    def top_k(
        self, user_rows: np.ndarray, k: int, exclude: sp.csr_matrix | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


# Users ranked at once through RanksDirectly.top_k: bounds its [users, k] and exclusion arrays.
DIRECT_BLOCK = 1 << 16


def evaluate_recommender(
    model: Recommender,
    truth: sp.csr_matrix,
    unknown: np.ndarray | None,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exclude: sp.csr_matrix,
    users: np.ndarray | None = None,
    sampling: Sampling | None = None,
) -> dict[str, float]:
    """Un-prefixed ranking metrics of a fitted baseline against ``truth`` (users x tracks).

    ``exclude`` holds the tracks each user already has (never recommended, never hits); it is a
    parameter, not read off the data, so that every system in one comparison is scored against
    the same set (``Encoded.known``). ``users`` defaults to those with held-out tracks.
    Scores are produced in row blocks (``ranking.top_k_chunks``), so memory stays bounded
    whatever the number of users; a :class:`RanksDirectly` baseline ranks without scores.
    ``sampling`` (``EvalConfig``): above its pair budget the users are
    ``metrics.sample_users``' seeded sample, the two-tower test's own, and the result adds
    ``eval_users``, ``eval_sampled`` and bootstrap intervals (``metrics.ranking_metrics``).
    """
    truth = sp.csr_matrix(truth)
    if exclude.shape != truth.shape:
        raise ValueError(f"exclude has shape {exclude.shape} but truth has {truth.shape}")
    if users is None:
        users = users_with_heldout(truth, unknown)
    n_items = truth.shape[1]
    sample = sample_users(users, n_items, sampling)
    users = sample.users
    if len(users) == 0:
        return {}
    metrics = ranking_metrics(
        _top_lists(model, users, n_items, max(ks), exclude),
        truth[users],
        np.asarray(unknown)[users] if unknown is not None else None,
        list(ks),
        n_items=n_items,
        bootstrap=sampling.bootstrap if sampling is not None else 0,
        seed=sampling.seed if sampling is not None else 0,
    )
    if sampling is not None:
        metrics.update(sample.as_metrics())
    return metrics


def _top_lists(
    model: Recommender, users: np.ndarray, n_items: int, k: int, exclude: sp.csr_matrix
) -> np.ndarray:
    """int64 [len(users), k]: each user's top ``k``, ``exclude`` rows removed."""
    if isinstance(model, RanksDirectly):
        blocks = [
            model.top_k(users[start : start + DIRECT_BLOCK], k, exclude)[0]
            for start in range(0, len(users), DIRECT_BLOCK)
        ]
        return np.concatenate(blocks)
    scored = ranking.top_k_chunks(
        lambda block: model.score(users[block]), len(users), n_items, k, exclude, rows=users
    )
    return np.concatenate([idx for idx, _ in scored])


@dataclass
class GridResult:
    """One grid point. ``metrics`` are its VAL metrics (un-prefixed; what the choice is made
    on, ``{}`` without validation rows); ``test_metrics`` stay empty except on the point chosen.
    ``eval_seconds`` is the VAL scoring; the chosen point's TEST scoring (and refit, if any) is
    in ``extra`` as ``test_eval_seconds`` / ``refit_seconds``."""

    params: dict[str, Any]
    metrics: dict[str, float]
    fit_seconds: float
    eval_seconds: float
    run_id: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    selected: bool = False


@dataclass
class BaselineResults:
    """Every grid point (``results``, grid order), the one chosen on VAL (``best``) and its
    TEST metrics (``test_metrics``, un-prefixed)."""

    name: str
    results: list[GridResult]
    best_index: int = 0
    selection: str = f"val_{SELECT_METRIC}"

    @property
    def best(self) -> GridResult:
        return self.results[self.best_index]

    @property
    def test_metrics(self) -> dict[str, float]:
        return self.best.test_metrics


def selection_key(metrics: Mapping[str, float]) -> tuple[float, float]:
    """VAL Recall@20, then VAL NDCG@10 on a tie; a point without them ranks last."""
    return (
        metrics.get(SELECT_METRIC, float("-inf")),
        metrics.get(TIE_METRIC, float("-inf")),
    )


def run_name_for(params: Mapping[str, Any]) -> str:
    """Short, readable MLflow run names: ``ease λ=500``, ``ials f=128 reg=1 alpha=10 binary``,
    ``rp3beta a=0.8 b=0.3 k=200``."""
    model = params.get("model", "?")
    if model == "ease":
        return f"ease λ={params['lambda']:g}"
    if model == "ials":
        name = (
            f"ials f={params['factors']} reg={params['regularization']:g} alpha={params['alpha']:g}"
        )
        scaling = params.get("scaling", "linear")
        return name + ("" if scaling == "linear" else f" {scaling}")
    if model == "rp3beta":
        return f"rp3beta a={params['alpha']:g} b={params['beta']:g} k={params['neighbors']}"
    return str(model)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@dataclass(frozen=True)
class _NoBootstrap:
    """The caller's user budget without bootstrap intervals: VAL only ranks grid points (as
    ``train``'s per-epoch validation, which drops them too)."""

    max_pairs: int
    seed: int
    bootstrap: int = 0


@dataclass
class _Sweep:
    """What every point of one sweep shares."""

    name: str
    data: Prepared
    ks: Sequence[int]
    test_exclude: sp.csr_matrix
    sampling: Sampling | None
    num_threads: int
    seed: int
    tags: dict[str, str]
    logged: dict[str, Any] | None  # MLflow: experiment and params; None -> no logging


def run_baseline(
    name: str,
    data: Prepared,
    grid: Sequence[Mapping[str, Any]] | None = None,
    *,
    experiment: str = "tracktower",
    tracking_uri: str | None = None,
    dataset_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    exclude: sp.csr_matrix | None = None,
    sampling: Sampling | None = None,
    num_threads: int = 0,
    seed: int = 0,
    log_to_mlflow: bool = True,
    on_result: Callable[[GridResult], None] | None = None,
) -> BaselineResults:
    """Choose ``name``'s hyper-parameters on VAL and score the choice once on TEST.

    Every point of ``grid`` (``None`` -> :func:`grid_for`) is fitted on ``data.encoded.train``
    and scored on VAL with TRAIN excluded, as ``train`` validates; the point with the best VAL
    Recall@20 (ties: NDCG@10) is then scored on TEST with ``exclude`` removed from its lists
    (default ``Encoded.known``, TRAIN + VAL: what the two-tower test excludes). Nothing is refit
    on TRAIN + VAL: every system in a comparison learns from the same TRAIN. A grid of more than
    one point needs validation rows (DataError otherwise); a single point is scored on VAL when
    there is one and on TEST either way. ``sampling`` (``EvalConfig``) is the evaluation budget
    of both, as in ``train``; VAL drops the bootstrap intervals.

    Each point is an MLflow run (tags ``system``, ``sweep``, ``dataset``, ``sweep.select``) with
    ``val_*`` metrics; only the chosen one gets ``test_*`` metrics and ``sweep.best=true``.
    """
    if 20 not in ks:
        raise DataError(f"ks must include 20 to select on {SELECT_METRIC}")
    points = list(grid) if grid is not None else grid_for(name, data.encoded.train)
    if not points:
        raise DataError(f"baseline {name!r}: the grid is empty")
    if len(points) > 1 and data.encoded.val.nnz == 0:
        raise DataError(
            f"a {len(points)}-point {name} grid is chosen on validation rows and there are "
            "none: set split.val_fraction > 0 (or run a single point, e.g. --no-grid)"
        )
    for point in points:  # bad hyper-parameters or a too-large EASE fail before any run starts
        check = getattr(_build(name, point, num_threads, seed), "check", None)
        if check is not None:
            check(data.encoded.train)
    sweep = _sweep(name, data, ks, exclude, sampling, num_threads, seed, len(points))
    if log_to_mlflow:
        from tracktower.training import tracking

        tracking.configure(tracking_uri)
        name_of_data = dataset_name or Path(data.source).name or "interactions"
        sweep.tags["dataset"] = name_of_data
        sweep.logged = {"experiment": experiment, "params": dict(params or {})}
    return _select_and_test(sweep, points, on_result)


def _sweep(
    name: str,
    data: Prepared,
    ks: Sequence[int],
    exclude: sp.csr_matrix | None,
    sampling: Sampling | None,
    num_threads: int,
    seed: int,
    n_points: int,
) -> _Sweep:
    tags = {
        "system": name,
        "model": name,
        "sweep": uuid.uuid4().hex[:12],
        "sweep.points": str(n_points),
        "sweep.select": f"val_{SELECT_METRIC}" if n_points > 1 else "single point",
        "sweep.select_tie": f"val_{TIE_METRIC}",
        "sweep.select_split": "val",
    }
    test_exclude = data.encoded.known if exclude is None else exclude
    return _Sweep(name, data, ks, test_exclude, sampling, num_threads, seed, tags, None)


def _select_and_test(
    sweep: _Sweep,
    points: Sequence[Mapping[str, Any]],
    on_result: Callable[[GridResult], None] | None,
) -> BaselineResults:
    """Fit and validate every point, keeping at most the best-so-far model (when small), then
    score the best on TEST (refitting it if it was too large to keep)."""
    results: list[GridResult] = []
    best_index, kept = 0, None
    for i, point in enumerate(points):
        # Built per point (not up front) so only one large fitted model (EASE) is alive.
        model = _build(sweep.name, point, sweep.num_threads, sweep.seed)
        result = _validate_point(sweep, model)
        results.append(result)
        if i == 0 or selection_key(result.metrics) > selection_key(results[best_index].metrics):
            best_index = i
            small = getattr(model, "memory_bytes", 0) <= KEEP_BYTES
            kept = model if small or i == len(points) - 1 else None
        del model
        if on_result is not None:
            on_result(result)
    best = results[best_index]
    if kept is None:
        kept = _build(sweep.name, points[best_index], sweep.num_threads, sweep.seed)
        started = time.perf_counter()
        kept.fit(sweep.data.encoded.train)
        best.extra["refit_seconds"] = time.perf_counter() - started
    _test_point(sweep, kept, best)
    return BaselineResults(sweep.name, results, best_index, sweep.tags["sweep.select"])


def _validate_point(sweep: _Sweep, model: Recommender) -> GridResult:
    """Fit on TRAIN and score VAL, inside the point's own MLflow run when logging."""
    if sweep.logged is None:
        return _fit_and_validate(sweep, model)
    from tracktower.training import tracking

    title = run_name_for(model.params())
    experiment = sweep.logged["experiment"]
    with tracking.experiment_run(experiment, title, tags=dict(sweep.tags)) as run:
        tracking.log_params_flat({**model.params(), **sweep.logged["params"]})
        with warnings.catch_warnings():
            # MLflow's schema hint about integer columns (the timestamp) is noise here.
            warnings.filterwarnings("ignore", message=".*integer column")
            tracking.log_dataset(sweep.data, name=sweep.tags["dataset"])
        result = _fit_and_validate(sweep, model)
        result.run_id = run.info.run_id
        timings = {"fit_seconds": result.fit_seconds, "val_eval_seconds": result.eval_seconds}
        tracking.log_metrics({**timings, **result.extra})
        tracking.log_metrics(result.metrics, prefix="val_")
    return result


def _fit_and_validate(sweep: _Sweep, model: Recommender) -> GridResult:
    enc = sweep.data.encoded
    start = time.perf_counter()
    model.fit(enc.train)
    fit_seconds = time.perf_counter() - start
    extra = {"peak_rss_mb": _peak_rss_mb()}
    model_bytes = getattr(model, "memory_bytes", None)
    if model_bytes:
        extra["model_mb"] = model_bytes / 1e6
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    if enc.val.nnz > 0:
        budget = None
        if sweep.sampling is not None:
            budget = _NoBootstrap(sweep.sampling.max_pairs, sweep.sampling.seed)
        metrics = evaluate_recommender(
            model, enc.val, enc.val_unknown, sweep.ks, exclude=enc.train, sampling=budget
        )
    eval_seconds = time.perf_counter() - start
    return GridResult(model.params(), metrics, fit_seconds, eval_seconds, extra=extra)


def _test_point(sweep: _Sweep, model: Recommender, best: GridResult) -> None:
    """The chosen point's TEST metrics, logged into its run with ``sweep.best=true``."""
    enc = sweep.data.encoded
    start = time.perf_counter()
    best.test_metrics = evaluate_recommender(
        model, enc.test, enc.test_unknown, sweep.ks, exclude=sweep.test_exclude,
        sampling=sweep.sampling,
    )  # fmt: skip
    best.extra["test_eval_seconds"] = time.perf_counter() - start
    best.selected = True
    if sweep.logged is None or best.run_id is None:
        return
    from tracktower.training import tracking

    title = f"{sweep.tags['dataset']}: {run_name_for(best.params)}"
    with tracking.resumed_run(best.run_id):
        tracking.set_tags({"sweep.best": "true"})
        timings = {
            k: v for k, v in best.extra.items() if k in ("refit_seconds", "test_eval_seconds")
        }
        tracking.log_metrics(timings)
        tracking.log_test_metrics(best.test_metrics, title=title)


def _build(name: str, point: Mapping[str, Any], num_threads: int, seed: int) -> Recommender:
    kwargs = dict(point)
    if name == "ials":
        kwargs.setdefault("num_threads", num_threads)
        kwargs.setdefault("random_state", seed)
    return make_recommender(name, **kwargs)
