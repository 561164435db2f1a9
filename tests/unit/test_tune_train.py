"""``tracktower train --tune-trials`` without training: its flags refused before any data is
read, the search's result handed to ``stages.train`` (best config, its YAML, the
``tune_run_id`` tag, ``--final`` passed through), and a search that left no config ending the
command without training."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracktower.features import synth
from tracktower.features.errors import DataError
from tracktower.training import cli, stages, tune
from tracktower.training.cli import app
from tracktower.training.config import load_config
from tracktower.training.data import prepare

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


def _train(tmp_path: Path, *args: str) -> Any:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["train", "--config", str(SMOKE), "--tracking-uri", uri]
    return CliRunner().invoke(app, [*common, "--interactions", "/nonexistent/x.parquet", *args])


def _no_search(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the search must not start")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tune-trials", "0"], "error: --tune-trials: expected an integer >= 1, got 0"),
        (
            ["--tune-trials", "2", "--tune-timeout", "-5"],
            "error: --tune-timeout: expected a number of seconds > 0, got -5",
        ),
        (["--tune-trials", "2", "--tune-timeout", "0"], "error: --tune-timeout: expected"),
        (["--tune-timeout", "60"], "error: --tune-timeout: only with --tune-trials N"),
        (["--tune-out", "best.yaml"], "error: --tune-out: only with --tune-trials N"),
        (["--tune-trials", "2", "--local-workers", "2"], "not with --local-workers"),
        (["--tune-trials", "2", "--set", "train.strategy=multi_worker"], "multi_worker"),
        (["--tune-trials", "2", "--resume"], "--tune-trials: a new search would change"),
    ],
)
@pytest.mark.usefixtures("_cli_globals_restored")
def test_bad_tune_flags_are_one_line_errors_before_any_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
) -> None:
    monkeypatch.setattr(tune, "tune", _no_search)
    result = _train(tmp_path, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "/nonexistent/x.parquet" not in lines[0], "refused before the data was read"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.usefixtures("_cli_globals_restored")
def test_a_directory_as_tune_out_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tune, "tune", _no_search)
    result = _train(tmp_path, "--tune-trials", "2", "--tune-out", str(tmp_path))
    assert result.exit_code == 2 and "--tune-out: expected a YAML file path" in result.stderr


def _result(best: Any, out: Path | None, **kwargs: Any) -> tune.TuneResult:
    return tune.TuneResult(
        run_id="parent123",
        metric="val_recall_at_20",
        best_value=0.25 if best is not None else None,
        best_trial=1 if best is not None else None,
        best_params={"model.temperature": 0.07} if best is not None else {},
        best_config=best,
        out=out,
        n_trials=kwargs.pop("n_trials", 2),
        n_complete=kwargs.pop("n_complete", 2 if best is not None else 0),
        **kwargs,
    )


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.usefixtures("_cli_globals_restored")
def test_the_best_config_is_trained_with_the_tune_run_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, final: bool
) -> None:
    base = load_config(SMOKE, ["data.interactions=/nonexistent/x.parquet"])
    best = base.model_copy(update={"model": base.model.model_copy(update={"temperature": 0.07})})
    searched: list[tuple[Any, tune.TuneOptions]] = []
    trained: list[dict[str, Any]] = []

    def search(cfg: Any, options: tune.TuneOptions, **kwargs: Any) -> tune.TuneResult:
        assert not kwargs, "train's search prepares its own (standard) split"
        searched.append((cfg, options))
        options.out.write_text("# the best YAML\n")
        return _result(best, options.out)

    def train(cfg: Any, **kwargs: Any) -> Any:
        assert kwargs["config_path"].read_text() == "# the best YAML\n"
        trained.append({"cfg": cfg, **kwargs})
        raise DataError("stop here")  # the stages themselves are tested elsewhere

    monkeypatch.setattr(tune, "tune", search)
    monkeypatch.setattr(stages, "train", train)
    args = ["--tune-trials", "3", "--tune-timeout", "42", "--set", "train.epochs=2"]
    result = _train(tmp_path, *args, *(["--final"] if final else []))
    assert result.exit_code == 2 and "stop here" in result.stderr, result.output
    ((cfg, options),) = searched
    assert (options.trials, options.timeout, options.fixed) == (3, 42.0, {"train.epochs"})
    assert cfg.train.epochs == 2 and options.seed == cfg.train.seed
    assert options.interactions_path is None, "the YAML keeps the input config's paths only"
    (call,) = trained
    assert call["cfg"] is best and call["final"] is final and not call["resume"]
    assert call["tags"] == {"tune_run_id": "parent123"}
    assert call["config_path"] == options.out and options.out.name == "smoke-tuned.yaml"
    assert not options.out.parent.exists(), "the temporary YAML is removed after training"
    assert "tuned: best val_recall_at_20 0.2500 (trial 1 of 2; parent run parent123)" in (
        result.stdout
    )


@pytest.mark.parametrize(
    ("outcome", "code", "expected"),
    [
        ({"interrupted": True}, 130, "the search was interrupted (2 trials: 0 complete"),
        ({"n_pruned": 2}, 1, "no trial completed (2 trials: 0 complete, 2 pruned"),
    ],
)
@pytest.mark.usefixtures("_cli_globals_restored")
def test_a_search_without_a_config_trains_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outcome: dict[str, Any],
    code: int,
    expected: str,
) -> None:
    monkeypatch.setattr(tune, "tune", lambda cfg, options, **_: _result(None, None, **outcome))
    monkeypatch.setattr(stages, "train", _no_search)
    out = tmp_path / "kept.yaml"
    result = _train(tmp_path, "--tune-trials", "2", "--tune-out", str(out))
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --tune-trials: "), result.stderr
    assert expected in lines[0] and "parent run parent123" in lines[0]
    assert lines[0].endswith("nothing trained")


def test_tune_for_train_raises_when_no_config_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tune, "tune", lambda *args, **kwargs: _result(None, None))
    options = tune.TuneOptions(trials=1, timeout=1.0)
    with pytest.raises(tune.SearchIncomplete, match="no trial completed") as caught:
        tune.tune_for_train(load_config(SMOKE), options)
    assert not caught.value.interrupted and caught.value.result.run_id == "parent123"
    assert isinstance(caught.value, DataError)


def test_train_tune_options_keep_tune_out_and_clean_the_temporary_file(tmp_path: Path) -> None:
    kept = tmp_path / "kept.yaml"
    with contextlib.ExitStack() as scope:
        options = cli._train_tune_options(SMOKE, ["train.epochs=3"], 2, None, kept, scope)
    assert options.out == kept and options.timeout == cli.DEFAULT_TUNE_TIMEOUT == 900.0
    assert options.fixed == {"train.epochs"} and options.trials == 2
    with contextlib.ExitStack() as scope:
        options = cli._train_tune_options(None, None, 2, 5.0, None, scope)
        assert options.out.parent.is_dir() and options.out.name.endswith("-tuned.yaml")
    assert not options.out.parent.exists()


def test_tune_refuses_final_data_and_uses_given_data(tmp_path: Path, monkeypatch) -> None:
    synth.write(tmp_path, users=60, tracks=80, seed=1)
    cfg = load_config(SMOKE, [f"data.interactions={tmp_path / 'interactions.parquet'}"])
    options = tune.TuneOptions(trials=1, timeout=1.0, out=tmp_path / "best.yaml")
    final = prepare(cfg.data, cfg.split, final=True)
    with pytest.raises(DataError, match="not a --final preparation"):
        tune.tune(cfg, options, data=final)

    given = prepare(cfg.data, cfg.split)
    seen: list[Any] = []

    def no_prepare(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the given data is not prepared again")

    def stop(search: Any, *args: Any) -> None:
        seen.append(search.data)
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "prepare", no_prepare)
    monkeypatch.setattr(tune, "_run", stop)
    result = tune.tune(cfg, options, data=given)
    assert result.interrupted
    (data,) = seen
    assert data.encoded.test.nnz == 0 and given.encoded.test.nnz > 0, "test emptied on a copy"
    assert (data.encoded.val != given.encoded.val).nnz == 0
