"""The ``tracktower`` command line: a root that imports each command's package only when run.

The root lives in ``features``, the layer both sides share, and resolves subcommands lazily (a
click group that imports ``tracktower.training.cli`` or ``tracktower.serving.cli`` on demand), so
``tracktower serve`` never imports training code and ``tracktower --help`` imports neither
TensorFlow nor MLflow. Bad input anywhere becomes one ``error: ...`` line and exit code 2
(:func:`guarded`), whichever package the command comes from.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from tracktower.features.errors import DataError, one_line

__all__ = [
    "EXIT_BAD_INPUT",
    "app",
    "end_runs_on_sigterm",
    "guarded",
    "main",
    "run_guarded",
    "setup_logging",
]

EXIT_BAD_INPUT = 2

P = ParamSpec("P")
R = TypeVar("R")

# Command name -> "module:typer app" that defines it; imported only when that command runs.
LAZY_COMMANDS = {
    "train": "tracktower.training.cli:app",
    "evaluate": "tracktower.training.cli:app",
    "register": "tracktower.training.cli:app",
    "tune": "tracktower.training.cli:app",
    "baseline": "tracktower.training.baselines.cli:baseline_command",
    "recommend": "tracktower.serving.cli:app",
    "serve": "tracktower.serving.cli:app",
}


class LazyGroup(TyperGroup):
    """Click's documented lazy-loading pattern: list every command, import one when asked.

    An entry is a typer app holding the command (several commands may share one app) or a bare
    command function."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *LAZY_COMMANDS]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attr = LAZY_COMMANDS[cmd_name].split(":")
        target = getattr(importlib.import_module(module), attr)
        if not isinstance(target, typer.Typer):  # a bare command function
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            single.command(cmd_name)(target)
            target = single
        command = typer.main.get_command(target)
        if isinstance(command, TyperGroup):
            return command.get_command(ctx, cmd_name)
        return command


def run_guarded(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call ``func``; DataError / ValidationError become ``error: ...`` on stderr and exit 2."""
    try:
        return func(*args, **kwargs)
    except (DataError, ValidationError) as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def guarded(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of :func:`run_guarded`; keeps the signature typer reads options from."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return run_guarded(func, *args, **kwargs)

    return wrapper


def setup_logging(verbose: bool) -> None:
    """INFO lines with times for long jobs; the libraries' own chatter only when it matters."""
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("mlflow", "alembic", "urllib3", "git", "absl", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Keras warns that subclassed towers have no get_config; export uses SavedModel signatures.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tracktower {metadata.version('tracktower')}")
        raise typer.Exit()


app = typer.Typer(
    name="tracktower",
    cls=LazyGroup,
    help="Two-tower music recommender: data, train, tune, evaluate, register, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    name="data",
    help="Create synthetic data or validate an interactions file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Two-tower music recommender: data, train, tune, evaluate, register, serve."""


def end_runs_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's kill, ``pkill``) unwind like Ctrl-C, so an MLflow run in
    progress ends KILLED instead of staying RUNNING forever. Entry points call it; the library
    never does."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def main() -> None:
    """Console entry point (``tracktower``)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    end_runs_on_sigterm()
    app()


@data_app.command()
@guarded
def synth(
    out: Annotated[Path, typer.Option(help="Directory for interactions.parquet + tracks.parquet.")],
    users: Annotated[
        int | None, typer.Option(min=1, help="Number of users [default: 2000, or the preset's].")
    ] = None,
    tracks: Annotated[
        int | None, typer.Option(min=2, help="Number of tracks [default: 5000, or the preset's].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same data.")] = 0,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Named size, written as sharded Parquet in bounded memory: 'mpd' = 1,000,000 "
            "users, 2,262,292 tracks, ~66.3M rows (DIR/interactions/part-*.parquet + "
            "DIR/tracks.parquet). --users/--tracks scale it down."
        ),
    ] = None,
) -> None:
    """Write a seeded synthetic dataset with learnable taste clusters."""
    from tracktower.features import synth as synth_mod
    from tracktower.features.dataset import fingerprint

    if preset is not None:
        _synth_preset(out, preset, users, tracks, seed)
        return
    inter, meta = synth_mod.generate(users=users or 2000, tracks=tracks or 5000, seed=seed)
    inter_path, tracks_path = synth_mod.save(out, inter, meta)
    typer.echo(
        f"wrote {inter_path} ({len(inter)} interactions, {inter['user_id'].nunique()} users, "
        f"{inter['track_id'].nunique()} tracks; fingerprint {fingerprint(inter)[:12]})"
    )
    typer.echo(f"wrote {tracks_path} ({len(meta)} tracks with title, artist, album, genre, year)")


def _synth_preset(out: Path, preset: str, users: int | None, tracks: int | None, seed: int) -> None:
    import time

    from tracktower.features import synth as synth_mod

    if preset not in synth_mod.PRESETS:
        raise DataError(f"unknown preset {preset!r}; choose from {', '.join(synth_mod.PRESETS)}")
    sizes = dict(synth_mod.PRESETS[preset])
    sizes.update({k: v for k, v in (("users", users), ("tracks", tracks)) if v is not None})
    started = time.perf_counter()
    done = synth_mod.write_sharded(out, seed=seed, **sizes)
    typer.echo(
        f"wrote {done.interactions}/ ({done.shards} shards, {done.rows} interactions, "
        f"{done.users} users, {done.tracks_heard} tracks heard) "
        f"in {time.perf_counter() - started:.0f} s"
    )
    typer.echo(f"wrote {done.tracks} ({done.catalogue} tracks with title, artist, album, genre)")


@data_app.command()
@guarded
def validate(
    path: Annotated[
        Path, typer.Argument(help="Parquet file/dir, CSV/TSV, or MPD slice directory.")
    ],
    tracks: Annotated[Path | None, typer.Option(help="Track metadata file to check too.")] = None,
    user_col: Annotated[str, typer.Option(help="Source column holding user ids.")] = "user_id",
    track_col: Annotated[str, typer.Option(help="Source column holding track ids.")] = "track_id",
    weight_col: Annotated[
        str | None, typer.Option(help="Weight column (default: weight, else plays, else 1).")
    ] = None,
    timestamp_col: Annotated[str | None, typer.Option(help="Timestamp column.")] = None,
) -> None:
    """Read a dataset exactly as training would and print its size and fingerprint."""
    from tracktower.features import io
    from tracktower.features.dataset import fingerprint

    columns = io.ColumnMap(
        user=user_col, track=track_col, weight=weight_col, timestamp=timestamp_col
    )
    df = io.read_interactions(path, columns)
    typer.echo(f"{path}: {len(df)} interactions")
    typer.echo(f"  users        {len(io.vocabulary(df['user_id']))}")
    typer.echo(f"  tracks       {len(io.vocabulary(df['track_id']))}")
    typer.echo(f"  weight       min {df['weight'].min():g}, max {df['weight'].max():g}")
    typer.echo(f"  timestamp    {'yes' if 'timestamp' in df else 'no'}")
    typer.echo(f"  fingerprint  {fingerprint(df)}")
    if tracks is not None:
        meta = io.read_tracks(tracks, df)
        matched = int(io.occurs_in(meta["track_id"], io.vocabulary(df["track_id"])).sum())
        columns_found = ", ".join(c for c in meta.columns if c != "track_id") or "none"
        typer.echo(
            f"{tracks}: {len(meta)} tracks, {matched} of them in the interactions "
            f"(metadata: {columns_found})"
        )
