"""Ablation runner: one MLflow run per config variant, scored on the benchmark's exact test split.

    python benchmarks/ablation.py --config configs/mpd.yaml \
        --interactions ../shared/data/mpd-subset/interactions.parquet \
        --tracks ../shared/data/mpd-subset/tracks.parquet \
        --variant base= --variant no_logq=model.logq_correction=false

Each variant is ``name=key=value,key=value`` (``name=`` alone is the config as is). The data is
prepared once; the test split equals ``benchmarks/quality.py``'s 80/20 holdout (the split is keyed
per (user, track), so the validation slice carved out of train leaves the test rows unchanged).
Results are printed, logged to MLflow (experiment ``--experiment``) and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    return name, [item for item in rest.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mpd.yaml")
    parser.add_argument("--interactions", type=Path, required=True)
    parser.add_argument("--tracks", type=Path)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument(
        "--k-core", type=int, default=5, help="the benchmark's core filter (quality.py uses 5)"
    )
    parser.add_argument("--experiment", default="tracktower-mpd-ablation")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "ablation.json"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)

    from tracktower.features.cli import end_runs_on_sigterm
    from tracktower.training import evaluate, tracking
    from tracktower.training.config import flatten, load_config
    from tracktower.training.data import prepare
    from tracktower.training.train import fit

    end_runs_on_sigterm()

    base = [
        f"data.interactions={args.interactions}",
        f"data.k_core={args.k_core}",
        "data.min_track_users=0",
    ]
    if args.tracks:
        base.append(f"data.tracks={args.tracks}")
    first = load_config(args.config, base)
    variants = [_parse_variant(text) for text in args.variant or ["base="]]
    configs = [load_config(args.config, [*base, *overrides]) for _, overrides in variants]
    for (name, _), cfg in zip(variants, configs, strict=True):
        if (cfg.data, cfg.split) != (first.data, first.split):
            parser.error(f"variant {name!r}: data.* and split.* are shared by all variants")
    data = prepare(first.data, first.split)
    enc = data.encoded
    results = []
    for (name, overrides), cfg in zip(variants, configs, strict=True):
        with tracking.experiment_run(
            args.experiment, name, tags={"system": "two_tower", "variant": name}
        ):
            tracking.log_params_flat(flatten(cfg))
            tracking.log_params_flat({"variant": name, "overrides": " ".join(overrides)})
            tracking.log_dataset_input(
                data.interactions, fingerprint=data.fingerprint, name="mpd", source=data.source
            )
            started = time.perf_counter()
            result = fit(
                cfg,
                enc,
                data.track_artist,
                on_epoch=lambda epoch, row: tracking.log_metrics(row, prefix="epoch_", step=epoch),
            )
            seconds = time.perf_counter() - started
            metrics = evaluate.evaluate_model(
                result.model,
                result.known,
                enc.test,
                enc.test_unknown,
                cfg.eval.ks,
                exclude=result.known,
            )
            tracking.log_metrics(metrics, prefix="test_")
            tracking.log_metrics(result.best_val)
            tracking.log_metrics({"fit_seconds": seconds, "best_epoch": result.best_epoch})
        row = {"variant": name, "overrides": overrides, "fit_seconds": seconds, **metrics}
        results.append(row)
        print(
            f"{name:24s} R@20 {metrics['recall_at_20']:.4f} N@10 {metrics['ndcg_at_10']:.4f} "
            f"R@100 {metrics['recall_at_100']:.4f} best_epoch {result.best_epoch} {seconds:.0f}s",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps(previous + results, indent=2))


if __name__ == "__main__":
    main()
