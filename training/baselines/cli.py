"""``tracktower baseline``: fit a non-neural baseline on the same data and split as ``train``.

Data flags mirror ``train`` and are applied as ``--set`` overrides on the experiment config, so a
baseline and a two-tower run given the same config and flags see the same k-core, split and seed
(and therefore the same dataset fingerprint and test users).
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tracktower.features.errors import DataError
from tracktower.training.baselines import DEFAULT_MAX_ITEMS

# Same default as ``tracktower train``; used only when it exists so the command works anywhere.
DEFAULT_CONFIG = Path("configs/default.yaml")

app = typer.Typer(add_completion=False, help="Non-neural baselines (popularity, EASE, iALS).")


class BaselineName(StrEnum):
    popular = "popular"
    ease = "ease"
    ials = "ials"


def baseline_command(
    model: Annotated[BaselineName, typer.Option("--model", "-m", help="Which baseline.")],
    interactions: Annotated[
        Path | None, typer.Option(help="Interactions file or directory (overrides the config).")
    ] = None,
    tracks: Annotated[Path | None, typer.Option(help="Track metadata (optional).")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Experiment YAML (default: configs/default.yaml if it exists)."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key=value (repeatable).")
    ] = None,
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
        bool, typer.Option("--grid/--no-grid", help="Sweep the documented grid, or defaults only.")
    ] = True,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    threads: Annotated[int, typer.Option(help="iALS threads (0 = all cores).")] = 0,
    max_items: Annotated[
        int, typer.Option(help="EASE refuses more tracks than this (needs n^2 x 4 bytes).")
    ] = DEFAULT_MAX_ITEMS,
) -> None:
    """Fit a baseline (each grid point is an MLflow run) and print its test metrics."""
    try:
        _run(
            model.value,
            interactions,
            tracks,
            config,
            overrides or [],
            experiment,
            k_core,
            seed,
            test_fraction,
            val_fraction,
            grid,
            tracking_uri,
            threads,
            max_items,
        )
    except DataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


app.command("baseline")(baseline_command)


def _run(
    name: str,
    interactions: Path | None,
    tracks: Path | None,
    config: Path | None,
    overrides: list[str],
    experiment: str | None,
    k_core: int | None,
    seed: int | None,
    test_fraction: float | None,
    val_fraction: float | None,
    grid: bool,
    tracking_uri: str | None,
    threads: int,
    max_items: int,
) -> None:
    from tracktower.training.baselines.runner import (
        DEFAULTS,
        GRIDS,
        GridResult,
        run_baseline,
        run_name_for,
    )
    from tracktower.training.config import load_config
    from tracktower.training.data import prepare

    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    flags = {
        "data.interactions": interactions,
        "data.tracks": tracks,
        "data.k_core": k_core,
        "split.seed": seed,
        "split.test_fraction": test_fraction,
        "split.val_fraction": val_fraction,
        "experiment": experiment,
    }
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    cfg = load_config(config, [*overrides, *extra])
    if threads < 0:
        raise DataError(f"--threads must be >= 0, got {threads}")
    if cfg.data.interactions is not None and not Path(cfg.data.interactions).exists():
        raise DataError("interactions not found", path=cfg.data.interactions)
    data = prepare(cfg.data, cfg.split)
    stats = data.stats
    typer.echo(
        f"{data.source}: {stats['rows']:,} interactions, {stats['users']:,} users, "
        f"{stats['tracks']:,} tracks (fingerprint {data.fingerprint[:12]})"
    )
    points = list(GRIDS[name]) if grid else [DEFAULTS[name]]
    if name == "ease":
        points = [{**p, "max_items": max_items} for p in points]

    def report(result: GridResult) -> None:
        m = result.metrics
        typer.echo(
            f"  {run_name_for(result.params):<32} recall@20={m.get('recall_at_20', 0):.4f} "
            f"ndcg@10={m.get('ndcg_at_10', 0):.4f} fit={result.fit_seconds:.1f}s"
        )

    out = run_baseline(
        name,
        data,
        points,
        experiment=cfg.experiment,
        tracking_uri=tracking_uri,
        params={"data": cfg.data.model_dump(mode="json"), "split": cfg.split.model_dump()},
        ks=cfg.eval.ks,
        num_threads=threads,
        seed=cfg.split.seed,
        on_result=report,
    )
    best = out.best
    typer.echo(f"best: {run_name_for(best.params)} (run {best.run_id})")
    for key in sorted(best.metrics):
        typer.echo(f"  test_{key} = {best.metrics[key]:.4f}")
    sys.stdout.flush()


def main() -> None:  # pragma: no cover - convenience entry point
    app()
