"""The fit loop: Keras ``fit`` over the tf.data pipeline, validated every epoch on Recall@K.

Early stopping is Keras's ``EarlyStopping`` watching a ranking metric computed exactly like the
final test metric (not the loss, which does not track retrieval quality well); it keeps the best
epoch's weights. Given a ``checkpoint_dir``, Keras's ``BackupAndRestore`` backs the training state
up there after every epoch, and a job that dies mid-run, started again with the same directory,
resumes after its last finished epoch. ``tracktower train`` gives each run its own persistent
directory (:mod:`tracktower.training.checkpoints`).

Several replicas (GPUs, workers) share each step: the global batch and the learning rate follow
their number by the rule in :mod:`tracktower.training.strategy`. Multi-worker, every worker runs
this same ``fit`` (each step is an all-reduce over all of them) on its shard of the input
(``tf.data`` auto-sharding by DATA: the same seeded shuffle everywhere, each worker keeps its
part of every global batch), and all must take the same number of epochs: the chief alone
computes the validation metrics, without any collective op, then hands them to every worker
(:func:`~tracktower.training.strategy.share_from_chief`), so early stopping sees the same values
and stops at the same epoch everywhere instead of leaving one worker waiting on the others.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from tracktower.features.dataset import Encoded
from tracktower.features.errors import DataError
from tracktower.features.tf import tf
from tracktower.training import evaluate, launcher, pipeline
from tracktower.training.config import ExperimentConfig, TrainConfig
from tracktower.training.metrics import users_with_heldout
from tracktower.training.model import TwoTowerModel
from tracktower.training.optimizers import LazyAdam
from tracktower.training.strategy import (
    configure_precision,
    make_strategy,
    scaled_learning_rate,
    share_from_chief,
    worker_loss,
    workers,
)

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], None]
# (global step, figures): see _Progress.
ProgressHook = Callable[[int, dict[str, float]], None]


@dataclass
class FitResult:
    """``known`` is every interaction the model was given (train plus the early-stopping slice):
    what inference reads as a user's history and what it excludes. Holding tracks out for early
    stopping must not make a user's served history forget them.

    ``history`` has one row per epoch run (``loss``, ``examples_per_sec``, ``epoch_seconds``,
    ``val_*``); ``best_epoch`` (1-based) is the epoch whose weights the model holds and
    ``best_val`` its ``val_*`` metrics (empty when there was nothing to validate on).
    ``resumed_epochs`` counts the epochs restored from a backup instead of run (0: none).

    ``batch_size`` is the global batch, ``per_replica_batch_size x replicas``, and
    ``learning_rate`` the rate after scaling (:mod:`tracktower.training.strategy`).
    """

    model: TwoTowerModel
    known: sp.csr_matrix
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0
    strategy: str = ""
    replicas: int = 1
    per_replica_batch_size: int = 0
    learning_rate: float = 0.0
    workers: int = 1
    resumed_epochs: int = 0


def _optimizer(
    cfg: TrainConfig, steps_per_epoch: int, learning_rate: float
) -> tf.keras.optimizers.Optimizer:
    lr: float | tf.keras.optimizers.schedules.LearningRateSchedule = learning_rate
    if cfg.lr_schedule == "cosine":
        # Decays to ~0 at the last allowed epoch: the late, small steps settle the embeddings
        # that a constant rate keeps shaking, and early stopping still keeps the best epoch.
        lr = tf.keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=max(1, cfg.epochs * steps_per_epoch)
        )
    # Keras's decoupled weight decay (AdamW's): each step every variable shrinks by
    # learning rate x weight_decay, embeddings a batch did not touch included.
    decay = {"weight_decay": cfg.weight_decay} if cfg.weight_decay else {}
    if cfg.optimizer == "adam":
        return tf.keras.optimizers.Adam(lr, **decay)
    if cfg.optimizer == "lazy_adam":
        return LazyAdam(lr, **decay)
    if cfg.optimizer == "adagrad":
        return tf.keras.optimizers.Adagrad(lr, **decay)
    return tf.keras.optimizers.SGD(lr, momentum=0.9, **decay)


class _Validation(tf.keras.callbacks.Callback):
    """Writes the epoch's row into Keras's ``logs``: the validation ranking metrics as ``val_*``
    (what ``EarlyStopping`` monitors, so this callback must come before it), throughput and time.

    Validation users see their training history and have it excluded, as test users see theirs.
    Multi-worker, only the chief scores them and every worker gets the chief's values (see the
    module docstring); ``strategy`` is what decides whether values are shared at all.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        data: Encoded,
        n_examples: int,
        on_epoch: EpochHook | None,
        *,
        strategy: tf.distribute.Strategy | None = None,
        chief: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.data = data
        self.n_examples = n_examples
        self.on_epoch = on_epoch
        self.strategy = strategy
        self.chief = chief
        self.rows: dict[int, dict[str, float]] = {}  # 1-based epoch -> row
        self.started = 0.0
        self.first_epoch: int | None = None  # 0-based; > 0 when Keras resumed from a backup
        users = users_with_heldout(data.val, data.val_unknown)
        if len(users) > cfg.train.max_val_users:
            rng = np.random.default_rng(cfg.train.seed)
            users = np.sort(rng.choice(users, cfg.train.max_val_users, replace=False))
        self.val_users = users

    @property
    def monitor(self) -> str:
        return f"val_{self.cfg.train.early_stopping.metric}"

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
            if epoch > 0:
                log.info(
                    "resumed from the backup: epochs 1-%d restored, continuing at epoch %d/%d",
                    epoch,
                    epoch + 1,
                    self.params.get("epochs", 0),
                )
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        seconds = time.perf_counter() - self.started
        logs = {} if logs is None else logs
        row: dict[str, float] = {
            "loss": float(logs.get("loss", np.nan)),
            "examples_per_sec": self.n_examples / max(seconds, 1e-9),
            "epoch_seconds": seconds,
        }
        if len(self.val_users):
            row.update({f"val_{k}": v for k, v in self._shared_validation().items()})
            if self.monitor not in row:
                names = ", ".join(k.removeprefix("val_") for k in row if k.startswith("val_"))
                raise DataError(
                    f"train.early_stopping.metric: {self.monitor.removeprefix('val_')!r} is not "
                    f"computed with eval.ks {self.cfg.eval.ks}; choose one of {names}"
                )
        logs.update(row)
        self.rows[epoch + 1] = row
        shown = " ".join(
            f"{k} {v:.4f}"
            for k, v in row.items()
            if k.startswith("val_") and k.endswith(("_20", "_10"))
        )
        log.info(
            "epoch %d/%d loss %.4f %s %.0f ex/s",
            epoch + 1,
            self.params.get("epochs", 0),
            row["loss"],
            shown,
            row["examples_per_sec"],
        )
        if self.on_epoch:
            self.on_epoch(epoch + 1, row)

    def _shared_validation(self) -> dict[str, float]:
        """The chief's metrics, on every worker. The chief's towers read its local copy of the
        weights (identical everywhere after each step's all-reduce): no collective op, so the
        others need not run the same calls; they wait in the share, which is one."""
        if self.strategy is None or workers(self.strategy) == 1:
            return self._validate()
        mine = json.dumps(self._validate()) if self.chief else None
        shared: dict[str, float] = json.loads(share_from_chief(self.strategy, mine))
        return shared

    def _validate(self) -> dict[str, float]:
        return evaluate.evaluate_model(
            self.model,
            self.data.train,
            self.data.val,
            self.data.val_unknown,
            self.cfg.eval.ks,
            exclude=self.data.train,
            users=self.val_users,
            # The same users x tracks budget as the test metrics; no interval every epoch.
            sampling=self.cfg.eval.model_copy(update={"bootstrap": 0}),
        )


