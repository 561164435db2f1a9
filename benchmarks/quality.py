#!/usr/bin/env python
"""Offline quality benchmark: every system on the same splits, chosen on validation, over seeds.

Usage (from the repository root):

    python benchmarks/quality.py                         # 3 datasets x seeds 0,1,2, full grids
    python benchmarks/quality.py --quick --datasets msd  # smoke run: a few minutes
    python benchmarks/quality.py --datasets mpd-artist --systems ease,ials --seeds 0,1,2,3,4
    python benchmarks/quality.py --systems tracktower-tuned          # tune, then fit (opt-in)

**Protocol.** Per dataset and seed there is ONE prepared split (``training.data.prepare``, the
loader ``train`` uses): a k-core, then a seeded per-user holdout of 20% TEST and 10% VAL, the rest
TRAIN. Every system is fitted on TRAIN and makes every choice on VAL only: the baselines' grid
point (``run_baseline`` fits each point on TRAIN, scores it on VAL, and scores only the chosen
point on TEST), the two-tower models' epoch (early stopping on validation Recall@20). TEST is
scored once per system and seed, with TRAIN+VAL excluded from every system's lists. Test metrics
are reported per seed and as mean ± sample standard deviation (ddof=1) over seeds.

**tracktower after tune** (``tracktower-tuned``; not part of ``--systems all``, whose meaning
predates it: name it, e.g. ``--systems all,tracktower-tuned`` or ``--systems tracktower,
tracktower-tuned``). Per dataset and seed, ``tracktower tune``'s search runs on the same split
with its TEST emptied (trials fit on TRAIN, judged on VAL), within ``--tune-budget`` seconds
(default 900, the issue's 15 minutes; ``--quick``: 60) and ``--tune-trials`` trials (default 50;
``--quick``: 3), each trial an MLflow child run; the best config is then fitted like
``tracktower`` (epoch on VAL, TEST once). Its table row reads "tracktower (after tune, N s)" and
it is compared with the best peer as tracktower is; it is never counted as a peer.

**Datasets** (``--data-root``, default ``../shared/data``): ``mpd`` (mpd-subset, 5-core),
``msd`` (msd-sample, 2-core, play counts), ``mpd-artist`` (mpd-subset aggregated to playlist x
artist by ``features.aggregate.to_artist_level``, weight = the artist's tracks in the playlist,
10-core; written to a temporary Parquet file, never into the repository). A missing dataset is
skipped with a warning, or fails the run when ``CI=true``.

The Markdown table (per dataset: test R@20 and NDCG@10 as mean ± std, the selected parameters,
fit seconds, and each tracktower row's ratio to the best peer) is printed and stored, with every
seed's figures and every grid point tried (with its validation figures), in
``benchmarks/results/quality.json``.
Each grid point and each two-tower fit is an MLflow run in the experiment ``tracktower-quality``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
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
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
SUMMARY_METRICS = (
    *("recall_at_10", "recall_at_20", "recall_at_50", "recall_at_100"),
    *("ndcg_at_10", "ndcg_at_100"),
)
TRACKTOWER = "tracktower"
TUNED = "tracktower-tuned"  # tracktower after `tune` within --tune-budget
OURS = (TRACKTOWER, TUNED)  # compared with the best peer; never peers themselves
# Systems in table order; the two-tower ones are imported only when asked for.
BASELINE_NAMES = ("popular", "ease", "ials", "rp3beta")
TWO_TOWER_NAMES = ("tfrs-tutorial", TRACKTOWER, TUNED)
OPT_IN = (TUNED,)  # run only when named: "all" keeps the meaning it had before them
QUICK_MAX_EPOCHS = 2
TUNE_BUDGET, TUNE_TRIALS = 900.0, 50  # the cap: 15 minutes of search
QUICK_TUNE_BUDGET, QUICK_TUNE_TRIALS = 60.0, 3


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    name: str
    interactions: Path
    tracks: Path | None
    k_core: int
    note: str
    derive: Callable[[Path, Path | None, Path], Path] | None = None  # -> derived interactions


def dataset_specs(root: Path) -> dict[str, DatasetSpec]:
    """The benchmark datasets and why each k-core was chosen."""
    mpd = root / "mpd-subset"
    msd = root / "msd-sample"
    return {
        "mpd": DatasetSpec(
            "mpd",
            "mpd-subset",
            mpd / "interactions.parquet",
            mpd / "tracks.parquet",
            5,
            "5-core: drops the ~88% of tracks that occur in < 5 playlists (no collaborative "
            "signal) and keeps EASE's Gram at ~23k^2",
        ),
        "msd": DatasetSpec(
            "msd",
            "msd-sample",
            msd / "interactions.parquet",
            msd / "tracks.parquet",
            2,
            "2-core keeps 96% of rows (single-listener songs cannot be recommended "
            "collaboratively anyway); play counts are the weights",
        ),
        "mpd-artist": DatasetSpec(
            "mpd-artist",
            "mpd-artist",
            mpd / "interactions.parquet",
            mpd / "tracks.parquet",
            10,
            "playlist x artist, weight = the artist's distinct tracks in the playlist; 10-core "
            "(5.8k playlists x 5.1k artists, 1.0% dense) is the shape of issue 12's hidden "
            "artist-level dataset (1.9k x 2.8k, ~1.1%); a 5-core keeps 9k artists at 0.56%",
            derive=write_artist_level,
        ),
    }


def write_artist_level(interactions: Path, tracks: Path | None, workdir: Path) -> Path:
    """The artist-level aggregate as a Parquet file under ``workdir`` (a temporary directory)."""
    from tracktower.features import io
    from tracktower.features.aggregate import to_artist_level
    from tracktower.features.errors import DataError

    if tracks is None or not tracks.is_file():
        raise DataError("an artist-level aggregate needs the tracks file", path=tracks)
    rows = io.read_interactions(interactions)
    frame = to_artist_level(rows, io.read_tracks(tracks, rows))
    out = workdir / "mpd-artist.parquet"
    frame.to_parquet(out, index=False)
    return out


@dataclass
class BenchContext:
    """One (dataset, seed): the prepared split every system shares, plus run settings."""

    spec: DatasetSpec
    data: Any  # tracktower.training.data.Prepared, with TRAIN / VAL / TEST
    interactions: Path  # what was prepared (the derived file for mpd-artist)
    tracks: Path | None
    split: dict[str, Any]
    experiment: str
    tracking_uri: str | None
    seed: int
    quick: bool
    threads: int
    grids: str = "full"  # training.baselines.runner.GRID_SIZES key (--quick: "quick")
    max_epochs: int | None = None
    cold_start: bool = False
    tune_budget: float = TUNE_BUDGET  # tracktower-tuned: seconds of search per (dataset, seed)
    tune_trials: int = TUNE_TRIALS
    ks: tuple[int, ...] = DEFAULT_KS
    params: dict[str, Any] = field(default_factory=dict)  # data/split params logged on each run


@dataclass
class SystemResult:
    system: str
    params: dict[str, Any]  # the selected configuration (chosen on VAL)
    metrics: dict[str, float]  # un-prefixed TEST metrics of that configuration
    fit_seconds: float
    val_metrics: dict[str, float] = field(default_factory=dict)  # what the choice was made on
    run_id: str | None = None
    grid: list[dict[str, Any]] = field(default_factory=list)  # every point tried, VAL figures
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class System:
    name: str
    fit_and_score: Callable[[BenchContext], SystemResult]


# --- systems -----------------------------------------------------------------------------------


def baseline_grid(name: str, ctx: BenchContext) -> list[dict[str, Any]]:
    """The runner's documented grid for this TRAIN matrix (``--quick``: its tiny one); on count
    data ``grid_for`` also tries iALS with log confidence at every point."""
    from tracktower.training.baselines.runner import grid_for

    return grid_for(name, ctx.data.encoded.train, quick=ctx.quick, size=ctx.grids)


def _point_row(r: Any) -> dict[str, Any]:
    return {
        "params": r.params,
        "val_recall_at_20": r.metrics.get("recall_at_20"),
        "val_ndcg_at_10": r.metrics.get("ndcg_at_10"),
        "fit_seconds": round(r.fit_seconds, 2),
        "val_eval_seconds": round(r.eval_seconds, 2),
        "selected": bool(getattr(r, "selected", False)),
        **{k: round(v, 1) for k, v in r.extra.items()},
    }


def _baseline(name: str) -> System:
    def fit_and_score(ctx: BenchContext) -> SystemResult:
        from tracktower.training.baselines.runner import GridResult, run_baseline, run_name_for

        def progress(r: GridResult) -> None:
            print(
                f"    {run_name_for(r.params):<34} val R@20={r.metrics.get('recall_at_20', 0):.4f} "
                f"N@10={r.metrics.get('ndcg_at_10', 0):.4f} fit={r.fit_seconds:7.1f}s "
                f"eval={r.eval_seconds:5.1f}s",
                flush=True,
            )

        out = run_baseline(
            name,
            ctx.data,
            baseline_grid(name, ctx),
            experiment=ctx.experiment,
            tracking_uri=ctx.tracking_uri,
            dataset_name=ctx.spec.name,
            params=ctx.params,
            ks=ctx.ks,
            num_threads=ctx.threads,
            seed=ctx.seed,
            on_result=progress,
        )
        chosen = out.best  # chosen on VAL; only it was scored on TEST
        return SystemResult(
            system=name,
            params={k: v for k, v in chosen.params.items() if k != "model"},
            metrics=dict(out.test_metrics),
            val_metrics=dict(chosen.metrics),
            fit_seconds=chosen.fit_seconds,
            run_id=chosen.run_id,
            grid=[_point_row(r) for r in out.results],
            extra={k: round(v, 1) for k, v in chosen.extra.items()},
        )

    return System(name, fit_and_score)


def all_systems(ctx: BenchContext, wanted: Callable[[str], bool]) -> list[System]:
    from tracktower.training.baselines import BASELINES

    out = [_baseline(n) for n in BASELINE_NAMES if n in BASELINES and wanted(n)]
    if any(wanted(n) for n in TWO_TOWER_NAMES):
        sys.path.insert(0, str(REPO / "benchmarks"))
        import two_tower

        out += [s for s in two_tower.systems(ctx, System, SystemResult) if wanted(s.name)]
    return out


# --- summary and table -------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,  # undefined for one
        "per_seed": list(values),
    }


def summarise(seeds: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system: mean ± std of each test metric over the seeds it ran on, its choices."""
    by_system: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for seed, entry in seeds.items():
        for result in entry["systems"]:
            by_system.setdefault(result["system"], []).append((seed, result))
    summary = {}
    for system, runs in by_system.items():
        summary[system] = {
            "seeds": [seed for seed, _ in runs],
            "metrics": {
                m: _mean_std([r["metrics"][m] for _, r in runs])
                for m in SUMMARY_METRICS
                if all(m in r["metrics"] for _, r in runs)
            },
            "selected": {seed: format_params(system, r["params"]) for seed, r in runs},
            "fit_seconds": statistics.fmean(r["fit_seconds"] for _, r in runs),
            "label": system_label(system, [r for _, r in runs]),
        }
    return summary


