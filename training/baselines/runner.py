"""Evaluate baselines exactly like the two-tower model and log every grid point to MLflow.

Scores come from the baseline, but the top-k (seen tracks excluded) is ``features.ranking.top_k``
and the metrics are ``training.metrics.ranking_metrics``: the same code the two-tower evaluation
and the server use, so a baseline can never look better (or worse) because of its own ranking.
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
from typing import TYPE_CHECKING, Any

from tracktower.features.errors import DataError
from tracktower.training.baselines import Recommender, make_recommender
from tracktower.training.baselines.cli import app, baseline_command

if TYPE_CHECKING:
    import numpy as np
    from scipy.sparse import csr_matrix

    from tracktower.training.data import Prepared

__all__ = [
    "DEFAULTS",
    "GRIDS",
    "QUICK_GRIDS",
    "BaselineResults",
    "GridResult",
    "app",
    "baseline_command",
    "evaluate_recommender",
    "run_baseline",
]

DEFAULT_KS: tuple[int, ...] = (10, 20, 50, 100)
SELECT_METRIC = "recall_at_20"
# Rows of dense scores per chunk: keeps the [B, n_tracks] float32 block near 128 MB.
_SCORE_BUDGET = 32 * 1024 * 1024

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


def users_with_heldout(truth: csr_matrix, unknown: np.ndarray | None) -> np.ndarray:
    import numpy as np

    held = np.diff(truth.indptr)
    if unknown is not None:
        held = held + np.asarray(unknown)
    return np.flatnonzero(held > 0)


def evaluate_recommender(
    model: Recommender,
    encoded: Any,
    split_name: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Un-prefixed ranking metrics of a fitted baseline on ``encoded.<split_name>``.

    Scores are produced in row chunks so memory stays bounded by ``_SCORE_BUDGET`` regardless of
    the number of users; training tracks are excluded by ``ranking.top_k`` itself.
    """
    import numpy as np

    from tracktower.features import ranking
    from tracktower.training.metrics import ranking_metrics

    if split_name not in ("val", "test"):
        raise DataError(f"split_name must be 'val' or 'test', got {split_name!r}")
    truth: csr_matrix = getattr(encoded, split_name)
    unknown = getattr(encoded, f"{split_name}_unknown", None)
    train: csr_matrix = encoded.train
    if users is None:
        users = users_with_heldout(truth, unknown)
    if len(users) == 0:
        return {}
    n_items = train.shape[1]
    k = max(ks)
    chunk = max(1, _SCORE_BUDGET // max(n_items, 1))
    tops = []
    for start in range(0, len(users), chunk):
        rows = users[start : start + chunk]
        idx, _ = ranking.top_k(model.score(rows), k, exclude=train, rows=rows)
        tops.append(idx)
    return ranking_metrics(
        np.concatenate(tops),
        truth[users],
        np.asarray(unknown)[users] if unknown is not None else None,
        list(ks),
        n_items=n_items,
    )


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
    num_threads: int = 0,
    seed: int = 0,
    log_to_mlflow: bool = True,
    on_result: Callable[[GridResult], None] | None = None,
) -> BaselineResults:
    """Fit and evaluate ``name`` at every grid point (``None`` -> the documented grid).

    ``data`` comes from :func:`tracktower.training.data.prepare`, the same loader ``train`` uses;
    ``params`` (e.g. the data and split config) are logged on every run next to the model's own.
    Each point is its own MLflow run (tags ``system``, ``sweep``, ``dataset``); the best by test
    Recall@20 additionally gets ``sweep.best=true``. Selecting on the test split is optimistic
    for the baseline, which only makes the two-tower comparison harder, never easier.
    """
    from tracktower.training import tracking

    if 20 not in ks:
        raise DataError(f"ks must include 20 to select on {SELECT_METRIC}")
    points = list(grid) if grid is not None else GRIDS[name]
    name_of_data = dataset_name or Path(data.source).name or "interactions"
    if log_to_mlflow:
        tracking.configure(tracking_uri)
    sweep = uuid.uuid4().hex[:12]
    for point in points:  # bad hyper-parameters or a too-large EASE fail before any run starts
        check = getattr(_build(name, point, num_threads, seed), "check", None)
        if check is not None:
            check(data.encoded.train)
    results: list[GridResult] = []
    for point in points:
        # Built per point (not up front) so only one fitted model (EASE: n^2 floats) is alive.
        model = _build(name, point, num_threads, seed)
        model_params = model.params()
        title = run_name_for(model_params)
        if not log_to_mlflow:
            result = _fit_and_evaluate(model, data, model_params, ks)
        else:
            tags = {"system": name, "model": name, "sweep": sweep, "dataset": name_of_data}
            with tracking.experiment_run(experiment, title, tags=tags) as run:
                tracking.log_params_flat({**model_params, **(params or {})})
                with warnings.catch_warnings():
                    # MLflow's schema hint about integer columns (the timestamp) is noise here.
                    warnings.filterwarnings("ignore", message=".*integer column")
                    tracking.log_dataset_input(
                        data.interactions,
                        fingerprint=data.fingerprint,
                        name=name_of_data,
                        source=data.source,
                    )
                result = _fit_and_evaluate(model, data, model_params, ks)
                result.run_id = run.info.run_id
                tracking.log_metrics(result.metrics, prefix="test_")
                timings = {"fit_seconds": result.fit_seconds, "eval_seconds": result.eval_seconds}
                tracking.log_metrics({**timings, **result.extra})
                tracking.log_recall_plot(result.metrics, title=f"{name_of_data}: {title}")
        results.append(result)
        if on_result is not None:
            on_result(result)
    out = BaselineResults(name, results)
    if log_to_mlflow and out.best.run_id:
        import mlflow

        mlflow.MlflowClient().set_tag(out.best.run_id, "sweep.best", "true")
    return out


def _build(name: str, point: Mapping[str, Any], num_threads: int, seed: int) -> Recommender:
    kwargs = dict(point)
    if name == "ials":
        kwargs.setdefault("num_threads", num_threads)
        kwargs.setdefault("random_state", seed)
    return make_recommender(name, **kwargs)


def _fit_and_evaluate(
    model: Recommender, data: Prepared, params: dict[str, Any], ks: Sequence[int]
) -> GridResult:
    start = time.perf_counter()
    model.fit(data.encoded.train)
    fit_seconds = time.perf_counter() - start
    extra = {"peak_rss_mb": _peak_rss_mb()}
    model_bytes = getattr(model, "memory_bytes", None)
    if model_bytes:
        extra["model_mb"] = model_bytes / 1e6
    start = time.perf_counter()
    metrics = evaluate_recommender(model, data.encoded, "test", ks)
    eval_seconds = time.perf_counter() - start
    return GridResult(params, metrics, fit_seconds, eval_seconds, extra=extra)
