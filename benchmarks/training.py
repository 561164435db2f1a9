#!/usr/bin/env python
"""Training throughput, memory and quality: the plain TFRS tutorial against tracktower (issue 9).

Usage (from the repository root):

    python benchmarks/training.py                   # MPD benchmark split: tutorial vs tracktower
    python benchmarks/training.py --data synth-20k  # the issue's 20k x 24k synthetic set
    python benchmarks/training.py --shape mpd       # the whole `train` path at MPD shape
    python benchmarks/training.py --shape small     # the same path at 20k users (a quick look)

**Comparison** (default): both systems train on the same prepared data, each in its own fresh
process (so peak RSS is its own and nothing is shared through TensorFlow's state), one after the
other, then are scored the same way on the same test split: exact top-k over every track with each
user's known tracks excluded (``features.ranking`` + ``training.metrics``, the code every other
benchmark uses). ``mpd-benchmark`` is the quality benchmark's split of ``../shared/data/mpd-subset``
(5-core, 20% test per playlist, seed 0; ``benchmarks/quality.py``); the target is tracktower at
R@20 >= 0.222 and NDCG@10 >= 0.203 there.

* ``tutorial`` is the TFRS basic-retrieval tutorial as its docs write it: ``StringLookup`` +
  ``Embedding(32)`` towers over the raw string ids, ``tfrs.tasks.Retrieval`` with a
  ``FactorizedTopK`` metric, ``Adagrad(0.1)``, ``shuffle(100_000).batch(8192).cache()``, 3 epochs.
  The metric is computed only outside training (``compute_metrics=not training``, as TFRS's later
  tutorials write it): per-batch top-k over the catalogue would measure the metric, not training.
  It trains on every known interaction (train + the validation slice): it has no early stopping.
* ``tracktower`` is ``configs/mpd.yaml`` through ``training.train.fit`` (its own input pipeline,
  validation each epoch and early stopping), ``--set`` overrides applied.

examples/s is training examples over the training part of each epoch (validation excluded), the
median over epochs, so the first epoch's tracing does not decide it; every epoch's figure is kept.

**Whole path** (``--shape``): ``tracktower data synth`` at that shape (reused with ``--reuse``),
then ``tracktower train --config configs/mpd.yaml ... --set train.epochs=1 --set
train.max_steps=200`` in a subprocess against a throwaway MLflow store, with its peak RSS and each
stage's wall time (the run's ``stage_*_seconds``, from ``--summary``).

Each system run is an MLflow run (experiment ``tracktower-training-bench``). The machine's load
average is recorded before and after. Results go to ``benchmarks/results/training.json`` (the
comparison) and ``benchmarks/results/training_<shape>.json`` (the whole path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # two_tower, a sibling module
DATA_ROOT = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
MPD_CONFIG = REPO / "configs" / "mpd.yaml"
EXPERIMENT = "tracktower-training-bench"
KS = [10, 20, 50, 100]
SHAPES = {
    # users, tracks for `tracktower data synth` (mpd: its preset, the Million Playlist Dataset's)
    "small": ["--users", "20000", "--tracks", "24000"],
    "mpd": ["--preset", "mpd"],
}


# --- data --------------------------------------------------------------------------------------


def benchmark_overrides(data: str, data_root: Path, work: Path) -> list[str]:
    """Config overrides that point ``configs/mpd.yaml`` at the comparison's data and split."""
    split = ["split.test_fraction=0.2", "split.seed=0"]
    if data == "mpd-benchmark":
        root = data_root / "mpd-subset"
        if not (root / "interactions.parquet").is_file():
            raise SystemExit(f"error: {root}/interactions.parquet not found (see --data-root)")
        return [
            f"data.interactions={root / 'interactions.parquet'}",
            f"data.tracks={root / 'tracks.parquet'}",
            "data.k_core=5",
            "data.min_track_users=0",
            *split,
        ]
    out = work / "synth-20k"
    if not (out / "interactions.parquet").exists():
        _run([_cli(), "data", "synth", *SHAPES["small"], "--out", str(out)])
    return [
        f"data.interactions={out / 'interactions.parquet'}",
        f"data.tracks={out / 'tracks.parquet'}",
        *split,
    ]


def _cli() -> str:
    return str(Path(sys.executable).with_name("tracktower"))


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs)


# --- the two systems (each in a child process) -------------------------------------------------


