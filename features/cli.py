"""``tracktower data ...``: create a synthetic dataset or check a real one before training on it.

Also home of :func:`run_guarded`, which the root CLI wraps every command in, so that bad input
anywhere ends as one ``error: ...`` line and exit code 2 rather than a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from pydantic import ValidationError

from tracktower.features.errors import DataError

__all__ = ["EXIT_BAD_INPUT", "app", "error_line", "guarded", "run_guarded"]

EXIT_BAD_INPUT = 2

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="data",
    help="Create synthetic data or validate an interactions file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def error_line(exc: DataError | ValidationError) -> str:
    """One line for a user: the DataError text, or the first pydantic error with its field path."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or exc.title
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"{field}: {first['msg']}{more}"
    return " ".join(str(exc).split())


def run_guarded(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call ``func``; DataError / ValidationError become ``error: ...`` on stderr and exit 2."""
    try:
        return func(*args, **kwargs)
    except (DataError, ValidationError) as exc:
        typer.echo(f"error: {error_line(exc)}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def guarded(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of :func:`run_guarded`; keeps the signature typer reads options from."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return run_guarded(func, *args, **kwargs)

    return wrapper


@app.command()
@guarded
def synth(
    out: Annotated[Path, typer.Option(help="Directory for interactions.parquet + tracks.parquet.")],
    users: Annotated[int, typer.Option(min=1, help="Number of users.")] = 2000,
    tracks: Annotated[int, typer.Option(min=2, help="Number of tracks.")] = 5000,
    seed: Annotated[int, typer.Option(help="Same seed, same data.")] = 0,
) -> None:
    """Write a seeded synthetic dataset with learnable taste clusters."""
    from tracktower.features import synth as synth_mod
    from tracktower.features.dataset import fingerprint

    inter, meta = synth_mod.generate(users=users, tracks=tracks, seed=seed)
    inter_path, tracks_path = synth_mod.save(out, inter, meta)
    typer.echo(
        f"wrote {inter_path} ({len(inter)} interactions, {inter['user_id'].nunique()} users, "
        f"{inter['track_id'].nunique()} tracks; fingerprint {fingerprint(inter)[:12]})"
    )
    typer.echo(f"wrote {tracks_path} ({len(meta)} tracks with title, artist, album, genre, year)")


@app.command()
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
    typer.echo(f"  users        {df['user_id'].nunique()}")
    typer.echo(f"  tracks       {df['track_id'].nunique()}")
    typer.echo(f"  weight       min {df['weight'].min():g}, max {df['weight'].max():g}")
    typer.echo(f"  timestamp    {'yes' if 'timestamp' in df else 'no'}")
    typer.echo(f"  fingerprint  {fingerprint(df)}")
    if tracks is not None:
        meta = io.read_tracks(tracks, df)
        matched = int(meta["track_id"].isin(df["track_id"]).sum())
        columns_found = ", ".join(c for c in meta.columns if c != "track_id") or "none"
        typer.echo(
            f"{tracks}: {len(meta)} tracks, {matched} of them in the interactions "
            f"(metadata: {columns_found})"
        )
