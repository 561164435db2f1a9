#!/usr/bin/env python
"""Hot-swap benchmark: a promotion under load, with no failed request.

Usage (from the repository root):

    nice python benchmarks/hot_swap.py
    python benchmarks/hot_swap.py --duration 20 --move-at 6 --refuse-at 13 --rate 40 \\
        --users 1000 --tracks 2000 --out /tmp/hot_swap.json                  # smoke run

One run, everything on loopback and in a temporary directory (removed at the end):

1. A sqlite MLflow store with three versions of ``tracktower``, registered the way training
   registers them (``tracking.log_model`` in a run, ``register_version``,
   ``record_version_in_manifest``): 1 and 2 are good (fake artifacts from ``tests/builders.py``,
   ``--users`` x ``--tracks``, with a TensorFlow history tower and an exact index), 3 has a ScaNN
   index searching one leaf, whose recall@100 measured at export is far below the 0.95 floor.
   ``@champion`` is version 1.
2. ``tracktower serve --model models:/tracktower@champion`` (one worker) polls the alias every
   ``--poll`` seconds (``TRACKTOWER_MODEL_POLL_SECONDS``). Its log is read live, each line
   time-stamped on arrival, to know when a load starts, when the swap lands and when the old
   version is released.
3. A separate process sends known-user ``GET /v1/users/{id}/recommendations?k=10`` open-loop at
   ``--rate`` requests/s for ``--duration`` s over keep-alive connections (a request waits for a
   free connection when all are busy, and its latency counts from its scheduled time, so a
   stalled server cannot hide behind a stalled client). Each response's model version is read
   from its body.
4. At ``--move-at`` s the alias moves to version 2; ``/v1/model`` is polled every 50 ms until it
   shows it. At ``--refuse-at`` s the alias moves to version 3, which the server must refuse
   (``tracktower_model_swaps_total{outcome="refused"}``) while version 2 keeps serving.

Reported: failed requests (non-200 or no answer within 5 s; target 0); p50/p99 latency in the
steady window (from ``--warmup`` s until the alias first moves) and in the swap window (from the
log line saying the new version is being loaded until 2 s after the old one is released; target
p99 <= 3x steady); the same for the refusal window; the time from the alias move until
``/v1/model`` shows the new version (target <= poll interval + the load time the server logs);
and, per window, the CPU other processes on the machine took (from /proc/stat, less the
server's, the client's and this script's). Results go to ``benchmarks/results/hot_swap.json``
(``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "hot_swap.json"
NAME, ALIAS = "tracktower", "champion"
REQUEST_TIMEOUT = 5.0
CONNECTIONS = 32
AFTER_RELEASE = 2.0  # the swap window ends this long after the old version is released
_VERSION = re.compile(rb'"version": "([^"]*)"')


# --- the load generator (runs in its own process: --client) --------------------------------------


class Pool:
    """Keep-alive HTTP/1.1 connections to the server, at most ``size`` open."""

    def __init__(self, port: int, size: int) -> None:
        self.port, self.size, self.open = port, size, 0
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.idle.empty() and self.open < self.size:
            self.open += 1
            try:
                return await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.open -= 1
                raise
        return await self.idle.get()

    def put(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.idle.put_nowait(conn)

    def drop(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.open -= 1
        conn[1].close()


async def _get(pool: Pool, path: str) -> tuple[int, bytes]:
    conn = await pool.get()
    reader, writer = conn
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
        body = await reader.readexactly(length)
    except BaseException:
        pool.drop(conn)
        raise
    if re.search(rb"(?i)connection: *close", head):
        pool.drop(conn)
    else:
        pool.put(conn)
    return status, body


async def _one(pool: Pool, path: str, scheduled: float, out: list[Any]) -> None:
    start = time.time()
    try:
        status, body = await asyncio.wait_for(_get(pool, path), REQUEST_TIMEOUT)
        found = _VERSION.search(body)
        version = found[1].decode() if found else ""
        error = "" if status == 200 else f"status {status}"
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
        status, version, error = 0, "", type(exc).__name__
    out.append((scheduled, start, time.time(), status, version, error))


async def _drive(args: argparse.Namespace) -> list[Any]:
    rng = random.Random(0)
    pool = Pool(args.port, CONNECTIONS)
    out: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    n = int(args.rate * args.duration)
    for i in range(n):
        scheduled = args.t0 + i / args.rate
        await asyncio.sleep(max(0.0, scheduled - time.time()))
        path = f"/v1/users/u{rng.randrange(args.users):05d}/recommendations?k=10"
        tasks.append(asyncio.create_task(_one(pool, path, scheduled, out)))
    await asyncio.gather(*tasks)
    return out


def client_main(args: argparse.Namespace) -> None:
    out = asyncio.run(_drive(args))
    Path(args.client_out).write_text(json.dumps(out))


# --- the registry and the server -----------------------------------------------------------------


def build_registry(root: Path, users: int, tracks: int, dim: int) -> tuple[str, float]:
    """The store with versions 1-3 (see the module); returns its URI and the seconds it took."""
    import mlflow
    from mlflow import MlflowClient

    sys.path.insert(0, str(REPO / "tests"))
    from builders import write_fake_artifact

    from tracktower.training import tracking

    start = time.monotonic()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("hot-swap", artifact_location=str(root / "art"))
    client = MlflowClient(uri)
    bad = {"index_backend": "scann", "index_params": {"leaves_to_search": 1}}
    for version, extra in (("1", {}), ("2", {}), ("3", bad)):
        # Known users' top 100 precomputed, as the real export does by default
        # (index.known_top_k): a new version serves them from its lists at once, not from a cold
        # cache of searches.
        artifact = write_fake_artifact(
            root / f"artifact{version}",
            users,
            tracks,
            dim,
            True,
            seed=int(version),
            known_top_k=100,
            **extra,
        )
        with mlflow.start_run(experiment_id=experiment) as run:
            tracking.log_model(artifact)
        model = tracking.logged_model(client, client.get_run(run.info.run_id))
        got = tracking.register_version(client, model, NAME)
        tracking.record_version_in_manifest(client, model, NAME, got)
        assert got == version, (got, version)
    client.set_registered_model_alias(NAME, ALIAS, "1")
    return uri, time.monotonic() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """``tracktower serve`` with its output read live; ``lines`` are (arrival time, text)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip()))
            self.log.write(line)
            self.log.flush()

    def first(self, pattern: str, after: float = 0.0) -> tuple[float, re.Match[str]] | None:
        for at, line in list(self.lines):
            found = re.search(pattern, line)
            if at >= after and found:
                return at, found
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        self.log.close()


