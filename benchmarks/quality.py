#!/usr/bin/env python
"""Offline quality benchmark on the real datasets: every system, same split, same metrics.

Usage (from the repository root):

    python benchmarks/quality.py                      # full grids, mpd + msd
    python benchmarks/quality.py --quick --datasets mpd

Each dataset is loaded with ``tracktower.training.data.prepare`` (the loader ``train`` uses),
k-cored, and split with a seeded per-user random 80/20 holdout (no validation slice: a system that
needs one carves it out of ``train`` itself). Every system is fitted on ``train`` and scored on
``test`` with the shared ``ranking.top_k`` + ``metrics.ranking_metrics``; every grid point is an
MLflow run in the experiment ``tracktower-quality``. The table is printed and written to
``benchmarks/results/quality.json``. See benchmarks/README.md for the grids and the numbers.

Adding a system: append a :class:`System` to the list returned by :func:`two_tower_systems` (or
write another hook like it); ``fit_and_score`` gets a :class:`BenchContext` and returns a
:class:`SystemResult` with un-prefixed metric names (``recall_at_20``...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tracktower.training.metrics import DEFAULT_KS

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "quality.json"
EXPERIMENT = "tracktower-quality"
TABLE_METRICS = (
    *("recall_at_10", "recall_at_20", "recall_at_50", "recall_at_100"),
    *("ndcg_at_10", "ndcg_at_100"),
)


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    name: str
    interactions: Path
    tracks: Path | None
    k_core: int
    note: str


def dataset_specs(root: Path) -> dict[str, DatasetSpec]:
    """The two benchmark datasets and why each k-core was chosen."""
    return {
        "mpd": DatasetSpec(
            "mpd",
            "mpd-subset",
            root / "mpd-subset" / "interactions.parquet",
            root / "mpd-subset" / "tracks.parquet",
            5,
            "5-core: drops the ~88% of tracks that occur in < 5 playlists (no collaborative "
            "signal) and keeps EASE's Gram at ~23k^2",
        ),
        "msd": DatasetSpec(
            "msd",
            "msd-sample",
            root / "msd-sample" / "interactions.parquet",
            root / "msd-sample" / "tracks.parquet",
            2,
            "2-core keeps 96% of rows (single-listener songs cannot be recommended "
            "collaboratively anyway); play counts are the weights",
        ),
    }


@dataclass
class BenchContext:
    """Everything a system needs: the prepared split plus run settings."""

    spec: DatasetSpec
    data: Any  # tracktower.training.data.Prepared
    experiment: str
    tracking_uri: str | None
    seed: int
    quick: bool
    threads: int
    skip_two_tower: bool = False
    ks: tuple[int, ...] = DEFAULT_KS
    params: dict[str, Any] = field(default_factory=dict)  # data/split params logged on each run


@dataclass
class SystemResult:
    system: str
    params: dict[str, Any]
    metrics: dict[str, float]  # un-prefixed test metrics of the selected configuration
    fit_seconds: float
    run_id: str | None = None
    grid: list[dict[str, Any]] = field(default_factory=list)  # every point tried
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class System:
    name: str
    fit_and_score: Callable[[BenchContext], SystemResult]


def _baseline(name: str) -> System:
    def fit_and_score(ctx: BenchContext) -> SystemResult:
        from tracktower.training.baselines.runner import (
            GRIDS,
            QUICK_GRIDS,
            GridResult,
            run_baseline,
            run_name_for,
        )

        grid = list((QUICK_GRIDS if ctx.quick else GRIDS)[name])
        if name == "ials" and ctx.spec.key == "msd":
            # Play counts are heavy-tailed: also try log confidence, 1 + alpha*log1p(plays).
            grid += [{**point, "scaling": "log"} for point in grid]

        def progress(r: GridResult) -> None:
            print(
                f"    {run_name_for(r.params):<34} R@20={r.metrics.get('recall_at_20', 0):.4f} "
                f"N@10={r.metrics.get('ndcg_at_10', 0):.4f} fit={r.fit_seconds:7.1f}s "
                f"eval={r.eval_seconds:5.1f}s rss={r.extra.get('peak_rss_mb', 0):,.0f}MB",
                flush=True,
            )

        out = run_baseline(
            name,
            ctx.data,
            grid,
            experiment=ctx.experiment,
            tracking_uri=ctx.tracking_uri,
            dataset_name=ctx.spec.name,
            params=ctx.params,
            ks=ctx.ks,
            # The whole 80% train part: the pairs the two-tower entries exclude too (their train
            # plus early-stopping slice is this part again), so the table's rows are comparable.
            exclude=ctx.data.encoded.known,
            num_threads=ctx.threads,
            seed=ctx.seed,
            on_result=progress,
        )
        best = out.best
        return SystemResult(
            system=name,
            params={k: v for k, v in best.params.items() if k != "model"},
            metrics=best.metrics,
            fit_seconds=best.fit_seconds,
            run_id=best.run_id,
            grid=[
                {
                    "params": r.params,
                    "recall_at_20": r.metrics.get("recall_at_20"),
                    "ndcg_at_10": r.metrics.get("ndcg_at_10"),
                    "fit_seconds": round(r.fit_seconds, 2),
                    "eval_seconds": round(r.eval_seconds, 2),
                    **{k: round(v, 1) for k, v in r.extra.items()},
                }
                for r in out.results
            ],
            extra={k: round(v, 1) for k, v in best.extra.items()},
        )

    return System(name, fit_and_score)


def baseline_systems(ctx: BenchContext) -> list[System]:
    return [_baseline("popular"), _baseline("ease"), _baseline("ials")]


def two_tower_systems(ctx: BenchContext) -> list[System]:
    """HOOK for the two-tower entries (owned by the lead): return System(...) items here.

    ``ctx.data.encoded.train`` is the 80% training split; carve a validation slice out of it for
    early stopping, never touch ``ctx.data.encoded.test`` until the final scoring.
    """
    if ctx.skip_two_tower:
        return []
    sys.path.insert(0, str(REPO / "benchmarks"))
    import two_tower

    return list(two_tower.systems(ctx, System, SystemResult, cold=not ctx.quick))


def _fmt_params(result: SystemResult) -> str:
    """Baselines reuse their MLflow run name ("λ=100", "f=64 reg=1 alpha=10")."""
    from tracktower.training.baselines import BASELINES
    from tracktower.training.baselines.runner import run_name_for

    if result.system in BASELINES:
        return run_name_for({"model": result.system, **result.params}).removeprefix(result.system)
    return " ".join(f"{k}={v}" for k, v in result.params.items())


def print_table(spec: DatasetSpec, results: Sequence[SystemResult]) -> None:
    heads = ["R@10", "R@20", "R@50", "R@100", "N@10", "N@100"]
    print(f"\n{spec.name}")
    print(f"{'system':<10} {'best params':<44} " + " ".join(f"{h:>6}" for h in heads) + "  fit s")
    for r in results:
        vals = " ".join(f"{r.metrics.get(m, float('nan')):6.4f}" for m in TABLE_METRICS)
        print(f"{r.system:<10} {_fmt_params(r).strip()[:44]:<44} {vals} {r.fit_seconds:6.1f}")


def run_dataset(spec: DatasetSpec, args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from tracktower.training.config import DataConfig, SplitConfig
    from tracktower.training.data import prepare

    if not spec.interactions.is_file():
        raise SystemExit(f"error: {spec.interactions}: dataset not found (see --data-root)")
    raw_rows = pq.ParquetFile(spec.interactions).metadata.num_rows
    data_cfg = DataConfig(interactions=spec.interactions, tracks=spec.tracks, k_core=spec.k_core)
    split_cfg = SplitConfig(val_fraction=0.0, test_fraction=0.2, seed=args.seed)
    started = time.perf_counter()
    data = prepare(data_cfg, split_cfg)
    stats = {"raw_rows": raw_rows, **data.stats, "prepare_seconds": time.perf_counter() - started}
    print(
        f"\n== {spec.name}: {raw_rows:,} rows -> {spec.k_core}-core {stats['rows']:,} rows, "
        f"{stats['users']:,} users, {stats['tracks']:,} tracks; train {stats['train_rows']:,} / "
        f"test {stats['test_rows']:,} rows (fingerprint {data.fingerprint[:12]})",
        flush=True,
    )
    ctx = BenchContext(
        spec=spec,
        data=data,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        seed=args.seed,
        quick=args.quick,
        skip_two_tower=not wants_two_tower(args.systems),
        threads=args.threads,
        params={
            "data": data_cfg.model_dump(mode="json"),
            "split": split_cfg.model_dump(),
            "benchmark": "quality" + (" quick" if args.quick else ""),
        },
    )
    results: list[SystemResult] = []
    for system in [*baseline_systems(ctx), *two_tower_systems(ctx)]:
        if not selected(args.systems, system.name):
            continue
        print(f"  {system.name}", flush=True)
        results.append(system.fit_and_score(ctx))
    print_table(spec, results)
    return {
        "name": spec.name,
        "source": str(spec.interactions),
        "k_core": spec.k_core,
        "k_core_note": spec.note,
        "split": {"val_fraction": 0.0, "test_fraction": 0.2, "seed": args.seed},
        "fingerprint": data.fingerprint,
        "stats": stats,
        "systems": [asdict(r) for r in results],
    }


def selected(systems: str, name: str) -> bool:
    """``--systems``: 'all', 'baselines', or a comma list of system names."""
    from tracktower.training.baselines import BASELINES

    if systems == "all":
        return True
    if systems == "baselines":
        return name in BASELINES
    return name in {s.strip() for s in systems.split(",")}


def wants_two_tower(systems: str) -> bool:
    """False when only baselines were asked for, so TensorFlow is never imported."""
    from tracktower.training.baselines import BASELINES

    if systems in ("all", "baselines"):
        return systems == "all"
    return any(s.strip() not in BASELINES for s in systems.split(",") if s.strip())


def merge_previous(path: Path, datasets: dict[str, Any]) -> dict[str, Any]:
    """With a subset of systems or datasets, keep the other entries of an existing report.

    A dataset's old systems are kept only when its fingerprint and split are unchanged, so a merged
    table never mixes numbers from different data.
    """
    if not path.is_file():
        return datasets
    try:
        old = json.loads(path.read_text()).get("datasets", {})
    except (OSError, ValueError):
        return datasets
    merged = dict(old)
    for key, new in datasets.items():
        prev = old.get(key)
        same = prev and (prev.get("fingerprint"), prev.get("split")) == (
            new["fingerprint"],
            new["split"],
        )
        if same:
            fresh = {s["system"] for s in new["systems"]}
            kept = [s for s in prev["systems"] if s["system"] not in fresh]
            new = {**new, "systems": kept + new["systems"]}
        merged[key] = new
    return merged


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("numpy", "scipy", "implicit", "mlflow", "pandas", "tensorflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="mpd,msd", help="comma list of: mpd, msd")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--quick", action="store_true", help="tiny grids (smoke run)")
    p.add_argument(
        "--systems",
        default="all",
        help="'all', 'baselines' (skip the two-tower), or a comma list of system names; "
        "a subset is merged into an existing --output",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="iALS threads (0 = all cores)")
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tracktower.features.cli import end_runs_on_sigterm

    end_runs_on_sigterm()
    specs = dataset_specs(args.data_root)
    keys = [k.strip() for k in args.datasets.split(",") if k.strip()]
    unknown = [k for k in keys if k not in specs]
    if unknown or not keys:
        print(f"error: --datasets: unknown {unknown}; choose from {sorted(specs)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    datasets = {key: run_dataset(specs[key], args) for key in keys}
    if args.systems != "all" or set(keys) != set(specs):
        datasets = merge_previous(args.output, datasets)
    report = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "experiment": args.experiment,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "libraries": _versions(),
        "total_seconds": round(time.perf_counter() - started, 1),
        "datasets": datasets,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.output} ({report['total_seconds']:.0f}s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
