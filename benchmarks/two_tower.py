"""Two-tower entries for ``benchmarks/quality.py``: the plain TFRS tutorial, tracktower, and
tracktower after ``tune`` (``tracktower-tuned``, run only when asked for by name).

Both train on the TRAIN part of the benchmark's one prepared split per (dataset, seed), the very
object the baselines get, so every system sees the same rows. Each picks its epoch on the VAL
part only: Keras early stopping on validation Recall@20 restores the best epoch's weights. The
model is then scored once on TEST with TRAIN+VAL as each user's history and as what its lists may
not contain, which is what the baselines' test lists exclude too.

:func:`fit_and_test` is the one fit-then-score step (``benchmarks/training.py``'s
``run_system`` can share it), :func:`fit_and_score` the same inside an MLflow run.
:func:`tuned` is ``tracktower-tuned``: ``tracktower tune``'s search
(:func:`tracktower.training.tune.tune`) on the same prepared split, its test partition emptied
so that the trials see TRAIN and VAL only, within the benchmark's budget; then the best config
fitted and scored like ``tracktower``.
:func:`cold_start` is the optional cold-start entry (``quality.py --cold-start``): it costs a
second fit on 90% of the users, so the default run leaves it out.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
MPD_CONFIG = REPO / "configs" / "mpd.yaml"

# The plain TFRS retrieval tutorial: id embeddings (32), dot product, Adagrad(0.1), in-batch
# softmax. The tutorial trains 3 epochs; here it is early-stopped on VAL like tracktower.
TUTORIAL = [
    "model.embedding_dim=32",
    "model.use_user_id=true",
    "model.use_history=false",
    "model.use_artist=false",
    "model.query_layers=[]",
    "model.candidate_layers=[]",
    "model.normalize=false",
    "model.logq_correction=false",
    "model.remove_accidental_hits=false",
    "model.negatives=in_batch",
    "model.uniform_negatives=0",
    "model.track_bias=false",
    "model.user_id_dropout=0",
    "train.optimizer=adagrad",
    "train.learning_rate=0.1",
    "train.lr_schedule=constant",
    "train.batch_size=8192",
    "train.weighting=none",
]
# Its epochs chosen on VAL: at most 10 (a constant learning rate has no natural end), stopped
# after 2 without a better validation Recall@20, as configs/mpd.yaml stops tracktower.
TUTORIAL_EPOCHS = ["train.epochs=10", "train.early_stopping.patience=2"]

TUNED = "tracktower-tuned"
# Short names of the searched keys for the table's "selected" column (in this order).
SHORT_PARAMS = {
    "train.learning_rate": "lr",
    "train.lr_schedule": "sched",
    "train.batch_size": "batch",
    "train.epochs": "epochs",
    "train.weighting": "weight",
    "model.embedding_dim": "d",
    "model.temperature": "T",
    "model.track_bias": "bias",
    "model.tie_track_embeddings": "tied",
    "model.query_layers": "query",
    "model.history_max_len": "hist",
    "model.use_user_id": "uid",
    "model.user_id_dropout": "uid_drop",
    "model.negatives": "neg",
    "model.uniform_negatives": "uniform",
}


@dataclass
class TwoTowerScore:
    """One fitted two-tower model: test metrics, and the validation figures that chose its epoch."""

    metrics: dict[str, float]  # un-prefixed test metrics
    val: dict[str, float]  # un-prefixed validation metrics of the kept epoch
    best_epoch: int
    epochs_run: int
    fit_seconds: float
    run_id: str | None
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: val, examples/s


def config(ctx: Any, overrides: Sequence[str]) -> Any:
    """``configs/mpd.yaml`` pointed at the benchmark's data and split, then ``overrides``.

    data.* and split.* describe exactly ``ctx.data`` (so the logged config is the truth, and
    :func:`cold_start` can re-prepare it); ``train.seed`` follows the split seed so that the
    spread over seeds includes the model's own initialisation, as it does for iALS.
    """
    from tracktower.training.config import load_config

    data = [
        f"data.interactions={ctx.interactions}",
        f"data.k_core={ctx.spec.k_core}",
        "data.min_track_users=0",  # exactly the benchmark's k-core data, as the baselines get
    ]
    if ctx.tracks:
        data.append(f"data.tracks={ctx.tracks}")
    split = [
        f"split.val_fraction={ctx.split['val_fraction']}",
        f"split.test_fraction={ctx.split['test_fraction']}",
        f"split.seed={ctx.seed}",
        f"train.seed={ctx.seed}",
    ]
    cfg = load_config(MPD_CONFIG, [*data, *split, *overrides])
    if ctx.max_epochs and cfg.train.epochs > ctx.max_epochs:
        train = cfg.train.model_copy(update={"epochs": ctx.max_epochs})
        cfg = cfg.model_copy(update={"train": train})
    return cfg


def _unprefixed(row: Mapping[str, float], prefix: str = "val_") -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in row.items() if k.startswith(prefix)}


def fit_and_test(
    cfg: Any, data: Any, ks: Sequence[int], on_epoch: Any = None
) -> tuple[Any, dict[str, float], float]:
    """``(FitResult, test metrics, fit seconds)``: trained on TRAIN, epoch kept on VAL, scored
    once on TEST. No MLflow of its own, so a caller's run can hold it (benchmarks/training.py).

    ``result.known`` is TRAIN+VAL: the history the query tower reads and what the lists
    exclude, the baselines' test exclusion set too.
    """
    from tracktower.training import evaluate
    from tracktower.training.train import fit

    started = time.perf_counter()
    result = fit(cfg, data.encoded, data.track_artist, on_epoch=on_epoch)
    seconds = time.perf_counter() - started
    enc = data.encoded
    metrics = evaluate.evaluate_model(
        result.model, result.known, enc.test, enc.test_unknown, list(ks), exclude=result.known
    )
    return result, metrics, seconds


def fit_and_score(
    cfg: Any,
    data: Any,
    *,
    ks: Sequence[int],
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    dataset_name: str,
    tracking_uri: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> TwoTowerScore:
    """:func:`fit_and_test` as one MLflow run: the flattened config, ``params``, the dataset
    input, every epoch's validation row (``epoch_*``), the kept epoch's ``val_*`` and the
    ``test_*`` metrics."""
    from tracktower.training import tracking
    from tracktower.training.config import flatten

    tracking.configure(tracking_uri)
    with tracking.experiment_run(experiment, run_name, tags=dict(tags)) as run:
        tracking.log_params_flat({**flatten(cfg), **(params or {})})
        tracking.log_dataset_input(
            data.interactions, fingerprint=data.fingerprint, name=dataset_name, source=data.source
        )
        result, metrics, seconds = fit_and_test(
            cfg,
            data,
            ks,
            on_epoch=lambda epoch, row: tracking.log_metrics(row, prefix="epoch_", step=epoch),
        )
        tracking.log_metrics(metrics, prefix="test_")
        tracking.log_metrics(result.best_val)
        tracking.log_metrics({"fit_seconds": seconds, "best_epoch": result.best_epoch})
    keep = ("val_recall_at_20", "val_ndcg_at_10", "examples_per_sec")
    history = [{k: round(float(row[k]), 5) for k in keep if k in row} for row in result.history]
    return TwoTowerScore(
        metrics=metrics,
        val=_unprefixed(result.best_val),
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        fit_seconds=seconds,
        run_id=run.info.run_id,
        history=history,
    )


def score_system(ctx: Any, name: str, cfg: Any, tags: Mapping[str, str] | None = None) -> Any:
    """:func:`fit_and_score` for one quality.py system on this (dataset, seed): its run named
    ``"<name> seed=<seed>"`` and tagged ``system``, ``dataset``, ``seed`` (and ``tags``)."""
    return fit_and_score(
        cfg,
        ctx.data,
        ks=ctx.ks,
        experiment=ctx.experiment,
        run_name=f"{name} seed={ctx.seed}",
        tags={"system": name, "dataset": ctx.spec.name, "seed": str(ctx.seed), **(tags or {})},
        dataset_name=ctx.spec.name,
        tracking_uri=ctx.tracking_uri,
        params=ctx.params,
    )


def cold_start(ctx: Any, cfg: Any, fraction: float = 0.1) -> dict[str, float]:
    """Hold out ``fraction`` of the users entirely; answer them from 80% of their tracks.

    The query tower is called with the user id hidden and the recent tracks as history, exactly
    what the server's ``session`` source does (the pooled history through the SavedModel's
    ``query_from_pooled_history`` signature). The warm model is early-stopped on its own VAL.
    """
    from tracktower.features.catalog import track_artist_index
    from tracktower.features.dataset import encode
    from tracktower.features.ranking import score_chunks
    from tracktower.features.split import holdout
    from tracktower.features.tf import tf
    from tracktower.training import evaluate
    from tracktower.training.data import prepare
    from tracktower.training.metrics import ranking_metrics
    from tracktower.training.train import fit

    full = prepare(cfg.data, cfg.split)
    # Plain string ids: this benchmark's data is small, and the code below maps ids by value.
    interactions = full.interactions.astype({"user_id": "str", "track_id": "str"})
    users = interactions["user_id"].drop_duplicates().to_numpy()
    rng = np.random.default_rng(ctx.seed)
    cold_users = set(rng.choice(users, int(len(users) * fraction), replace=False))
    is_cold = interactions["user_id"].isin(cold_users)
    warm_parts = holdout(
        interactions[~is_cold].reset_index(drop=True),
        val_fraction=cfg.split.val_fraction,
        test_fraction=cfg.split.test_fraction,
        min_user_interactions=cfg.split.min_user_interactions,
        seed=cfg.split.seed,
    )
    warm_enc = encode(warm_parts)
    started = time.perf_counter()
    result = fit(cfg, warm_enc, track_artist_index(warm_enc.track_ids, full.tracks))
    seconds = time.perf_counter() - started
    enc = warm_enc
    known = evaluate.evaluate_model(
        result.model, result.known, enc.test, enc.test_unknown, list(ctx.ks), exclude=result.known
    )
    cold = holdout(
        interactions[is_cold].reset_index(drop=True),
        val_fraction=0.0,
        test_fraction=0.2,
        min_user_interactions=2,
        seed=cfg.split.seed,
    )
    recent = cold.train.assign(idx=enc.track_index(cold.train["track_id"]) + 1)
    recent = recent[recent["idx"] > 0]
    order = sorted(set(cold.test["user_id"]))
    groups = recent.groupby("user_id")["idx"].apply(list).reindex(order)
    width = max(1, int(groups.map(lambda v: len(v) if isinstance(v, list) else 0).max()))
    hist = np.zeros((len(order), width), np.int32)
    for row, items in enumerate(groups):
        if isinstance(items, list):
            hist[row, : len(items)] = items
    queries = result.model.query_tower(
        {"user": tf.zeros(len(order), tf.int32), "history": tf.constant(hist)}
    ).numpy()

    def csr(frame: Any) -> Any:
        r = frame["user_id"].map({u: i for i, u in enumerate(order)}).to_numpy()
        c = enc.track_index(frame["track_id"])
        ok = c >= 0
        return sp.csr_matrix(
            (np.ones(ok.sum(), np.float32), (r[ok], c[ok])), shape=(len(order), len(enc.track_ids))
        ), np.bincount(r[~ok], minlength=len(order))

    seen, _ = csr(recent)
    truth, unknown = csr(cold.test)
    candidates = evaluate.track_embeddings(result.model)
    top = np.concatenate([i for i, _ in score_chunks(queries, candidates, max(ctx.ks), seen)])
    session = ranking_metrics(top, truth, unknown, list(ctx.ks), n_items=len(enc.track_ids))
    return {
        "known_recall_at_20": known["recall_at_20"],
        "session_recall_at_20": session["recall_at_20"],
        "session_ndcg_at_10": session["ndcg_at_10"],
        "ratio": session["recall_at_20"] / max(known["recall_at_20"], 1e-12),
        "cold_users": len(order),
        "fit_seconds": seconds,
    }


def short_params(params: Mapping[str, Any]) -> str:
    """The best trial's values in a few characters each ("lr=0.0031 T=0.083 d=64 ...")."""
    order = list(SHORT_PARAMS)
    keys = sorted(params, key=lambda k: (order.index(k) if k in order else len(order), k))
    parts = []
    for key in keys:
        value = params[key]
        text = f"{value:.3g}" if isinstance(value, float) else str(value).lower()
        parts.append(f"{SHORT_PARAMS.get(key, key.rsplit('.', 1)[-1])}={text}")
    return " ".join(parts) or "the input config"


