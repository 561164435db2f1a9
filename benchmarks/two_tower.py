"""Two-tower entries for ``benchmarks/quality.py``: the TFRS-tutorial model, tracktower, cold start.

Each system re-prepares the benchmark's data with a validation slice carved out of the 80% train
part (for early stopping) and asserts that the test rows are exactly the baselines' test rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
MPD_CONFIG = REPO / "configs" / "mpd.yaml"

# The plain TFRS retrieval tutorial: id embeddings (32), dot product, Adagrad(0.1), 3 epochs.
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
    "train.epochs=3",
    "train.weighting=none",
    "train.early_stopping.patience=100",
]


def _config(ctx: Any, overrides: list[str]) -> Any:
    from tracktower.training.config import load_config

    spec = ctx.spec
    data = [
        f"data.interactions={spec.interactions}",
        f"data.k_core={spec.k_core}",
        "data.min_track_users=0",  # exactly the benchmark's k-core data, as the baselines get
    ]
    if spec.tracks:
        data.append(f"data.tracks={spec.tracks}")
    split = ["split.test_fraction=0.2", f"split.seed={ctx.seed}"]
    return load_config(MPD_CONFIG, [*data, *split, *overrides])


def _prepare(ctx: Any, cfg: Any) -> Any:
    from tracktower.features.split import TEST
    from tracktower.training.data import prepare

    data = prepare(cfg.data, cfg.split)
    mine, theirs = (
        d.interactions.loc[d.labels == TEST, ["user_id", "track_id"]]
        .astype("str")
        .sort_values(["user_id", "track_id"])
        for d in (data, ctx.data)
    )
    if not np.array_equal(mine.to_numpy(), theirs.to_numpy()):
        raise AssertionError("two-tower test split differs from the baselines' test split")
    return data


def _fit_logged(
    ctx: Any, name: str, cfg: Any, data: Any
) -> tuple[Any, dict[str, float], float, str]:
    from tracktower.training import evaluate, tracking
    from tracktower.training.config import flatten
    from tracktower.training.train import fit

    tracking.configure(ctx.tracking_uri)
    with tracking.experiment_run(
        ctx.experiment, name, tags={"system": name, "dataset": ctx.spec.name}
    ) as run:
        tracking.log_params_flat(flatten(cfg))
        tracking.log_dataset_input(
            data.interactions, fingerprint=data.fingerprint, name=ctx.spec.name, source=data.source
        )
        started = time.perf_counter()
        result = fit(
            cfg,
            data.encoded,
            data.track_artist,
            on_epoch=lambda epoch, row: tracking.log_metrics(row, prefix="epoch_", step=epoch),
        )
        seconds = time.perf_counter() - started
        enc = data.encoded
        # Train plus the early-stopping slice is the benchmark's whole train part: the same
        # exclusion set the baselines are scored against.
        metrics = evaluate.evaluate_model(
            result.model,
            result.known,
            enc.test,
            enc.test_unknown,
            list(ctx.ks),
            exclude=result.known,
        )
        tracking.log_metrics(metrics, prefix="test_")
        tracking.log_metrics(result.best_val)
        tracking.log_metrics({"fit_seconds": seconds, "best_epoch": result.best_epoch})
        tracking.log_recall_plot(metrics, title=f"{name} — {ctx.spec.name}")
    return result, metrics, seconds, run.info.run_id


def cold_start(ctx: Any, cfg: Any, fraction: float = 0.1) -> dict[str, float]:
    """Hold out ``fraction`` of the users entirely; answer them from 80% of their tracks.

    The query tower is called with the user id hidden and the recent tracks as history, exactly
    what the server's ``session`` source does (the pooled history through the SavedModel's
    ``query_from_pooled_history`` signature).
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


def systems(ctx: Any, system_cls: Any, result_cls: Any, cold: bool = True) -> list[Any]:
    def make(name: str, overrides: list[str], with_cold: bool) -> Any:
        def fit_and_score(ctx: Any) -> Any:
            cfg = _config(ctx, overrides)
            data = _prepare(ctx, cfg)
            result, metrics, seconds, run_id = _fit_logged(ctx, name, cfg, data)
            extra: dict[str, Any] = {"best_epoch": result.best_epoch}
            if with_cold:
                extra["cold_start"] = cold_start(ctx, cfg)
                print(f"    cold start: {extra['cold_start']}", flush=True)
            return result_cls(
                system=name,
                params={"config": "mpd.yaml", "overrides": " ".join(overrides)},
                metrics=metrics,
                fit_seconds=seconds,
                run_id=run_id,
                extra=extra,
            )

        return system_cls(name, fit_and_score)

    return [
        make("tfrs-tutorial", TUTORIAL, False),
        make("tracktower", [], cold and ctx.spec.key == "mpd"),
    ]
