"""``tracktower train``, ``tracktower evaluate`` and ``tracktower register``: the training stages
(:mod:`tracktower.training.stages`) as commands; ``tracktower tune``: the hyperparameter search
(:mod:`tracktower.training.tune`), which ``train --tune-trials`` also runs before it trains.

The root command line (:mod:`tracktower.features.cli`) imports this module only for these
commands. Heavy imports stay inside the commands, and the data is read and validated before
TensorFlow is imported, so a bad file is reported in about a second (except in a multi-worker
``train``: its strategy joins the cluster first, before any TensorFlow op may run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from tracktower.features.cli import guarded, setup_logging

if TYPE_CHECKING:
    from tracktower.training.config import ExperimentConfig
    from tracktower.training.launcher import Role
    from tracktower.training.stages import TrainSummary
    from tracktower.training.tune import TuneOptions, TuneResult

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(help="Experiment YAML (validated; see configs/). Default: configs/default.yaml."),
]
InteractionsOpt = Annotated[
    Path | None,
    typer.Option(help="Interactions: Parquet file/dir, CSV/TSV, or a directory of MPD slices."),
]
TracksOpt = Annotated[Path | None, typer.Option(help="Optional track metadata file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config field, e.g. --set train.epochs=5."),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)."),
]
PromoteOpt = Annotated[
    bool | None,
    typer.Option(
        "--promote/--no-promote",
        help="Move the champion alias unconditionally, or never (default: the champion policy).",
        show_default=False,
    ),
]
SummaryOpt = Annotated[
    Path | None, typer.Option(help="Write run id, model URI, champion and metrics as JSON.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        help="Continue the newest run of this same command that died after backing up an "
        "epoch: its MLflow run, from that epoch (a new run when there is none)."
    ),
]
LocalWorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="Run as N multi-worker processes on this machine (TF_CONFIG on loopback "
        "ports, train.strategy=multi_worker); exits with the chief's status.",
        show_default=False,
    ),
]
TuneTrialsOpt = Annotated[
    int | None,
    typer.Option(
        help="First search the hyperparameters with this many trials (as `tracktower tune`, "
        "on the standard split's validation, --set keys fixed), then train the best config.",
        show_default=False,
    ),
]
TuneTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds the --tune-trials search may take (default 900).", show_default=False
    ),
]
TuneOutOpt = Annotated[
    Path | None,
    typer.Option(
        help="Keep the --tune-trials search's best config as this YAML (default: a temporary "
        "file, removed after training).",
        show_default=False,
    ),
]

DEFAULT_CONFIG = Path("configs/default.yaml")
# The run finished but its model did not pass the registration gate (training/champion.py).
EXIT_NOT_REGISTERED = 3
# A multi-worker job lost a worker (launcher.WorkerLost): restarting with --resume continues it.
EXIT_WORKER_LOST = 4
# `tune --timeout` / `train --tune-timeout` default: the budget of 15 minutes.
DEFAULT_TUNE_TIMEOUT = 900.0


def experiment_config(
    config: Path | None,
    overrides: list[str] | None,
    interactions: Path | None = None,
    tracks: Path | None = None,
    **fields: object,
) -> ExperimentConfig:
    """The experiment config with the command's flags applied as ``--set`` overrides (after the
    user's own ``--set``s, so a flag wins); ``configs/default.yaml`` when no file is named and it
    exists, so the commands work from the repository root and anywhere else."""
    from tracktower.training.config import load_config

    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    flags = {"data.interactions": interactions, "data.tracks": tracks, **fields}
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(config, [*(overrides or []), *extra])


@app.command()
@guarded
def train(
    config: ConfigOpt = None,
    interactions: InteractionsOpt = None,
    tracks: TracksOpt = None,
    set_: SetOpt = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name.")] = None,
    run_name: Annotated[
        str | None, typer.Option(help="MLflow run name (default: derived).")
    ] = None,
    tracking_uri: TrackingOpt = None,
    summary: SummaryOpt = None,
    final: Annotated[
        bool,
        typer.Option(help="Production retrain: no test split, alias unchanged unless --promote."),
    ] = False,
    promote: PromoteOpt = None,
    baseline: Annotated[
        bool, typer.Option(help="Log the popularity baseline (once per dataset and split).")
    ] = True,
    resume: ResumeOpt = False,
    local_workers: LocalWorkersOpt = None,
    tune_trials: TuneTrialsOpt = None,
    tune_timeout: TuneTimeoutOpt = None,
    tune_out: TuneOutOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train the two-tower model, evaluate it, export it and register it in MLflow.

    With ``TF_CONFIG`` set and ``train.strategy=multi_worker``, this process is one worker of a
    cluster: the chief trains, exports and registers; the others only train with it.
    With ``--tune-trials`` the search runs first and its best config is trained (:func:`_chief`).
    """
    from tracktower.training import launcher, tracking

    cfg = experiment_config(
        config, set_, interactions, tracks, experiment=experiment, run_name=run_name
    )
    multi_worker = local_workers is not None or cfg.train.strategy == "multi_worker"
    _check_tune_flags(tune_trials, tune_timeout, tune_out, multi_worker, resume)
    setup_logging(verbose)
    if local_workers is not None:
        launcher.check(local_workers, cfg.train.strategy)
        raise typer.Exit(launcher.launch(sys.argv[1:], local_workers))
    tracking.configure(tracking_uri)
    role = _cluster_role(cfg)
    from tracktower.training import stages

    tuning = None if tune_trials is None else (tune_trials, tune_timeout, tune_out)
    try:
        if not role.chief:
            stages.train_worker(cfg, final=final)
            return
        result = _chief(
            cfg,
            config,
            set_,
            tuning,
            final=final,
            promote=promote,
            baseline=baseline,
            resume=resume,
        )
    except launcher.WorkerLost as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_WORKER_LOST) from None
    if summary is not None:
        result.write(summary)
    for name, value in result.metrics.items():
        typer.echo(f"  test {name:16s} {_number(name, value)}")
    _outcome(result.run_id, result.model_uri, result.champion, result.champion_reason)


