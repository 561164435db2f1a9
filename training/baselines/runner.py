"""Evaluate baselines exactly like the two-tower model and log every grid point to MLflow.

Scores come from the baseline, but the top-k is ``features.ranking``'s (same row blocks, same
tie-break) and the metrics are ``training.metrics.ranking_metrics``: the same code the two-tower
evaluation and the server use, so a baseline can never look better (or worse) because of its own
ranking. The one exception, a baseline that ranks without scoring every track
(:class:`RanksDirectly`, the popularity baseline at catalogue scale), must return exactly the
lists ``ranking.top_k`` would, which its unit test checks against brute force. What the lists
may not contain is passed in explicitly, and defaults to what the two-tower test excludes
(``Encoded.known``).
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
    "GRIDS",
    "QUICK_GRIDS",
    "BaselineResults",
    "GridResult",
    "RanksDirectly",
    "evaluate_recommender",
    "run_baseline",
    "run_name_for",
]

SELECT_METRIC = "recall_at_20"

# Default hyper-parameters (``--no-grid``) and the documented grids (benchmarks/README.md explains
# the choice and the measured optima). EASE's lambda is relative to Gram entries (co-occurrence
# counts); the best values on both benchmark datasets were 50-100. iALS's regularization in
# implicit is absolute (not scaled by the number of interactions) and alpha sets the confidence of
# observed pairs; the defaults are the fast end of the benchmark's good region.
DEFAULTS: dict[str, dict[str, Any]] = {
    "popular": {},
    "ease": {"l2": 100.0},
    "ials": {"factors": 256, "regularization": 100.0, "alpha": 40.0, "iterations": 15},
}


def _ials_grid(factors: Sequence[int], regs: Sequence[float], alphas: Sequence[float]) -> list:
    return [
        {"factors": f, "regularization": r, "alpha": a, "iterations": 15}
        for f, r, a in itertools.product(factors, regs, alphas)
    ]


GRIDS: dict[str, list[dict[str, Any]]] = {
    "popular": [{}],
    "ease": [{"l2": v} for v in (25.0, 50.0, 100.0, 200.0, 500.0, 1000.0)],
    "ials": _ials_grid((128, 256, 512), (1.0, 10.0, 100.0), (10.0, 40.0, 100.0)),
}
QUICK_GRIDS: dict[str, list[dict[str, Any]]] = {
    "popular": [{}],
    "ease": [{"l2": v} for v in (100.0, 500.0)],
    "ials": _ials_grid((64,), (1.0,), (1.0, 10.0)),
}


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
    params: dict[str, Any]
    metrics: dict[str, float]
    fit_seconds: float
    eval_seconds: float
    run_id: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class BaselineResults:
    name: str
    results: list[GridResult]

    @property
    def best(self) -> GridResult:
        return max(self.results, key=lambda r: r.metrics.get(SELECT_METRIC, float("-inf")))


def run_name_for(params: Mapping[str, Any]) -> str:
    """Short, readable MLflow run names: ``ease λ=500``, ``ials f=128 reg=1 alpha=10``."""
    model = params.get("model", "?")
    if model == "ease":
        return f"ease λ={params['lambda']:g}"
    if model == "ials":
        name = (
            f"ials f={params['factors']} reg={params['regularization']:g} alpha={params['alpha']:g}"
        )
        return name + (" log" if params.get("scaling") == "log" else "")
    return str(model)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


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
    num_threads: int = 0,
    seed: int = 0,
    log_to_mlflow: bool = True,
    on_result: Callable[[GridResult], None] | None = None,
) -> BaselineResults:
    """Fit on ``data.encoded.train`` and test ``name`` at every grid point (``None`` -> the
    documented grid).

    ``data`` comes from :func:`tracktower.training.data.prepare`, the same loader ``train`` uses;
    ``params`` (e.g. the data and split config) are logged on every run next to the model's own.
    ``exclude`` is what the test lists may not contain; the default, ``Encoded.known`` (train +
    validation), is what the two-tower test excludes, so the two are compared on equal terms.
    Each point is its own MLflow run (tags ``system``, ``sweep``, ``dataset``); the best by test
    Recall@20 additionally gets ``sweep.best=true``. Selecting on the test split is optimistic
    for the baseline, which only makes the two-tower comparison harder, never easier.
    """
    from tracktower.training import tracking

    if 20 not in ks:
        raise DataError(f"ks must include 20 to select on {SELECT_METRIC}")
    if exclude is None:
        exclude = data.encoded.known
    points = list(grid) if grid is not None else GRIDS[name]
    for point in points:  # bad hyper-parameters or a too-large EASE fail before any run starts
        check = getattr(_build(name, point, num_threads, seed), "check", None)
        if check is not None:
            check(data.encoded.train)
    if log_to_mlflow:
        tracking.configure(tracking_uri)
    name_of_data = dataset_name or Path(data.source).name or "interactions"
    tags = {"system": name, "model": name, "sweep": uuid.uuid4().hex[:12], "dataset": name_of_data}
    results: list[GridResult] = []
    for point in points:
        # Built per point (not up front) so only one fitted model (EASE: n^2 floats) is alive.
        model = _build(name, point, num_threads, seed)
        if log_to_mlflow:
            result = _logged_fit(model, data, ks, exclude, experiment, tags, params or {})
        else:
            result = _fit_and_evaluate(model, data, ks, exclude)
        results.append(result)
        if on_result is not None:
            on_result(result)
    out = BaselineResults(name, results)
    if log_to_mlflow and out.best.run_id:
        import mlflow

        mlflow.MlflowClient().set_tag(out.best.run_id, "sweep.best", "true")
    return out


def _logged_fit(
    model: Recommender,
    data: Prepared,
    ks: Sequence[int],
    exclude: sp.csr_matrix,
    experiment: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
) -> GridResult:
    """:func:`_fit_and_evaluate` inside its own MLflow run, with the data and metrics logged."""
    from tracktower.training import tracking

    title = run_name_for(model.params())
    with tracking.experiment_run(experiment, title, tags=dict(tags)) as run:
        tracking.log_params_flat({**model.params(), **params})
        with warnings.catch_warnings():
            # MLflow's schema hint about integer columns (the timestamp) is noise here.
            warnings.filterwarnings("ignore", message=".*integer column")
            tracking.log_dataset(data, name=tags["dataset"])
        result = _fit_and_evaluate(model, data, ks, exclude)
        result.run_id = run.info.run_id
        timings = {"fit_seconds": result.fit_seconds, "eval_seconds": result.eval_seconds}
        tracking.log_metrics({**timings, **result.extra})
        tracking.log_test_metrics(result.metrics, title=f"{tags['dataset']}: {title}")
    return result


def _build(name: str, point: Mapping[str, Any], num_threads: int, seed: int) -> Recommender:
    kwargs = dict(point)
    if name == "ials":
        kwargs.setdefault("num_threads", num_threads)
        kwargs.setdefault("random_state", seed)
    return make_recommender(name, **kwargs)


def _fit_and_evaluate(
    model: Recommender, data: Prepared, ks: Sequence[int], exclude: sp.csr_matrix
) -> GridResult:
    start = time.perf_counter()
    model.fit(data.encoded.train)
    fit_seconds = time.perf_counter() - start
    extra = {"peak_rss_mb": _peak_rss_mb()}
    model_bytes = getattr(model, "memory_bytes", None)
    if model_bytes:
        extra["model_mb"] = model_bytes / 1e6
    start = time.perf_counter()
    enc = data.encoded
    metrics = evaluate_recommender(model, enc.test, enc.test_unknown, ks, exclude=exclude)
    eval_seconds = time.perf_counter() - start
    return GridResult(model.params(), metrics, fit_seconds, eval_seconds, extra=extra)