class _Progress(tf.keras.callbacks.Callback):
    """Examples/s and the epoch's ETA as it goes: a tqdm bar on stderr when ``show_bar`` (the
    config's ``train.progress`` and a terminal), else a log line at every tenth of the epoch.

    At every tenth, ``on_progress(step, figures)`` gets the run's 1-based global step and
    ``examples_per_sec`` (since the epoch began), ``eta_seconds`` (to the epoch's end),
    ``epoch_fraction`` and the epoch's running mean ``loss``: ten calls an epoch, so a caller
    can log them to MLflow without slowing the steps. Keras hands this callback its batch logs
    as tensors (``_supports_tf_logs``): only the tenths read one, the other steps never wait.
    """

    _supports_tf_logs = True

    def __init__(
        self, examples_per_step: int, show_bar: bool, on_progress: ProgressHook | None
    ) -> None:
        super().__init__()
        self.per_step = examples_per_step
        self.show_bar = show_bar
        self.on_progress = on_progress
        self.epoch = 0
        self.steps = 0
        self.marks: set[int] = set()
        self.started = 0.0
        self.bar: Any = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch
        self.steps = int(self.params.get("steps") or 0)
        self.marks = {max(1, round(self.steps * k / 10)) for k in range(1, 11)}
        self.started = time.perf_counter()
        if self.show_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.steps * self.per_step,
                desc=f"epoch {epoch + 1}/{self.params.get('epochs', 0)}",
                unit="ex",
                unit_scale=True,
                file=sys.stderr,
                leave=False,
            )

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        done = batch + 1
        if self.bar is not None:
            self.bar.update(self.per_step)
        if done not in self.marks:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        figures = {
            "examples_per_sec": done * self.per_step / elapsed,
            "eta_seconds": (self.steps - done) * elapsed / done,
            "epoch_fraction": done / max(self.steps, 1),
        }
        if logs and "loss" in logs:
            figures["loss"] = float(logs["loss"])
        if self.bar is None:
            log.info(  # not "epoch N/M ...": that line is the epoch's result (logs parse it)
                "step %d/%d of epoch %d/%d (%.0f%%): %.0f ex/s, ETA %.0f s",
                done,
                self.steps,
                self.epoch + 1,
                self.params.get("epochs", 0),
                100 * figures["epoch_fraction"],
                figures["examples_per_sec"],
                figures["eta_seconds"],
            )
        if self.on_progress is not None:
            self.on_progress(self.epoch * self.steps + done, figures)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.close()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _callbacks(
    cfg: ExperimentConfig,
    validation: _Validation,
    checkpoint_dir: Path | None,
    progress: _Progress,
) -> tuple[list[tf.keras.callbacks.Callback], tf.keras.callbacks.EarlyStopping | None]:
    """Progress, then validation (it fills the logs), then early stopping, then the backup.

    tf-keras 2.20's ``EarlyStopping`` restores the best weights in ``on_train_end`` whenever it
    saw a monitored value, whether it stopped early or ran out of epochs, so the model always ends
    on its best epoch. Its memory is not part of the backup: a resumed job keeps the best of the
    epochs it runs itself.
    """
    callbacks: list[tf.keras.callbacks.Callback] = [progress, validation]
    stopper = None
    if len(validation.val_users):
        stopper = tf.keras.callbacks.EarlyStopping(
            monitor=validation.monitor,
            mode="max",
            patience=cfg.train.early_stopping.patience,
            restore_best_weights=True,
        )
        callbacks.append(stopper)
    if checkpoint_dir is not None:
        callbacks.append(tf.keras.callbacks.BackupAndRestore(str(checkpoint_dir)))
    return callbacks, stopper