def _chief(
    cfg: ExperimentConfig,
    config: Path | None,
    overrides: list[str] | None,
    tuning: tuple[int, float | None, Path | None] | None,
    *,
    final: bool,
    promote: bool | None,
    baseline: bool,
    resume: bool,
) -> TrainSummary:
    """The chief's ``train``. With ``tuning`` (``--tune-trials``, ``--tune-timeout``,
    ``--tune-out``) the search of ``tracktower tune`` runs first, on the standard split (also
    for ``--final``: it needs a validation split), ``--set`` keys fixed; the best trial's
    config is then trained, logged as the run's config (its YAML as the config file) and the
    run tagged ``tune_run_id``. A search interrupted or without a complete trial trains
    nothing (exit 130 or 1)."""
    from tracktower.training import stages

    config_path = config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    with contextlib.ExitStack() as scope:
        tags: dict[str, str] = {}
        if tuning is not None:
            options = _train_tune_options(config, overrides, *tuning, scope)
            cfg, config_path, tags = _tune_before_training(cfg, options)
        return stages.train(
            cfg,
            config_path=config_path,
            final=final,
            promote=promote,
            baseline=baseline,
            resume=resume,
            tags=tags,
        )


def _check_tune_flags(
    trials: int | None,
    timeout: float | None,
    out: Path | None,
    multi_worker: bool,
    resume: bool,
) -> None:
    """``train``'s ``--tune-*`` flags, checked before any data is read. A multi-worker run
    (``--local-workers`` or ``train.strategy=multi_worker``) is refused: the search trains its
    trials on this machine only, and the other workers would wait for a fit that comes late."""
    from tracktower.features.errors import DataError
    from tracktower.training import tune as tuning

    if trials is None:
        given = [f for f, v in (("--tune-timeout", timeout), ("--tune-out", out)) if v is not None]
        if given:
            raise DataError(f"{given[0]}: only with --tune-trials N")
        return
    flags = ("--tune-trials", "--tune-timeout")
    tuning.check_budget(trials, DEFAULT_TUNE_TIMEOUT if timeout is None else timeout, flags=flags)
    if out is not None and out.is_dir():
        raise DataError("--tune-out: expected a YAML file path, got a directory", path=out)
    if multi_worker:
        raise DataError(
            "--tune-trials: the search trains its trials on this machine, not with "
            "--local-workers or train.strategy=multi_worker; run `tracktower tune --out "
            "best.yaml` first, then `tracktower train --config best.yaml --local-workers N`"
        )
    if resume:
        raise DataError(
            "--tune-trials: a new search would change the config that --resume continues; "
            "train the kept config instead (--tune-out best.yaml, then --config best.yaml "
            "--resume)"
        )