def system_label(system: str, runs: Sequence[dict[str, Any]]) -> str:
    """The table's name for a system: tracktower-tuned says its search budget (per seed)."""
    if system != TUNED:
        return system
    budgets = sorted({float(r.get("extra", {}).get("tune_budget_seconds", 0)) for r in runs})
    return f"tracktower (after tune, {'/'.join(f'{b:g}' for b in budgets)} s)"


def format_params(system: str, params: dict[str, Any]) -> str:
    """Baselines reuse their MLflow run name ("λ=100", "f=64 reg=1 alpha=10")."""
    if system in BASELINE_NAMES:
        from tracktower.training.baselines.runner import run_name_for

        name = run_name_for({"model": system, **params}).removeprefix(system).strip()
        return name or "—"
    if system == TUNED and "tuned" in params:
        return f"{params['tuned']}; epoch {params.get('epoch', '?')}"
    if "epoch" in params:
        return f"epoch {params['epoch']}"
    return " ".join(f"{k}={v}" for k, v in params.items()) or "—"


def best_peers(summary: dict[str, dict[str, Any]]) -> dict[str, tuple[str, float]]:
    """Per table metric, the system with the highest mean that is not tracktower (defaults or
    tuned: both are compared with the peers, neither is one)."""
    out = {}
    for metric in ("recall_at_20", "ndcg_at_10"):
        peers = [
            (s["metrics"][metric]["mean"], name)
            for name, s in summary.items()
            if name not in OURS and metric in s["metrics"]
        ]
        if peers:
            value, name = max(peers)
            out[metric] = (name, value)
    return out


