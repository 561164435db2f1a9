"""Experiment configuration: YAML validated into typed models, overridable with ``key=value``.

Everything that changes what a run learns lives here, so that the flattened config logged to MLflow
is a complete description of the run and two runs can be compared field by field in the UI.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tracktower.features.columns import ColumnMap
from tracktower.features.errors import DataError, one_line
from tracktower.features.index import DEFAULT_RECALL_FLOOR, DEFAULT_RECALL_TARGET, MIN_SAMPLE
from tracktower.training.metrics import DEFAULT_KS


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a YAML file must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    interactions: Path | None = None
    tracks: Path | None = None
    # The reader's own model, so a config can name every column the reader understands.
    columns: ColumnMap = ColumnMap()
    # 0 disables; >0 drops users and tracks with fewer interactions, iterated until stable.
    k_core: int = Field(0, ge=0)
    # 0 disables; >0 drops tracks heard by fewer users but keeps every user and the rest of their
    # history: a production retrain must still answer for light users, and a history-based query
    # tower can embed anyone with one known track.
    min_track_users: int = Field(0, ge=0)


class SplitConfig(_Strict):
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    min_user_interactions: int = Field(5, ge=2)
    # --final keeps only this much of each user's history aside, for early stopping.
    final_val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self


class ModelConfig(_Strict):
    embedding_dim: int = Field(64, ge=2, le=4096)
    use_user_id: bool = True
    use_history: bool = True
    use_artist: bool = True
    query_layers: list[int] = Field(default_factory=lambda: [128])
    candidate_layers: list[int] = Field(default_factory=list)
    normalize: bool = True
    temperature: float = Field(0.05, gt=0.0)
    # Fraction of training examples whose user id is hidden, so the query tower also learns to
    # answer from listening history alone (the cold-start "session" path at serving time).
    user_id_dropout: float = Field(0.2, ge=0.0, le=1.0)
    # Fraction of the history's tracks hidden from each training example (a fresh draw every
    # step), a denoising regulariser: the query must be right from part of the history, which
    # is what keeps a model on dense data from memorising each user's exact set. Serving and
    # evaluation always read the whole history.
    history_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    history_max_len: int = Field(100, ge=1)
    # One track table for the pooled history and the candidates (tied), or one each (untied,
    # as word2vec's input/output vectors): untied doubles the table but decouples the roles.
    tie_track_embeddings: bool = True
    logq_correction: bool = True
    remove_accidental_hits: bool = True
    # Uniformly sampled extra negatives per batch, on top of the in-batch ones (0 = in-batch only).
    uniform_negatives: int = Field(0, ge=0)
    # "full" scores every batch against the whole catalogue (exact softmax, no sampling bias);
    # "auto" picks it when the catalogue has at most full_softmax_max_tracks tracks, where one
    # [batch x tracks] product per step is cheap, and in-batch sampled softmax above that.
    negatives: Literal["auto", "in_batch", "full"] = "auto"
    full_softmax_max_tracks: int = Field(50_000, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # A learned per-track bias added to the score (one extra embedding column).
    track_bias: bool = False

    @field_validator("query_layers", "candidate_layers")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n <= 0 for n in v):
            raise ValueError("layer sizes must be positive integers")
        return v

    @model_validator(mode="after")
    def _some_query_input(self) -> ModelConfig:
        if not (self.use_user_id or self.use_history):
            raise ValueError("the query tower needs use_user_id or use_history (or both)")
        return self


class EarlyStoppingConfig(_Strict):
    metric: str = "recall_at_20"
    # Epochs without a new best validation score before training stops (best weights are kept).
    patience: int = Field(2, ge=1)


class CheckpointConfig(_Strict):
    """Where Keras's ``BackupAndRestore`` keeps each run's state after every epoch, and how long
    the state of runs that died is kept (see :mod:`tracktower.training.checkpoints`).

    The directory must outlive the process and the machine's temp cleaner, so it defaults to the
    user's cache (``$TRACKTOWER_CHECKPOINT_DIR`` when set and ``dir`` is not). None of this changes
    what a run learns: it is left out of the key that identifies a run's checkpoints.
    """

    enabled: bool = True
    dir: Path | None = None
    # State of runs that died (kept for resuming): the newest keep_failed stay, unless older than
    # max_age_days; a run that finishes removes its own.
    keep_failed: int = Field(3, ge=0)
    max_age_days: float = Field(14.0, gt=0.0)


class TrainConfig(_Strict):
    """``learning_rate`` and ``batch_size`` are one replica's: with N replicas (GPUs of a
    ``mirrored`` run, or all workers' of a ``multi_worker`` one) a step takes N x batch_size
    examples and Adam, lazy Adam and Adagrad run at learning_rate x sqrt(N); SGD keeps its rate
    (its summed gradient already grows with the batch). See ``tracktower.training.strategy``;
    the values used are logged as ``resolved.*``.
    """

    # lazy_adam updates only the embedding rows a batch touches (Adam decays every row's moments
    # each step, a cost that grows with the catalogue): see training/optimizers.py.
    optimizer: Literal["adam", "lazy_adam", "adagrad", "sgd"] = "adam"
    learning_rate: float = Field(0.003, gt=0.0)
    # Decoupled weight decay (0 = none): a step shrinks every weight by learning_rate x this.
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    # "cosine" decays the learning rate to 0 over train.epochs (early stopping may end sooner).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # "auto" derives the batch size from the number of training interactions (see pipeline).
    batch_size: int | Literal["auto"] = "auto"
    epochs: int = Field(10, ge=1)
    weighting: Literal["none", "log1p", "raw"] = "log1p"
    # Each example's weight times n_u ** -p (n_u: its user's training rows): 0 lets heavy users
    # dominate the loss as they dominate the rows; 1 counts every user once, as the metrics do.
    user_weight_power: float = Field(0.0, ge=0.0, le=1.0)
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    strategy: Literal["auto", "cpu", "mirrored", "multi_worker"] = "auto"
    mixed_precision: bool = False
    seed: int = 42
    # Validation users scored per epoch (a seeded sample keeps epochs fast on big data).
    max_val_users: int = Field(5000, ge=1)
    # Caps the steps of each epoch (None: one pass over the training examples), so a full-size
    # dataset can be trained briefly for a benchmark or a smoke test without changing the data.
    max_steps: int | None = Field(None, ge=1)
    # Examples shuffled together: bounds training memory whatever the row count (fit writes the
    # examples once in a seeded random order to a scratch file, so a window of it suffices).
    shuffle_buffer: int = Field(1 << 18, ge=1)
    # A per-epoch progress bar (examples/s, ETA) on stderr; the same figures go to MLflow.
    progress: bool = True
    checkpoints: CheckpointConfig = CheckpointConfig()

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 2:
            raise ValueError("batch_size must be >= 2 or 'auto'")
        return v


class EvalConfig(_Strict):
    """Above ``max_pairs`` (evaluated users x tracks), test and validation metrics are exact on
    a seeded random sample of ``max_pairs // tracks`` users, reported with a bootstrap 95%
    interval (``bootstrap`` resamples of those users), so evaluation never grows as users x
    tracks."""

    ks: list[int] = Field(default_factory=lambda: list(DEFAULT_KS))
    max_pairs: int = Field(20_000_000_000, ge=1)
    bootstrap: int = Field(1000, ge=0)
    seed: int = 0


class PromotionConfig(_Strict):
    """When a trained model is registered at all, and when it may become champion.

    The size floor stops a degenerate file (one user, a few rows) from producing a "champion"
    whose fingerprint then blocks every real model; the lift over popularity stops a model that
    learned nothing from being registered; the tie tolerance keeps a champion that a new model
    matches only within run-to-run noise (see :mod:`tracktower.training.champion`).
    """

    min_users: int = Field(20, ge=1)
    min_tracks: int = Field(20, ge=1)
    min_rows: int = Field(200, ge=1)
    # Test Recall@20 must be strictly greater than popularity's on the same split times this.
    min_lift: float = Field(1.05, ge=1.0)
    # A challenger within this much test Recall@20 of the champion leaves the champion in place.
    tie_tolerance: float = Field(0.001, ge=0.0)


class IndexConfig(_Strict):
    """The retrieval index built at export (``tracktower.features.index``).

    ``auto`` is exact search below ``AUTO_MIN_TRACKS`` (10,000) tracks and ScaNN from there (the
    measured crossover). Recall@10/@100 against exact search is measured on a seeded sample of
    ``sample_users`` known users' query vectors (all of them when there are fewer; never a
    sample under 1,000); an index whose recall@100 stays below ``recall_floor`` after retuning
    fails the export, and one above ``recall_target`` is searched narrower (fewer leaves, so
    cheaper queries) as long as its measured recall@100 stays at or above the target.
    """

    backend: Literal["auto", "exact", "scann"] = "auto"
    recall_floor: float = Field(DEFAULT_RECALL_FLOOR, gt=0.0, le=1.0)
    recall_target: float = Field(DEFAULT_RECALL_TARGET, gt=0.0, le=1.0)
    sample_users: int = Field(MIN_SAMPLE, ge=MIN_SAMPLE)
    # Every known user's top list (seen tracks excluded) searched through the index at export
    # and stored in the artifact, this wide: a server answers any k up to it with a slice of a
    # shared memory map, never a search (4 + 4 bytes per user and slot: 800 MB at 1M users and
    # 100). 0: none, each known user is searched on first request. Match the server's max_k.
    known_top_k: int = Field(100, ge=0)


class ExperimentConfig(_Strict):
    experiment: str = "tracktower"
    model_name: str = "tracktower"
    run_name: str | None = None
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    promotion: PromotionConfig = PromotionConfig()
    index: IndexConfig = IndexConfig()


def _parse_value(raw: str) -> Any:
    """``--set`` values are YAML scalars/lists so that ``model.query_layers=[256,128]`` works."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise DataError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise DataError(f"--set expects key=value, got {item!r}")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DataError(f"--set {key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(path: Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate; every failure becomes a one-line DataError naming the field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError("config file not found", path=path) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read config: {exc}", path=path) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DataError(f"invalid YAML: {exc}".replace("\n", " "), path=path) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise DataError("expected a mapping at the top level", path=path)
        data = loaded
    return config_from_mapping(data, overrides, where=str(path) if path is not None else "config")


def config_from_mapping(
    data: Mapping[str, Any], overrides: list[str] | None = None, *, where: str = "config"
) -> ExperimentConfig:
    """Validate an already-parsed config (a YAML file's, or one stored in a model's manifest)."""
    merged = apply_overrides(copy.deepcopy(dict(data)), overrides or [])
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as exc:
        raise DataError(one_line(exc, field_prefix="field "), path=where) from None


def flatten(value: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted key → scalar, the shape MLflow params and the UI's column picker want."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
    return out