class CpuSampler:
    """Every 0.25 s: the machine's busy CPU time (/proc/stat) and this benchmark's own processes'
    (server, client, this one), so each window can say how much CPU other processes took."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, float, float]] = []  # (time, busy s, ours s)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.stop.wait(0.25):
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
            ours = 0
            for pid in self.pids:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        stat = f.read().rsplit(")", 1)[1].split()
                    ours += int(stat[11]) + int(stat[12]) + int(stat[13]) + int(stat[14])
                except OSError:
                    pass
            self.samples.append((time.time(), busy / tick, ours / tick))

    def others(self, lo: float, hi: float) -> float | None:
        """CPU cores other processes used on average in [lo, hi)."""
        inside = [s for s in self.samples if lo <= s[0] < hi]
        if len(inside) < 2:
            return None
        (t0, b0, o0), (t1, b1, o1) = inside[0], inside[-1]
        return round(max(0.0, (b1 - b0) - (o1 - o0)) / (t1 - t0), 2)


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def wait_ready(base: str, server: Server, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        if server.proc.poll() is not None:
            raise SystemExit(f"server exited early; log: {server.log.name}")
        if fetch(f"{base}/readyz")[0] == 200:
            return time.monotonic() - start
        time.sleep(0.25)
    raise SystemExit(f"server not ready after {timeout:g} s; log: {server.log.name}")


def model_version(base: str) -> str | None:
    status, body = fetch(f"{base}/v1/model")
    return json.loads(body)["version"] if status == 200 else None


def refusals(base: str) -> float:
    found = re.search(
        r'tracktower_model_swaps_total\{outcome="refused"\} (\S+)', fetch(f"{base}/metrics")[1]
    )
    return float(found[1]) if found else 0.0


# --- the run -------------------------------------------------------------------------------------


def sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.time()))


def move(uri: str, version: str) -> float:
    from mlflow import MlflowClient

    MlflowClient(uri).set_registered_model_alias(NAME, ALIAS, version)
    return time.time()


def promote_and_watch(uri: str, base: str, t0: float, args: argparse.Namespace) -> dict[str, Any]:
    """Move the alias to 2, then to 3, and watch ``/v1/model`` and ``/metrics``."""
    sleep_until(t0 + args.move_at)
    moved = move(uri, "2")
    visible = None
    while time.time() < moved + 60:
        if model_version(base) == "2":
            visible = time.time()
            break
        time.sleep(0.05)
    sleep_until(t0 + args.refuse_at)
    bad_moved = move(uri, "3")
    refused, seen = None, set()
    while time.time() < bad_moved + 60:
        seen.add(model_version(base))
        if refusals(base) >= 1:
            refused = time.time()
            break
        time.sleep(0.25)
    seen.add(model_version(base))
    return {
        "moved": moved,
        "visible": visible,
        "bad_moved": bad_moved,
        "refused": refused,
        "versions_during_refusal": sorted(v or "none" for v in seen),
    }


def latency(rows: list[Any], lo: float, hi: float) -> dict[str, Any]:
    """p50/p99/max in ms of requests scheduled in [lo, hi): from schedule and from send."""
    sel = [r for r in rows if lo <= r[0] < hi and r[3] == 200]
    if not sel:
        return {"requests": 0}
    total = np.array([r[2] - r[0] for r in sel]) * 1e3
    sent = np.array([r[2] - r[1] for r in sel]) * 1e3
    return {
        "requests": len(sel),
        "seconds": round(hi - lo, 2),
        "p50_ms": round(float(np.percentile(total, 50)), 2),
        "p99_ms": round(float(np.percentile(total, 99)), 2),
        "max_ms": round(float(total.max()), 2),
        "p99_from_send_ms": round(float(np.percentile(sent, 99)), 2),
    }


def server_events(server: Server) -> dict[str, Any]:
    """When the server began loading, swapped, released and refused, from its log lines."""
    load = server.first(r"moved to version 2 .*loading it")
    swapped = server.first(
        r"swapped tracktower version \S+ -> 2 \(download, load and checks ([\d.]+) s\)"
    )
    released = server.first(r"released version 1 \(a collection of (\d+) objects, ([\d.]+) ms\)")
    bad_load = server.first(r"moved to version 3 .*loading it")
    refused = server.first(r"refused tracktower version 3: (.*); still serving")
    return {
        "load_started": load[0] if load else None,
        "swapped": swapped[0] if swapped else None,
        "load_seconds": float(swapped[1][1]) if swapped else None,
        "released": released[0] if released else None,
        "release_collected_objects": int(released[1][1]) if released else None,
        "release_collection_ms": float(released[1][2]) if released else None,
        "bad_load_started": bad_load[0] if bad_load else None,
        "refused_at": refused[0] if refused else None,
        "refusal_reason": refused[1][1] if refused else None,
    }


def summarise(
    rows: list[Any],
    t0: float,
    watch: dict[str, Any],
    events: dict[str, Any],
    cpu: CpuSampler,
    args: argparse.Namespace,
) -> dict[str, Any]:
    failed = [r for r in rows if r[3] != 200]
    steady = latency(rows, t0 + args.warmup, watch["moved"])
    steady["other_cpu_cores"] = cpu.others(t0 + args.warmup, watch["moved"])
    swap_lo = events["load_started"] or watch["moved"]
    swap_hi = (events["released"] or events["swapped"] or swap_lo) + AFTER_RELEASE
    swap = latency(rows, swap_lo, swap_hi)
    swap["other_cpu_cores"] = cpu.others(swap_lo, swap_hi)
    refuse_lo = events["bad_load_started"] or watch["bad_moved"]
    refuse_hi = (events["refused_at"] or refuse_lo) + AFTER_RELEASE
    refuse = latency(rows, refuse_lo, refuse_hi)
    refuse["other_cpu_cores"] = cpu.others(refuse_lo, refuse_hi)
    after = [
        r for r in rows if r[3] == 200 and events["refused_at"] and r[0] >= events["refused_at"]
    ]
    visible = watch["visible"] - watch["moved"] if watch["visible"] else None
    bound = args.poll + (events["load_seconds"] or 0.0)
    ratio = swap["p99_ms"] / steady["p99_ms"] if swap.get("requests") else None
    return {
        "requests": len(rows),
        "achieved_rate": round(len(rows) / args.duration, 1),
        "failed": len(failed),
        "failures": sorted({r[5] for r in failed}),
        "responses_by_version": {
            v: sum(1 for r in rows if r[4] == v) for v in sorted({r[4] for r in rows})
        },
        "steady": steady,
        "swap_window": swap,
        "swap_p99_over_steady": round(ratio, 2) if ratio else None,
        "whole_move_to_visible_plus_5s": latency(
            rows, watch["moved"], (watch["visible"] or watch["moved"]) + 5
        ),
        "refusal_window": refuse,
        "alias_move_to_model_visible_s": round(visible, 2) if visible else None,
        "visible_bound_s": round(bound, 2),
        "alias_move_to_refusal_s": round(events["refused_at"] - watch["bad_moved"], 2)
        if events["refused_at"]
        else None,
        "versions_served_after_refusal": sorted({r[4] for r in after}),
        "targets": {
            "zero_failed": not failed,
            "swap_p99_within_3x_steady": bool(ratio is not None and ratio <= 3.0),
            "visible_within_poll_plus_load": bool(visible is not None and visible <= bound + 0.1),
            "bad_version_refused": bool(events["refusal_reason"])
            and watch["versions_during_refusal"] == ["2"],
        },
    }


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    load_before = os.getloadavg()
    uri, setup_seconds = build_registry(tmp, args.users, args.tracks, args.dim)
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "TRACKTOWER_TRACKING_URI": uri,
        "TRACKTOWER_MODEL_POLL_SECONDS": str(args.poll),
        "TRACKTOWER_MODEL_CACHE_DIR": str(tmp / "cache"),
        "TRACKTOWER_WORKERS": "1",
    }
    tt = Path(sys.executable).with_name("tracktower")
    cmd = [
        str(tt) if tt.exists() else "tracktower",
        "serve",
        "--model",
        f"models:/{NAME}@{ALIAS}",
        "--port",
        str(port),
    ]
    server = Server(cmd, env, tmp / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(base, server, 180)
        t0 = time.time() + 2
        client_out = tmp / "client.json"
        client = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                "--port",
                str(port),
                "--t0",
                repr(t0),
                "--rate",
                str(args.rate),
                "--duration",
                str(args.duration),
                "--users",
                str(args.users),
                "--client-out",
                str(client_out),
            ]
        )
        cpu = CpuSampler([server.proc.pid, client.pid, os.getpid()])
        watch = promote_and_watch(uri, base, t0, args)
        if client.wait(timeout=args.duration + 120) != 0:
            raise SystemExit("load generator failed")
        cpu.stop.set()
        rows = json.loads(client_out.read_text())
    finally:
        server.stop()
    events = server_events(server)
    summary = summarise(rows, t0, watch, events, cpu, args)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "config": {
            k: v
            for k, v in vars(args).items()
            if k
            in (
                "rate",
                "duration",
                "poll",
                "users",
                "tracks",
                "dim",
                "move_at",
                "refuse_at",
                "warmup",
            )
        },
        "registry_setup_seconds": round(setup_seconds, 1),
        "time_to_ready_s": round(ready, 1),
        "server": {
            k: (round(v - t0, 2) if isinstance(v, float) and v > 1e9 else v)
            for k, v in events.items()
        },
        "alias_moves_s": {
            "to_2": round(watch["moved"] - t0, 2),
            "to_3": round(watch["bad_moved"] - t0, 2),
        },
        **summary,
    }


def table(result: dict[str, Any]) -> str:
    s, w, r = result["steady"], result["swap_window"], result["refusal_window"]
    rows = [
        (
            "load",
            f"{result['achieved_rate']} req/s for {result['config']['duration']} s, "
            f"{result['requests']} known-user GETs (k=10), one worker",
        ),
        ("failed requests", str(result["failed"])),
        (
            "steady p50 / p99",
            f"{s['p50_ms']} / {s['p99_ms']} ms ({s['requests']} requests; other processes "
            f"{s['other_cpu_cores']} cores)",
        ),
        (
            "swap window p50 / p99",
            f"{w.get('p50_ms')} / {w.get('p99_ms')} ms ({w.get('requests')} requests, "
            f"{result['swap_p99_over_steady']}x steady p99; other processes "
            f"{w['other_cpu_cores']} cores)",
        ),
        (
            "refusal window p50 / p99",
            f"{r.get('p50_ms')} / {r.get('p99_ms')} ms ({r.get('requests')} requests; other "
            f"processes {r['other_cpu_cores']} cores)",
        ),
        (
            "alias move -> /v1/model shows it",
            f"{result['alias_move_to_model_visible_s']} s "
            f"(poll {result['config']['poll']} s + load "
            f"{result['server']['load_seconds']} s)",
        ),
        (
            "old version released",
            f"collection of {result['server']['release_collected_objects']} objects, "
            f"{result['server']['release_collection_ms']} ms",
        ),
        (
            "bad version",
            f"refused {result['alias_move_to_refusal_s']} s after the move: "
            f"{result['server']['refusal_reason']}",
        ),
    ]
    out = ["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rate", type=float, default=110.0, help="requests per second (open loop)")
    p.add_argument("--duration", type=float, default=75.0, help="seconds of load")
    p.add_argument("--move-at", type=float, default=20.0, help="alias -> version 2 at this second")
    p.add_argument("--refuse-at", type=float, default=45.0, help="alias -> version 3 (bad)")
    p.add_argument(
        "--warmup", type=float, default=5.0, help="seconds left out of the steady window"
    )
    p.add_argument("--poll", type=float, default=2.0, help="TRACKTOWER_MODEL_POLL_SECONDS")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--tracks", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    p.add_argument("--client-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.client and not 0 < args.warmup < args.move_at < args.refuse_at < args.duration:
        p.error("need 0 < --warmup < --move-at < --refuse-at < --duration")
    return args


def main() -> None:
    args = parse()
    if args.client:
        client_main(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="hot-swap-"))
    try:
        result = run(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(table(result))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
