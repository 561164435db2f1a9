#!/usr/bin/env python
"""Variants of ``configs/mpd.yaml`` judged on VALIDATION only, on the quality benchmark's splits.

How ``configs/mpd.yaml``'s defaults were chosen (issue 12, part 3): each variant is a list of
``--set`` overrides, fitted on TRAIN of ``benchmarks/quality.py``'s split of each dataset (same
k-core, 10% VAL / 20% TEST per user, split seed ``--seed``) and scored on VAL every epoch; the
best epoch's validation Recall@20 / NDCG@10 is recorded. TEST is never scored here. Compare the
figures with the peers' validation figures in ``results/quality.json`` (each grid point's
``val_recall_at_20``) to get the ratios in the README table. Every fit is an MLflow run in
``tracktower-defaults`` (tags ``dataset``, ``variant``) with its per-epoch ``epoch_val_*``.

    python benchmarks/defaults.py --datasets mpd-artist,msd                  # the README's variants
    python benchmarks/defaults.py --datasets mpd --variants v.json  # {"name": ["k=v", ...]}

Results are appended to ``--output`` (default ``benchmarks/results/defaults.json``) after each
fit, and a (dataset, variant, seed) already there is skipped, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402
import two_tower  # noqa: E402

# Overrides on configs/mpd.yaml as it was before issue 12's part 3 (no history dropout, no play
# count weighting): the rows of the README's "Defaults chosen ... on validation" table.
BEFORE = ["model.history_dropout=0", "train.weighting=none"]
VARIANTS: dict[str, list[str]] = {
    "previous defaults": BEFORE,
    "log1p": [*BEFORE, "train.weighting=log1p"],
    "user id": [*BEFORE, "model.use_user_id=true"],
    "history dropout 0.25": [*BEFORE, "model.history_dropout=0.25"],
    "history dropout 0.5": [*BEFORE, "model.history_dropout=0.5"],
    "temperature 0.2": [*BEFORE, "model.temperature=0.2"],
    "lr 0.001": [*BEFORE, "train.learning_rate=0.001"],
    "history dropout 0.5 + temperature 0.2": [
        *BEFORE,
        "model.history_dropout=0.5",
        "model.temperature=0.2",
    ],
    "history dropout 0.5 + log1p (chosen)": [],
    "chosen, 8 epochs": ["train.epochs=8"],
    "chosen, history dropout 0.7": ["model.history_dropout=0.7"],
    # Tried on mpd-artist after the choice (one change each from configs/mpd.yaml as committed):
    "chosen, embedding 256": ["model.embedding_dim=256"],
    "chosen, user weight power 0.5": ["train.user_weight_power=0.5"],
    "chosen, user weight power 1": ["train.user_weight_power=1.0"],
    "chosen, temperature 0.05": ["model.temperature=0.05"],
    "chosen, lr 0.004": ["train.learning_rate=0.004"],
    "chosen, no artist feature": ["model.use_artist=false"],
    "chosen, query layer 256": ["model.query_layers=[256]"],
    "chosen, weight decay 0.1": ["train.weight_decay=0.1"],
    "chosen, weight decay 0.5": ["train.weight_decay=0.5"],
}
EXPERIMENT = "tracktower-defaults"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--datasets", default="mpd-artist,msd,mpd", help="comma list")
    p.add_argument("--variants", type=Path, default=None, help="JSON {name: [overrides]}")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--data-root", type=Path, default=quality.DATA_ROOT)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--output", type=Path, default=REPO / "benchmarks/results/defaults.json")
    return p.parse_args(argv)


def load_variants(path: Path | None) -> dict[str, list[str]]:
    if path is None:
        return VARIANTS
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --variants {path}: {exc}") from None
    ok = isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in data.values()
    )
    if not ok:
        raise SystemExit(f"error: --variants {path}: expected {{name: [overrides, ...]}}")
    return data


def fit_variant(ctx: Any, data: Any, name: str, overrides: list[str]) -> dict[str, Any]:
    """One fit on TRAIN, its best epoch on VAL, as an MLflow run; TEST is not scored."""
    from tracktower.training import tracking
    from tracktower.training.config import flatten
    from tracktower.training.train import fit

    cfg = two_tower.config(ctx, overrides)
    started = time.perf_counter()
    tags = {"dataset": ctx.spec.key, "variant": name, "seed": str(ctx.seed)}
    with tracking.experiment_run(EXPERIMENT, f"{ctx.spec.key} {name} s{ctx.seed}", tags=tags):
        tracking.log_params_flat(flatten(cfg))
        result = fit(
            cfg,
            data.encoded,
            data.track_artist,
            on_epoch=lambda e, row: tracking.log_metrics(row, prefix="epoch_", step=e),
        )
        tracking.log_metrics(result.best_val)
    return {
        "dataset": ctx.spec.key,
        "variant": name,
        "seed": ctx.seed,
        "overrides": overrides,
        "val_recall_at_20": float(result.best_val["val_recall_at_20"]),
        "val_ndcg_at_10": float(result.best_val["val_ndcg_at_10"]),
        "best_epoch": result.best_epoch,
        "curve": [round(float(h.get("val_recall_at_20", 0.0)), 4) for h in result.history],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tracktower.training import tracking
    from tracktower.training.config import DataConfig, SplitConfig
    from tracktower.training.data import prepare

    variants = load_variants(args.variants)
    specs = quality.dataset_specs(args.data_root)
    keys = [k.strip() for k in args.datasets.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in specs]:
        print(f"error: --datasets: unknown {unknown}; choose from {sorted(specs)}", file=sys.stderr)
        return 2
    tracking.configure(args.tracking_uri)
    done = json.loads(args.output.read_text()) if args.output.is_file() else []
    split = {"val_fraction": quality.VAL_FRACTION, "test_fraction": quality.TEST_FRACTION}
    with tempfile.TemporaryDirectory(prefix="tracktower-defaults-") as work:
        for key in keys:
            spec = specs[key]
            inputs = quality.dataset_inputs(spec, Path(work))
            if inputs is None:
                continue
            interactions, tracks = inputs
            data = prepare(
                DataConfig(interactions=interactions, tracks=tracks, k_core=spec.k_core),
                SplitConfig(**split, seed=args.seed),
            )
            ctx = SimpleNamespace(
                interactions=interactions,
                tracks=tracks,
                spec=spec,
                seed=args.seed,
                split=split,
                max_epochs=None,
            )
            for name, overrides in variants.items():
                seen = {(r["dataset"], r["variant"], r["seed"]) for r in done}
                if (key, name, args.seed) in seen:
                    continue
                row = fit_variant(ctx, data, name, overrides)
                print(json.dumps(row), flush=True)
                done.append(row)
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(json.dumps(done, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
