#!/usr/bin/env python
"""Serving at catalogue scale (issue 8): build an artifact of the Million Playlist Dataset's shape
through the real export path, serve it with ``tracktower serve``, load it with wrk, check targets.

Usage (from the repository root, on a quiet machine):

    python benchmarks/serving_scale.py --out /tmp/scale-mpd                  # 1M users x 2.26M
    python benchmarks/serving_scale.py --users 20000 --tracks 24000 --out /tmp/scale-small
    python benchmarks/serving_scale.py --out /tmp/scale-mpd --reuse          # serve the last build

Why synthetic data: the issue's targets (start-up, latency, memory) are about the *shape* of a
catalogue, and the MPD itself is not in the repository. The data is generated vectorised, a block
of users at a time, so even 66M user-track pairs never exist as Python objects:

* tracks: clustered vectors as in ``index_crossover.clustered`` (about 1,000 tracks per cluster,
  so 2,262 clusters at MPD shape; centre plus same-scale noise, times a log-normal norm), with
  MPD-like ids (``spotify:track:`` + 22 characters), titles ``Title i`` and artists
  ``Artist <cluster>``;
* users: a seen-track count from a log-normal clipped to MPD's 5..250 (about 66 distinct tracks
  on average after duplicates are dropped), 85% of them drawn from one "taste" cluster, the rest
  from a Zipf-like global popularity (exponent 0.7: at MPD shape the top track is in ~4% of
  users, 4.7% in the MPD);
* model: a history-only query tower (a known user's query is the normalised mean of their
  tracks' vectors, the session path is the same tower), the track table set to the vectors.

The artifact is written by ``training.export.export_artifact`` with default ``IndexConfig``
(``auto`` picks ScaNN above 10k tracks, recall floor 0.95 on 1,000 sampled users), in a child
process so that the driver never holds TensorFlow or the build's memory while it measures.
The driver uses only that public path and the ``tracktower serve`` CLI, never artifact
internals: request lists are derived from the generator's parameters.

Then, in one run: time from launch to ``/readyz`` 200 with one worker; ``GET /v1/model`` must show
the index and its recall; wrk (8 connections, 2 threads, a warm-up then a measured run per phase)
on (a) ``/healthz``, (b) known users' recommendations (users in a shuffled order, each wrk thread
walking its own slice, so requests are mostly first-time index searches, not cache hits), (c) POST
sessions of 20 tracks from one cluster for unknown users, (d) unknown users' popularity
fallback; server and generator CPU per phase; memory (RSS and PSS summed over the server's
process tree) of one worker, then of two workers after a warm-up of the same mix. The machine's
quietness is recorded (load average, other processes' busy cores per section, nice level).

Results are merged by shape key into ``benchmarks/results/serving_scale.json``. Everything the
run writes besides that goes under ``--out``; every process it starts is stopped on exit, error,
Ctrl-C or SIGTERM. Helpers (``Server``, ``tracktower_bin``, ``wrk_version``,
``children_cpu_seconds``) are imported from ``benchmarks/serving.py`` by file path. See
benchmarks/README.md, "Serving at catalogue scale".
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "serving_scale.json"
BUILD_JSON = "build.json"
REC_K = 10
ALL_WORKERS_GRACE = 60.0
SESSION_TRACKS = 20
# Request lines per phase and wrk run: enough distinct known users for 15 s at >10k req/s,
# small enough that each wrk thread's Lua table stays in the tens of MB at MPD shape.
MAX_LINES = 200_000
MAX_SESSION_LINES = 20_000
USER_BLOCK = 50_000  # users generated at once (about 3.3M pairs at MPD's mean)
VECTOR_BLOCK = 1 << 18  # track vectors generated at once (128 MB of float32 at dim 128)
# Every server started, so that main() stops them all whatever happens.
SERVERS: list[Any] = []


def _load_serving_bench() -> ModuleType:
    """benchmarks/serving.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "tracktower_bench_serving", REPO / "benchmarks" / "serving.py"
    )
    if spec is None or spec.loader is None:
        raise SystemExit("cannot load benchmarks/serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would; dataclasses there look it up
    spec.loader.exec_module(module)
    return module


bench = _load_serving_bench()


# ---- synthetic data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenParams:
    """Everything the data depends on: its sha256 is the dataset fingerprint."""

    users: int
    tracks: int
    dim: int
    seed: int = 0
    tracks_per_cluster: int = 1000
    taste_share: float = 0.85
    zipf_exponent: float = 0.7
    # log-normal seen-track counts, clipped to MPD's range; mean ~69 drawn, ~66 distinct
    seen_mu: float = 3.96
    seen_sigma: float = 0.78
    seen_min: int = 5
    seen_max: int = 250

    @property
    def n_clusters(self) -> int:
        return min(self.tracks, max(32, self.tracks // self.tracks_per_cluster))

    @property
    def key(self) -> str:
        return f"{self.users}x{self.tracks}"

    def fingerprint(self) -> str:
        raw = json.dumps({"generator": "serving_scale/1", **asdict(self)}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()


def _rng(params: GenParams, stream: int) -> np.random.Generator:
    """One independent stream per purpose, so the layout can be regenerated on its own."""
    return np.random.default_rng([params.seed, stream])


def cluster_layout(params: GenParams) -> tuple[np.ndarray, np.ndarray]:
    """(start, size) of each cluster: tracks are stored cluster by cluster, every cluster
    non-empty, sizes as a uniform random assignment gives them (about tracks_per_cluster)."""
    rng, c = _rng(params, 1), params.n_clusters
    labels = np.concatenate([np.arange(c), rng.integers(0, c, params.tracks - c)])
    sizes = np.bincount(labels, minlength=c).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return starts, sizes


def track_table(params: GenParams, sizes: np.ndarray) -> np.ndarray:
    """The track embedding table ``[tracks + 1, dim]`` float32, row 0 (OOV/padding) zeros,
    row i + 1 = track i; filled a block at a time so no float64 copy of the whole exists."""
    rng, dim = _rng(params, 2), params.dim
    scale = np.float32(1.0 / np.sqrt(dim))
    centres = rng.standard_normal((len(sizes), dim), dtype=np.float32) * scale
    labels = np.repeat(np.arange(len(sizes)), sizes)
    table = np.zeros((params.tracks + 1, dim), dtype=np.float32)
    for start in range(0, params.tracks, VECTOR_BLOCK):
        stop = min(start + VECTOR_BLOCK, params.tracks)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32) * scale
        block += centres[labels[start:stop]]
        block *= rng.lognormal(0.0, 0.25, size=(stop - start, 1)).astype(np.float32)
        table[start + 1 : stop + 1] = block
    return table


def seen_counts(params: GenParams, rng: np.random.Generator, n: int) -> np.ndarray:
    drawn = np.rint(rng.lognormal(params.seen_mu, params.seen_sigma, n))
    return np.clip(drawn, params.seen_min, params.seen_max).astype(np.int64)


def popularity_sampler(params: GenParams) -> tuple[np.ndarray, np.ndarray]:
    """(cdf over popularity ranks, rank -> track): Zipf-like, popular tracks spread over
    clusters by a random permutation."""
    weights = np.arange(1, params.tracks + 1, dtype=np.float64) ** -params.zipf_exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return cdf, _rng(params, 3).permutation(params.tracks)


def user_block(
    params: GenParams,
    rng: np.random.Generator,
    n: int,
    layout: tuple[np.ndarray, np.ndarray],
    popular: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """(distinct seen tracks per user, their track indices sorted per user) for n users."""
    starts, sizes = layout
    counts = seen_counts(params, rng, n)
    row = np.repeat(np.arange(n, dtype=np.int64), counts)
    taste = rng.integers(0, len(sizes), n)[row]
    in_cluster = (rng.random(len(row)) * sizes[taste]).astype(np.int64)
    cdf, rank_to_track = popular
    ranks = np.minimum(np.searchsorted(cdf, rng.random(len(row))), params.tracks - 1)
    track = np.where(
        rng.random(len(row)) < params.taste_share, starts[taste] + in_cluster, rank_to_track[ranks]
    )
    keys = np.sort(row * params.tracks + track)  # by user, then track
    # Duplicates dropped by hand: np.unique (hash based in numpy 2) is ~6x slower here.
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    return np.bincount(keys // params.tracks, minlength=n), (keys % params.tracks).astype(np.int32)


def known_matrix(params: GenParams, layout: tuple[np.ndarray, np.ndarray]) -> Any:
    """The users x tracks csr of seen tracks, built block by block into preallocated arrays."""
    import scipy.sparse as sp

    rng, popular = _rng(params, 4), popularity_sampler(params)
    indptr = np.zeros(params.users + 1, dtype=np.int64)
    indices = np.empty(params.users * 80, dtype=np.int32)  # grown if ever too small
    used = 0
    for start in range(0, params.users, USER_BLOCK):
        n = min(USER_BLOCK, params.users - start)
        counts, tracks = user_block(params, rng, n, layout, popular)
        if used + len(tracks) > len(indices):
            indices = np.resize(indices, 2 * (used + len(tracks)))
        indices[used : used + len(tracks)] = tracks
        indptr[start + 1 : start + n + 1] = used + np.cumsum(counts)
        used += len(tracks)
    indices = indices[:used].copy()
    data = np.ones(used, dtype=np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(params.users, params.tracks))


def user_ids(n: int) -> np.ndarray:
    """``u0`` .. ``u<n-1>``: fixed-width unicode, as narrow as the longest id."""
    width = len(str(max(n - 1, 0)))
    return np.char.add("u", np.arange(n).astype(f"U{width}"))


def track_ids(indices: np.ndarray) -> np.ndarray:
    """MPD-like ``spotify:track:`` + 22 characters, so id arrays have the real width."""
    return np.char.add("spotify:track:", np.char.zfill(np.asarray(indices).astype("U22"), 22))


def tracks_frame(ids: np.ndarray, sizes: np.ndarray) -> Any:
    import pandas as pd

    labels = np.repeat(np.arange(len(sizes)), sizes)
    width = len(str(len(ids)))  # numpy's default "U" width for ints is 21 characters
    return pd.DataFrame(
        {
            "track_id": ids,
            "title": np.char.add("Title ", np.arange(len(ids)).astype(f"U{width}")),
            "artist": np.char.add("Artist ", labels.astype(f"U{width}")),
        }
    )


def seen_stats(known: Any, params: GenParams) -> dict[str, Any]:
    lengths = np.diff(known.indptr)
    listeners = np.bincount(known.indices, minlength=params.tracks)
    return {
        "pairs": int(known.nnz),
        "seen_mean": round(float(lengths.mean()), 2),
        "seen_median": float(np.median(lengths)),
        "seen_min": int(lengths.min()),
        "seen_max": int(lengths.max()),
        "top_track_user_share": round(float(listeners.max()) / params.users, 4),
        "tracks_never_seen": int((listeners == 0).sum()),
    }


# ---- build (child process) ----------------------------------------------------------------------


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def generate(params: GenParams) -> dict[str, Any]:
    """Everything export needs, plus generation figures."""
    start = time.perf_counter()
    layout = cluster_layout(params)
    table = track_table(params, layout[1])
    known = known_matrix(params, layout)
    ids = track_ids(np.arange(params.tracks))
    return {
        "table": table,
        "known": known,
        "user_ids": user_ids(params.users),
        "track_ids": ids,
        "tracks": tracks_frame(ids, layout[1]),
        "figures": {
            "data_seconds": round(time.perf_counter() - start, 1),
            "data_peak_rss_mb": peak_rss_mb(),
            **seen_stats(known, params),
        },
    }


def export(params: GenParams, data: dict[str, Any], out: Path) -> Any:
    """The real export path: a history-only TwoTowerModel with its track table set, then
    ``export_artifact`` with the manifest fields ``stages.export`` passes."""
    from tracktower.features.artifact import DatasetInfo
    from tracktower.training.config import ExperimentConfig, IndexConfig, ModelConfig
    from tracktower.training.export import ExportInputs, export_artifact
    from tracktower.training.model import TwoTowerModel

    model_cfg = ModelConfig(
        embedding_dim=params.dim,
        use_user_id=False,
        use_history=True,
        use_artist=False,
        query_layers=[],
        normalize=True,
    )
    cfg = ExperimentConfig(model_name="serving-scale-bench", model=model_cfg)
    model = TwoTowerModel(model_cfg, params.users, params.tracks)
    model.track_embedding.set_weights([data.pop("table")])
    dataset = DatasetInfo(
        fingerprint=params.fingerprint(),
        rows=int(data["known"].nnz),
        users=params.users,
        tracks=params.tracks,
        source="synthetic: benchmarks/serving_scale.py",
        generator=asdict(params),
    )
    inputs = ExportInputs(
        model=model,
        user_ids=data["user_ids"],
        track_ids=data["track_ids"],
        known=data["known"],
        tracks=data["tracks"],
        manifest={
            "model_name": cfg.model_name,
            "run_id": None,
            "config": cfg.model_dump(mode="json"),
            "dataset": dataset.model_dump(),
            "metrics": {},
        },
        index=IndexConfig(),
        seed=params.seed,
    )
    return export_artifact(inputs, out)


def build_main(params: GenParams, out: Path) -> int:
    """Child process: generate, export to ``out/artifact``, write ``out/build.json``."""
    data = generate(params)
    figures = data.pop("figures")
    print(f"generated in {figures['data_seconds']} s: {figures}", flush=True)
    start = time.perf_counter()
    exported = export(params, data, out / "artifact")
    figures["export_seconds"] = round(time.perf_counter() - start, 1)
    figures["index"] = exported.index.to_dict()
    figures["build_peak_rss_mb"] = peak_rss_mb()
    record = {"params": asdict(params), "build": figures}
    (out / BUILD_JSON).write_text(json.dumps(record, indent=2) + "\n")
    print(f"exported in {figures['export_seconds']} s: index {figures['index']}", flush=True)
    return 0


def run_build(args: argparse.Namespace, params: GenParams, log: Path) -> dict[str, Any]:
    """The build in a child (same interpreter), so its memory is gone before serving starts."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build-only", *_shape_args(args)]
    print(
        f"building {params.key} x {params.dim} into {args.out / 'artifact'} (log: {log}) ...",
        flush=True,
    )
    start = time.monotonic()
    try:
        with log.open("wb") as out:
            done = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=args.build_timeout, check=False
            )
    finally:
        for partial in args.out.glob(".artifact.*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"build failed ({done.returncode}):\n{tail}")
    record: dict[str, Any] = json.loads((args.out / BUILD_JSON).read_text())
    record["build"]["wall_seconds"] = round(time.monotonic() - start, 1)
    return record


def _shape_args(args: argparse.Namespace) -> list[str]:
    return [
        f"--users={args.users}",
        f"--tracks={args.tracks}",
        f"--dim={args.dim}",
        f"--seed={args.seed}",
        f"--out={args.out}",
    ]


def reused_build(args: argparse.Namespace, params: GenParams) -> dict[str, Any]:
    """The earlier build's figures; a build of another shape or seed is refused."""
    file = args.out / BUILD_JSON
    if not file.is_file():
        print(f"warning: {file} missing; build figures unknown", flush=True)
        return {"params": asdict(params), "build": {}, "reused": True}
    record: dict[str, Any] = json.loads(file.read_text())
    if record.get("params") != asdict(params):
        raise SystemExit(
            f"{args.out / 'artifact'} was built with {record.get('params')}, not "
            f"{asdict(params)}: use another --out, or remove {args.out / 'artifact'} to rebuild"
        )
    return {**record, "reused": True}


def artifact_bytes(path: Path) -> dict[str, int]:
    """Bytes per top-level entry of the artifact (arrays, index, saved_model, files), and total."""
    sizes: dict[str, int] = {}
    for entry in sorted(path.iterdir()):
        files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
        sizes[entry.name] = sum(f.stat().st_size for f in files)
    sizes["total"] = sum(sizes.values())
    return sizes


# ---- request lists and wrk ----------------------------------------------------------------------

# Lines are "METHOD<TAB>PATH[<TAB>BODY]". Each thread pre-formats its own slice of the lines and
# walks it in order (wrapping), so a list of distinct users gives distinct requests until a
# thread has sent its whole slice; done() prints one JSON line with the totals and, per thread,
# requests sent and slice length (the driver's distinct-request count).
WRK_LUA = r"""
local threads = {}
function setup(thread)
  threads[#threads + 1] = thread
  thread:set("tid", #threads)
end
local reqs, i = {}, 0
sent, slice = 0, 0
function init(args)
  local lines = {}
  for line in io.lines("__LINES__") do lines[#lines + 1] = line end
  local per = math.floor(#lines / __THREADS__)
  local first, last = (tid - 1) * per + 1, tid * per
  if tid == __THREADS__ then last = #lines end
  if per == 0 then first, last = 1, #lines end
  local json = {["Content-Type"] = "application/json"}
  for j = first, last do
    local m, p, b = lines[j]:match("^(%u+)\t([^\t]+)\t?(.*)$")
    if b == "" then reqs[#reqs + 1] = wrk.format(m, p)
    else reqs[#reqs + 1] = wrk.format(m, p, json, b) end
  end
  slice = #reqs
end
function request()
  i = i + 1
  sent = sent + 1
  return reqs[(i - 1) % slice + 1]
end
function done(s, lat, req)
  local per = {}
  for _, t in ipairs(threads) do
    per[#per + 1] = string.format("[%d, %d]", t:get("sent"), t:get("slice"))
  end
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "non_2xx": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, '
    .. '"p99_us": %d, "max_us": %d, "threads": [%s]}\n', s.requests, s.duration,
    s.errors.status, s.errors.connect, s.errors.read, s.errors.write, s.errors.timeout,
    lat:percentile(50), lat:percentile(90), lat:percentile(99), lat.max,
    table.concat(per, ", ")))
end
"""


def rec_line(user: str) -> str:
    return f"GET\t/v1/users/{quote(user, safe='')}/recommendations?k={REC_K}"


def session_line(user: str, tracks: np.ndarray) -> str:
    body = {"user_id": user, "k": REC_K, "recent_track_ids": track_ids(tracks).tolist()}
    return f"POST\t/v1/recommendations\t{json.dumps(body, separators=(',', ':'))}"


def session_tracks(params: GenParams, rng: np.random.Generator, n: int) -> np.ndarray:
    """Track indices ``[n, SESSION_TRACKS]``: each row distinct tracks of one cluster, picked
    from a window of 4 x SESSION_TRACKS consecutive tracks at a random place in the cluster
    (tracks within a cluster are exchangeable, so that is a random subset; a cluster smaller
    than the window repeats tracks)."""
    starts, sizes = cluster_layout(params)
    cluster = rng.integers(0, len(sizes), n)
    window = np.argsort(rng.random((n, SESSION_TRACKS * 4)), axis=1)[:, :SESSION_TRACKS]
    offset = (rng.random(n) * sizes[cluster]).astype(np.int64)
    return starts[cluster, None] + (offset[:, None] + window) % sizes[cluster, None]


def write_lines(file: Path, lines: Sequence[str]) -> Path:
    file.write_text("\n".join(lines) + "\n")
    return file


def request_lists(params: GenParams, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per phase: a warm-up and a measured list, disjoint (so the measured known users are first
    requests for the server, not warm-up cache hits), and what the lists hold."""
    rng = _rng(params, 5)
    users = rng.permutation(params.users)
    n_warm = min(max(params.users // 10, 1), 20_000)
    warm_users, users = users[:n_warm], users[n_warm : n_warm + MAX_LINES]
    n_sessions = min(MAX_SESSION_LINES, MAX_LINES)
    sessions = session_tracks(params, rng, n_sessions + n_warm)
    phases: dict[str, dict[str, Any]] = {"a_healthz": {"lines": ["GET\t/healthz"] * 2}}
    phases["b_known"] = {"lines": [rec_line(f"u{u}") for u in users]}
    phases["b_known"]["warm"] = [rec_line(f"u{u}") for u in warm_users]
    phases["c_session"] = {
        "lines": [session_line(f"session-{i}", s) for i, s in enumerate(sessions[n_warm:])],
        "warm": [session_line(f"warm-{i}", s) for i, s in enumerate(sessions[:n_warm])],
    }
    unknown = [rec_line(f"nobody-{i}") for i in range(min(MAX_LINES, params.users) + n_warm)]
    phases["d_unknown"] = {"lines": unknown[n_warm:], "warm": unknown[:n_warm]}
    for name, phase in phases.items():
        phase["distinct_lines"] = len(phase["lines"])
        phase["file"] = write_lines(run_dir / f"{name}.txt", phase.pop("lines"))
        phase["warm_file"] = write_lines(run_dir / f"{name}.warm.txt", phase.pop("warm", []))
        if not phase["warm_file"].read_text().strip():
            phase["warm_file"] = phase["file"]
    return phases


def load_wrk(base: str, lines: Path, seconds: int, conns: int, threads: int) -> dict[str, Any]:
    script = lines.with_suffix(".lua")
    lua = WRK_LUA.replace("__LINES__", str(lines)).replace("__THREADS__", str(threads))
    script.write_text(lua)
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s"]
    cmd += ["--latency", "-s", str(script), base]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise SystemExit(f"wrk produced no result:\n{out.stdout}\n{out.stderr}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    return {
        "requests": raw["requests"],
        # "sent" also counts requests still in flight when wrk stopped
        "distinct_requests": min(
            raw["requests"], sum(min(sent, size) for sent, size in raw["threads"])
        ),
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "non_2xx": raw["non_2xx"],
        "socket_errors": sum(raw[k] for k in ("connect", "read", "write", "timeout")),
    }


# ---- measuring ----------------------------------------------------------------------------------


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (/proc/stat, all cores)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [float(x) for x in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process and its finished children (the build, wrk, stopped servers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime + bench.children_cpu_seconds()


class Quietness:
    """Busy cores on the machine outside the benchmark's processes over a section (as
    ``index_crossover.CpuMeter``, but also leaving out the children: the build, wrk, and the
    live server tree given as ``server_cpu``)."""

    def __init__(self, server_cpu: Callable[[], float] | None = None) -> None:
        self.server_cpu = server_cpu
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        ours = own_cpu_seconds() + (self.server_cpu() if self.server_cpu else 0.0)
        return time.monotonic(), busy_cpu_seconds(), ours

    def stop(self) -> dict[str, float]:
        wall, busy, ours = (b - a for a, b in zip(self.start, self._sample(), strict=True))
        return {
            "seconds": round(wall, 1),
            "others_busy_cores": round(max(0.0, busy - ours) / max(wall, 1e-9), 3),
        }


def tree_memory(pid: int) -> dict[str, Any]:
    """RSS, PSS and USS summed over the process tree (psutil reads /proc/PID/smaps_rollup).
    RSS counts every shared page once per process (the memory-mapped artifact, libraries); PSS
    splits a shared page among the processes mapping it, so its sum is what the tree uses."""
    import psutil

    root = psutil.Process(pid)
    per = []
    for proc in (root, *root.children(recursive=True)):
        try:
            info = proc.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        per.append({"pid": proc.pid, **{k: _mb(getattr(info, k)) for k in MEM_FIELDS}})
    total = {f"{k}_mb": round(sum(p[k] for p in per), 1) for k in MEM_FIELDS}
    return {**total, "processes": per}


MEM_FIELDS = ("rss", "pss", "uss", "shared")


def _mb(value: int) -> float:
    return round(value / 2**20, 1)


def serve_env() -> dict[str, str]:
    """The caller's environment without TRACKTOWER_* (no API keys, default limits), so what is
    measured is the documented default configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKTOWER_")}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true"}


def launch(artifact: Path, workers: int, log: Path) -> tuple[Any, float]:
    """The server (serving.py's ``Server``: own session, stopped as a group) and its launch time."""
    cmd = [bench.tracktower_bin(), "serve", "--model", str(artifact), "--host", "127.0.0.1"]
    cmd += ["--port", "{port}", "--workers", str(workers)]
    launched = time.monotonic()
    server = bench.Server(f"tracktower serve --workers {workers}", cmd, serve_env(), log)
    SERVERS.append(server)
    return server, launched


def wait_ready(server: Any, launched: float, workers: int, timeout: float) -> dict[str, Any]:
    """Seconds from launch to the first /readyz 200, and to every worker's "Application startup
    complete." (uvicorn's log line; a worker only accepts connections after it). Should that
    line never come, ``all_workers_s`` is None ALL_WORKERS_GRACE seconds after the first 200."""
    deadline, first = launched + timeout, None
    while time.monotonic() < deadline and server.proc.poll() is None:
        now = time.monotonic() - launched
        if first is None and _ready(server.base):
            first = now
        started = server.log.read_text(errors="replace").count("Application startup complete")
        if first is not None and (started >= workers or now - first > ALL_WORKERS_GRACE):
            all_workers = round(now, 2) if started >= workers else None
            return {"ready_s": round(first, 2), "all_workers_s": all_workers}
        time.sleep(0.1)
    tail = server.log.read_text(errors="replace")[-3000:]
    raise SystemExit(f"{server.name} not ready (exit {server.proc.poll()}):\n{tail}")


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def post(server: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        server.base + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


def check_sources(server: Any, params: GenParams) -> dict[str, str]:
    """One request per kind, answered from the expected source, before any load."""
    session = track_ids(session_tracks(params, _rng(params, 6), 1)[0]).tolist()
    got = {
        "b_known": server.get(f"/v1/users/u0/recommendations?k={REC_K}")["source"],
        "c_session": post(
            server,
            "/v1/recommendations",
            {"user_id": "probe", "k": REC_K, "recent_track_ids": session},
        )["source"],
        "d_unknown": server.get(f"/v1/users/nobody/recommendations?k={REC_K}")["source"],
    }
    want = {"b_known": "model", "c_session": "session", "d_unknown": "popular"}
    if got != want:
        raise SystemExit(f"unexpected recommendation sources {got}, expected {want}")
    return got


def drive(args: argparse.Namespace, server: Any, phase: dict[str, Any]) -> dict[str, Any]:
    """Warm-up on the phase's warm list, then the measured run, with server and generator CPU
    and the machine's other load over the measured run."""
    conns, threads = args.concurrency, args.threads
    load_wrk(server.base, phase["warm_file"], args.warmup, conns, threads)
    meter = Quietness(server.cpu_seconds)
    server_cpu, gen_cpu = server.cpu_seconds(), bench.children_cpu_seconds()
    result = load_wrk(server.base, phase["file"], args.duration, conns, threads)
    server_cpu = server.cpu_seconds() - server_cpu
    gen_cpu = bench.children_cpu_seconds() - gen_cpu
    result["distinct_lines"] = phase["distinct_lines"]
    result["server_cpu_cores"] = server_cpu / args.duration
    result["server_cpu_us_per_request"] = server_cpu / max(result["requests"], 1) * 1e6
    result["generator_cpu_cores"] = gen_cpu / args.duration
    result["others_busy_cores"] = meter.stop()["others_busy_cores"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


# ---- the run ------------------------------------------------------------------------------------


def serve_one(
    args: argparse.Namespace, artifact: Path, phases: dict[str, Any], params: GenParams
) -> dict[str, Any]:
    """One worker: start-up, /v1/model, the four load phases, then its memory."""
    server, launched = launch(artifact, 1, args.run_dir / "serve-1.log")
    meter = Quietness(server.cpu_seconds)
    out: dict[str, Any] = {"startup": wait_ready(server, launched, 1, args.ready_timeout)}
    print(f"one worker ready in {out['startup']['ready_s']} s on {server.base}", flush=True)
    out["model_index"] = server.get("/v1/model").get("index")
    out["sources"] = check_sources(server, params)
    out["phases"] = {}
    for name, phase in phases.items():
        out["phases"][name] = result = drive(args, server, phase)
        print(f"  {name}: {result['rps']:.0f} req/s, p99 {result['p99_ms']} ms", flush=True)
    out["memory"] = tree_memory(server.proc.pid)
    out["quietness"] = meter.stop()
    server.stop()
    return out


def serve_two(args: argparse.Namespace, artifact: Path, phases: dict[str, Any]) -> dict[str, Any]:
    """Two workers: start-up, a warm-up of the same mix (both workers touch their pages), memory."""
    server, launched = launch(artifact, 2, args.run_dir / "serve-2.log")
    meter = Quietness(server.cpu_seconds)
    out: dict[str, Any] = {"startup": wait_ready(server, launched, 2, args.ready_timeout)}
    print(f"two workers ready in {out['startup']['all_workers_s']} s", flush=True)
    for name in ("b_known", "c_session", "d_unknown"):
        load_wrk(server.base, phases[name]["file"], args.mem_warmup, args.concurrency, args.threads)
    out["warmup_s_per_phase"] = args.mem_warmup
    out["memory"] = tree_memory(server.proc.pid)
    out["quietness"] = meter.stop()
    server.stop()
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    one, build = result["serve_1"], result["build"]
    phases, index = one["phases"], one.get("model_index") or {}
    health = phases["a_healthz"]["rps"]
    rows = [("launch to /readyz 200 <= 60 s (1 worker)", one["startup"]["ready_s"], 60.0)]
    for name in ("b_known", "c_session", "d_unknown"):
        rows.append((f"p99 {name} <= 10 ms", phases[name]["p99_ms"], 10.0))
    checks = [(label, value, value <= limit) for label, value, limit in rows]
    for name in ("b_known", "c_session", "d_unknown"):
        ratio = round(phases[name]["rps"] / max(health, 1e-9), 3)
        checks.append((f"req/s {name} >= 0.5 x /healthz", ratio, ratio >= 0.5))
    errors = sum(p["non_2xx"] + p["socket_errors"] for p in phases.values())
    checks.append(("no non-2xx or socket errors", errors, errors == 0))
    recall = index.get("recall_at_100")
    checks.append(("/v1/model index recall@100 >= 0.95", recall, (recall or 0.0) >= 0.95))
    seconds = (build.get("index") or index).get("build_seconds")
    seconds = None if seconds is None else round(seconds, 2)
    checks.append(("index build <= 180 s", seconds, seconds is not None and seconds <= 180))
    ratio = result["memory_two_over_one"]["pss"]
    checks.append(("PSS two workers <= 1.3 x one", ratio, ratio <= 1.3))
    return [{"target": t, "value": v, "pass": bool(ok)} for t, v, ok in checks]


def machine(load_before: tuple[float, ...], sections: dict[str, dict[str, float]]) -> dict:
    wall = sum(s["seconds"] for s in sections.values())
    busy = sum(s["others_busy_cores"] * s["seconds"] for s in sections.values())
    return {
        "cores": os.cpu_count(),
        "nice": os.nice(0),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "others_busy_cores": {k: v["others_busy_cores"] for k, v in sections.items()},
        "others_busy_cores_mean": round(busy / max(wall, 1e-9), 3),
    }


def save(path: Path, key: str, result: dict[str, Any]) -> None:
    """Merge this shape's result into the file, replacing only this shape's entry."""
    merged: dict[str, Any] = {"shapes": {}}
    if path.is_file():
        merged = json.loads(path.read_text())
        merged.setdefault("shapes", {})
    merged["shapes"][key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, path)


def print_table(result: dict[str, Any]) -> None:
    build, one, two = result["build"], result["serve_1"], result["serve_2"]
    index = build.get("index") or one.get("model_index") or {}
    print(f"\n{result['shape']}: {result['generator_stats']}")
    print(
        f"build: data {build.get('data_seconds')} s, export {build.get('export_seconds')} s, "
        f"index {index.get('backend')} {round(index.get('build_seconds') or 0, 1)} s "
        f"{index.get('params')}, "
        f"recall@10 {index.get('recall_at_10')} @100 {index.get('recall_at_100')}, "
        f"peak RSS {build.get('build_peak_rss_mb')} MB; artifact {result['artifact_mb']} MB"
    )
    print(f"start-up: 1 worker {one['startup']}, 2 workers {two['startup']}")
    print(
        f"{'phase':<12}{'requests':>9}{'distinct':>9}{'req/s':>8}{'p50':>7}{'p90':>7}{'p99':>7}"
        f"{'max':>8}{'non2xx':>7}{'sockerr':>8}{'srv cores':>10}{'us/req':>8}{'gen cores':>10}"
    )
    for name, r in one["phases"].items():
        print(
            f"{name:<12}{r['requests']:>9}{r['distinct_requests']:>9}{r['rps']:>8.0f}"
            f"{r['p50_ms']:>7.2f}{r['p90_ms']:>7.2f}{r['p99_ms']:>7.2f}{r['max_ms']:>8.1f}"
            f"{r['non_2xx']:>7}{r['socket_errors']:>8}{r['server_cpu_cores']:>10.2f}"
            f"{r['server_cpu_us_per_request']:>8.0f}{r['generator_cpu_cores']:>10.2f}"
        )
    m1, m2 = one["memory"], two["memory"]
    print(
        f"memory MB: 1 worker PSS {m1['pss_mb']} (RSS {m1['rss_mb']}); 2 workers PSS "
        f"{m2['pss_mb']} (RSS {m2['rss_mb']}); two/one {result['memory_two_over_one']} (RSS "
        "counts the shared, memory-mapped artifact once per process: PSS is the measure)"
    )
    print(f"machine: {result['machine']}")
    for t in result["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}  (got {t['value']})")


def obtain_build(args: argparse.Namespace, params: GenParams) -> dict[str, Any]:
    artifact = args.out / "artifact"
    if artifact.exists() and args.reuse:
        return reused_build(args, params)
    if artifact.exists():
        raise SystemExit(f"{artifact} exists: pass --reuse to serve it, or another --out")
    return {**run_build(args, params, args.run_dir / "build.log"), "reused": False}


def run(args: argparse.Namespace, params: GenParams) -> dict[str, Any]:
    load_before, started = os.getloadavg(), datetime.now(UTC).isoformat(timespec="seconds")
    meter = Quietness()
    record = obtain_build(args, params)
    sections = {"build": meter.stop()} if not record["reused"] else {}
    artifact = args.out / "artifact"
    phases = request_lists(params, args.run_dir)
    one = serve_one(args, artifact, phases, params)
    two = serve_two(args, artifact, phases)
    sections.update(
        {"serve_1_worker": one.pop("quietness"), "serve_2_workers": two.pop("quietness")}
    )
    result: dict[str, Any] = {
        "timestamp": started,
        "command": " ".join(["python", "benchmarks/serving_scale.py", *sys.argv[1:]]),
        "shape": {"users": params.users, "tracks": params.tracks, "dim": params.dim},
        "generator": record["params"],
        "generator_stats": {k: v for k, v in record["build"].items() if k in STAT_KEYS},
        "build": {k: v for k, v in record["build"].items() if k not in STAT_KEYS},
        "build_reused": record["reused"],
        "artifact_mb": {k: _mb(v) for k, v in artifact_bytes(artifact).items()},
        "serve_1": one,
        "serve_2": two,
        # PSS is the target's measure; RSS counts the shared, memory-mapped artifact per process
        "memory_two_over_one": {
            k: round(two["memory"][f"{k}_mb"] / one["memory"][f"{k}_mb"], 3) for k in MEM_FIELDS
        },
        "load_generator": {
            "name": bench.wrk_version(),
            "threads": args.threads,
            "connections": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
        },
        "server_env": "TRACKTOWER_* unset (defaults), loopback, no API keys",
        "machine": machine(load_before, sections),
    }
    result["targets"] = targets(result)
    return result


STAT_KEYS = (
    *("pairs", "seen_mean", "seen_median", "seen_min", "seen_max"),
    *("top_track_user_share", "tracks_never_seen"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--tracks", type=int, default=2_262_292)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="work dir; the artifact is OUT/artifact")
    p.add_argument("--reuse", action="store_true", help="serve OUT/artifact if it exists")
    p.add_argument("--duration", type=int, default=15, help="seconds per measured phase")
    p.add_argument("--warmup", type=int, default=2, help="discarded seconds before each phase")
    p.add_argument("--mem-warmup", type=int, default=5, help="two-worker warm-up per phase")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--build-timeout", type=float, default=7200.0)
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON merged by shape")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.users < 1 or args.tracks < 2 or args.dim < 2:
        p.error("--users >= 1, --tracks >= 2 and --dim >= 2")
    if min(args.duration, args.warmup, args.mem_warmup) < 1:
        p.error("--duration, --warmup and --mem-warmup are whole seconds >= 1 (wrk's -d)")
    if not 1 <= args.threads <= args.concurrency:
        p.error("--threads must be between 1 and --concurrency")
    args.out = args.out.resolve()
    args.run_dir = args.out / "run"
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    params = GenParams(users=args.users, tracks=args.tracks, dim=args.dim, seed=args.seed)
    if args.build_only:
        return build_main(params, args.out)
    if bench.wrk_version() is None:
        raise SystemExit("wrk not found (apt-get install -y wrk)")
    signal.signal(signal.SIGTERM, _terminate)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, params)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        for server in SERVERS:
            server.stop()
    print_table(result)
    save(args.results, params.key, result)
    print(f"\nwrote {args.results} [{params.key}]")
    return 0 if all(t["pass"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