def tutorial(data: Any, epochs: int) -> tuple[Any, Any, list[float]]:
    """The TFRS basic-retrieval tutorial: (user model, track model, examples/s per epoch)."""
    import tensorflow_recommenders as tfrs

    from tracktower.features.tf import tf

    enc = data.encoded
    known = enc.known.tocoo()
    unique_user_ids = enc.user_ids.astype(object)
    unique_track_ids = enc.track_ids.astype(object)
    ratings = tf.data.Dataset.from_tensor_slices(
        {"user_id": unique_user_ids[known.row], "track_id": unique_track_ids[known.col]}
    )
    tracks = tf.data.Dataset.from_tensor_slices(unique_track_ids)
    embedding_dimension = 32

    user_model = tf.keras.Sequential(
        [
            tf.keras.layers.StringLookup(vocabulary=unique_user_ids, mask_token=None),
            tf.keras.layers.Embedding(len(unique_user_ids) + 1, embedding_dimension),
        ]
    )
    track_model = tf.keras.Sequential(
        [
            tf.keras.layers.StringLookup(vocabulary=unique_track_ids, mask_token=None),
            tf.keras.layers.Embedding(len(unique_track_ids) + 1, embedding_dimension),
        ]
    )
    metrics = tfrs.metrics.FactorizedTopK(candidates=tracks.batch(128).map(track_model))
    task = tfrs.tasks.Retrieval(metrics=metrics)

    class TutorialModel(tfrs.Model):
        def __init__(self) -> None:
            super().__init__()
            self.user_model = user_model
            self.track_model = track_model
            self.task = task

        def compute_loss(self, features: dict[str, Any], training: bool = False) -> Any:
            user_embeddings = self.user_model(features["user_id"])
            positive_track_embeddings = self.track_model(features["track_id"])
            return self.task(
                user_embeddings, positive_track_embeddings, compute_metrics=not training
            )

    model = TutorialModel()
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
    cached_train = ratings.shuffle(100_000).batch(8192).cache()
    timer = _EpochTimer(len(known.row))
    model.fit(cached_train, epochs=epochs, callbacks=[timer], verbose=0)
    return user_model, track_model, timer.rates


