"""One training run end to end: data → popularity baseline → fit → test → export → register.

Registration is the last step and happens only after everything before it succeeded, so a failed or
interrupted run can never replace a good model; the champion alias moves only by the rule in
:func:`tracktower.training.tracking.log_and_register_model`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tracktower.training import tracking
from tracktower.training.config import ExperimentConfig, flatten
from tracktower.training.data import Prepared, prepare

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    run_id: str
    model_uri: str
    model_name: str
    model_version: str
    champion: bool
    champion_reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    baseline_run_id: str | None = None
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))


def _log_dataset(data: Prepared) -> None:
    tracking.log_dataset_input(
        data.interactions,
        fingerprint=data.fingerprint,
        name=Path(data.source).name or "interactions",
        source=data.source,
    )


def run_popularity(cfg: ExperimentConfig, data: Prepared) -> tuple[str, dict[str, float]]:
    """The baseline every model must beat, logged with the same metric names for the MLflow UI."""
    from tracktower.training.baselines.popular import Popularity
    from tracktower.training.baselines.runner import evaluate_recommender

    with tracking.experiment_run(
        cfg.experiment, "popularity", tags={"system": "popular", "model": "popular"}
    ) as run:
        tracking.log_params_flat({"model": "popular", "split": cfg.split.model_dump()})
        _log_dataset(data)
        started = time.perf_counter()
        model = Popularity().fit(data.encoded.train)
        fit_seconds = time.perf_counter() - started
        metrics = evaluate_recommender(model, data.encoded, split_name="test", ks=cfg.eval.ks)
        tracking.log_metrics(metrics, prefix="test_")
        tracking.log_metrics({"fit_seconds": fit_seconds})
        return run.info.run_id, metrics


def train_and_register(
    cfg: ExperimentConfig,
    *,
    config_path: Path | None = None,
    final: bool = False,
    promote: bool | None = None,
    baseline: bool = True,
) -> TrainSummary:
    import mlflow

    from tracktower.training import evaluate
    from tracktower.training.export import ExportInputs, export_artifact
    from tracktower.training.train import fit

    data = prepare(cfg.data, cfg.split, final=final)
    log.info("dataset %s: %s (fingerprint %s)", data.source, data.stats, data.fingerprint[:12])
    baseline_id: str | None = None
    baseline_metrics: dict[str, float] = {}
    if baseline and not final:
        baseline_id, baseline_metrics = run_popularity(cfg, data)
        log.info("popularity: test recall_at_20 %.4f", baseline_metrics.get("recall_at_20", 0.0))

    run_name = cfg.run_name or ("two-tower final" if final else "two-tower")
    tags = {"system": "two_tower", "model": "two_tower", "final": str(final).lower()}
    with tracking.experiment_run(cfg.experiment, run_name, tags=tags) as run:
        run_id = run.info.run_id
        tracking.log_params_flat(flatten(cfg))
        tracking.log_params_flat({"final": final})
        _log_dataset(data)
        if config_path is not None:
            mlflow.log_artifact(str(config_path), "config")
        mlflow.log_text(cfg.model_dump_json(indent=2), "config/resolved.json")

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            tracking.log_metrics(row, step=epoch)

        with tempfile.TemporaryDirectory(prefix="tracktower-") as tmp:
            started = time.perf_counter()
            result = fit(
                cfg,
                data.encoded,
                data.track_artist,
                checkpoint_dir=Path(tmp) / "checkpoints",
                on_epoch=on_epoch,
            )
            train_seconds = time.perf_counter() - started
            tracking.log_params_flat(
                {"resolved.batch_size": result.batch_size, "resolved.strategy": result.strategy}
            )
            tracking.log_metrics({"train_seconds": train_seconds, "best_epoch": result.best_epoch})
            enc = data.encoded
            metrics: dict[str, float] = {}
            if not final:
                metrics = evaluate.evaluate_model(
                    result.model,
                    result.table,
                    result.known,
                    enc.test,
                    enc.test_unknown,
                    cfg.eval.ks,
                )
                tracking.log_metrics(metrics, prefix="test_")
                tracking.log_recall_plot(metrics, title=f"{run_name} — test")
                log.info("test: %s", " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            manifest = {
                "model_name": cfg.model_name,
                "run_id": run_id,
                "config": cfg.model_dump(mode="json"),
                "dataset": {"fingerprint": data.fingerprint, "source": data.source, **data.stats},
                "metrics": {f"test_{k}": v for k, v in metrics.items()},
                "final": final,
            }
            artifact = export_artifact(
                ExportInputs(
                    model=result.model,
                    table=result.table,
                    user_ids=enc.user_ids,
                    track_ids=enc.track_ids,
                    train=result.known,
                    tracks=data.tracks,
                    manifest=manifest,
                ),
                Path(tmp) / "artifact",
                top_k=cfg.eval.export_top_k,
            )
            registration = tracking.log_and_register_model(
                artifact,
                model_name=cfg.model_name,
                fingerprint=data.fingerprint,
                test_recall_at_20=None if final else metrics.get("recall_at_20"),
                promote=promote if promote is not None else (False if final else None),
            )
    log.info(
        "registered %s (champion %s: %s)",
        registration.model_uri,
        "moved" if registration.champion else "unchanged",
        registration.reason,
    )
    return TrainSummary(
        run_id=run_id,
        model_uri=registration.model_uri,
        model_name=registration.name,
        model_version=registration.version,
        champion=registration.champion,
        champion_reason=registration.reason,
        metrics=metrics,
        baseline_run_id=baseline_id,
        baseline_metrics=baseline_metrics,
        dataset={"fingerprint": data.fingerprint, **data.stats},
        train_seconds=train_seconds,
    )