def fit(
    cfg: ExperimentConfig,
    data: Encoded,
    track_artist: np.ndarray | None = None,
    *,
    checkpoint_dir: Path | None = None,
    on_epoch: EpochHook | None = None,
    on_progress: ProgressHook | None = None,
) -> FitResult:
    """Train on ``data.train``, validate on ``data.val`` each epoch, keep the best epoch.

    ``checkpoint_dir`` (None: no backups) must outlive the process to be of any use: it holds the
    state of the last finished epoch until training completes, and is emptied then; given one
    that holds a backup, training resumes after its epoch. Multi-worker, every worker passes the
    same directory (on a shared file system across hosts): the chief writes it, the others
    write only Keras's ``workertemp_<index>`` folder in it, which Keras removes after each save,
    and all restore from it. ``on_epoch(epoch, row)`` is called after every epoch with the
    1-based epoch and its row; ``on_progress(step, figures)`` at every tenth of an epoch with
    the 1-based global step and its throughput figures (see :class:`_Progress`).

    The examples live in an anonymous scratch file in the system's temp directory (``TMPDIR``),
    12 bytes per row, for as long as the training input does (:mod:`.pipeline`).
    """
    tf.keras.utils.set_random_seed(cfg.train.seed)
    configure_precision(cfg.train.mixed_precision)
    strategy = make_strategy(cfg.train.strategy)
    if checkpoint_dir is not None and isinstance(strategy, tf.distribute.OneDeviceStrategy):
        raise DataError(
            "checkpoint_dir: Keras's BackupAndRestore cannot back up train.strategy=cpu"
        )
    examples = pipeline.make_examples(
        data.train,
        cfg.train.weighting,
        seed=cfg.train.seed,
        user_weight_power=cfg.train.user_weight_power,
    )
    if len(examples) == 0:
        raise ValueError("no training interactions left after the split")
    model, ds, per_replica, lr = _model_and_batches(cfg, data, examples, strategy, track_artist)
    replicas = int(strategy.num_replicas_in_sync)
    n_workers = workers(strategy)
    chief = n_workers == 1 or launcher.role().chief
    per_step = min(per_replica * replicas, len(examples))
    steps = int(ds.cardinality())
    validation = _Validation(cfg, data, steps * per_step, on_epoch, strategy=strategy, chief=chief)
    progress = _Progress(per_step, cfg.train.progress and sys.stderr.isatty(), on_progress)
    callbacks, stopper = _callbacks(cfg, validation, checkpoint_dir, progress)
    log.info(
        "training on %d interactions (%d steps of %d per epoch), %d users, %d tracks, "
        "batch %d per replica, learning rate %g, strategy %s (%d replicas, %d workers)",
        len(examples),
        steps,
        per_step,
        len(data.user_ids),
        len(data.track_ids),
        per_replica,
        lr,
        type(strategy).__name__,
        replicas,
        n_workers,
    )
    with worker_loss():
        model.fit(ds, epochs=cfg.train.epochs, callbacks=callbacks, verbose=0)
    best_epoch = max(validation.rows, default=0)
    if stopper is not None and stopper.best_weights is not None:
        best_epoch = stopper.best_epoch + 1
    best = validation.rows.get(best_epoch, {})
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        model = _local_copy(model, cfg, data, track_artist)
    return FitResult(
        model=model,
        known=(data.train + data.val).tocsr(),
        history=[validation.rows[e] for e in sorted(validation.rows)],
        best_epoch=best_epoch,
        best_val={k: v for k, v in best.items() if k.startswith("val_")},
        batch_size=per_replica * replicas,
        strategy=type(strategy).__name__,
        replicas=replicas,
        per_replica_batch_size=per_replica,
        learning_rate=lr,
        workers=n_workers,
        resumed_epochs=validation.first_epoch or 0,
    )


