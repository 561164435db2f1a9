#!/usr/bin/env python
"""HTTP serving benchmark: the real server against its own ceiling and against naive TF serving.

Usage (from the repository root):

    python benchmarks/serving.py                          # trains a model in a temp MLflow store
    python benchmarks/serving.py --reuse                  # models:/tracktower@champion if present
    python benchmarks/serving.py --model models:/tracktower/3 --duration 10

One run starts ``tracktower serve`` (one uvicorn worker) on a free loopback port and loads it from a
separate process (wrk, else a multi-process asyncio client) at fixed concurrency in three phases:
(a) ``GET /healthz``, the generator + framework ceiling; (b) ``GET /v1/users/{id}/recommendations``
for random known users; (c) the same requests against ``benchmarks/naive_server.py``, which calls
the SavedModel's history signature per request with the user's seen tracks and ranks with numpy.
The table is printed and written as JSON; targets are checked, and a failing target triggers an
in-process profile of the recommendation route (``--profile`` forces it). See
benchmarks/README.md, "Serving benchmark".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "serving.json"
REC_PATH = "/v1/users/{}/recommendations?k=10"
CHAMPION = "models:/tracktower@champion"

# Each wrk thread reads the path list once; done() prints one JSON line the driver parses, so no
# per-response Lua callback slows the generator (wrk counts non-2xx/3xx itself).
WRK_LUA = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local n = #paths
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) math.randomseed(os.time() + 7919 * (tid or 0)) end
function request() return wrk.format("GET", paths[math.random(n)]) end
function done(s, lat, req)
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "non_2xx": %%d, '
    .. '"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d, "p50_us": %%d, '
    .. '"p90_us": %%d, "p99_us": %%d, "max_us": %%d}\\n', s.requests, s.duration, s.errors.status,
    s.errors.connect, s.errors.read, s.errors.write, s.errors.timeout, lat:percentile(50),
    lat:percentile(90), lat:percentile(99), lat.max))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(cmd: Sequence[str], env: dict[str, str], cwd: Path, log: Path, timeout: float) -> None:
    with log.open("ab") as out:
        done = subprocess.run(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{tail}")


def tracktower_bin() -> str:
    local = Path(sys.executable).with_name("tracktower")
    return str(local) if local.exists() else (shutil.which("tracktower") or "tracktower")


def has_champion() -> bool:
    """True if the current tracking store has the champion alias (never creates ./mlflow.db)."""
    if not os.environ.get("MLFLOW_TRACKING_URI") and not Path("mlflow.db").exists():
        return False
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_model_version_by_alias("tracktower", "champion")
    except MlflowException:
        return False
    return True


def obtain_model(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> str:
    """The model URI to serve; trains the default model into a throwaway store if needed."""
    if args.model:
        return str(args.model)
    if args.reuse and has_champion():
        return CHAMPION
    # Also this process's: resolve_artifact downloads models:/ URIs through MLflow's process-wide
    # registry URI, which its tracking_uri argument does not reach.
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"] = (
        f"sqlite:///{tmp / 'mlflow.db'}"
    )
    log, tt = tmp / "train.log", tracktower_bin()
    print(f"training the default model in {tmp} (log: {log}) ...", flush=True)
    start = time.monotonic()
    run([tt, "data", "synth", "--out", str(tmp / "data")], env, tmp, log, 300)
    summary = tmp / "summary.json"
    train = [
        tt,
        "train",
        "--config",
        str(REPO / "configs" / "default.yaml"),
        "--no-baseline",
        "--interactions",
        str(tmp / "data" / "interactions.parquet"),
        "--tracks",
        str(tmp / "data" / "tracks.parquet"),
        "--summary",
        str(summary),
    ]
    run(train, env, tmp, log, 1800)
    print(f"trained in {time.monotonic() - start:.0f} s", flush=True)
    return str(json.loads(summary.read_text())["model_uri"])


class Server:
    """A subprocess in its own session, so stopping it stops its whole process group."""

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log, self.port = name, log, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.base}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{self.name} not ready (exit {self.proc.poll()}):\n{tail}")

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + path, timeout=10) as resp:
            result: dict[str, Any] = json.load(resp)
            return result

    def rss_mb(self) -> float:
        import psutil

        proc = psutil.Process(self.proc.pid)
        procs = [proc, *proc.children(recursive=True)]
        return round(sum(p.memory_info().rss for p in procs) / 2**20, 1)

    def cpu_seconds(self) -> float:
        import psutil

        proc = psutil.Process(self.proc.pid)
        times = [p.cpu_times() for p in (proc, *proc.children(recursive=True))]
        return sum(t.user + t.system for t in times)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


# ---- load generation ---------------------------------------------------------------------------


def wrk_version() -> str | None:
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def load_wrk(base: str, paths_file: Path, seconds: float, conns: int, threads: int) -> dict:
    script = paths_file.with_suffix(".lua")
    script.write_text(WRK_LUA % paths_file)
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        base,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise SystemExit(f"wrk produced no result:\n{out.stdout}\n{out.stderr}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    socket_errors = sum(raw[k] for k in ("connect", "read", "write", "timeout"))
    return {
        "requests": raw["requests"],
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "errors": raw["non_2xx"],
        "socket_errors": socket_errors,
    }


async def _client(port: int, paths: list[str], until: float, lat: list[float]) -> int:
    """One keep-alive connection sending requests back to back; returns its non-2xx count."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    bad, clock = 0, time.perf_counter
    while clock() < until:
        path = random.choice(paths)
        start = clock()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for h in head.split(b"\r\n"):
            if h[:15].lower() == b"content-length:":
                length = int(h[15:])
        await reader.readexactly(length)
        lat.append(clock() - start)
        bad += not 200 <= status < 300
    writer.close()
    return bad