class _EpochTimer:
    """Keras callback (duck-typed): examples/s of each epoch's training part."""

    def __new__(cls, n_examples: int) -> Any:
        from tracktower.features.tf import tf

        class Timer(tf.keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.rates: list[float] = []
                self.started = 0.0

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                seconds = time.perf_counter() - self.started
                self.rates.append(n_examples / max(seconds, 1e-9))
                print(f"    epoch {epoch + 1}: {self.rates[-1]:,.0f} ex/s", flush=True)

        return Timer()


def score_tutorial(data: Any, user_model: Any, track_model: Any) -> dict[str, float]:
    import numpy as np

    from tracktower.features.tf import tf
    from tracktower.training.evaluate import evaluate_embeddings
    from tracktower.training.metrics import users_with_heldout

    enc = data.encoded
    users = users_with_heldout(enc.test, enc.test_unknown)
    queries = np.concatenate(
        [
            user_model(tf.constant(enc.user_ids[users[i : i + 4096]].astype(object))).numpy()
            for i in range(0, len(users), 4096)
        ]
    )
    candidates = track_model(tf.constant(enc.track_ids.astype(object))).numpy()
    return evaluate_embeddings(
        queries, candidates, users, enc.test, enc.test_unknown, KS, exclude=enc.known
    )


def run_system(system: str, overrides: list[str], epochs: int | None) -> dict[str, Any]:
    """One system, trained and scored in this process; returns its figures."""
    import numpy as np

    from tracktower.training import tracking
    from tracktower.training.config import flatten, load_config
    from tracktower.training.data import prepare

    cfg = load_config(MPD_CONFIG, overrides)
    started = time.perf_counter()
    data = prepare(cfg.data, cfg.split)
    prepare_seconds = time.perf_counter() - started
    tracking.configure(None)
    with tracking.experiment_run(EXPERIMENT, system, tags={"system": system}) as run:
        tracking.log_params_flat({"system": system, "overrides": " ".join(overrides)})
        started = time.perf_counter()
        if system == "tutorial":
            user_model, track_model, rates = tutorial(data, epochs or 3)
            fit_seconds = time.perf_counter() - started
            metrics = score_tutorial(data, user_model, track_model)
            n_examples = data.encoded.known.nnz
        else:
            import two_tower  # the quality benchmark's fit-then-test step

            if epochs:
                cfg = cfg.model_copy(
                    update={"train": cfg.train.model_copy(update={"epochs": epochs})}
                )
            tracking.log_params_flat(flatten(cfg))
            result, metrics, fit_seconds = two_tower.fit_and_test(
                cfg,
                data,
                KS,
                on_epoch=lambda e, row: tracking.log_metrics(row, prefix="epoch_", step=e),
            )
            rates = [row["examples_per_sec"] for row in result.history]
            enc = data.encoded
            n_examples = enc.train.nnz
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        figures = {
            "examples_per_sec": float(np.median(rates)),
            "examples_per_sec_by_epoch": [round(r, 1) for r in rates],
            "epochs": len(rates),
            "train_examples": int(n_examples),
            "fit_seconds": round(fit_seconds, 1),
            "prepare_seconds": round(prepare_seconds, 1),
            "peak_rss_mb": round(rss_mb, 1),
            **{f"test_{k}": round(v, 4) for k, v in metrics.items()},
        }
        tracking.log_metrics(
            {k: v for k, v in figures.items() if isinstance(v, int | float)}, prefix=""
        )
        figures["run_id"] = run.info.run_id
        figures["dataset"] = data.stats
    return figures


# --- the whole path at a shape -----------------------------------------------------------------


def whole_path(shape: str, work: Path, reuse: bool, extra: list[str]) -> dict[str, Any]:
    """``data synth`` then ``train`` (1 epoch, 200 steps) at ``shape``, each a timed subprocess."""
    data = work / f"synth-{shape}"
    synth: dict[str, Any] = {"reused": True}
    if not (reuse and (data / "tracks.parquet").exists()):
        synth = _timed([_cli(), "data", "synth", *SHAPES[shape], "--out", str(data)])
    interactions = data / "interactions"
    if not interactions.exists():
        interactions = data / "interactions.parquet"
    with tempfile.TemporaryDirectory(prefix="tracktower-bench-") as tmp:
        summary = Path(tmp) / "summary.json"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.setdefault(checkpoints_env(), str(Path(tmp) / "checkpoints"))
        cmd = [
            _cli(),
            "train",
            "--config",
            str(MPD_CONFIG),
            "--interactions",
            str(interactions),
            "--tracks",
            str(data / "tracks.parquet"),
            "--set",
            "train.epochs=1",
            "--set",
            "train.max_steps=200",
            *[a for s in extra for a in ("--set", s)],
            "--summary",
            str(summary),
        ]
        train = _timed(cmd, env=env, cwd=tmp)
        result = json.loads(summary.read_text()) if summary.exists() else {}
    return {"shape": shape, "data": str(data), "synth": synth, "train": train, "summary": result}


def checkpoints_env() -> str:
    from tracktower.training.checkpoints import ENV_VAR

    return ENV_VAR


def _timed(cmd: list[str], **kwargs: Any) -> dict[str, Any]:
    """Wall time and peak RSS of one subprocess (``wait4``'s own rusage, not the children's max)."""
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, **kwargs)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: {cmd[1:3]} exited {proc.returncode} after {seconds:.0f} s")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


# --- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["mpd-benchmark", "synth-20k"], default="mpd-benchmark")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--systems", default="tutorial,tracktower")
    parser.add_argument("--epochs", type=int, default=None, help="override both systems' epochs")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tracktower-training-bench"))
    parser.add_argument("--reuse", action="store_true", help="reuse synthesized data in --work")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:  # one system, in this fresh process; figures as JSON on the last line
        spec = json.loads(args.child)
        figures = run_system(spec["system"], spec["overrides"], spec["epochs"])
        print("RESULT " + json.dumps(figures), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_before": os.getloadavg(),
    }
    if args.shape:
        out.update(whole_path(args.shape, args.work, args.reuse, args.overrides))
        path = args.output or RESULTS / f"training_{args.shape}.json"
    else:
        base = benchmark_overrides(args.data, args.data_root, args.work)
        out["data"] = args.data
        out["systems"] = {}
        for system in args.systems.split(","):
            overrides = base + (args.overrides if system == "tracktower" else [])
            spec = {"system": system, "overrides": overrides, "epochs": args.epochs}
            print(f"== {system}", flush=True)
            proc = _run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                stdout=subprocess.PIPE,
            )
            lines = proc.stdout.splitlines()
            print("\n".join(ln for ln in lines if not ln.startswith("RESULT ")), flush=True)
            line = [ln for ln in lines if ln.startswith("RESULT ")][-1]
            out["systems"][system] = json.loads(line.removeprefix("RESULT "))
            print(json.dumps(out["systems"][system], indent=1), flush=True)
        figures = out["systems"]
        if {"tutorial", "tracktower"} <= figures.keys():
            out["ratio_examples_per_sec"] = round(
                figures["tracktower"]["examples_per_sec"] / figures["tutorial"]["examples_per_sec"],
                3,
            )
        path = args.output or RESULTS / "training.json"
    out["load_after"] = os.getloadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "systems"}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