def _train_tune_options(
    config: Path | None,
    overrides: list[str] | None,
    trials: int,
    timeout: float | None,
    out: Path | None,
    scope: contextlib.ExitStack,
) -> TuneOptions:
    """``train --tune-trials``'s search options, as ``tracktower tune`` would take them: the
    ``--set`` keys fixed, the YAML keeping the input config's data paths, written to ``out`` or
    to a file in a temporary directory that ``scope`` removes after training (it is logged as
    the run's config file, named after the input config: ``<stem>-tuned.yaml``)."""
    from tracktower.training import tune as tuning

    written = experiment_config(config, overrides)
    stem = config.stem if config is not None else "default"
    if out is None:
        tmp = scope.enter_context(tempfile.TemporaryDirectory(prefix="tracktower-tune-"))
        out = Path(tmp) / f"{stem}-tuned.yaml"
    return tuning.TuneOptions(
        trials=trials,
        timeout=DEFAULT_TUNE_TIMEOUT if timeout is None else timeout,
        out=out,
        seed=written.train.seed,
        fixed=tuning.fixed_keys(overrides or []),
        run_name=f"tune {stem} {trials} trials (train)",
        interactions_path=written.data.interactions,
        tracks_path=written.data.tracks,
    )


def _tune_before_training(
    cfg: ExperimentConfig, options: TuneOptions
) -> tuple[ExperimentConfig, Path, dict[str, str]]:
    """The search on ``cfg``'s standard split; returns the best config, its YAML (the config
    file the training run logs) and the training run's ``tune_run_id`` tag. A search that left
    no config ends the command: exit 130 when interrupted, else 1, one line on stderr."""
    from tracktower.training import tune as tuning

    _optuna_logs_through_logging()
    try:
        result = tuning.tune_for_train(cfg, options)
    except tuning.SearchIncomplete as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(130 if exc.interrupted else 1) from None
    assert result.best_config is not None and result.out is not None  # tune_for_train's promise
    typer.echo(
        f"tuned: best {result.metric} {result.best_value:.4f} (trial {result.best_trial} of "
        f"{result.n_trials}; parent run {result.run_id}) → training {result.out}"
    )
    return result.best_config, result.out, {"tune_run_id": result.run_id}


def _cluster_role(cfg: ExperimentConfig) -> Role:
    """Multi-worker, this process's role, with the strategy created now: it joins the cluster
    and must exist before any other TensorFlow op (data preparation runs none)."""
    from tracktower.training import launcher

    if cfg.train.strategy != "multi_worker":
        if os.environ.get(launcher.ENV_VAR):
            logging.getLogger(__name__).warning(
                "%s is set but train.strategy=%s: training on this machine alone "
                "(set train.strategy=multi_worker to join the cluster)",
                launcher.ENV_VAR,
                cfg.train.strategy,
            )
        return launcher.Role(None, 0, 1, True)
    role = launcher.role()
    from tracktower.training.strategy import make_strategy

    make_strategy(cfg.train.strategy)
    return role


MODEL_HELP = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a local artifact directory"
)