def _cell(stat: dict[str, Any] | None) -> str:
    """mean ± std; a single seed has no spread to show, so only its value."""
    if not stat:
        return "—"
    if len(stat["per_seed"]) < 2:
        return f"{stat['mean']:.4f}"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def markdown_table(title: str, summary: dict[str, dict[str, Any]]) -> str:
    """Rows = systems; test R@20 and NDCG@10 as mean ± std; for tracktower and
    tracktower-tuned, its ratio to the best peer (the last column)."""
    peers = best_peers(summary)
    lines = [
        f"**{title}**",
        "",
        "| system | R@20 | NDCG@10 | selected on validation (per seed) | fit s | "
        "tracktower / best peer (R@20 / NDCG@10) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    order = [*BASELINE_NAMES, *TWO_TOWER_NAMES]
    for name in sorted(summary, key=lambda n: (order.index(n) if n in order else 99, n)):
        s = summary[name]
        choices = list(dict.fromkeys(s["selected"].values()))
        chosen = "; ".join(
            choices
            if len(choices) == 1
            else [f"{seed}: {value}" for seed, value in s["selected"].items()]
        )
        ratio = ""
        if name in OURS and peers:
            parts = [
                f"{s['metrics'][m]['mean'] / peers[m][1]:.3f}x" if m in peers else "—"
                for m in ("recall_at_20", "ndcg_at_10")
            ]
            ratio = " / ".join(parts)
        lines.append(
            f"| {s.get('label', name)} | {_cell(s['metrics'].get('recall_at_20'))} | "
            f"{_cell(s['metrics'].get('ndcg_at_10'))} | {chosen} | {s['fit_seconds']:.1f} | "
            f"{ratio} |"
        )
    if peers:
        lines += [
            "",
            "Best peer: "
            + ", ".join(f"{m} {name} ({value:.4f})" for m, (name, value) in peers.items()),
        ]
    return "\n".join(lines)


def dataset_title(entry: dict[str, Any]) -> str:
    seeds = entry["seeds"]
    stats = next(iter(seeds.values()))["stats"] if seeds else {}
    return (
        f"{entry['name']} ({entry['k_core']}-core, {stats.get('users', 0):,} users x "
        f"{stats.get('tracks', 0):,} items, {stats.get('rows', 0):,} rows; per-user "
        f"{entry['split']['val_fraction']:.0%} val / {entry['split']['test_fraction']:.0%} test; "
        f"test mean ± std over seeds {', '.join(sorted(seeds, key=int))})"
    )


# --- one dataset -------------------------------------------------------------------------------


def dataset_inputs(spec: DatasetSpec, workdir: Path) -> tuple[Path, Path | None] | None:
    """The files to prepare (derived ones built under ``workdir``); None: skip a missing one."""
    missing = [p for p in (spec.interactions, spec.tracks) if p is not None and not p.is_file()]
    if missing:
        message = f"{missing[0]}: dataset {spec.key!r} not found (see --data-root)"
        if os.environ.get("CI", "").lower() == "true":
            raise SystemExit(f"error: {message}")
        print(f"warning: {message}; skipped", file=sys.stderr, flush=True)
        return None
    if spec.derive is None:
        return spec.interactions, spec.tracks
    return spec.derive(spec.interactions, spec.tracks, workdir), None


def run_seed(
    spec: DatasetSpec,
    inputs: tuple[Path, Path | None],
    seed: int,
    args: argparse.Namespace,
    wanted: Callable[[str], bool],
) -> dict[str, Any]:
    from tracktower.training.config import DataConfig, SplitConfig
    from tracktower.training.data import prepare

    interactions, tracks = inputs
    data_cfg = DataConfig(interactions=interactions, tracks=tracks, k_core=spec.k_core)
    split_cfg = SplitConfig(val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, seed=seed)
    started = time.perf_counter()
    data = prepare(data_cfg, split_cfg)
    stats = {**data.stats, "prepare_seconds": round(time.perf_counter() - started, 2)}
    print(
        f"\n== {spec.name} seed {seed}: {spec.k_core}-core {stats['rows']:,} rows, "
        f"{stats['users']:,} users, {stats['tracks']:,} items; train {stats['train_rows']:,} / "
        f"val {stats['val_rows']:,} / test {stats['test_rows']:,} rows "
        f"(fingerprint {data.fingerprint[:12]})",
        flush=True,
    )
    ctx = BenchContext(
        spec=spec,
        data=data,
        interactions=interactions,
        tracks=tracks,
        split={"val_fraction": VAL_FRACTION, "test_fraction": TEST_FRACTION},
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        seed=seed,
        quick=args.quick,
        threads=args.threads,
        grids=args.grids,
        max_epochs=args.max_epochs,
        cold_start=args.cold_start,
        tune_budget=args.tune_budget,
        tune_trials=args.tune_trials,
        params={
            "data": {**data_cfg.model_dump(mode="json"), "dataset": spec.key},
            "split": split_cfg.model_dump(),
            "benchmark": "quality" + (" quick" if args.quick else ""),
            "grids": "quick" if args.quick else args.grids,
        },
    )
    results = []
    for system in all_systems(ctx, wanted):
        print(f"  {system.name}", flush=True)
        result = system.fit_and_score(ctx)
        print(
            f"    -> {format_params(result.system, result.params)}: "
            f"val R@20 {result.val_metrics.get('recall_at_20', float('nan')):.4f}, "
            f"test R@20 {result.metrics.get('recall_at_20', float('nan')):.4f} "
            f"N@10 {result.metrics.get('ndcg_at_10', float('nan')):.4f}",
            flush=True,
        )
        results.append(asdict(result))
    grids = "quick" if args.quick else args.grids
    return {"fingerprint": data.fingerprint, "stats": stats, "grids": grids, "systems": results}


def run_dataset(
    spec: DatasetSpec,
    args: argparse.Namespace,
    workdir: Path,
    wanted: Callable[[str], bool],
    on_seed: Callable[[dict[str, Any]], Any] = lambda entry: None,
) -> dict[str, Any] | None:
    """Every seed of one dataset; ``on_seed`` gets the entry after each seed, so that the
    report on disk holds each finished seed even if a later one is killed."""
    inputs = dataset_inputs(spec, workdir)
    if inputs is None:
        return None
    entry: dict[str, Any] = {
        "name": spec.name,
        "source": str(spec.interactions)
        + (" (artist-level aggregate)" if spec.derive is not None else ""),
        "k_core": spec.k_core,
        "k_core_note": spec.note,
        "split": {"val_fraction": VAL_FRACTION, "test_fraction": TEST_FRACTION},
        "seeds": {},
    }
    for seed in args.seeds:
        entry["seeds"][str(seed)] = run_seed(spec, inputs, seed, args, wanted)
        on_seed(entry)
    return entry


def merge_previous(path: Path, datasets: dict[str, Any]) -> dict[str, Any]:
    """Keep an existing report's other datasets, seeds and systems next to this run's.

    A seed's old systems are kept only when its data fingerprint and the split fractions are
    unchanged, so a merged table never mixes figures from different data.
    """
    if not path.is_file():
        return datasets
    try:
        old = json.loads(path.read_text()).get("datasets", {})
    except (OSError, ValueError):
        return datasets
    merged = {k: v for k, v in old.items() if isinstance(v.get("seeds"), dict)}
    for key, new in datasets.items():
        prev = merged.get(key)
        if not prev or prev.get("split") != new["split"]:
            merged[key] = new
            continue
        seeds = dict(prev["seeds"])
        for seed, entry in new["seeds"].items():
            before = seeds.get(seed)
            if before and before.get("fingerprint") == entry["fingerprint"]:
                fresh = {s["system"] for s in entry["systems"]}
                kept = [s for s in before["systems"] if s["system"] not in fresh]
                entry = {**entry, "systems": kept + entry["systems"]}
            seeds[seed] = entry
        merged[key] = {**new, "seeds": seeds}
    return merged


# --- command line ------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("numpy", "scipy", "implicit", "mlflow", "pandas", "tensorflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number > 0 (``--tune-budget``, ``--tune-trials``), else one line."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0 or value == float("inf"):
            name = "an integer >= 1" if kind is int else "a number of seconds > 0"
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    return parse


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--datasets", default="mpd,msd,mpd-artist", help="comma list")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny grids, seed 0 only, at most {QUICK_MAX_EPOCHS} epochs (smoke run)",
    )
    p.add_argument(
        "--grids",
        choices=("full", "focused"),
        default="full",
        help="baseline grids: the runner's full GRIDS, or FOCUSED_GRIDS (about a third of the "
        "time on MPD, around its seed-0 choices; for repeating over seeds); --quick: tiny ones",
    )
    p.add_argument(
        "--systems",
        default="all",
        help="'all' (every system but "
        + ", ".join(OPT_IN)
        + ", which runs only when named), 'baselines' (no TensorFlow), or a comma list of: "
        + ", ".join([*BASELINE_NAMES, *TWO_TOWER_NAMES])
        + " (may include 'all'); a subset is merged into an existing --output",
    )
    p.add_argument("--seeds", type=_seeds, default=None, help="split seeds (default 0,1,2)")
    p.add_argument("--max-epochs", type=int, default=None, help="cap on two-tower epochs")
    p.add_argument(
        "--cold-start",
        action="store_true",
        help="also measure tracktower's cold start on mpd (a second fit per seed)",
    )
    p.add_argument(
        "--tune-budget",
        type=_positive(float),
        default=None,
        help=f"{TUNED}: seconds of search per dataset and seed (default {TUNE_BUDGET:g}, "
        f"the issue's cap; --quick: {QUICK_TUNE_BUDGET:g})",
    )
    p.add_argument(
        "--tune-trials",
        type=_positive(int),
        default=None,
        help=f"{TUNED}: most trials per search (default {TUNE_TRIALS}; --quick: "
        f"{QUICK_TUNE_TRIALS})",
    )
    p.add_argument("--threads", type=int, default=0, help="iALS threads (0 = all cores)")
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.quick and args.max_epochs is None:
        args.max_epochs = QUICK_MAX_EPOCHS
    if args.tune_budget is None:
        args.tune_budget = QUICK_TUNE_BUDGET if args.quick else TUNE_BUDGET
    if args.tune_trials is None:
        args.tune_trials = QUICK_TUNE_TRIALS if args.quick else TUNE_TRIALS
    return args


