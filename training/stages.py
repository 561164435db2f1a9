"""The training pipeline as small stages: prepare → fit → export → evaluate → register.

Each stage takes and returns plain typed values, so the CLI composes them (``tracktower train``)
and each can also run on its own: ``tracktower evaluate`` re-scores an exported model,
``tracktower register`` registers an existing run. Offline metrics are computed from the exported
artifact's arrays, the very embeddings the server ranks, and every system in a comparison is
scored against one exclusion set that the caller passes explicitly.

Registration is the last stage and runs only after everything before it succeeded, so a failed or
interrupted run never replaces a good model; whether the champion alias moves is decided by
:mod:`tracktower.training.champion`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from tracktower.features import artifact as contract
from tracktower.features.dataset import Encoded, reindex
from tracktower.features.errors import DataError
from tracktower.features.index import ExactIndex, IndexInfo, RetrievalIndex, search_excluding
from tracktower.training import champion, checkpoints, launcher, tracking
from tracktower.training.config import EvalConfig, ExperimentConfig, PromotionConfig, flatten
from tracktower.training.data import Prepared, prepare

if TYPE_CHECKING:
    from tracktower.training.export import Exported
    from tracktower.training.train import FitResult

log = logging.getLogger(__name__)
_SCRATCH_PREFIX = "tracktower-"
RESUMED_TAG = "tracktower.resumed_epochs"

__all__ = [
    "Heldout",
    "Registration",
    "TrainSummary",
    "check_size",
    "evaluate_artifact",
    "export",
    "fit",
    "heldout",
    "log_index",
    "popularity_baseline",
    "prepare",
    "register",
    "run_name",
    "train",
    "train_worker",
]


@dataclass(frozen=True)
class Heldout:
    """What a comparison scores against: held-out truth, unreachable held-out counts, and the
    tracks each user already has (excluded from every system's list alike)."""

    truth: sp.csr_matrix
    unknown: np.ndarray
    exclude: sp.csr_matrix


@dataclass(frozen=True)
class Registration:
    """Outcome of registering a run's model: whether it was registered at all (see
    :func:`tracktower.training.champion.gate`), and *why* the champion alias did (not) move."""

    model_uri: str | None
    name: str
    version: str | None
    champion: bool
    reason: str
    registered: bool = True


@dataclass
class TrainSummary:
    run_id: str
    model_uri: str | None
    model_name: str
    model_version: str | None
    registered: bool
    champion: bool
    champion_reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    baseline_run_id: str | None = None
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    # Epochs restored from a dead run's backup by --resume (0: trained from the first epoch).
    resumed_epochs: int = 0
    # Wall seconds of each stage, in order (also the run's ``stage_<name>_seconds`` metrics).
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))


class StageTimer:
    """Wall seconds per stage of one ``train``: where the time goes at catalogue scale (logged as
    ``stage_<name>_seconds``; a stage timed twice adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Times the block; a stage that raises is not recorded (its time would read as done)."""
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        log.info("stage %s: %.1f s", name, elapsed)

    def log(self) -> None:
        tracking.log_metrics({f"stage_{k}_seconds": v for k, v in self.seconds.items()})


