"""``tracktower tune``: a seeded Optuna search over the knobs that matter, judged on validation
only, each trial an MLflow child run under one parent run, the best config written as a YAML
that ``tracktower train`` accepts.

Protocol. The data is prepared once, with the config's own ``data`` and ``split`` settings (or
handed in already prepared with them, ``tune(..., data=...)``, by a caller that needs it too),
so every trial trains on the same training partition and is scored on the same validation
partition that ``train`` would carve. The test partition is emptied before any trial sees the
data (:func:`without_test`): no trial can evaluate it, and nothing tune logs is a test metric.
A trial's value is the best per-epoch validation score of its fit, on the early-stopping metric
(``train.early_stopping.metric``, Recall@20 by default): the epoch whose weights ``train`` keeps.

Search. TPE (seeded) proposes each trial; the first trial takes the input config's values
wherever the space can express them, so the input's own settings are among the candidates. A
median pruner stops a trial whose validation score after an epoch (from the second on) is below
the median of earlier trials at that epoch, by raising out of the fit's epoch hook, which ends
Keras's ``fit`` there. ``--timeout`` bounds the whole search: no trial starts after it, and a
trial still running when it passes stops after its current epoch and counts with the best epoch
it reached (tag ``tune.stopped=deadline``). The output YAML is rewritten whenever a trial beats
the best so far, so even a killed search leaves its best behind.

Space (:func:`search_space`), a rule on the prepared data's shape (training examples, users,
tracks, users' history lengths, whether play counts vary), so that one command works for a
playlist dataset and for a dense play-count one:

- ``train.learning_rate`` log-uniform in [5e-4, 3e-2]; ``train.lr_schedule`` constant or cosine;
- ``train.batch_size``: the automatic size (about 300 steps an epoch, see
  :func:`tracktower.training.pipeline.auto_batch_size`), half and double it, at least 32 and
  at most what leaves 20 steps an epoch;
- ``train.epochs`` integer in [ceil(300 / s), ceil(3000 / s)] (at most 30), ``s`` the steps of
  an epoch at the middle batch choice: the number of epochs follows from a range of optimizer
  steps;
- ``train.weighting`` none or log1p, only when the training weights (play counts) vary;
- ``model.embedding_dim`` in {32, 64, 128, 256}, at most 4 x sqrt(tracks);
- ``model.temperature`` log-uniform in [0.02, 0.5]; ``model.track_bias`` on or off;
- pooling of the history: ``model.history_max_len`` among {25, 50, 100, 200, 400} up to the
  first value covering the 99th percentile of users' training history; ``tie_track_embeddings``
  (one table for history and candidates, or two); ``history_dropout`` among {0, 0.25, 0.5}
  (the share of each training example's history hidden, a denoising regulariser for dense
  data); ``query_layers`` none (the pooled history is linearly projected) or one hidden layer
  of twice the embedding size; ``use_user_id`` (a user-id embedding next to the pooled
  history) and, with it, ``user_id_dropout`` in [0, 0.5];
- negatives: ``model.negatives`` full or in_batch when the catalogue has at most
  ``model.full_softmax_max_tracks`` tracks (else the config's own setting), and for in-batch
  softmax ``model.uniform_negatives`` among 0 and {1024, 4096, 16384} up to a quarter of the
  catalogue.

A key set with ``--set`` (or any key below a section set with it) is fixed, not searched.

MLflow. The parent run (tag ``system=tune``) logs the base config (``base.*``), the data shape
(``shape.*``), the space (``space.*``) and the dataset; at the end the best trial's values
(``best.*`` params), its score (``best_<metric>``), ``n_trials``/``n_complete``/``n_pruned``
and the best YAML as the artifact ``tune/best.yaml``. Each trial is a child run (tag
``system=tune_trial``, ``mlflow.parentRunId``) with its whole config as params, per-epoch
curves (``epoch_*``), the kept epoch's ``val_*`` and its state in ``tune.state`` (complete,
pruned, failed, interrupted). Ctrl-C (or SIGTERM through the CLI) ends the search: the best
trial so far is logged and written, the interrupted trial's run and the parent end KILLED.

Inside ``train``. ``tracktower train --tune-trials N`` runs :func:`tune_for_train` first, on the
standard (non-final) split of the same data and config, and then trains the best trial's config
(``TuneResult.best_config``); a search that is interrupted or completes no trial raises
:class:`SearchIncomplete` instead, so nothing is ever trained with a half-made config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import yaml

from tracktower.features.errors import DataError
from tracktower.training import tracking
from tracktower.training.config import ExperimentConfig, config_from_mapping, flatten
from tracktower.training.data import Prepared, prepare
from tracktower.training.stages import check_size

if TYPE_CHECKING:
    import mlflow
    import optuna

    from tracktower.features.dataset import Encoded

log = logging.getLogger(__name__)

__all__ = [
    "DataShape",
    "EpochReporter",
    "Param",
    "SearchIncomplete",
    "TuneOptions",
    "TuneResult",
    "base_values",
    "best_yaml",
    "check_budget",
    "data_shape",
    "fixed_keys",
    "initial_params",
    "make_study",
    "search_space",
    "suggest",
    "trial_config",
    "trial_run",
    "tune",
    "tune_for_train",
    "without_test",
]

# The rule's constants (see the module docstring).
LEARNING_RATE = (5e-4, 3e-2)
TEMPERATURE = (0.02, 0.5)
USER_ID_DROPOUT = (0.0, 0.5)
HISTORY_DROPOUT = (0.0, 0.25, 0.5)
EMBEDDING_DIMS = (32, 64, 128, 256)
UNIFORM_NEGATIVES = (1024, 4096, 16384)
HISTORY_LENGTHS = (25, 50, 100, 200, 400)
MIN_STEPS, MAX_STEPS, MAX_EPOCHS = 300, 3000, 30
MIN_STEPS_PER_EPOCH, MIN_BATCH, MAX_BATCH = 20, 32, 16384

SYSTEM, TRIAL_SYSTEM = "tune", "tune_trial"
STATE_TAG, STOPPED_TAG, TRIAL_TAG = "tune.state", "tune.stopped", "tune.trial"
BEST_ARTIFACT = "tune/best.yaml"
DEFAULT_OUT = Path("best.yaml")


@dataclass(frozen=True)
class DataShape:
    """What the search space is a function of: sizes of the prepared training partition."""

    examples: int  # training interactions, one example each
    users: int
    tracks: int
    history_p99: int  # 99th percentile of users' training history length
    weighted: bool  # the training weights (play counts) are not all equal


@dataclass(frozen=True)
class Param:
    """One searched config key (dotted path): categorical when ``choices`` is given, else a
    float (or ``integer``) range; ``when`` decides from the values so far (the base config's for
    keys not searched) whether it applies at all, e.g. uniform negatives only without a full
    softmax."""

    key: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    when: Callable[[Mapping[str, Any]], bool] | None = None

    def describe(self) -> str:
        if self.choices:
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        kind = "log-uniform " if self.log else ("integer " if self.integer else "uniform ")
        return f"{kind}[{self.low:g}, {self.high:g}]"

    def contains(self, value: Any) -> bool:
        if self.choices:
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return self.low <= value <= self.high and (not self.integer or isinstance(value, int))


@dataclass(frozen=True)
class TuneOptions:
    """``interactions_path``/``tracks_path``: the data paths the input config itself named,
    written into the best YAML (None: left out, so that a path given on the command line does
    not end up in a config meant for other data)."""

    trials: int
    timeout: float
    out: Path = DEFAULT_OUT
    seed: int = 0
    fixed: frozenset[str] = frozenset()
    run_name: str | None = None
    interactions_path: Path | None = None
    tracks_path: Path | None = None


@dataclass
class TuneResult:
    run_id: str
    metric: str
    best_value: float | None = None
    best_trial: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_config: ExperimentConfig | None = None
    out: Path | None = None  # None: no trial completed, nothing written
    n_trials: int = 0
    n_complete: int = 0
    n_pruned: int = 0
    interrupted: bool = False


class DeadlineReached(Exception):
    """The search's time is up: raised out of a fit after an epoch, caught by the trial."""