@app.command()
@guarded
def evaluate(
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "models:/tracktower@champion",
    config: Annotated[
        Path | None,
        typer.Option(help="Experiment YAML (default: the config the model was trained with)."),
    ] = None,
    interactions: InteractionsOpt = None,
    tracks: TracksOpt = None,
    set_: SetOpt = None,
    split: Annotated[
        Literal["test", "val"], typer.Option(help="Which held-out partition to score.")
    ] = "test",
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name.")] = None,
    tracking_uri: TrackingOpt = None,
    log: Annotated[bool, typer.Option(help="Log the evaluation as an MLflow run.")] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Re-score an exported or registered model on a dataset split (default: its own data)."""
    from tracktower.features import artifact as contract
    from tracktower.serving.resolve import resolve_artifact
    from tracktower.training import stages, tracking
    from tracktower.training.config import config_from_mapping

    setup_logging(verbose)
    tracking.configure(tracking_uri)
    resolved = resolve_artifact(model, tracking_uri=tracking_uri)
    manifest = contract.read_manifest(resolved.path)
    flags = {"data.interactions": interactions, "data.tracks": tracks, "experiment": experiment}
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    overrides = [*(set_ or []), *extra]
    if config is not None:
        cfg = experiment_config(config, overrides)
    else:
        cfg = config_from_mapping(manifest.config, overrides, where=f"{model} (manifest config)")
    data = stages.prepare(cfg.data, cfg.split)
    metrics = stages.evaluate_artifact(
        resolved.path,
        data.encoded,
        stages.heldout(data.encoded, split),
        cfg.eval.ks,
        sampling=cfg.eval,
    )
    same = data.fingerprint == manifest.dataset.fingerprint
    typer.echo(
        f"{model} ({resolved.name} version {resolved.version}) on {data.source} "
        f"({'the data it was trained on' if same else 'other data'}), {split} split:"
    )
    for name, value in metrics.items():
        typer.echo(f"  {split} {name:16s} {_number(name, value)}")
    if log:
        run_id = stages.log_evaluation(cfg, data, metrics, model=model, split=split)
        typer.echo(f"logged as run {run_id} in experiment {cfg.experiment}")


@app.command()
@guarded
def register(
    run_id: Annotated[str, typer.Option(help="The training run whose model to register.")],
    model_name: Annotated[str, typer.Option(help="Registered model name.")] = "tracktower",
    promote: PromoteOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Register the model of an existing run and apply the champion policy."""
    from tracktower.training import stages, tracking

    tracking.configure(tracking_uri)
    result = stages.register(run_id, model_name=model_name, promote=promote)
    _outcome(run_id, result.model_uri, result.champion, result.reason)


def _outcome(run_id: str, model_uri: str | None, champion: bool, reason: str) -> None:
    """One line for what happened to the run's model; exit 3 when it was not registered."""
    if model_uri is None:
        typer.echo(f"run {run_id}: {reason}", err=True)
        raise typer.Exit(EXIT_NOT_REGISTERED)
    moved = "moved" if champion else "unchanged"
    typer.echo(f"run {run_id}: {model_uri} (champion {moved}: {reason})")


@app.command()
@guarded
def tune(
    config: ConfigOpt = None,
    interactions: InteractionsOpt = None,
    tracks: TracksOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Fix a config field (not searched), e.g. --set train.epochs=5."),
    ] = None,
    trials: Annotated[int, typer.Option(help="Most trials to run (>= 1).")] = 50,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds the whole search may take: no trial starts after it, and a running "
            "one stops after its current epoch."
        ),
    ] = DEFAULT_TUNE_TIMEOUT,
    out: Annotated[
        Path,
        typer.Option(
            help="Where the best config is written (rewritten at each new best) as a YAML that "
            "`tracktower train --config` accepts."
        ),
    ] = Path("best.yaml"),
    seed: Annotated[int, typer.Option(help="Seed of the TPE sampler.")] = 0,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name.")] = None,
    run_name: Annotated[
        str | None, typer.Option(help="Name of the parent MLflow run (default: derived).")
    ] = None,
    tracking_uri: TrackingOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Search the model's hyperparameters on the validation split (Optuna TPE with pruning),
    every trial an MLflow child run of one parent run; write the best config as a YAML.

    The test split is never evaluated. Ctrl-C ends the search keeping the best trial so far
    (written to --out; the parent run ends KILLED; exit code 130).
    """
    from tracktower.training import tracking
    from tracktower.training import tune as tuning

    tuning.check_budget(trials, timeout)
    # The YAML keeps the data paths of the input config (and its --set), not the flags'.
    written = experiment_config(config, set_)
    cfg = experiment_config(config, set_, interactions, tracks, experiment=experiment)
    setup_logging(verbose)
    _optuna_logs_through_logging()
    tracking.configure(tracking_uri)
    stem = config.stem if config is not None else "default"
    options = tuning.TuneOptions(
        trials=trials,
        timeout=timeout,
        out=out,
        seed=seed,
        fixed=tuning.fixed_keys(set_ or []),
        run_name=run_name or f"tune {stem} {trials} trials",
        interactions_path=written.data.interactions,
        tracks_path=written.data.tracks,
    )
    result = tuning.tune(cfg, options)
    _tune_outcome(result)


def _optuna_logs_through_logging() -> None:
    """Optuna's one line per trial in the same format as ours, instead of its own handler."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def _tune_outcome(result: TuneResult) -> None:
    """The best trial and where its config went; exit 130 when Ctrl-C ended the search, 1
    when it ended with no complete trial."""
    counts = f"{result.n_trials} trials: {result.n_complete} complete, {result.n_pruned} pruned"
    if result.best_value is None or result.out is None:
        typer.echo(f"parent run {result.run_id}: no trial completed ({counts})", err=True)
    else:
        typer.echo(
            f"best {result.metric} {result.best_value:.4f} (trial {result.best_trial}; "
            f"{counts}) → {result.out}; parent run {result.run_id}"
        )
        for key, value in sorted(result.best_params.items()):
            typer.echo(f"  {key:32s} {value}")
    if result.interrupted:
        typer.echo("interrupted: the search ended early", err=True)
        raise typer.Exit(130)
    if result.out is None:
        raise typer.Exit(1)


def _number(name: str, value: float) -> str:
    """Counts (``eval_users``, ``eval_sampled``) as integers, metrics to four decimals."""
    return f"{value:.0f}" if name.startswith("eval_") else f"{value:.4f}"