def heldout(encoded: Encoded, split: str = "test") -> Heldout:
    """The ``split`` partition as truth, excluding everything the model was given (train + val):
    a track the user already has is neither recommended back nor counted as a hit."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    truth = encoded.test if split == "test" else encoded.val
    unknown = encoded.test_unknown if split == "test" else encoded.val_unknown
    return Heldout(truth, unknown, encoded.known if split == "test" else encoded.train)


def run_name(cfg: ExperimentConfig, config_path: Path | None, *, final: bool) -> str:
    """A name that tells runs apart in the MLflow UI: the config file and the knobs that most
    often differ between experiments, unless the config or ``--run-name`` gives one."""
    if cfg.run_name:
        return cfg.run_name
    m, t = cfg.model, cfg.train
    stem = config_path.stem if config_path is not None else "two-tower"
    name = f"{stem} d{m.embedding_dim} T{m.temperature:g} lr{t.learning_rate:g} e{t.epochs}"
    return f"{name} final" if final else name


def check_size(policy: PromotionConfig, data: Prepared) -> None:
    """Refuse data too small to say anything (before any training or MLflow run)."""
    stats = data.stats
    for key, floor in (("users", policy.min_users), ("tracks", policy.min_tracks)):
        if stats[key] < floor:
            raise DataError(
                f"only {stats[key]} {key} after filtering ({stats['rows']} rows): below "
                f"promotion.min_{key}={floor}; a model of so little data is not registered "
                f"(lower promotion.min_{key} to train on it anyway)",
                path=data.source,
            )
    if stats["rows"] < policy.min_rows:
        raise DataError(
            f"only {stats['rows']} interactions after filtering: below promotion.min_rows="
            f"{policy.min_rows} (lower it to train on so little data anyway)",
            path=data.source,
        )


def popularity_baseline(
    cfg: ExperimentConfig, data: Prepared, held: Heldout, *, log_run: bool = True
) -> tuple[str | None, dict[str, float]]:
    """The scores every model must beat, and the run that records them.

    The metrics are always computed (the registration gate needs them); the run is logged once
    per dataset fingerprint and split, since re-logging it with every ``train`` would only add
    identical rows to the runs table, and an existing one is reused. Above ``cfg.eval.max_pairs``
    they are of the same seeded sample of users as the model's test (``metrics.sample_users``),
    ranked in O(users x k) (``Popularity.top_k``).
    """
    from tracktower.training.baselines.popular import Popularity
    from tracktower.training.baselines.runner import evaluate_recommender

    started = time.perf_counter()
    model = Popularity().fit(data.encoded.train)
    fit_seconds = time.perf_counter() - started
    metrics = evaluate_recommender(
        model, held.truth, held.unknown, cfg.eval.ks, exclude=held.exclude, sampling=cfg.eval
    )
    if not log_run:
        return None, metrics
    split_key = tracking.split_key(cfg.split.model_dump())
    existing = tracking.find_baseline_run(cfg.experiment, "popular", data.fingerprint, split_key)
    if existing is not None:
        log.info("popularity baseline for this dataset and split: run %s (reused)", existing)
        return existing, metrics
    tags = {"system": "popular", "model": "popular", "split": split_key}
    with tracking.experiment_run(cfg.experiment, "popularity", tags=tags) as run:
        tracking.log_params_flat({"model": "popular", "split": cfg.split.model_dump()})
        tracking.log_dataset(data)
        tracking.log_metrics(metrics, prefix="test_")
        tracking.log_metrics({"fit_seconds": fit_seconds})
        return str(run.info.run_id), metrics


def fit(
    cfg: ExperimentConfig, data: Prepared, checkpoint_dir: Path | None = None
) -> tuple[FitResult, float]:
    """Train inside the active run; returns the result and its wall time in seconds.

    Per-epoch values are logged as ``epoch_*`` curves; the plain ``val_*`` columns are those of
    the epoch whose weights are kept, so the runs table compares the models that were exported.
    The run's tags say where its per-epoch backups go (``checkpoint_dir``; none when None).
    ``resolved.*`` params record what ``auto`` settings and the replica count made of the batch
    and learning rate (:mod:`tracktower.training.strategy`); a resumed fit tags the run with the
    epochs it restored (``tracktower.resumed_epochs``).
    """
    from tracktower.training.train import fit as fit_model

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        tracking.log_metrics(row, prefix="epoch_", step=epoch)

    def on_progress(step: int, figures: dict[str, float]) -> None:
        tracking.log_metrics(figures, prefix="progress_", step=step)

    if checkpoint_dir is not None:
        tracking.set_tags({checkpoints.DIR_TAG: str(checkpoint_dir)})
    started = time.perf_counter()
    result = fit_model(
        cfg,
        data.encoded,
        data.track_artist,
        checkpoint_dir=checkpoint_dir,
        on_epoch=on_epoch,
        on_progress=on_progress,
    )
    seconds = time.perf_counter() - started
    tracking.log_params_flat(
        {
            "batch_size": result.batch_size,
            "per_replica_batch_size": result.per_replica_batch_size,
            "learning_rate": result.learning_rate,
            "replicas": result.replicas,
            "workers": result.workers,
            "strategy": result.strategy,
        },
        prefix="resolved",
    )
    if result.resumed_epochs:
        tracking.set_tags({RESUMED_TAG: str(result.resumed_epochs)})
    tracking.log_metrics(result.best_val)
    tracking.log_metrics({"train_seconds": seconds, "best_epoch": result.best_epoch})
    return result, seconds


def export(
    cfg: ExperimentConfig, data: Prepared, result: FitResult, out_dir: Path, run_id: str
) -> Exported:
    """Write the artifact (see :mod:`tracktower.features.artifact`) for the fitted model, with
    the retrieval index ``cfg.index`` asks for, measured (a DataError when below its floor)."""
    from tracktower.training.export import ExportInputs, export_artifact

    inputs = ExportInputs(
        model=result.model,
        user_ids=data.encoded.user_ids,
        track_ids=data.encoded.track_ids,
        known=result.known,
        tracks=data.tracks,
        manifest={
            "model_name": cfg.model_name,
            "run_id": run_id,
            "config": cfg.model_dump(mode="json"),
            "dataset": {"fingerprint": data.fingerprint, "source": data.source, **data.stats},
            "final": data.final,
        },
        index=cfg.index,
        seed=cfg.train.seed,
    )
    return export_artifact(inputs, out_dir)


def log_index(info: IndexInfo) -> None:
    """The index the artifact ships with, in the active run: ``index.built.*`` params (the
    config's ``index.*`` params say what was asked for, e.g. ``auto``; MLflow params cannot
    change, so what was built has its own names) and ``index_*`` metrics."""
    tracking.log_params_flat(
        {"backend": info.backend, "params": info.params, "sample_users": info.sample_users},
        prefix="index.built",
    )
    metrics = {"build_seconds": info.build_seconds}
    for name in ("recall_at_10", "recall_at_100"):
        value = getattr(info, name)
        if value is not None:
            metrics[name] = value
    tracking.log_metrics(metrics, prefix="index_")


# Users searched at once by offline evaluation: bounds the over-fetched [block, k + extra] arrays.
EVAL_BLOCK = 4096


def evaluate_artifact(
    path: Path,
    encoded: Encoded,
    held: Heldout,
    ks: list[int],
    *,
    sampling: EvalConfig | None = None,
) -> dict[str, float]:
    """Ranking metrics of an exported model on a split, through the artifact's own vocabulary
    and its own retrieval index (what the server would return, exclusions included).

    ``encoded``/``held`` may come from another encoding of the data (``tracktower evaluate`` on
    a re-prepared dataset): users the model does not know are skipped, held-out tracks it does not
    know count as unreachable, exactly as for a model trained on that data.

    Above ``sampling.max_pairs`` (users x tracks) only a seeded sample of the users is searched
    (``metrics.sample_users``: the popularity baseline of the same split gets the same one); the
    result adds ``eval_users``, ``eval_sampled`` and bootstrap intervals. ``sampling`` defaults
    to the ``eval`` settings the artifact was trained with (its manifest's config), so a
    re-evaluation draws the sample its training run's test did.
    """
    from tracktower.training.metrics import ranking_metrics, sample_users

    manifest = contract.read_manifest(path)
    sampling = sampling if sampling is not None else _artifact_eval_config(manifest, path)
    arrays = contract.read_arrays(path, manifest)
    index = contract.read_index(path, manifest, arrays["track_embeddings"])
    users = reindex_ids(arrays["user_ids"], encoded.user_ids)
    tracks = reindex_ids(arrays["track_ids"], encoded.track_ids)
    shape = (len(arrays["user_ids"]), len(arrays["track_ids"]))
    truth, unknown = reindex(held.truth, users, tracks, shape, held.unknown)
    exclude, _ = reindex(held.exclude, users, tracks, shape)
    sample = sample_users(np.flatnonzero(np.diff(truth.indptr) + unknown > 0), shape[1], sampling)
    rows = sample.users
    if len(rows) == 0:
        return {}
    # As wide as the lists the server answers known users from (an approximate search for more
    # candidates is not a prefix of one for fewer), then cut: the metrics are of what is served.
    width = min(max(max(ks), manifest.known_top_k), shape[1])
    top = search_index(index, arrays, width, exclude, rows)[:, : max(ks)]
    metrics = ranking_metrics(
        top,
        truth[rows],
        unknown[rows],
        ks,
        n_items=shape[1],
        bootstrap=sampling.bootstrap,
        seed=sampling.seed,
    )
    log.info(
        "artifact evaluated on %d of %d users (%s)",
        len(rows),
        sample.population,
        "a seeded sample" if sample.sampled else "all",
    )
    return {**metrics, **sample.as_metrics()}


def _artifact_eval_config(manifest: contract.Manifest, path: Path) -> EvalConfig:
    """The ``eval`` settings an artifact was trained with: defaults for what it does not say,
    and keys this version does not know are left out (an artifact from a newer version)."""
    from pydantic import ValidationError

    saved = manifest.config.get("eval") or {}
    if not isinstance(saved, dict):
        raise DataError(f"manifest config eval: expected a mapping, got {saved!r:.60}", path=path)
    known = {k: v for k, v in saved.items() if k in EvalConfig.model_fields}
    try:
        return EvalConfig.model_validate(known)
    except ValidationError as exc:
        problem = exc.errors()[0]
        field_name = ".".join(str(p) for p in problem["loc"])
        raise DataError(f"manifest config eval.{field_name}: {problem['msg']}", path=path) from None


def search_index(
    index: RetrievalIndex,
    arrays: dict[str, np.ndarray],
    k: int,
    exclude: sp.csr_matrix,
    rows: np.ndarray,
) -> np.ndarray:
    """Top-``k`` track indices of the known users ``rows`` through ``index``, their ``exclude``
    rows removed (over-fetch, exact fallback: ``features.index.search_excluding``)."""
    exact = ExactIndex(arrays["track_embeddings"])
    exclude = sp.csr_matrix(exclude)
    top = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), EVAL_BLOCK):
        block = rows[start : start + EVAL_BLOCK]
        queries = arrays["user_embeddings"][block]
        top[start : start + len(block)], _ = search_excluding(
            index, exact, queries, k, exclude, rows=block
        )
    return top


def reindex_ids(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each of ``ids`` in the artifact's sorted ``vocab`` (-1 where absent)."""
    from tracktower.features.dataset import encode_ids

    return encode_ids(np.asarray(vocab).astype(str), np.asarray(ids).astype(str))


def register(run_id: str, *, model_name: str, promote: bool | None) -> Registration:
    """Register the model logged by ``run_id`` if it passes the gate, then apply the champion
    policy to it.

    The run's own records say what the policy compares (dataset fingerprint, test Recall@20,
    popularity's on the same split, the ``promotion.*`` settings it was trained with), so any
    finished run can be registered later, not only the one that just trained.
    """
    import mlflow

    client = mlflow.MlflowClient()
    run = tracking.get_run(client, run_id)
    active = mlflow.active_run()
    if run.info.status != "FINISHED" and (active is None or active.info.run_id != run_id):
        raise DataError(f"run {run_id} is {run.info.status}; only a finished run is registered")
    model = tracking.logged_model(client, run)
    params, metrics = run.data.params, run.data.metrics
    policy = PromotionConfig.model_validate(
        {k.removeprefix("promotion."): v for k, v in params.items() if k.startswith("promotion.")}
    )
    candidate = champion.Candidate(
        fingerprint=params.get("dataset.fingerprint", ""),
        recall_at_20=metrics.get("test_recall_at_20"),
        baseline_recall_at_20=metrics.get("baseline_test_recall_at_20"),
    )
    gate = champion.gate(candidate, policy.min_lift)
    if not gate.promote:
        with tracking.resumed_run(run_id):
            tracking.set_tags({"registered_model": "", "champion": "False", "gate": gate.reason})
        return Registration(None, model_name, None, False, gate.reason, registered=False)
    version = tracking.register_version(client, model, model_name)
    tracking.record_version_in_manifest(client, model, model_name, version)
    champion.tag_version(client, model_name, version, candidate)
    decision = champion.apply(client, model_name, version, candidate, promote, policy.tie_tolerance)
    with tracking.resumed_run(run_id):
        tracking.set_tags(
            {"registered_model": f"{model_name}/{version}", "champion": str(decision.promote)}
        )
    uri = f"models:/{model_name}/{version}"
    return Registration(uri, model_name, version, decision.promote, decision.reason)


def train(
    cfg: ExperimentConfig,
    *,
    config_path: Path | None = None,
    final: bool = False,
    promote: bool | None = None,
    baseline: bool = True,
    resume: bool = False,
    tags: Mapping[str, str] | None = None,
) -> TrainSummary:
    """``tracktower train``: the stages above in order, inside one MLflow run.

    ``tags``: extra tags of the training run, e.g. ``tune_run_id`` when ``cfg`` is the best
    config of a search run just before (``train --tune-trials``, composed by the CLI).

    The checkpoint directory is checked first, so a bad one fails before any data is read.
    ``resume``: continue the newest run of this same command (same :func:`checkpoints.run_key`)
    that died with a backed-up epoch, in its own MLflow run, from that epoch; with none, one log
    line says so and a new run starts. Multi-worker this is the chief's part; the other workers
    run :func:`train_worker` and meet it in the same ``fit``.
    """
    if not (role := _role(cfg)).chief:
        raise DataError(f"this process is {role.name} of a cluster: see train_worker")
    checkpoint_root = checkpoints.prepare_root(cfg.train)
    timer = StageTimer()
    with timer("prepare"):
        data = prepare(cfg.data, cfg.split, final=final)
    log.info("dataset %s: %s (fingerprint %s)", data.source, data.stats, data.fingerprint[:12])
    check_size(cfg.promotion, data)
    held = None if final else heldout(data.encoded)
    with timer("baseline"):
        baseline_id, popular = (
            popularity_baseline(cfg, data, held, log_run=baseline) if held else (None, {})
        )
    name = run_name(cfg, config_path, final=final)
    key = checkpoints.run_key(cfg, data.fingerprint, final=final, workers=launcher.role().workers)
    run_tags = {"system": "two_tower", "model": "two_tower", "final": str(final).lower()}
    run_tags.update({**(tags or {}), checkpoints.KEY_TAG: key})
    if baseline_id:
        run_tags["baseline_run_id"] = baseline_id
    resumed = _claim_for_resume(cfg, checkpoint_root, key) if resume else None
    with _training_run(cfg, name, run_tags, resumed) as run_id:
        if resumed is None:  # a resumed run logged these before its first backup
            tracking.log_config(cfg, flatten(cfg), config_path, final=final)
            tracking.log_dataset(data)
        policy = cfg.train.checkpoints
        with checkpoints.for_run(
            checkpoint_root, policy, key, run_id, resumed=resumed is not None
        ) as checkpoint_dir:
            _share_checkpoint_dir(cfg, checkpoint_dir)
            with timer("fit"):
                result, seconds = fit(cfg, data, checkpoint_dir)
        data = release_after_fit(data, result)
        metrics = _export_and_evaluate(cfg, data, result, held, popular, run_id, name, timer)
        with timer("register"):
            registration = register(
                run_id, model_name=cfg.model_name, promote=_promote(final, promote)
            )
        timer.log()
    log.info("%s: %s", registration.model_uri or "not registered", registration.reason)
    return TrainSummary(
        run_id=run_id,
        model_uri=registration.model_uri,
        model_name=registration.name,
        model_version=registration.version,
        registered=registration.registered,
        champion=registration.champion,
        champion_reason=registration.reason,
        metrics=metrics,
        baseline_run_id=baseline_id,
        baseline_metrics=popular,
        dataset={"fingerprint": data.fingerprint, **data.stats},
        train_seconds=seconds,
        resumed_epochs=result.resumed_epochs,
        stage_seconds={k: round(v, 2) for k, v in timer.seconds.items()},
    )


def release_after_fit(data: Prepared, result: FitResult) -> Prepared:
    """Free what export and evaluation do not read before they start, since the run's peak
    memory is reached there: the optimizer's state and the training input
    (:func:`tracktower.training.train.release_training_state`), and the interaction rows, of
    which only their number is read after fit (``stats``): the returned ``Prepared`` holds a
    frame of as many rows and no columns (24 bytes a row less, 1.6 GB at MPD shape)."""
    import dataclasses

    import pandas as pd

    from tracktower.training.train import release_training_state

    release_training_state(result.model)
    rows = pd.DataFrame(index=pd.RangeIndex(len(data.interactions)))
    return dataclasses.replace(data, interactions=rows)


def _export_and_evaluate(
    cfg: ExperimentConfig,
    data: Prepared,
    result: FitResult,
    held: Heldout | None,
    popular: dict[str, float],
    run_id: str,
    name: str,
    timer: StageTimer,
) -> dict[str, float]:
    """Export, score the artifact on the test split (unless ``--final``), log the model; returns
    the test metrics."""
    with scratch_dir() as tmp:
        with timer("export"):
            exported = export(cfg, data, result, Path(tmp) / "artifact", run_id)
        path = exported.path
        log_index(exported.index)
        metrics: dict[str, float] = {}
        if held is not None:
            with timer("evaluate"):
                metrics = evaluate_artifact(
                    path, data.encoded, held, cfg.eval.ks, sampling=cfg.eval
                )
            tracking.log_test_metrics(metrics, title=f"{name} — test")
            tracking.log_metrics(popular, prefix="baseline_test_")
            contract.update_manifest(path, metrics={f"test_{k}": v for k, v in metrics.items()})
        with timer("log_model"):
            tracking.log_model(path)
    return metrics


def train_worker(cfg: ExperimentConfig, *, final: bool = False) -> None:
    """A non-chief worker's part of ``tracktower train``: the same data and the same ``fit`` as
    the chief (every step is a collective over all workers), and nothing else: no MLflow, no
    export, and no file but Keras's own ``workertemp_<index>`` in the chief's checkpoint
    directory, which must be the same path on every worker (a shared file system across hosts).
    """
    from tracktower.training.strategy import make_strategy, share_from_chief
    from tracktower.training.train import fit as fit_model

    role = _role(cfg)
    make_strategy(cfg.train.strategy)  # joins the cluster before anything else touches TF
    data = prepare(cfg.data, cfg.split, final=final)
    log.info("%s: dataset %s (fingerprint %s)", role.name, data.source, data.fingerprint[:12])
    check_size(cfg.promotion, data)
    shared = json.loads(share_from_chief(make_strategy(cfg.train.strategy), None))
    checkpoint_dir = Path(shared["dir"]) if shared["dir"] else None
    if checkpoint_dir is not None and shared["state"] != checkpoints.has_state(checkpoint_dir):
        raise DataError(
            f"train.checkpoints.dir: the chief resumes from {checkpoint_dir}, which this worker "
            f"({role.name}) does not see; multi-worker checkpoints need one file system shared "
            "by every worker at the same path"
        )
    result = fit_model(cfg, data.encoded, data.track_artist, checkpoint_dir=checkpoint_dir)
    log.info(
        "%s: done (%d epochs); the chief exports and registers", role.name, len(result.history)
    )


def _role(cfg: ExperimentConfig) -> launcher.Role:
    """This process's multi-worker role (a single process is its own chief)."""
    if cfg.train.strategy != "multi_worker":
        return launcher.Role(None, 0, 1, True)
    return launcher.role()


def _share_checkpoint_dir(cfg: ExperimentConfig, checkpoint_dir: Path | None) -> None:
    """Multi-worker, tell the other workers (waiting in :func:`train_worker`) which directory to
    back up to and restore from, and whether it holds a backup: theirs must be the same."""
    if cfg.train.strategy != "multi_worker":
        return
    from tracktower.training.strategy import make_strategy, share_from_chief

    state = checkpoint_dir is not None and checkpoints.has_state(checkpoint_dir)
    text = json.dumps({"dir": str(checkpoint_dir or ""), "state": state})
    share_from_chief(make_strategy(cfg.train.strategy), text)


def _claim_for_resume(
    cfg: ExperimentConfig, root: Path | None, key: str
) -> checkpoints.Owner | None:
    """The newest dead run of this command with a backup, made this process's, whose MLflow run
    can be reopened (one in this experiment, not deleted); None (and one log line) if none."""
    for path in checkpoints.resumable(root, key):
        owner = checkpoints.read_owner(path)
        problem = owner and _reopen_problem(owner.run_id, cfg.experiment)
        if owner is None or problem:
            log.warning("--resume: skipping %s: %s", path, problem or "no owner record")
            continue
        if (claimed := checkpoints.claim(path)) is not None:
            return claimed
    where = f"in {root}" if root is not None else "(checkpoints are off for this config)"
    log.info(
        "--resume: no checkpoint of an earlier run of this command (key %s) to resume %s; "
        "starting a new run",
        key,
        where,
    )
    return None


@contextlib.contextmanager
def _training_run(
    cfg: ExperimentConfig,
    name: str,
    tags: dict[str, str],
    resumed: checkpoints.Owner | None,
) -> Iterator[str]:
    """A new MLflow run, or the resumed one reopened (RUNNING again, owned by this process);
    yields its id. Either ends FINISHED on success, KILLED on an interrupt, FAILED otherwise."""
    if resumed is None:
        with tracking.experiment_run(cfg.experiment, name, tags=tags) as run:
            yield str(run.info.run_id)
        return
    import mlflow

    tracking.initialise_store(mlflow.get_tracking_uri())
    experiment_id = tracking.get_run(mlflow.MlflowClient(), resumed.run_id).info.experiment_id
    # The dead run is still RUNNING unless a later run's start marked it KILLED: mark it now,
    # so its record shows the crash even though it is about to run again.
    tracking.end_dead_runs(experiment_id)
    with tracking.resumed_run(resumed.run_id):  # RUNNING again
        # Owner tags name this process now: a concurrent start must not take it for dead.
        tracking.set_tags({**tags, **tracking._owner_tags()})
        log.info("--resume: reopened MLflow run %s", resumed.run_id)
        try:
            yield resumed.run_id
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


def _reopen_problem(run_id: str, experiment: str) -> str | None:
    """Why the MLflow run ``run_id`` cannot be resumed in ``experiment``; None if it can."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        run = tracking.get_run(client, run_id)
    except DataError as exc:
        return str(exc)
    if run.info.lifecycle_stage == "deleted":
        return f"its MLflow run {run_id} was deleted"
    name = client.get_experiment(run.info.experiment_id).name
    if name != experiment:
        return f"its MLflow run {run_id} is in experiment {name!r}, not {experiment!r}"
    return None


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """A temporary directory for the export, named after this process; directories that a killed
    run (``kill -9`` skips every cleanup) left behind are removed first, so they never pile up."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{_SCRATCH_PREFIX}*-"):
        pid = old.name.removeprefix(_SCRATCH_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not tracking._alive(int(pid), ""):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", suffix="-") as tmp:
        yield tmp


def _promote(final: bool, promote: bool | None) -> bool | None:
    """A ``--final`` retrain has no test metrics to compare: the alias moves only if forced."""
    return promote if promote is not None else (False if final else None)


def log_evaluation(
    cfg: ExperimentConfig, data: Prepared, metrics: dict[str, float], *, model: str, split: str
) -> str:
    """An MLflow run for a re-evaluation, with the same metric names as a training run's, so it
    sits in the runs table next to the runs it is compared with."""
    tags = {
        "system": "evaluate",
        "model_uri": model,
        "split": tracking.split_key(cfg.split.model_dump()),
    }
    with tracking.experiment_run(cfg.experiment, f"evaluate {model}", tags=tags) as run:
        tracking.log_params_flat({"model_uri": model, "evaluated_split": split})
        tracking.log_params_flat(flatten(cfg.split), prefix="split")
        tracking.log_dataset(data)
        tracking.log_metrics(metrics, prefix=f"{split}_")
        return str(run.info.run_id)
