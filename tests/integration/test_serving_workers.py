"""``tracktower serve --workers 2`` with a slow model load: both workers survive it, serve, map
the same artifact files, and any worker's ``/metrics`` counts the requests of both.

The slow load is real GIL starvation, what killed loading workers under uvicorn's supervisor:
a ``sitecustomize`` on the workers' PYTHONPATH holds the GIL (one long C call) for
``HOLD_SECONDS`` when the worker opens the artifact's manifest, so the worker's health-check
thread cannot answer. uvicorn's supervisor, with the health-check timeout of ``HEALTHCHECK``
seconds used here, killed such a worker on every start. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path

import builders
import httpx
import pytest
from servers import running

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")

HEALTHCHECK = 1
HOLD_SECONDS = 3.0
USER_ROUTE = "/v1/users/{user_id}/recommendations"

SLOW_LOAD = '''
"""Test hook: a spawned worker holds the GIL for a while when it opens the manifest."""
import os
import sys
import time

if "--multiprocessing-fork" in sys.argv and os.environ.get("TEST_GIL_HOLD_SECONDS"):
    _held = []

    def _hold(event, args):
        if event != "open" or _held or not str(args[0]).endswith("manifest.json"):
            return
        _held.append(True)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            sum(range(10**7))
            runs.append(time.perf_counter() - start)
        n = int(float(os.environ["TEST_GIL_HOLD_SECONDS"]) / min(runs) * 10**7)
        start = time.perf_counter()
        sum(range(n))  # one C call: the GIL is not released until it returns
        print(f"worker {os.getpid()} held the GIL {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)

    sys.addaudithook(_hold)
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve_command(root: Path) -> tuple[list[str], dict[str, str], int, Path]:
    artifact = builders.write_fake_artifact(root / "artifact", 20, 100, 8, False)
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_LOAD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKTOWER_")}
    paths = [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        TEST_GIL_HOLD_SECONDS=str(HOLD_SECONDS),
        TRACKTOWER_WORKER_HEALTHCHECK_TIMEOUT_SECONDS=str(HEALTHCHECK),
        TRACKTOWER_WORKER_STARTUP_TIMEOUT_SECONDS="120",
        PROMETHEUS_MULTIPROC_DIR=str(root / "stale"),  # left by someone else: never used
    )
    port = _free_port()
    tracktower = str(Path(sys.executable).with_name("tracktower"))
    cmd = [tracktower, "serve", "--model", str(artifact), "--workers", "2", "--port", str(port)]
    return cmd, env, port, artifact


def _scrape(base: str) -> str:
    with httpx.Client(timeout=10) as client:  # a new connection: any worker may answer
        response = client.get(f"{base}/metrics")
    assert response.status_code == 200
    return response.text


def _worker_pids(text: str) -> set[int]:
    """Workers with a model loaded (``tracktower_model_info`` has one series per live worker)."""
    found = re.findall(r'^tracktower_model_info\{[^}]*pid="(\d+)"[^}]*\} 1\.0$', text, re.M)
    return {int(pid) for pid in found}


def _user_requests(text: str) -> float:
    prefix = f'tracktower_http_requests_total{{method="GET",route="{USER_ROUTE}",status="200"}} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def _both_ready(base: str) -> set[int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = _worker_pids(_scrape(base))
        if len(pids) == 2:
            return pids
        time.sleep(0.5)
    pytest.fail("two workers did not both load the model within 120 s")


def _proc(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_text(errors="replace")


def _metrics_dir(pid: int) -> Path:
    entries = _proc(pid, "environ").split("\0")
    (value,) = [e.split("=", 1)[1] for e in entries if e.startswith("PROMETHEUS_MULTIPROC_DIR=")]
    return Path(value)


def _served_by(directory: Path, pid: int) -> float:
    """Requests to the user route counted in one worker's own file."""
    from prometheus_client.multiprocess import MultiProcessCollector

    total = 0.0
    for metric in MultiProcessCollector.merge([str(directory / f"counter_{pid}.db")]):
        for sample in metric.samples:
            if (
                sample.name == "tracktower_http_requests_total"
                and sample.labels.get("route") == USER_ROUTE
            ):
                total += sample.value
    return total


def test_two_workers_survive_a_slow_load_serve_and_share_metrics(tmp_path: Path) -> None:
    cmd, env, port, artifact = _serve_command(tmp_path)
    log = tmp_path / "serve.log"
    with running(cmd, env, log, port) as base:
        pids = _both_ready(base)
        directory = _metrics_dir(min(pids))
        _check_workers(base, log, artifact, pids, directory)
    # Stopped: the private metrics directory is gone, the stale one was never created.
    assert not directory.exists() and not (tmp_path / "stale").exists()


def _check_workers(base: str, log: Path, artifact: Path, pids: set[int], directory: Path) -> None:
    parents = {_proc(pid, "status").split("PPid:")[1].split()[0] for pid in pids}
    assert len(parents) == 1  # both children of the one `tracktower serve`
    assert directory.is_dir() and directory.name.startswith("tracktower-metrics-")

    # A new connection per request, until both workers have answered some.
    sent = 0
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base, timeout=10, limits=limits) as client:
        while sent < 40 or min(_served_by(directory, pid) for pid in pids) == 0:
            response = client.get(f"/v1/users/{builders.user_id(sent % 20)}/recommendations")
            assert response.status_code == 200 and response.json()["source"] == "model"
            sent += 1
            assert sent < 2000, "one worker never answered"
    for _ in range(6):  # whichever worker answers the scrape, it counts both
        assert _user_requests(_scrape(base)) == sent

    # The same workers throughout: none was killed while loading or since.
    time.sleep(2 * HEALTHCHECK + 1)
    assert _worker_pids(_scrape(base)) == pids
    text = log.read_text()
    holds = [float(s) for s in re.findall(r"held the GIL ([\d.]+) s", text)]
    assert len(holds) == 2 and min(holds) > HEALTHCHECK, text  # the load really was slow
    assert "died" not in text and "did not start serving" not in text, text
    assert len(re.findall(r"Child process \[\d+\] serving after", text)) == 2, text

    # The artifact's arrays are file mappings in both workers: one copy, in the page cache.
    for pid in pids:
        maps = _proc(pid, "maps")
        for name in ("track_embeddings.npy", "user_embeddings.npy"):
            assert str(artifact / "arrays" / name) in maps, (pid, name)
