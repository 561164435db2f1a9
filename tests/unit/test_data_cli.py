"""``tracktower data``: exit 0 with a summary, or exit 2 with one ``error:`` line on stderr."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import typer
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from tracktower.features.cli import data_app as app
from tracktower.features.cli import guarded, run_guarded
from tracktower.features.errors import DataError

runner = CliRunner()


def test_synth_then_validate(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    result = runner.invoke(app, ["synth", "--out", str(out), "--users", "50", "--tracks", "120"])
    assert result.exit_code == 0, result.output
    assert "interactions.parquet" in result.stdout and "50 users" in result.stdout
    assert (out / "interactions.parquet").is_file() and (out / "tracks.parquet").is_file()

    result = runner.invoke(
        app,
        ["validate", str(out / "interactions.parquet"), "--tracks", str(out / "tracks.parquet")],
    )
    assert result.exit_code == 0, result.output
    assert "users        50" in result.stdout and "fingerprint" in result.stdout
    assert "120 tracks" in result.stdout


def test_synth_preset_writes_shards_that_validate(tmp_path: Path) -> None:
    out = tmp_path / "mpd"
    args = ["synth", "--preset", "mpd", "--users", "120", "--tracks", "400", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 shards" in result.stdout and "120 users" in result.stdout
    result = runner.invoke(app, ["validate", str(out / "interactions")])
    assert result.exit_code == 0, result.output
    assert "users        120" in result.stdout
    result = runner.invoke(app, ["synth", "--preset", "nope", "--out", str(out)])
    assert result.exit_code == 2 and "unknown preset 'nope'" in result.output


def test_validate_with_column_options(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("listener,song\nu,a\nv,a\n")
    result = runner.invoke(
        app, ["validate", str(path), "--user-col", "listener", "--track-col", "song"]
    )
    assert result.exit_code == 0, result.output
    assert "2 interactions" in result.stdout


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "no such file"),
        ("user_id,track_id,weight\nu,a,-1\n", "column 'weight', row 1"),
        ("user_id,song\nu,a\n", "missing required column 'track_id'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and needle in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_tracks_from_another_dataset_exits_2(tmp_path: Path) -> None:
    inter = tmp_path / "i.parquet"
    pd.DataFrame({"user_id": ["u"], "track_id": ["a"]}).to_parquet(inter)
    tracks = tmp_path / "t.csv"
    tracks.write_text("track_id,title\nb,B\n")
    result = runner.invoke(app, ["validate", str(inter), "--tracks", str(tracks)])
    assert result.exit_code == 2 and "t.csv, column 'track_id'" in result.stderr


def test_synth_into_a_file_exits_2(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = runner.invoke(app, ["synth", "--out", str(target), "--users", "5", "--tracks", "10"])
    assert result.exit_code == 2 and "not a directory" in result.stderr


class _Model(BaseModel):
    n: int


def test_run_guarded_maps_validation_and_data_errors(capsys: pytest.CaptureFixture[str]) -> None:
    def bad_model() -> None:
        _Model.model_validate({"n": "many"})

    with pytest.raises(typer.Exit) as info:
        run_guarded(bad_model)
    assert info.value.exit_code == 2
    assert capsys.readouterr().err.startswith("error: n: ")

    @guarded
    def bad_data(path: str) -> None:
        raise DataError("broken", path=path, row=3)

    with pytest.raises(typer.Exit):
        bad_data("x.csv")
    assert capsys.readouterr().err == "error: x.csv, row 3: broken\n"
    assert run_guarded(lambda a, b: a + b, 1, b=2) == 3
    with pytest.raises(ValidationError):  # not swallowed outside the guard
        bad_model()
