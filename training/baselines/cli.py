"""``tracktower baseline``: fit a non-neural baseline on the same data and split as ``train``.

The shared flags (``--config``, ``--interactions``, ``--tracks``, ``--set``, ``--tracking-uri``,
``--experiment``) are ``train``'s own option definitions, and the data flags are applied as
``--set`` overrides on the experiment config, so a baseline and a two-tower run given the same
config and flags see the same k-core, split and seed (and therefore the same dataset fingerprint
and test users), and the test lists exclude the same tracks (train + validation,
``Encoded.known``). A grid is chosen on the validation split (``split.val_fraction`` > 0), the
way ``train`` early-stops; only the chosen point is scored on test.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracktower.features.cli import guarded
from tracktower.features.errors import DataError
from tracktower.training.baselines import DEFAULT_MAX_ITEMS
from tracktower.training.cli import (
    ConfigOpt,
    InteractionsOpt,
    SetOpt,
    TrackingOpt,
    TracksOpt,
    experiment_config,
)

if TYPE_CHECKING:
    from tracktower.training.baselines.runner import GridResult
    from tracktower.training.config import ExperimentConfig


class BaselineName(StrEnum):
    popular = "popular"
    ease = "ease"
    ials = "ials"
    rp3beta = "rp3beta"


@guarded
def baseline_command(
    name: Annotated[BaselineName, typer.Argument(help="Which baseline.", show_default=False)],
    interactions: InteractionsOpt = None,
    tracks: TracksOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name.")] = None,
    k_core: Annotated[
        int | None, typer.Option("--k-core", help="Min interactions per user and track (0=off).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed (also iALS's random state).")] = None,
    test_fraction: Annotated[
        float | None, typer.Option(help="Held-out test share per user.")
    ] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Validation share per user.")] = None,
    grid: Annotated[
        bool,
        typer.Option(
            "--grid/--no-grid",
            help="Sweep the documented grid (chosen on validation), or defaults only.",
        ),
    ] = True,
    tracking_uri: TrackingOpt = None,
    threads: Annotated[int, typer.Option(help="iALS threads (0 = all cores).")] = 0,
    max_items: Annotated[
        int, typer.Option(help="EASE refuses more tracks than this (needs n^2 x 4 bytes).")
    ] = DEFAULT_MAX_ITEMS,
) -> None:
    """Fit a baseline on the training split, choose its grid point on validation (each point is
    an MLflow run) and print the chosen point's test metrics."""
    if threads < 0:
        raise DataError(f"--threads must be >= 0, got {threads}")
    flags = {
        "data.k_core": k_core,
        "split.seed": seed,
        "split.test_fraction": test_fraction,
        "split.val_fraction": val_fraction,
        "experiment": experiment,
    }
    cfg = experiment_config(config, set_, interactions, tracks, **flags)
    _run(name.value, cfg, grid, tracking_uri, threads, max_items)


def _run(
    name: str,
    cfg: ExperimentConfig,
    grid: bool,
    tracking_uri: str | None,
    threads: int,
    max_items: int,
) -> None:
    from tracktower.training.baselines.runner import DEFAULTS, grid_for, run_baseline, run_name_for
    from tracktower.training.data import prepare

    if cfg.data.interactions is not None and not Path(cfg.data.interactions).exists():
        raise DataError("interactions not found", path=cfg.data.interactions)
    data = prepare(cfg.data, cfg.split)
    stats = data.stats
    typer.echo(
        f"{data.source}: {stats['rows']:,} interactions, {stats['users']:,} users, "
        f"{stats['tracks']:,} tracks (fingerprint {data.fingerprint[:12]})"
    )
    points = grid_for(name, data.encoded.train) if grid else [DEFAULTS[name]]
    if name == "ease":
        points = [{**p, "max_items": max_items} for p in points]
    out = run_baseline(
        name,
        data,
        points,
        experiment=cfg.experiment,
        tracking_uri=tracking_uri,
        params={"data": cfg.data.model_dump(mode="json"), "split": cfg.split.model_dump()},
        ks=cfg.eval.ks,
        sampling=cfg.eval,
        num_threads=threads,
        seed=cfg.split.seed,
        on_result=_report,
    )
    best = out.best
    typer.echo(f"best: {run_name_for(best.params)} (run {best.run_id}, chosen by {out.selection})")
    for key in sorted(best.test_metrics):
        typer.echo(f"  test_{key} = {best.test_metrics[key]:.4f}")
    sys.stdout.flush()


def _report(result: GridResult) -> None:
    from tracktower.training.baselines.runner import run_name_for

    m = result.metrics
    typer.echo(
        f"  {run_name_for(result.params):<36} val recall@20={m.get('recall_at_20', 0):.4f} "
        f"ndcg@10={m.get('ndcg_at_10', 0):.4f} fit={result.fit_seconds:.1f}s"
    )
