"""The ``tracktower`` command line: one root app, each command importing its heavy parts lazily.

``tracktower --help`` must not import TensorFlow or MLflow; each command pulls in what it needs.
Bad input anywhere becomes one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from tracktower.features.cli import app as data_app
from tracktower.features.cli import run_guarded

app = typer.Typer(
    name="tracktower",
    help="Two-tower music recommender: train, evaluate, register, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("mlflow", "alembic", "urllib3", "git", "absl", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Keras warns that subclassed towers have no get_config; export uses SavedModel signatures.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="Experiment YAML (validated; see configs/).")] = Path(
        "configs/default.yaml"
    ),
    interactions: Annotated[
        Path | None,
        typer.Option(help="Interactions: Parquet file/dir, CSV/TSV, or a directory of MPD slices."),
    ] = None,
    tracks: Annotated[Path | None, typer.Option(help="Optional track metadata file.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override any config field, e.g. --set train.epochs=5."),
    ] = None,
    summary: Annotated[
        Path | None, typer.Option(help="Write run id, model URI, champion and metrics as JSON.")
    ] = None,
    final: Annotated[
        bool,
        typer.Option(help="Production retrain: no test split, alias unchanged unless --promote."),
    ] = False,
    promote: Annotated[
        bool, typer.Option(help="Move the champion alias to this version unconditionally.")
    ] = False,
    baseline: Annotated[
        bool, typer.Option(help="Also log the popularity baseline run on the same split.")
    ] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train the two-tower model, evaluate it, export it and register it in MLflow."""

    def work() -> None:
        from tracktower.training.config import load_config

        overrides = list(set_ or [])
        if interactions is not None:
            overrides.append(f"data.interactions={interactions}")
        if tracks is not None:
            overrides.append(f"data.tracks={tracks}")
        cfg = load_config(config, overrides)
        _logging(verbose)
        from tracktower.training.run import train_and_register

        result = train_and_register(
            cfg,
            config_path=config,
            final=final,
            promote=True if promote else None,
            baseline=baseline,
        )
        if summary is not None:
            result.write(summary)
        typer.echo(
            f"run {result.run_id}: {result.model_uri} "
            f"(champion {'moved' if result.champion else 'unchanged'}: {result.champion_reason})"
        )
        for name, value in result.metrics.items():
            typer.echo(f"  test {name:16s} {value:.4f}")

    run_guarded(work)


def _register_optional_commands() -> None:
    """Baseline and serving commands live in their own packages; serving never imports training."""
    from tracktower.serving.cli import recommend, serve
    from tracktower.training.baselines.runner import baseline_command

    app.command("baseline")(baseline_command)
    app.command("recommend")(recommend)
    app.command("serve")(serve)


def main() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    _register_optional_commands()
    from tracktower.training.tracking import end_runs_on_sigterm

    end_runs_on_sigterm()
    app()