def _python_worker(port: int, paths: list[str], seconds: float, conns: int) -> tuple:
    """One client process: ``conns`` connections on one event loop; (latencies, non-2xx, secs)."""

    async def go() -> tuple[list[float], int, float]:
        lat: list[float] = []
        start = time.perf_counter()
        until = start + seconds
        bad = await asyncio.gather(*(_client(port, paths, until, lat) for _ in range(conns)))
        return lat, sum(bad), time.perf_counter() - start

    return asyncio.run(go())


def load_python(base: str, paths_file: Path, seconds: float, conns: int, procs: int) -> dict:
    port, paths = int(base.rsplit(":", 1)[1]), paths_file.read_text().split()
    share = [conns // procs + (i < conns % procs) for i in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        futures = [pool.submit(_python_worker, port, paths, seconds, c) for c in share]
        parts = [f.result(timeout=seconds + 60) for f in futures]
    lat = np.array([x for part in parts for x in part[0]]) * 1000
    p50, p90, p99 = np.percentile(lat, [50, 90, 99]).tolist()
    return {
        "requests": len(lat),
        "rps": round(sum(len(part[0]) / part[2] for part in parts), 1),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": float(lat.max()),
        "errors": sum(part[1] for part in parts),
        "socket_errors": 0,
    }


def drive(args: argparse.Namespace, server: Server, paths_file: Path) -> dict:
    """A discarded warm-up run, then the measured one, both at the same concurrency.

    CPU time of the server and of the generator over the measured run is recorded too: on a shared
    machine req/s alone cannot tell a slow server from a starved one, CPU per request can.
    """
    conns, threads = args.concurrency, args.threads
    fn = load_wrk if args.generator == "wrk" else load_python
    fn(server.base, paths_file, args.warmup, conns, threads)
    server_cpu, gen_cpu = server.cpu_seconds(), children_cpu_seconds()
    result = fn(server.base, paths_file, args.duration, conns, threads)
    server_cpu, gen_cpu = server.cpu_seconds() - server_cpu, children_cpu_seconds() - gen_cpu
    result["server_cpu_cores"] = server_cpu / args.duration
    result["server_cpu_us_per_request"] = server_cpu / max(result["requests"], 1) * 1e6
    result["generator_cpu_cores"] = gen_cpu / args.duration
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def children_cpu_seconds() -> float:
    """User + system CPU of this process's finished children (wrk, the python client pool)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---- profiling ----------------------------------------------------------------------------------


def profile(artifact: Path, paths: list[str], user_ids: list[str], n: int = 4000) -> dict:
    """Where a recommendation request spends its time, in-process (no HTTP, no generator).

    The ASGI app is driven directly on one event loop in this thread, so cProfile sees the whole
    path (middleware, routing, validation, scoring, serialisation); TestClient would run the app in
    a portal thread the profiler cannot see. The artifact is loaded as the server loads it (with
    TensorFlow when it has a history tower), because the size of the heap sets the cost of a full
    garbage collection, which shows up in the tail: GC pauses are recorded per generation, before
    and after ``gc.freeze()``.
    """
    import cProfile
    import gc
    import io
    import pstats
    from urllib.parse import unquote

    from tracktower.serving.app import create_app
    from tracktower.serving.artifact import Recommender
    from tracktower.serving.settings import Settings

    rec = Recommender.load(artifact)
    app = create_app(Settings(model_uri=str(artifact)), recommender=rec)

    async def call(path: str) -> None:
        route, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": unquote(route),
            "raw_path": route.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(b"host", b"bench")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"{path}: HTTP {message['status']}")

        await app(scope, receive, send)

    async def loop(requests: list[str]) -> list[float]:
        async with app.router.lifespan_context(app):
            for p in requests[:200]:
                await call(p)
            lat = []
            for p in requests:
                start = time.perf_counter()
                await call(p)
                lat.append(time.perf_counter() - start)
            return lat

    pauses: list[tuple[int, float]] = []
    began: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            pauses.append((info["generation"], time.perf_counter() - began.pop()))

    def timed(requests: list[str]) -> dict:
        pauses.clear()
        gc.callbacks.append(on_gc)
        try:
            lat = np.array(asyncio.run(loop(requests))) * 1e6
        finally:
            gc.callbacks.remove(on_gc)
        gen2 = [t * 1000 for g, t in pauses if g == 2]
        return {
            "mean_us": round(float(lat.mean()), 1),
            "p50_us": round(float(np.percentile(lat, 50)), 1),
            "p99_us": round(float(np.percentile(lat, 99)), 1),
            "max_us": round(float(lat.max()), 1),
            "gc_collections": len(pauses),
            "gc_gen2_collections": len(gen2),
            "gc_gen2_max_ms": round(max(gen2, default=0.0), 1),
            "gc_total_ms": round(sum(t for _, t in pauses) * 1000, 1),
        }

    reqs = [random.choice(paths) for _ in range(n)]
    users = [random.choice(user_ids) for _ in range(n)]
    result: dict[str, Any] = {"calls": n, "tracked_objects": len(gc.get_objects())}
    result["asgi_healthz"] = timed(["/healthz"] * n)
    result["asgi_recommendation"] = timed(reqs)
    start = time.perf_counter()
    gc.collect()
    result["full_gc_ms"] = round((time.perf_counter() - start) * 1000, 1)
    start = time.perf_counter()
    for u in users:
        rec.recommend(u, 10)
    result["recommender_recommend_us"] = round((time.perf_counter() - start) / n * 1e6, 1)
    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(loop(reqs))
    prof.disable()
    gc.freeze()
    result["asgi_recommendation_after_gc_freeze"] = timed(reqs)
    gc.unfreeze()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(15)
    stats.sort_stats("cumulative").print_stats(25)
    result["cprofile"] = text.getvalue()
    return result


# ---- driver -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model URI or artifact dir (default: train one)")
    p.add_argument("--reuse", action="store_true", help=f"use {CHAMPION} of the current store")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per measured phase")
    p.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each phase")
    p.add_argument("--concurrency", type=int, default=8, help="open connections")
    p.add_argument("--threads", type=int, default=2, help="wrk threads / python client processes")
    p.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--profile", action="store_true", help="profile even if every target passes")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (store, logs)")
    args = p.parse_args(argv)
    if not 1 <= args.threads <= args.concurrency:
        p.error("--threads must be between 1 and --concurrency")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    version = wrk_version()
    if args.generator == "auto":
        args.generator = "wrk" if version else "python"
    if args.generator == "wrk" and version is None:
        raise SystemExit("wrk not found (apt-get install -y wrk), or use --generator python")
    generator = version if args.generator == "wrk" else "python asyncio (multi-process)"
    tmp = Path(tempfile.mkdtemp(prefix="tracktower-serving-bench-"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    servers: list[Server] = []
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    try:
        uri = obtain_model(args, tmp, env)
        from tracktower.features.artifact import read_arrays, read_manifest
        from tracktower.serving.resolve import resolve_artifact

        tracking = env.get("MLFLOW_TRACKING_URI")
        artifact = resolve_artifact(uri, tracking_uri=tracking, dst_path=tmp / "artifact").path
        arrays = read_arrays(artifact, read_manifest(artifact))
        user_ids = arrays["user_ids"].tolist()
        paths = [REC_PATH.format(quote(u, safe="")) for u in user_ids]
        rec_file, health_file = tmp / "users.txt", tmp / "healthz.txt"
        rec_file.write_text("\n".join(paths) + "\n")
        health_file.write_text("/healthz\n")

        serve = [
            tracktower_bin(),
            "serve",
            "--model",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--workers",
            "1",
        ]
        main_srv = Server("tracktower serve", serve, env, tmp / "server.log")
        servers.append(main_srv)
        main_srv.wait_ready(300)
        sample = main_srv.get(paths[0])
        print(
            f"{main_srv.name} ready on {main_srv.base}; {len(user_ids)} users; "
            f"sample source={sample['source']} items={len(sample['items'])}",
            flush=True,
        )
        phases = {"a_healthz": drive(args, main_srv, health_file)}
        phases["b_recommend"] = drive(args, main_srv, rec_file)
        rss = main_srv.rss_mb()
        main_srv.stop()

        naive_cmd = [
            sys.executable,
            str(REPO / "benchmarks" / "naive_server.py"),
            "--artifact",
            str(artifact),
            "--port",
            "{port}",
        ]
        naive = Server("naive server", naive_cmd, env, tmp / "naive.log")
        servers.append(naive)
        naive.wait_ready(300)
        # Same exclusion, and the same query when the model has no user-id embedding (with one,
        # the naive history-only query differs by design): recorded, not required.
        naive_ids = [item["track_id"] for item in naive.get(paths[0])["items"]]
        same_top10 = naive_ids == [item["track_id"] for item in sample["items"]]
        phases["c_naive"] = drive(args, naive, rec_file)
        naive_rss = naive.rss_mb()
        naive.stop()

        a, b, c = (phases[k] for k in ("a_healthz", "b_recommend", "c_naive"))
        ratios = {
            "b_over_a": round(b["rps"] / a["rps"], 3),
            "b_over_c": round(b["rps"] / c["rps"], 2),
        }
        targets = [
            {
                "target": "(b) req/s >= 0.5 x (a)",
                "value": ratios["b_over_a"],
                "pass": ratios["b_over_a"] >= 0.5,
            },
            {"target": "p99(b) <= 10 ms", "value": b["p99_ms"], "pass": b["p99_ms"] <= 10.0},
            {
                "target": "(b) req/s >= 5 x (c)",
                "value": ratios["b_over_c"],
                "pass": ratios["b_over_c"] >= 5.0,
            },
        ]
        result: dict[str, Any] = {
            "timestamp": started,
            "model_uri": uri,
            "artifact": {"users": len(user_ids), "tracks": len(arrays["track_ids"])},
            "machine": {
                "cores": os.cpu_count(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            },
            "load_generator": {
                "name": generator,
                "threads": args.threads,
                "connections": args.concurrency,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
            },
            "ceiling_reference": "a_healthz req/s: generator + HTTP + framework, no model work",
            "server": {
                "command": "tracktower serve --workers 1",
                "rss_mb_after_load": rss,
                "naive_rss_mb_after_load": naive_rss,
            },
            "phases": phases,
            "naive_same_top10_as_server": same_top10,
            "ratios": ratios,
            "targets": targets,
        }
        print_table(result)
        if args.profile or not all(t["pass"] for t in targets):
            print("\nprofiling the recommendation path in-process ...", flush=True)
            result["profile"] = profile(artifact, paths, user_ids)
            print(result["profile"]["cprofile"])
            shown = {k: v for k, v in result["profile"].items() if k != "cprofile"}
            print(json.dumps(shown, indent=2))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
        return 0 if all(t["pass"] for t in targets) else 1
    finally:
        for srv in servers:
            srv.stop()
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def print_table(result: dict[str, Any]) -> None:
    gen = result["load_generator"]
    print(
        f"\nload generator: {gen['name']}, {gen['threads']} threads, {gen['connections']} "
        f"connections, {gen['duration_s']:g} s per phase after {gen['warmup_s']:g} s warm-up; "
        f"{result['machine']['cores']} cores"
    )
    print(
        f"{'phase':<28}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'non-2xx':>8}{'sockerr':>8}"
        f"{'srv cores':>10}{'srv us/req':>11}{'gen cores':>10}"
    )
    labels = {
        "a_healthz": "(a) /healthz [ceiling ref]",
        "b_recommend": "(b) recommendations",
        "c_naive": "(c) naive TF per request",
    }
    for key, label in labels.items():
        r = result["phases"][key]
        print(
            f"{label:<28}{r['rps']:>9.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['errors']:>8}"
            f"{r['socket_errors']:>8}{r['server_cpu_cores']:>10.2f}"
            f"{r['server_cpu_us_per_request']:>11.0f}{r['generator_cpu_cores']:>10.2f}"
        )
    ratios, srv = result["ratios"], result["server"]
    print(
        f"b/a = {ratios['b_over_a']:.2f}   b/c = {ratios['b_over_c']:.1f}   "
        f"server RSS after load = {srv['rss_mb_after_load']} MB "
        f"(naive {srv['naive_rss_mb_after_load']} MB)"
    )
    for t in result["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}  (got {t['value']})")


if __name__ == "__main__":
    sys.exit(main())