def tune_for(ctx: Any) -> tuple[Any, float]:
    """``tracktower tune`` on the benchmark's config for this seed (``config(ctx, [])``) and on
    ``ctx.data`` itself (tune empties its TEST; trials are judged on VAL), within
    ``ctx.tune_budget`` seconds and ``ctx.tune_trials`` trials, in the benchmark's experiment;
    the YAML goes to a temporary directory. With ``--max-epochs`` the epochs are that cap,
    fixed, not searched. Returns the result and the search's wall seconds; Ctrl-C ends the
    benchmark, and a search with no complete trial is an error."""
    from tracktower.training import tracking, tune

    cfg = config(ctx, [f"experiment={ctx.experiment}"])
    fixed = frozenset({"train.epochs"} if ctx.max_epochs else ())
    tracking.configure(ctx.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="tracktower-quality-tune-") as tmp:
        options = tune.TuneOptions(
            trials=ctx.tune_trials,
            timeout=ctx.tune_budget,
            out=Path(tmp) / "best.yaml",
            seed=ctx.seed,
            fixed=fixed,
            run_name=f"tune {ctx.spec.name} seed={ctx.seed}",
        )
        started = time.perf_counter()
        result = tune.tune(cfg, options, data=ctx.data)
        seconds = time.perf_counter() - started
    if result.interrupted:
        raise KeyboardInterrupt
    if result.best_config is None:
        raise RuntimeError(
            f"{TUNED}: no trial completed in {ctx.tune_budget:g} s ({result.n_trials} trials, "
            f"parent run {result.run_id})"
        )
    return result, seconds


