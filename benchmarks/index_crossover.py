#!/usr/bin/env python
"""Exact vs ScaNN retrieval by catalogue size: the crossover behind ``index.AUTO_MIN_TRACKS``.

Usage (from the repository root):

    nice python benchmarks/index_crossover.py
    python benchmarks/index_crossover.py --sizes 1000,10000 --queries 100   # smoke run

For each catalogue size, clustered synthetic embeddings (below) are indexed both ways through
``tracktower.features.index`` (the code export and the server use): ``ExactIndex`` and
``build_index(..., "scann", queries=...)``, which measures recall on 1,000 tuning queries and
widens the search if recall@100 < 0.95. Then, on separate timing queries:

* single-query latency (k = 10, the server's case), p50 / p99 over ``--queries`` queries, BLAS
  limited to one thread as the server does (ScaNN answers one query on one thread anyway);
* a batch of ``--batch`` queries (k = 10), every core allowed (BLAS threads for exact, ScaNN's
  thread pool), as offline evaluation and batch scoring run;
* recall@10 / @100 of ScaNN against exact on the timing queries.

The crossover is the smallest size from which on (every larger size too) ScaNN's single-query
p50 beats exact's with recall@100 >= 0.95. The machine's load is recorded: other processes' CPU
use during each size, from /proc/stat minus this process's own CPU time.

Data: ``max(32, n / 1000)`` centres drawn N(0, I/dim); a point is a centre plus noise of the
same scale (N(0, I/dim)), times a log-normal norm factor (sigma 0.25) standing in for popularity;
queries are other centre-plus-noise draws. The noise makes a query's top 100 span several
clusters, so recall is not trivially 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from tracktower.features.index import ExactIndex, build_index, measure_recall

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "index_crossover.json"
SIZES = (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
RECALL_FLOOR = 0.95
K_LATENCY = 10
WARMUP = 20


def clustered(n: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Catalogue ``[n, dim]`` and queries, float32; see the module docstring."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(dim)
    centres = rng.normal(scale=scale, size=(max(32, n // 1000), dim)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = centres[rng.integers(0, len(centres), m)]
        out += rng.normal(scale=scale, size=(m, dim)).astype(np.float32)
        return out

    points = draw(n)
    points *= rng.lognormal(0.0, 0.25, size=(n, 1)).astype(np.float32)
    return points, draw(n_queries)


class CpuMeter:
    """Busy cores on the machine outside this process between start and stop (/proc/stat)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [float(x) for x in stat.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.monotonic(), busy, own.ru_utime + own.ru_stime

    def others_busy_cores(self) -> float:
        wall, busy, own = (b - a for a, b in zip(self.start, self._sample(), strict=True))
        return round(max(0.0, busy - own) / max(wall, 1e-9), 3)


def single_latency(search: Callable[[np.ndarray, int], Any], queries: np.ndarray) -> dict:
    """p50 / p99 milliseconds of one-query searches, BLAS on one thread."""
    times = []
    with threadpool_limits(limits=1, user_api="blas"):
        for q in queries[:WARMUP]:
            search(q[None], K_LATENCY)
        for q in queries:
            start = time.perf_counter()
            search(q[None], K_LATENCY)
            times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {
        "p50_ms": round(float(np.median(ms)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
    }


def batch_latency(search: Callable[[np.ndarray, int], Any], queries: np.ndarray) -> dict:
    start = time.perf_counter()
    search(queries, K_LATENCY)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 4), "per_query_ms": round(seconds / len(queries) * 1e3, 4)}


def one_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    meter = CpuMeter()
    points, queries = clustered(n, args.dim, args.queries + args.batch + args.tune, args.seed + n)
    timing, batch = queries[: args.queries], queries[args.queries : args.queries + args.batch]
    tune = queries[args.queries + args.batch :]
    exact = ExactIndex(points)
    row: dict[str, Any] = {"n": n, "exact": {"single": single_latency(exact.search, timing)}}
    if n <= args.max_exact_batch:
        row["exact"]["batch"] = batch_latency(exact.search, batch)
    start = time.perf_counter()
    index, info = build_index(points, "scann", seed=args.seed, queries=tune, sample_size=args.tune)
    scann: dict[str, Any] = {
        "build_index_seconds": round(time.perf_counter() - start, 2),
        "info": info.to_dict(),
        "single": single_latency(index.search, timing),
        "batch": batch_latency(index.search, batch),
    }
    recall = measure_recall(index, points, timing)
    scann.update({key: round(value, 4) for key, value in recall.items()})
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "index")
        files = (Path(tmp) / "index").iterdir()
        scann["index_bytes"] = sum(f.stat().st_size for f in files)
    row["scann"] = scann
    row["scann_wins"] = bool(
        scann["single"]["p50_ms"] < row["exact"]["single"]["p50_ms"]
        and scann["recall_at_100"] >= RECALL_FLOOR
    )
    row["others_busy_cores"] = meter.others_busy_cores()
    return row


def crossover(rows: Sequence[dict[str, Any]]) -> int | None:
    """Smallest size from which on ScaNN wins at every measured size."""
    best = None
    for row in sorted(rows, key=lambda r: r["n"], reverse=True):
        if not row["scann_wins"]:
            break
        best = row["n"]
    return best


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{'tracks':>9} | {'exact p50/p99 ms':>17} | {'scann p50/p99 ms':>17} | "
        f"{'batch/q ms ex/sc':>16} | {'R@10':>6} {'R@100':>6} | {'build s':>7} | "
        f"{'leaves':>9} | {'index MB':>8} | {'others':>6}"
    )
    for row in result["sizes"]:
        ex, sc = row["exact"], row["scann"]
        ex_batch = f"{ex['batch']['per_query_ms']:.3f}" if "batch" in ex else "-"
        params = sc["info"]["params"]
        print(
            f"{row['n']:>9} | {ex['single']['p50_ms']:>7.3f} / {ex['single']['p99_ms']:>7.3f} | "
            f"{sc['single']['p50_ms']:>7.3f} / {sc['single']['p99_ms']:>7.3f} | "
            f"{ex_batch:>7} / {sc['batch']['per_query_ms']:>6.3f} | "
            f"{sc['recall_at_10']:>6.3f} {sc['recall_at_100']:>6.3f} | "
            f"{sc['info']['build_seconds']:>7.1f} | "
            f"{params['leaves_to_search']:>4}/{params['num_leaves']:<4} | "
            f"{sc['index_bytes'] / 2**20:>8.1f} | {row['others_busy_cores']:>6.2f}"
        )
    print(f"crossover (ScaNN from): {result['crossover']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=500, help="single-query timings per size")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--tune", type=int, default=1000, help="queries build_index measures on")
    p.add_argument("--max-exact-batch", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    meter, load_before, started = CpuMeter(), os.getloadavg(), time.perf_counter()
    rows = []
    for n in sizes:
        rows.append(one_size(n, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/index_crossover.py", *(argv or sys.argv[1:])]),
        "machine": {
            "cores": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "others_busy_cores_mean": meter.others_busy_cores(),
            "nice": os.nice(0),
        },
        "settings": {
            "dim": args.dim,
            "single_queries": args.queries,
            "k_latency": K_LATENCY,
            "batch": args.batch,
            "tune_queries": args.tune,
            "seed": args.seed,
            "recall_floor": RECALL_FLOOR,
            "scann": importlib.metadata.version("scann"),
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "sizes": rows,
        "crossover": crossover(rows),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
