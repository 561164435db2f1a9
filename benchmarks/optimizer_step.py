#!/usr/bin/env python
"""Training-step time by catalogue size and optimizer: does a step grow with the catalogue?

Usage (from the repository root; the 2.26M-track runs hold several GB, so take the lock):

    flock /tmp/heavy.lock nice -n 5 python benchmarks/optimizer_step.py
    python benchmarks/optimizer_step.py --tracks 20000,50000 --steps 5 --warmup 2   # smoke run

The model is the real ``TwoTowerModel`` with ``configs/mpd.yaml``'s model settings (history-only
query tower, untied input/output track tables of 128, per-track bias, artist embedding, in-batch
plus 4,096 uniform negatives with logQ) and its optimizer built by ``train._optimizer`` with
mpd.yaml's learning rate and cosine schedule. Batches are synthetic and random (a batch of
``--batch`` target tracks, each with a history of 5-100 tracks; one artist per 8 tracks), so
only the cost of a step is measured, not what it learns. Targets are drawn Zipf-like (exponent
0.8), histories too by default; ``--history uniform`` draws them uniformly over the catalogue,
the most distinct rows a batch can touch (written to ``optimizer_step_uniform.json``). A sparse
update's cost follows the distinct rows a batch touches (``distinct_track_rows_per_batch``),
which a bigger catalogue raises until every history slot is a different track.
Each (optimizer, catalogue) pair runs in its own process (``--one``): ``--warmup`` steps, then
``--steps`` timed steps, each timed alone; its peak RSS is that process's.

tf-keras's Adam decays the moments of every row of each embedding table at every step, even
for the sparse gradient of a lookup, so its step grows with the catalogue; Adagrad's sparse
update and ``LazyAdam`` (:mod:`tracktower.training.optimizers`) touch only the batch's rows.
The target (issue 9): a step at 2.26M tracks costs at most 1.3x one at 50k.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "optimizer_step.json"
CONFIG = REPO / "configs" / "mpd.yaml"
OPTIMIZERS = ("adam", "adagrad", "lazy_adam")
TRACKS = (50_000, 2_262_292)
TARGET_RATIO = 1.3


def _batches(
    n_tracks: int, batch: int, max_len: int, count: int, seed: int, history: str
) -> list[dict]:
    """``count`` random batches in the pipeline's format (indices +1, 0 = padding). Targets are
    Zipf-like (exponent 0.8); histories too (``zipf``) or uniform over the catalogue
    (``uniform``: the most distinct rows a batch can touch, the worst case for the update)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_tracks + 1) ** 0.8
    p = weights / weights.sum()
    log_p = np.log(p).astype(np.float32)
    out = []
    for _ in range(count):
        track = rng.choice(n_tracks, batch, p=p).astype(np.int32) + 1
        lengths = rng.integers(5, max_len + 1, batch)
        if history == "zipf":
            hist = rng.choice(n_tracks, (batch, max_len), p=p).astype(np.int32) + 1
        else:
            hist = rng.integers(1, n_tracks + 1, (batch, max_len)).astype(np.int32)
        hist[np.arange(max_len)[None, :] >= lengths[:, None]] = 0
        out.append(
            {
                "user": np.zeros(batch, np.int32),
                "track": track,
                "history": hist,
                "weight": np.ones(batch, np.float32),
                "log_q": log_p[track - 1],
            }
        )
    return out


def one(
    optimizer: str, n_tracks: int, batch: int, steps: int, warmup: int, history: str
) -> dict[str, Any]:
    """Step times of one optimizer on one catalogue size, in this process."""
    from tracktower.features.tf import tf
    from tracktower.training.config import load_config
    from tracktower.training.model import TwoTowerModel
    from tracktower.training.train import _optimizer

    cfg = load_config(CONFIG)
    train_cfg = cfg.train.model_copy(update={"optimizer": optimizer})
    tf.keras.utils.set_random_seed(0)
    track_artist = np.concatenate([[0], np.arange(n_tracks) // 8 + 1]).astype(np.int32)
    started = time.perf_counter()
    model = TwoTowerModel(cfg.model, 1, n_tracks, track_artist)
    model.compile(optimizer=_optimizer(train_cfg, 300, train_cfg.learning_rate))
    build_seconds = time.perf_counter() - started
    data = _batches(n_tracks, batch, cfg.model.history_max_len, 8, seed=1, history=history)
    touched = np.mean(
        [len(np.unique(np.concatenate([b["history"].ravel(), b["track"]]))) for b in data]
    )
    ds = tf.data.Dataset.from_tensor_slices(
        {k: np.stack([b[k] for b in data]) for k in data[0]}
    ).repeat()
    step = model.make_train_function()
    iterator = iter(ds)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        logs = step(iterator)
        float(logs["loss"])  # the step has run
        if i >= warmup:
            times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    return {
        "optimizer": optimizer,
        "tracks": n_tracks,
        "batch": batch,
        "steps": steps,
        "step_ms_median": round(float(np.median(ms)), 1),
        "step_ms_mean": round(float(ms.mean()), 1),
        "step_ms_p90": round(float(np.percentile(ms, 90)), 1),
        "examples_per_sec": round(batch / float(np.median(ms)) * 1000),
        "history": history,
        "distinct_track_rows_per_batch": round(float(touched)),
        "build_seconds": round(build_seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "full_softmax": bool(model.full_softmax),
    }


def _run_child(args: argparse.Namespace, optimizer: str, n_tracks: int) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--one", optimizer, str(n_tracks), "--batch", str(args.batch),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--history", args.history,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{optimizer} at {n_tracks} tracks failed:\n{proc.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--tracks", default=",".join(str(n) for n in TRACKS))
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--history", choices=("zipf", "uniform"), default="zipf")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="default: results/" + RESULTS.name + " (zipf), optimizer_step_uniform.json (uniform)",
    )
    parser.add_argument("--one", nargs=2, metavar=("OPTIMIZER", "TRACKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = one(args.one[0], int(args.one[1]), args.batch, args.steps, args.warmup, args.history)
        print(json.dumps(row))
        return
    sizes = sorted(int(n) for n in args.tracks.split(","))
    rows = [_run_child(args, o, n) for o in args.optimizers.split(",") for n in sizes]
    ratios = {}
    for opt in args.optimizers.split(","):
        by_size = {r["tracks"]: r["step_ms_median"] for r in rows if r["optimizer"] == opt}
        ratios[opt] = round(by_size[sizes[-1]] / by_size[sizes[0]], 2)
    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": str(CONFIG.relative_to(REPO)),
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "history": args.history,
        "target": f"step at {sizes[-1]} tracks <= {TARGET_RATIO}x one at {sizes[0]}",
        "ratio_largest_over_smallest": ratios,
        "meets_target": {k: v <= TARGET_RATIO for k, v in ratios.items()},
        "rows": rows,
    }
    output = args.output or (
        RESULTS if args.history == "zipf" else RESULTS.with_name("optimizer_step_uniform.json")
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"ratio_largest_over_smallest": ratios}, indent=1))


if __name__ == "__main__":
    main()