def tuned(ctx: Any, result_cls: Any) -> Any:
    """``tracktower-tuned`` for one (dataset, seed): :func:`tune_for`, then the best config
    through :func:`fit_and_score` like ``tracktower`` (epoch on VAL, TEST scored once), its run
    tagged ``tune_run_id``. ``fit_seconds`` is the final fit's; the search's time is in
    ``extra.tune_seconds``."""
    search, seconds = tune_for(ctx)
    cfg = search.best_config
    score = score_system(ctx, TUNED, cfg, tags={"tune_run_id": search.run_id})
    extra = {
        "epochs_run": score.epochs_run,
        "tune_seconds": round(seconds, 1),
        "tune_budget_seconds": ctx.tune_budget,
        "tune_max_trials": ctx.tune_trials,
        "n_trials": search.n_trials,
        "n_complete": search.n_complete,
        "n_pruned": search.n_pruned,
        f"best_{search.metric}": search.best_value,
        "tune_run_id": search.run_id,
        "best_params": search.best_params,
    }
    return result_cls(
        system=TUNED,
        params={
            "tuned": short_params(search.best_params),
            "epoch": f"{score.best_epoch}/{cfg.train.epochs}",
        },
        metrics=score.metrics,
        val_metrics=score.val,
        fit_seconds=score.fit_seconds,
        run_id=score.run_id,
        grid=[{"epoch": i + 1, **row} for i, row in enumerate(score.history)],
        extra=extra,
    )