class SearchIncomplete(DataError):
    """A search run for ``train`` left no config to train: ``interrupted`` (Ctrl-C or SIGTERM)
    or no trial completed. ``result`` is what it did record (its parent run, its counts)."""

    def __init__(self, message: str, result: TuneResult) -> None:
        super().__init__(message)
        self.result = result
        self.interrupted = result.interrupted


# --- input checks -------------------------------------------------------------------------


def check_budget(
    trials: int, timeout: float, *, flags: tuple[str, str] = ("--trials", "--timeout")
) -> None:
    """Bad budgets are one-line errors before any data is read, naming the command's own
    ``flags`` for the trial count and the timeout (``train`` calls them ``--tune-*``)."""
    if trials < 1:
        raise DataError(f"{flags[0]}: expected an integer >= 1, got {trials}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise DataError(f"{flags[1]}: expected a number of seconds > 0, got {timeout:g}")


def fixed_keys(overrides: Sequence[str]) -> frozenset[str]:
    """The dotted keys a list of ``--set key=value`` names: fixed, not searched."""
    keys = {item.split("=", 1)[0].strip().strip(".") for item in overrides if "=" in item}
    return frozenset(k for k in keys if k)


def is_fixed(key: str, fixed: Collection[str]) -> bool:
    return any(key == f or key.startswith(f + ".") for f in fixed)


def _check_config(cfg: ExperimentConfig) -> str:
    """The objective's metric name (``val_...``), after refusing configs tune cannot honour."""
    if cfg.train.strategy == "multi_worker":
        raise DataError(
            "train.strategy: tune trains its trials on this machine; use auto, cpu or mirrored"
        )
    if cfg.split.val_fraction <= 0:
        raise DataError("split.val_fraction: tune scores trials on validation; it must be > 0")
    metric = cfg.train.early_stopping.metric
    found = re.fullmatch(r".+_at_(\d+)", metric)
    if found and int(found[1]) not in cfg.eval.ks:
        raise DataError(
            f"train.early_stopping.metric: {metric!r} needs {found[1]} in eval.ks {cfg.eval.ks}"
        )
    return f"val_{metric}"


# --- the data and the space ----------------------------------------------------------------


def without_test(data: Prepared) -> Prepared:
    """The prepared data with its encoded test partition emptied: what every trial gets, so
    that the test split cannot be evaluated by tune whatever the fit does."""
    enc = data.encoded
    empty = sp.csr_matrix(enc.test.shape, dtype=enc.test.dtype)
    encoded = dataclasses.replace(enc, test=empty, test_unknown=np.zeros_like(enc.test_unknown))
    return dataclasses.replace(data, encoded=encoded)


def data_shape(encoded: Encoded) -> DataShape:
    train = sp.csr_matrix(encoded.train)
    lengths = np.diff(train.indptr)
    values = train.data
    return DataShape(
        examples=int(train.nnz),
        users=int(encoded.n_users),
        tracks=int(encoded.n_tracks),
        history_p99=int(np.ceil(np.percentile(lengths, 99))) if len(lengths) else 0,
        weighted=bool(len(values) and values.min() != values.max()),
    )


def batch_choices(examples: int) -> tuple[int, ...]:
    """The automatic batch, half and double it, within [32, the size that leaves 20 steps]."""
    from tracktower.training.pipeline import auto_batch_size

    auto = auto_batch_size(examples)
    cap = 2 ** math.floor(math.log2(max(examples / MIN_STEPS_PER_EPOCH, 1.0)))
    cap = min(max(cap, MIN_BATCH), MAX_BATCH)
    return tuple(sorted({min(max(b, MIN_BATCH), cap) for b in (auto // 2, auto, auto * 2)}))


def epoch_range(examples: int) -> tuple[int, int]:
    """Epochs that make 300 to 3000 optimizer steps at the middle batch choice (at most 30)."""
    choices = batch_choices(examples)
    steps = max(1, math.ceil(examples / choices[len(choices) // 2]))
    low = min(max(1, math.ceil(MIN_STEPS / steps)), MAX_EPOCHS - 1)
    high = min(max(math.ceil(MAX_STEPS / steps), low + 1), MAX_EPOCHS)
    return low, high


def embedding_dims(tracks: int) -> tuple[int, ...]:
    cap = max(EMBEDDING_DIMS[0], 4.0 * math.sqrt(tracks))
    return tuple(d for d in EMBEDDING_DIMS if d <= cap)


def history_lengths(p99: int) -> tuple[int, ...]:
    """Lengths below the 99th percentile, and the first one that covers it (all of them when
    none does)."""
    below = [n for n in HISTORY_LENGTHS if n < p99]
    cover = [n for n in HISTORY_LENGTHS if n >= p99][:1]
    return tuple(below + cover)


def uniform_negative_choices(tracks: int) -> tuple[int, ...]:
    return (0, *(m for m in UNIFORM_NEGATIVES if m <= tracks // 4))


def resolved_negatives(values: Mapping[str, Any], tracks: int) -> str:
    """``full`` or ``in_batch``: what the model does with ``model.negatives`` (``auto``
    resolved by the catalogue size, as :class:`~tracktower.training.model.TwoTowerModel` does)."""
    negatives = values["model.negatives"]
    if negatives == "auto":
        return "full" if tracks <= int(values["model.full_softmax_max_tracks"]) else "in_batch"
    return str(negatives)


def _in_batch(tracks: int, values: Mapping[str, Any]) -> bool:
    return resolved_negatives(values, tracks) == "in_batch"


def _uses_history(values: Mapping[str, Any]) -> bool:
    return bool(values["model.use_history"])


def _uses_user_id(values: Mapping[str, Any]) -> bool:
    return bool(values["model.use_user_id"])


def _train_params(shape: DataShape) -> list[Param]:
    low, high = epoch_range(shape.examples)
    params = [
        Param("train.learning_rate", low=LEARNING_RATE[0], high=LEARNING_RATE[1], log=True),
        Param("train.lr_schedule", choices=("constant", "cosine")),
        Param("train.batch_size", choices=batch_choices(shape.examples)),
        Param("train.epochs", low=low, high=high, integer=True),
    ]
    if shape.weighted:
        params.append(Param("train.weighting", choices=("none", "log1p")))
    return params


def _model_params(shape: DataShape, base: ExperimentConfig) -> list[Param]:
    params = [
        Param("model.embedding_dim", choices=embedding_dims(shape.tracks)),
        Param("model.temperature", low=TEMPERATURE[0], high=TEMPERATURE[1], log=True),
        Param("model.track_bias", choices=(False, True)),
        Param("model.tie_track_embeddings", choices=(True, False)),
        Param("model.query_layers", choices=("linear", "mlp")),
        Param("model.history_max_len", choices=history_lengths(shape.history_p99)),
        Param("model.history_dropout", choices=HISTORY_DROPOUT, when=_uses_history),
        Param("model.use_user_id", choices=(False, True), when=_uses_history),
        Param(
            "model.user_id_dropout",
            low=USER_ID_DROPOUT[0],
            high=USER_ID_DROPOUT[1],
            when=_uses_user_id,
        ),
    ]
    if shape.tracks <= base.model.full_softmax_max_tracks:
        params.append(Param("model.negatives", choices=("full", "in_batch")))
    uniform = uniform_negative_choices(shape.tracks)
    if len(uniform) > 1:
        in_batch = functools.partial(_in_batch, shape.tracks)
        params.append(Param("model.uniform_negatives", choices=uniform, when=in_batch))
    return params


def search_space(
    shape: DataShape, base: ExperimentConfig, fixed: Collection[str] = ()
) -> list[Param]:
    """The space for data of this shape, minus the keys fixed with ``--set``; a parameter's
    ``when`` only reads keys listed before it (or not searched)."""
    params = [*_train_params(shape), *_model_params(shape, base)]
    if not base.model.use_history:  # no history to pool: its knobs mean nothing
        params = [p for p in params if p.key != "model.history_max_len"]
    return [p for p in params if not is_fixed(p.key, fixed)]


def base_values(cfg: ExperimentConfig, shape: DataShape) -> dict[str, Any]:
    """The base config flattened, ``auto`` resolved to what a fit would use: the values a
    condition reads for keys not searched, and the first trial's values."""
    from tracktower.training.pipeline import auto_batch_size

    values = flatten(cfg)
    values["model.negatives"] = resolved_negatives(values, shape.tracks)
    if values["train.batch_size"] == "auto":
        values["train.batch_size"] = auto_batch_size(shape.examples)
    values["model.query_layers"] = "mlp" if values["model.query_layers"] else "linear"
    return values


def initial_params(space: Sequence[Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """The base config's values that lie in the space: the first trial (``enqueue_trial``)."""
    return {p.key: values[p.key] for p in space if p.contains(values.get(p.key))}


def suggest(
    trial: optuna.Trial, space: Sequence[Param], values: Mapping[str, Any]
) -> dict[str, Any]:
    """The trial's value of each parameter whose condition holds, by dotted key."""
    current = dict(values)
    chosen: dict[str, Any] = {}
    for p in space:
        if p.when is not None and not p.when(current):
            continue
        if p.choices:
            value: Any = trial.suggest_categorical(p.key, p.choices)
        elif p.integer:
            value = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
        else:
            value = trial.suggest_float(p.key, p.low, p.high, log=p.log)
        chosen[p.key] = current[p.key] = value
    return chosen


def trial_config(
    base: ExperimentConfig, chosen: Mapping[str, Any], *, where: str = "tune trial"
) -> ExperimentConfig:
    """The base config with the trial's values, validated like any config file."""
    data = base.model_dump(mode="json")
    for key, value in chosen.items():
        _set_dotted(data, key, value)
    if "model.query_layers" in chosen:
        width = 2 * int(data["model"]["embedding_dim"])
        data["model"]["query_layers"] = [width] if chosen["model.query_layers"] == "mlp" else []
    return config_from_mapping(data, where=where)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *sections, name = key.split(".")
    node = data
    for section in sections:
        node = node[section]
    node[name] = value


# --- one trial ------------------------------------------------------------------------------


def _log_epoch(row: Mapping[str, float], epoch: int) -> None:
    tracking.log_metrics(row, prefix="epoch_", step=epoch)


class EpochReporter:
    """A trial's ``on_epoch`` hook: logs the epoch's row, reports the metric to Optuna, and ends
    the fit by raising out of Keras's epoch callback (``fit`` stops there and returns nothing)
    when the pruner says so (:class:`optuna.TrialPruned`) or the search's ``deadline`` (a
    ``clock`` time) has passed (:class:`DeadlineReached`); ``best`` is the best value seen."""

    def __init__(
        self,
        trial: optuna.Trial,
        metric: str,
        deadline: float,
        *,
        log_row: Callable[[Mapping[str, float], int], None] = _log_epoch,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trial, self.metric, self.deadline = trial, metric, deadline
        self.log_row, self.clock = log_row, clock
        self.best: float | None = None
        self.best_row: dict[str, float] = {}
        self.best_epoch = 0
        self.epoch = 0  # the last epoch seen

    def __call__(self, epoch: int, row: dict[str, float]) -> None:
        import optuna

        self.epoch = epoch
        self.log_row(row, epoch)
        value = row.get(self.metric)
        if value is None:
            return
        if self.best is None or value > self.best:
            self.best, self.best_epoch = float(value), epoch
            self.best_row = {k: v for k, v in row.items() if k.startswith("val_")}
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {value:.4f} after epoch {epoch}")
        if self.clock() >= self.deadline:
            raise DeadlineReached(f"the search's time ran out after epoch {epoch}")


OWNER_TAGS = (tracking.HOST_TAG, tracking.PID_TAG, tracking.PID_START_TAG)


@contextlib.contextmanager
def trial_run(name: str, tags: Mapping[str, str]) -> Iterator[mlflow.ActiveRun]:
    """A child run of the active (parent) run, ended by the trial's outcome: FINISHED with
    ``tune.state`` complete or pruned, KILLED on Ctrl-C, FAILED otherwise. It carries the
    parent's owner tags, so a killed search's children are ended by the next run's cleanup
    (:func:`tracktower.training.tracking.end_dead_runs`) as the parent is."""
    import mlflow
    import optuna

    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("trial_run needs an active parent run")
    owner = {k: parent.data.tags[k] for k in OWNER_TAGS if k in parent.data.tags}
    run = mlflow.start_run(run_name=name, nested=True, tags={**owner, **tags})
    state, status = "failed", "FAILED"
    try:
        yield run
        state, status = "complete", "FINISHED"
    except optuna.TrialPruned:
        state, status = "pruned", "FINISHED"
        raise
    except KeyboardInterrupt:
        state, status = "interrupted", "KILLED"
        raise
    finally:
        with contextlib.suppress(Exception):
            mlflow.set_tag(STATE_TAG, state)
        mlflow.end_run(status)


@dataclass
class _Search:
    """The objective and its bookkeeping: each trial's config, and the best YAML rewritten
    whenever a trial beats the best so far (so a killed search leaves its best behind)."""

    base: ExperimentConfig
    data: Prepared
    space: list[Param]
    values: dict[str, Any]
    metric: str
    deadline: float
    options: TuneOptions
    configs: dict[int, ExperimentConfig] = field(default_factory=dict)
    best: float | None = None
    parent_run_id: str = ""

    def objective(self, trial: optuna.Trial) -> float:
        chosen = suggest(trial, self.space, self.values)
        cfg = trial_config(self.base, chosen, where=f"tune trial {trial.number}")
        self.configs[trial.number] = cfg
        tags = {"system": TRIAL_SYSTEM, "model": "two_tower", TRIAL_TAG: str(trial.number)}
        with trial_run(f"trial {trial.number}", tags) as run:
            trial.set_user_attr("run_id", str(run.info.run_id))
            tracking.log_params_flat(cfg.model_dump(mode="json"))
            return self._fit(trial, cfg)

    def _fit(self, trial: optuna.Trial, cfg: ExperimentConfig) -> float:
        import optuna

        from tracktower.training import train

        reporter = EpochReporter(trial, self.metric, self.deadline, clock=_now)
        started = time.perf_counter()
        try:
            result = train.fit(cfg, self.data.encoded, self.data.track_artist, on_epoch=reporter)
            best_val, best_epoch = result.best_val, result.best_epoch
        except DeadlineReached:
            tracking.set_tags({STOPPED_TAG: "deadline"})
            best_val, best_epoch = reporter.best_row, reporter.best_epoch
        except optuna.TrialPruned:
            tracking.log_metrics({"pruned_at_epoch": float(reporter.epoch)})
            raise
        finally:
            tracking.log_metrics({"train_seconds": time.perf_counter() - started})
            _release_tensorflow()
        if self.metric not in best_val:
            raise DataError(f"{self.metric}: the fit computed no validation metric")
        tracking.log_metrics({**best_val, "best_epoch": float(best_epoch)})
        return float(best_val[self.metric])

    def on_trial_end(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        import optuna

        if _now() >= self.deadline:  # Optuna's own timeout does not see a trial cut short
            study.stop()
        if trial.state != optuna.trial.TrialState.COMPLETE or trial.value is None:
            return
        if self.best is None or trial.value > self.best:
            self.best = float(trial.value)
            text = best_yaml(self.configs[trial.number], self.options, self.note(study, trial))
            _write_atomic(self.options.out, text)

    def note(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
        return (
            f"tracktower tune: trial {trial.number} of parent run {self.parent_run_id}, "
            f"{self.metric} {trial.value:.4f} on validation"
        )


def _now() -> float:
    """The clock of the search's deadline (one place, so a test can move it)."""
    return time.monotonic()


def _release_tensorflow() -> None:
    """Drop the trial's graph and model: trials would otherwise pile up in one process."""
    from tracktower.features.tf import tf

    tf.keras.backend.clear_session()
    gc.collect()


# --- the search ------------------------------------------------------------------------------


def make_study(
    trials: int, seed: int, pruner: optuna.pruners.BasePruner | None = None
) -> optuna.Study:
    """TPE with a third of the trials (3 to 10) drawn at random first; a median pruner that
    waits for 2 to 5 finished trials and never judges a trial before its second epoch."""
    import optuna

    startup = min(max(trials // 3, 3), 10)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if pruner is None:
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=min(max(trials // 5, 2), 5), n_warmup_steps=2
        )
    return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)


def tune(
    cfg: ExperimentConfig,
    options: TuneOptions,
    *,
    pruner: optuna.pruners.BasePruner | None = None,
    data: Prepared | None = None,
) -> TuneResult:
    """Run the search (see the module docstring); returns the best trial, or the best so far
    with ``interrupted`` set when Ctrl-C ended it. Bad input fails before any MLflow run.

    ``data``: the data already prepared with ``cfg.data`` and ``cfg.split`` (not ``final``), so
    that a caller holding it (the quality benchmark) does not prepare it twice; its test
    partition is emptied here all the same. None: prepared here."""
    check_budget(options.trials, options.timeout)
    if options.out.is_dir():
        raise DataError("--out: expected a YAML file path, got a directory", path=options.out)
    metric = _check_config(cfg)
    if data is not None and data.final:
        raise DataError("tune needs the standard split's validation, not a --final preparation")
    data = without_test(data if data is not None else prepare(cfg.data, cfg.split))
    check_size(cfg.promotion, data)
    if data.encoded.val.nnz == 0:
        raise DataError("no validation interactions to score trials on", path=data.source)
    shape = data_shape(data.encoded)
    space = search_space(shape, cfg, options.fixed)
    values = base_values(cfg, shape)
    study = make_study(options.trials, options.seed, pruner)
    if first := initial_params(space, values):
        study.enqueue_trial(first)
    search = _Search(cfg, data, space, values, metric, 0.0, options)
    result = TuneResult(run_id="", metric=metric)
    try:
        _run(search, study, shape, result)
    except KeyboardInterrupt:
        result.interrupted = True
    return result


def tune_for_train(cfg: ExperimentConfig, options: TuneOptions) -> TuneResult:
    """The search ``tracktower train --tune-trials`` runs before training, on the standard
    split of ``cfg``'s data (a ``--final`` retrain has no validation to judge trials on); its
    ``best_config`` is what ``train`` then trains. Raises :class:`SearchIncomplete` when the
    search left no config to train (interrupted, or no trial completed)."""
    result = tune(cfg, options)
    counts = f"{result.n_trials} trials: {result.n_complete} complete, {result.n_pruned} pruned"
    where = f"parent run {result.run_id}" if result.run_id else "no MLflow run"
    if result.interrupted:
        raise SearchIncomplete(
            f"--tune-trials: the search was interrupted ({counts}; {where}); nothing trained",
            result,
        )
    if result.best_config is None:
        raise SearchIncomplete(
            f"--tune-trials: no trial completed ({counts}; {where}); nothing trained", result
        )
    return result


def _run(search: _Search, study: optuna.Study, shape: DataShape, result: TuneResult) -> None:
    """The parent run around the optimisation; on Ctrl-C the best so far is recorded, then
    the interrupt goes on so that the parent ends KILLED."""
    cfg, options = search.base, search.options
    name = options.run_name or f"tune {options.trials} trials"
    with tracking.experiment_run(cfg.experiment, name, tags={"system": SYSTEM}) as run:
        result.run_id = search.parent_run_id = str(run.info.run_id)
        _log_setup(search, shape)
        search.deadline = _now() + options.timeout
        try:
            study.optimize(
                search.objective,
                n_trials=options.trials,
                timeout=options.timeout,
                callbacks=[search.on_trial_end],
                gc_after_trial=True,
            )
        except KeyboardInterrupt:
            _finish(search, study, result, interrupted=True)
            raise
        _finish(search, study, result, interrupted=False)


def _log_setup(search: _Search, shape: DataShape) -> None:
    options = search.options
    tracking.log_params_flat(search.base.model_dump(mode="json"), prefix="base")
    tracking.log_params_flat(dataclasses.asdict(shape), prefix="shape")
    tracking.log_params_flat({p.key: p.describe() for p in search.space}, prefix="space")
    tracking.log_params_flat(
        {"trials": options.trials, "timeout": options.timeout, "seed": options.seed},
        prefix="tune",
    )
    tracking.log_dataset(search.data)


def _finish(search: _Search, study: optuna.Study, result: TuneResult, *, interrupted: bool) -> None:
    """Counts, the best trial's values and YAML, in the parent run and in ``result``."""
    import optuna

    states = [t.state for t in study.trials]
    result.n_trials = len(states)
    result.n_complete = states.count(optuna.trial.TrialState.COMPLETE)
    result.n_pruned = states.count(optuna.trial.TrialState.PRUNED)
    result.interrupted = interrupted
    counts = {"n_trials": result.n_trials, "n_complete": result.n_complete}
    tracking.log_metrics({**counts, "n_pruned": result.n_pruned})
    tracking.set_tags({"tune.interrupted": str(interrupted).lower()})
    if result.n_complete == 0:
        log.warning("no trial completed: nothing written to %s", search.options.out)
        return
    best = study.best_trial
    result.best_value, result.best_trial = float(best.value or 0.0), best.number
    result.best_params = dict(best.params)
    result.best_config = search.configs[best.number]
    result.out = search.options.out
    text = best_yaml(result.best_config, search.options, search.note(study, best))
    _write_atomic(search.options.out, text)
    tracking.log_params_flat(result.best_params, prefix="best")
    tracking.log_metrics({f"best_{search.metric}": result.best_value})
    tracking.set_tags({"best_trial": str(best.number), "best_run_id": best.user_attrs["run_id"]})
    _log_text(text, BEST_ARTIFACT)


def _log_text(text: str, artifact: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact)


# --- the best config as YAML ---------------------------------------------------------------


def best_yaml(cfg: ExperimentConfig, options: TuneOptions, note: str = "") -> str:
    """``cfg`` as a config file ``tracktower train --config`` accepts: every field written out,
    the data paths only as the input config named them (see :class:`TuneOptions`)."""
    data = cfg.model_dump(mode="json")
    section = data["data"]
    section.pop("interactions", None)
    section.pop("tracks", None)
    paths = {"interactions": options.interactions_path, "tracks": options.tracks_path}
    data["data"] = {**{k: str(v) for k, v in paths.items() if v is not None}, **section}
    header = "".join(f"# {line}\n" for line in note.splitlines() if line)
    return header + yaml.safe_dump(data, sort_keys=False)


def _write_atomic(path: Path, text: str) -> None:
    """A reader (or a kill) never sees half a file: written beside it, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
