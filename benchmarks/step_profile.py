#!/usr/bin/env python
"""Where a training step's time goes: mpd.yaml's step with one component changed at a time.

Usage (from the repository root; a few minutes on 2 cores):

    python benchmarks/step_profile.py            # batch 1024, 23,327 tracks (MPD benchmark)
    python benchmarks/step_profile.py --rounds 5     # shorter

Every variant is the real ``TwoTowerModel`` and optimizer on the same synthetic Zipf batches
(``optimizer_step._batches``). All variants are built first and then stepped round-robin in one
process, one step each per round, so a noisy machine slows them alike; the figure is the median
step's examples/s. Written to ``benchmarks/results/step_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "step_profile.json"
VARIANTS: dict[str, list[str]] = {
    "mpd.yaml": [],
    "history_max_len=50": ["model.history_max_len=50"],
    "uniform_negatives=0": ["model.uniform_negatives=0"],
    "uniform_negatives=1024": ["model.uniform_negatives=1024"],
    "no artist": ["model.use_artist=false"],
    "no accidental-hit removal": ["model.remove_accidental_hits=false"],
    "lazy_adam": ["train.optimizer=lazy_adam"],
    "adagrad": ["train.optimizer=adagrad"],
    "h50 + u1024 + lazy_adam": [
        "model.history_max_len=50",
        "model.uniform_negatives=1024",
        "train.optimizer=lazy_adam",
    ],
}


def _step(overrides: list[str], n_tracks: int, batch: int, cache: dict[int, Any]) -> Any:
    """A warmed-up train function over repeating synthetic batches, for one variant."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from optimizer_step import CONFIG, _batches

    from tracktower.features.tf import tf
    from tracktower.training.config import load_config
    from tracktower.training.model import TwoTowerModel
    from tracktower.training.train import _optimizer

    cfg = load_config(CONFIG, overrides)
    tf.keras.utils.set_random_seed(0)
    artist = np.concatenate([[0], np.arange(n_tracks) // 8 + 1]).astype(np.int32)
    model = TwoTowerModel(cfg.model, 1, n_tracks, artist)
    model.compile(optimizer=_optimizer(cfg.train, 300, cfg.train.learning_rate))
    length = cfg.model.history_max_len
    if length not in cache:
        cache[length] = _batches(n_tracks, batch, length, 8, seed=1, history="zipf")
    data = cache[length]
    stacked = {k: np.stack([b[k] for b in data]) for k in data[0]}
    iterator = iter(tf.data.Dataset.from_tensor_slices(stacked).repeat())
    fn = model.make_train_function()
    for _ in range(3):
        float(fn(iterator)["loss"])
    return lambda: float(fn(iterator)["loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracks", type=int, default=23_327)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    cache: dict[int, Any] = {}
    steps = {name: _step(ov, args.tracks, args.batch, cache) for name, ov in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    rates = {name: round(args.batch / float(np.median(t))) for name, t in times.items()}
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tracks": args.tracks,
        "batch": args.batch,
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "examples_per_sec": rates,
        "relative_to_mpd_yaml": {k: round(v / rates["mpd.yaml"], 2) for k, v in rates.items()},
    }
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