def systems(ctx: Any, system_cls: Any, result_cls: Any) -> list[Any]:
    """``tfrs-tutorial``, ``tracktower`` (configs/mpd.yaml defaults) and ``tracktower-tuned``
    (:func:`tuned`) as quality.py systems."""

    def make(name: str, overrides: list[str], label: str) -> Any:
        def run(ctx: Any) -> Any:
            cfg = config(ctx, overrides)
            score = score_system(ctx, name, cfg)
            extra: dict[str, Any] = {"epochs_run": score.epochs_run}
            if name == "tracktower" and ctx.cold_start and ctx.spec.key == "mpd":
                extra["cold_start"] = cold_start(ctx, cfg)
                print(f"    cold start: {extra['cold_start']}", flush=True)
            return result_cls(
                system=name,
                params={"config": label, "epoch": f"{score.best_epoch}/{cfg.train.epochs}"},
                metrics=score.metrics,
                val_metrics=score.val,
                fit_seconds=score.fit_seconds,
                run_id=score.run_id,
                grid=[{"epoch": i + 1, **row} for i, row in enumerate(score.history)],
                extra=extra,
            )

        return system_cls(name, run)

    return [
        make("tfrs-tutorial", [*TUTORIAL, *TUTORIAL_EPOCHS], "TFRS tutorial (dim 32, Adagrad)"),
        make("tracktower", [], "configs/mpd.yaml"),
        system_cls(TUNED, lambda ctx: tuned(ctx, result_cls)),
    ]
