"""The fit loop: Keras ``fit`` over the tf.data pipeline, validated every epoch on Recall@K.

Early stopping watches a ranking metric computed exactly like the final test metric (not the loss,
which does not track retrieval quality well), keeps the best weights, and checkpoints every epoch so
a long GPU job can be resumed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from tracktower.features.dataset import Encoded
from tracktower.features.tf import tf
from tracktower.training import evaluate, pipeline
from tracktower.training.config import ExperimentConfig, TrainConfig
from tracktower.training.model import TwoTowerModel
from tracktower.training.strategy import configure_precision, make_strategy

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class FitResult:
    """``known`` is every interaction the model was given (train plus the early-stopping slice)
    and ``table`` its histories: what inference uses as a user's history and what it excludes.
    Holding tracks out for early stopping must not make a user's served history forget them."""

    model: TwoTowerModel
    table: tf.RaggedTensor
    known: sp.csr_matrix
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    batch_size: int = 0
    strategy: str = ""
    replicas: int = 1


def _optimizer(cfg: TrainConfig, steps_per_epoch: int) -> tf.keras.optimizers.Optimizer:
    lr: float | tf.keras.optimizers.schedules.LearningRateSchedule = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        # Decays to ~0 at the last allowed epoch: the late, small steps settle the embeddings
        # that a constant rate keeps shaking, and early stopping still keeps the best epoch.
        lr = tf.keras.optimizers.schedules.CosineDecay(
            cfg.learning_rate, decay_steps=max(1, cfg.epochs * steps_per_epoch)
        )
    if cfg.optimizer == "adam":
        return tf.keras.optimizers.Adam(lr)
    if cfg.optimizer == "adagrad":
        return tf.keras.optimizers.Adagrad(lr)
    return tf.keras.optimizers.SGD(lr, momentum=0.9)


class _EpochCallback(tf.keras.callbacks.Callback):
    """Validation metrics, one log line, early stopping with best-weight restore, checkpoints."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        data: Encoded,
        table: tf.RaggedTensor,
        n_examples: int,
        checkpoint: tf.train.CheckpointManager | None,
        on_epoch: EpochHook | None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.data = data
        self.table = table
        self.n_examples = n_examples
        self.checkpoint = checkpoint
        self.on_epoch = on_epoch
        self.history: list[dict[str, float]] = []
        self.best: float = -np.inf
        self.best_epoch = 0
        self.best_weights: list[np.ndarray] | None = None
        self.wait = 0
        self.started = 0.0
        users = evaluate.users_with_truth(data.val, data.val_unknown)
        if len(users) > cfg.train.max_val_users:
            rng = np.random.default_rng(cfg.train.seed)
            users = np.sort(rng.choice(users, cfg.train.max_val_users, replace=False))
        self.val_users = users

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        seconds = time.perf_counter() - self.started
        row: dict[str, float] = {
            "loss": float((logs or {}).get("loss", np.nan)),
            "examples_per_sec": self.n_examples / max(seconds, 1e-9),
            "epoch_seconds": seconds,
        }
        metric = self.cfg.train.early_stopping.metric
        if len(self.val_users):
            val = evaluate.evaluate_model(
                self.model,
                self.table,
                self.data.train,
                self.data.val,
                self.data.val_unknown,
                self.cfg.eval.ks,
                users=self.val_users,
            )
            row.update({f"val_{k}": v for k, v in val.items()})
        self.history.append(row)
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
        if self.checkpoint is not None:
            self.checkpoint.save(checkpoint_number=epoch + 1)
        score = row.get(f"val_{metric}")
        if score is None:
            self.best_epoch = epoch + 1
            return
        if score > self.best:
            self.best, self.best_epoch, self.wait = score, epoch + 1, 0
            self.best_weights = self.model.get_weights()
        else:
            self.wait += 1
            if self.wait >= self.cfg.train.early_stopping.patience:
                log.info("early stopping: val_%s has not improved for %d epochs", metric, self.wait)
                self.model.stop_training = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def fit(
    cfg: ExperimentConfig,
    data: Encoded,
    track_artist: np.ndarray | None = None,
    *,
    checkpoint_dir: Path | None = None,
    on_epoch: EpochHook | None = None,
) -> FitResult:
    tf.keras.utils.set_random_seed(cfg.train.seed)
    configure_precision(cfg.train.mixed_precision)
    strategy = make_strategy(cfg.train.strategy)
    examples = pipeline.make_examples(data.train, cfg.train.weighting)
    if len(examples) == 0:
        raise ValueError("no training interactions left after the split")
    batch_size = (
        pipeline.auto_batch_size(len(examples))
        if cfg.train.batch_size == "auto"
        else int(cfg.train.batch_size)
    )
    table = pipeline.history_table(data.train)
    ds = pipeline.training_dataset(
        examples,
        pipeline.history_matrix(data.train, 4 * cfg.model.history_max_len, cfg.train.seed),
        batch_size=batch_size,
        history_max_len=cfg.model.history_max_len,
        user_id_dropout=cfg.model.user_id_dropout if cfg.model.use_user_id else 0.0,
        seed=cfg.train.seed,
    )
    with strategy.scope():
        model = TwoTowerModel(cfg.model, len(data.user_ids), len(data.track_ids), track_artist)
        model.compile(optimizer=_optimizer(cfg.train, max(1, int(ds.cardinality()))))
    manager = None
    if checkpoint_dir is not None:
        ckpt = tf.train.Checkpoint(model=model)
        manager = tf.train.CheckpointManager(ckpt, str(checkpoint_dir), max_to_keep=2)
    callback = _EpochCallback(cfg, data, table, len(examples), manager, on_epoch)
    log.info(
        "training on %d interactions, %d users, %d tracks, batch %d, strategy %s (%d replicas)",
        len(examples),
        len(data.user_ids),
        len(data.track_ids),
        batch_size,
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
    )
    model.fit(ds, epochs=cfg.train.epochs, callbacks=[callback], verbose=0)
    known = (data.train + data.val).tocsr()
    return FitResult(
        model=model,
        table=pipeline.history_table(known),
        known=known,
        history=callback.history,
        best_epoch=callback.best_epoch,
        batch_size=batch_size,
        strategy=type(strategy).__name__,
        replicas=strategy.num_replicas_in_sync,
    )
