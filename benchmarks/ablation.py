"""Ablation runner: config variants judged on VALIDATION only; test is scored for the winner alone.

    python benchmarks/ablation.py --config configs/mpd.yaml \
        --interactions ../shared/data/mpd-subset/interactions.parquet \
        --tracks ../shared/data/mpd-subset/tracks.parquet \
        --variant base= --variant no_logq=model.logq_correction=false

Each variant is ``name=key=value,key=value`` (``name=`` alone is the config as is). The data is
prepared once, split like ``benchmarks/quality.py`` (per-user holdout of 20% test and 10%
validation, ``--seed``). Every variant trains on the TRAIN part and keeps its best epoch on the
VAL part; the decision columns printed, logged (``val_*``) and saved are validation figures, and
the variant with the best validation ``--select`` metric is the chosen one. Only that variant is
then scored on TEST (once, logged as ``test_*`` in its run and saved on its row): choosing
between variants on test figures would tune the configuration to the test split, which is what
issue 12 found the earlier ablation did. Results are appended to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DECISION = ("recall_at_20", "ndcg_at_10", "recall_at_100")


def _parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    return name, [item for item in rest.split(",") if item]


def _parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mpd.yaml")
    parser.add_argument("--interactions", type=Path, required=True)
    parser.add_argument("--tracks", type=Path)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument(
        "--k-core", type=int, default=5, help="the benchmark's core filter (quality.py: mpd 5)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split (and model) seed")
    parser.add_argument(
        "--select", default="recall_at_20", help="validation metric that picks the variant"
    )
    parser.add_argument("--experiment", default="tracktower-mpd-ablation")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "ablation.json"
    )
    return parser, parser.parse_args()


def main() -> None:
    parser, args = _parse_args()
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
        "split.val_fraction=0.1",
        "split.test_fraction=0.2",
        f"split.seed={args.seed}",
        f"train.seed={args.seed}",
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
    rows: list[dict[str, Any]] = []
    chosen: tuple[float, Any, str, int] | None = None  # (val score, fit result, run id, row)
    print(f"{'variant':24s} " + " ".join(f"val {m:>13s}" for m in DECISION) + "  epoch  fit s")
    for (name, overrides), cfg in zip(variants, configs, strict=True):
        with tracking.experiment_run(
            args.experiment, name, tags={"system": "two_tower", "variant": name}
        ) as run:
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
            tracking.log_metrics(result.best_val)
            tracking.log_metrics({"fit_seconds": seconds, "best_epoch": result.best_epoch})
        val = dict(result.best_val)
        rows.append(
            {
                "variant": name,
                "overrides": overrides,
                "seed": args.seed,
                "fit_seconds": seconds,
                "best_epoch": result.best_epoch,
                **val,
            }
        )
        print(
            f"{name:24s} "
            + " ".join(f"{val.get('val_' + m, float('nan')):17.4f}" for m in DECISION)
            + f"  {result.best_epoch:5d} {seconds:6.0f}",
            flush=True,
        )
        score = val.get(f"val_{args.select}", float("-inf"))
        if chosen is None or score > chosen[0]:
            chosen = (score, result, run.info.run_id, len(rows) - 1)  # only the leader's model
        del result
    assert chosen is not None
    _, best, run_id, index = chosen
    metrics = evaluate.evaluate_model(
        best.model, best.known, enc.test, enc.test_unknown, first.eval.ks, exclude=best.known
    )
    with tracking.resumed_run(run_id):
        tracking.log_metrics(metrics, prefix="test_")
        tracking.set_tags({"ablation.chosen": "true"})
    winner = rows[index]
    winner.update({"chosen": True, **{f"test_{k}": v for k, v in metrics.items()}})
    print(
        f"chosen on validation {args.select}: {winner['variant']}; test R@20 "
        f"{metrics['recall_at_20']:.4f} N@10 {metrics['ndcg_at_10']:.4f} "
        f"R@100 {metrics['recall_at_100']:.4f}",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps(previous + rows, indent=2))


if __name__ == "__main__":
    main()