def _model_and_batches(
    cfg: ExperimentConfig,
    data: Encoded,
    examples: pipeline.Examples,
    strategy: tf.distribute.Strategy,
    track_artist: np.ndarray | None,
) -> tuple[TwoTowerModel, tf.data.Dataset, int, float]:
    """The compiled model under ``strategy``, the global batches, and the scaling rule's
    per-replica batch and learning rate (:mod:`tracktower.training.strategy`)."""
    replicas = int(strategy.num_replicas_in_sync)
    per_replica = (
        pipeline.auto_batch_size(len(examples))
        if cfg.train.batch_size == "auto"
        else int(cfg.train.batch_size)
    )
    ds = _sharded(
        pipeline.training_dataset(
            examples,
            data.train,
            batch_size=per_replica * replicas,
            history_max_len=cfg.model.history_max_len,
            user_id_dropout=cfg.model.user_id_dropout if cfg.model.use_user_id else 0.0,
            seed=cfg.train.seed,
            history_dropout=cfg.model.history_dropout if cfg.model.use_history else 0.0,
            shuffle_buffer=cfg.train.shuffle_buffer,
            with_history=cfg.model.use_history,
            max_steps=cfg.train.max_steps,
        )
    )
    lr = scaled_learning_rate(cfg.train.optimizer, cfg.train.learning_rate, replicas)
    with strategy.scope():
        model = TwoTowerModel(cfg.model, len(data.user_ids), len(data.track_ids), track_artist)
        model.compile(optimizer=_optimizer(cfg.train, max(1, int(ds.cardinality())), lr))
    return model, ds, per_replica, lr


def _sharded(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Auto-shard by DATA, said explicitly: the examples are read from one memory-mapped
    scratch file, not from a list of files, so the default (FILE, then DATA) would only warn
    before doing the same. Every worker draws the same seeded order and keeps its share of
    each global batch. Inert on one worker."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _local_copy(
    model: TwoTowerModel, cfg: ExperimentConfig, data: Encoded, track_artist: np.ndarray | None
) -> TwoTowerModel:
    """The trained weights in a model outside any strategy. A multi-worker model's variables
    are distributed ones, and saving them (the export's SavedModel) reads its Keras metric
    variables across workers: a collective op the chief would wait in alone once the others
    have finished. The copy's variables are plain."""
    plain = TwoTowerModel(cfg.model, len(data.user_ids), len(data.track_ids), track_artist)
    plain.set_weights(model.get_weights())
    return plain


def release_training_state(model: TwoTowerModel) -> None:
    """Free what only training needs, keeping the weights: the optimizer with its slots (Adam's
    and LazyAdam's moments are two more copies of every table: 3.4 GB for configs/mpd.yaml's two
    1.67M x 128 track tables) and the traced train/test/predict steps, which hold the
    optimizer's variables too. ``fit``'s training input (the scratch examples, the history
    table the dataset captured) has no owner once ``fit`` returns; Keras's objects keep
    themselves alive in reference cycles, so only a collection frees it all. Afterwards the
    model can be called, exported and saved, but not trained again until it is compiled
    again."""
    model.optimizer = None
    # Keras also keeps the optimizer as a checkpoint dependency and in the compile config.
    if "optimizer" in getattr(model, "_unconditional_dependency_names", {}):
        model._delete_tracking("optimizer")
    config = getattr(model, "_compile_config", None)
    if config is not None:
        config.config.pop("optimizer", None)
    model.train_function = None
    model.test_function = None
    model.predict_function = None
    model.train_tf_function = None
    gc.collect()