def wanted_systems(systems: str) -> Callable[[str], bool]:
    """``--systems``: 'all' (every system but the opt-in ones, ``OPT_IN``), 'baselines', or a
    comma list of system names, which may include 'all' (``all,tracktower-tuned``)."""
    names = {s.strip() for s in systems.split(",") if s.strip()}
    if systems == "baselines":
        return lambda name: name in BASELINE_NAMES
    every = "all" in names
    return lambda name: name in names or (every and name not in OPT_IN)


def write_report(
    args: argparse.Namespace, ran: dict[str, dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """Merge ``ran`` into ``--output`` (:func:`merge_previous`) and replace the file atomically
    (a temporary file renamed over it), so a killed run never leaves half a JSON behind."""
    datasets = merge_previous(args.output, ran)
    for entry in datasets.values():
        entry["summary"] = summarise(entry["seeds"])
        entry["table_markdown"] = markdown_table(dataset_title(entry), entry["summary"])
    report = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "grids": "quick" if args.quick else args.grids,
        "seeds": args.seeds,
        "max_epochs": args.max_epochs,
        "tune": {"budget_seconds": args.tune_budget, "max_trials": args.tune_trials},
        "experiment": args.experiment,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "libraries": _versions(),
        "total_seconds": round(seconds, 1),
        "datasets": datasets,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_text(json.dumps(report, indent=2, default=str) + "\n")
    partial.replace(args.output)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tracktower.features.cli import end_runs_on_sigterm

    end_runs_on_sigterm()
    specs = dataset_specs(args.data_root)
    keys = [k.strip() for k in args.datasets.split(",") if k.strip()]
    unknown = [k for k in keys if k not in specs]
    known_systems = {*BASELINE_NAMES, *TWO_TOWER_NAMES}
    bad = [s for s in args.systems.split(",") if s.strip() not in {*known_systems, "all"}]
    if unknown or not keys:
        print(f"error: --datasets: unknown {unknown}; choose from {sorted(specs)}", file=sys.stderr)
        return 2
    if args.systems not in ("all", "baselines") and bad:
        print(
            f"error: --systems: unknown {bad}; choose from {sorted(known_systems)}", file=sys.stderr
        )
        return 2
    wanted = wanted_systems(args.systems)
    started = time.perf_counter()
    ran: dict[str, dict[str, Any]] = {}

    def save(key: str, entry: dict[str, Any]) -> dict[str, Any]:
        ran[key] = entry
        return write_report(args, ran, time.perf_counter() - started)

    with tempfile.TemporaryDirectory(prefix="tracktower-quality-") as work:
        for key in keys:
            run_dataset(specs[key], args, Path(work), wanted, on_seed=lambda e, k=key: save(k, e))
    report = write_report(args, ran, time.perf_counter() - started)  # final total_seconds
    tables = [report["datasets"][key]["table_markdown"] for key in ran]
    markdown = "\n\n".join(tables)
    print("\n" + markdown)
    if args.markdown:
        args.markdown.write_text(markdown + "\n")
    print(f"\nwrote {args.output} ({report['total_seconds']:.0f}s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
