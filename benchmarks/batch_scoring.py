#!/usr/bin/env python
"""All-user batch scoring: Spark local mode against the single-process engine, same machine and
artifact (issue 11, part 3).

Usage (from the repository root; Java 17 and pyspark installed):

    python benchmarks/batch_scoring.py                               # 100k users x 50k tracks
    python benchmarks/batch_scoring.py --users 20000 --tracks 10000  # a quick look

The artifact is the serving tests' synthetic one (``tests/builders.py``: Gaussian 64-d
embeddings, up to 19 seen tracks per user, exact index unless ``--index scann``), written through
the artifact contract. Every known user is scored at ``--k`` (the Discover-Weekly job), then:

* ``local``: ``batch.recommend_to_parquet`` in this process (BLAS on every core);
* ``spark_cold``: ``recommend_with_spark`` as the CLI runs it, JVM start, Python workers and the
  model load included (a new session, so a new JVM unless this process already has one: it runs
  first, before any other Spark work here);
* ``spark_warm``: the same job twice in one kept session, the second timed: the JVM, the Python
  workers and their opened model are reused, so it is the engine's throughput without start-up.

users/s = users / wall seconds. The outputs are compared after sorting by (user_id, rank): with
float embeddings the engines batch users differently, so a BLAS kernel may round a score
differently and break a near-tie the other way; the differing rows are counted, not hidden.
The machine's load average is recorded before and after (other work on a shared machine slows
both engines, not necessarily equally). Results go to ``benchmarks/results/batch_scoring.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "batch_scoring.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--tracks", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index", choices=["exact", "scann"], default="exact")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--partitions", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    return parser.parse_args()


def build(work: Path, args: argparse.Namespace) -> tuple[Path, Path, float]:
    sys.path.insert(0, str(REPO / "tests"))
    from builders import write_fake_artifact

    start = time.perf_counter()
    artifact = write_fake_artifact(
        work / "artifact", args.users, args.tracks, args.dim, False, index_backend=args.index
    )
    seconds = time.perf_counter() - start
    from tracktower.features.artifact import read_arrays, read_manifest

    ids = read_arrays(artifact, read_manifest(artifact))["user_ids"]
    users = work / "users.parquet"
    pd.DataFrame({"user_id": [str(u) for u in ids]}).to_parquet(users)
    return artifact, users, seconds


def timed(label: str, users: int, fn: Any) -> tuple[dict[str, Any], Any]:
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s, {users / seconds:,.0f} users/s", flush=True)
    return {"seconds": round(seconds, 2), "users_per_s": round(users / seconds, 1)}, value


def compare(a: Path, b: Path) -> dict[str, Any]:
    """How far two outputs differ: rows with another track at that rank (a near-tie broken the
    other way), the users they belong to, and the largest score difference."""
    left = pd.read_parquet(a).sort_values(["user_id", "rank"], kind="stable")
    right = pd.read_parquet(b).sort_values(["user_id", "rank"], kind="stable")
    if len(left) != len(right):
        return {"rows": [len(left), len(right)], "identical": False}
    left, right = left.reset_index(drop=True), right.reset_index(drop=True)
    other = (left["user_id"] != right["user_id"]) | (left["track_id"] != right["track_id"])
    return {
        "rows": len(left),
        "identical": bool(left.equals(right)),
        "rows_with_another_track": int(other.sum()),
        "users_with_another_list": int(left.loc[other, "user_id"].nunique()),
        "max_abs_score_difference": float((left["score"] - right["score"]).abs().max()),
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tracktower.serving.batch import recommend_to_parquet
    from tracktower.serving.spark import recommend_with_spark, spark_session

    artifact, users, build_s = build(work, args)
    n = args.users
    print(f"artifact: {n} users x {args.tracks} tracks, {args.index} ({build_s:.0f} s)")
    spark_opts = {"master": args.master, "partitions": args.partitions}
    results: dict[str, Any] = {}
    results["spark_cold"], cold = timed(
        "spark cold",
        n,
        lambda: recommend_with_spark(artifact, users, args.k, work / "cold", **spark_opts),
    )
    results["spark_cold"].update(partitions=cold.partitions, model_loads=cold.model_loads)
    with spark_session(args.master, parallelism=args.partitions) as session:
        recommend_with_spark(artifact, users, args.k, work / "warm", session=session, **spark_opts)
        results["spark_warm"], warm = timed(
            "spark warm",
            n,
            lambda: recommend_with_spark(
                artifact, users, args.k, work / "warm", session=session, **spark_opts
            ),
        )
    results["spark_warm"].update(
        partitions=warm.partitions, model_loads_second_run=warm.model_loads
    )
    results["local"], _ = timed(
        "local", n, lambda: recommend_to_parquet(artifact, users, args.k, work / "local.parquet")
    )
    results["local_vs_spark_cold"] = compare(work / "local.parquet", work / "cold")
    return results


def main() -> None:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="batch-scoring-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        results = run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    record = {
        "shape": {"users": args.users, "tracks": args.tracks, "dim": args.dim, "k": args.k},
        "index": args.index,
        "master": args.master,
        **results,
        "speedup_spark_warm_vs_local": round(
            results["spark_warm"]["users_per_s"] / results["local"]["users_per_s"], 2
        ),
        "speedup_spark_cold_vs_local": round(
            results["spark_cold"]["users_per_s"] / results["local"]["users_per_s"], 2
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after],
            "nice": os.nice(0),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
