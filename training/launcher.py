"""Multi-worker roles from ``TF_CONFIG``, and ``tracktower train --local-workers N``.

A multi-worker job is N copies of one ``tracktower train`` command, each told its place by the
standard ``TF_CONFIG`` environment variable (a cluster of ``host:port`` addresses and this
process's task in it), as Kubernetes operators, Vertex AI or a hand-written script set it. The
chief (task type ``chief``, or worker 0 when the cluster has no chief) alone talks to MLflow,
exports and registers; see :func:`role`.

The launcher runs such a job on one machine, for trying it out: it picks free loopback ports,
starts the N workers with ``train.strategy=multi_worker``, prefixes their output with
``[wI]``, and exits with the chief's status. Training cannot go on without any of its workers
(every step is a collective operation over all of them): when one fails, the chief's next step
fails too and it ends by itself (see :func:`_wait`); when the chief ends, or the launcher is
interrupted or terminated, the workers still running are stopped: SIGTERM (the chief then ends
its MLflow run KILLED and keeps its checkpoint for ``--resume``), SIGKILL after a grace period.
Each worker also gets SIGTERM from the kernel if the launcher itself dies (Linux), so no orphan
keeps the ports.

Nothing here imports TensorFlow: the launcher process only waits on its children.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from tracktower.features.errors import DataError

log = logging.getLogger(__name__)

ENV_VAR = "TF_CONFIG"
FLAG = "--local-workers"
STRATEGY_OVERRIDE = "train.strategy=multi_worker"
# TensorFlow sizes its thread pools from these (tensorflow/core/util/util.cc); unset, each worker
# would take every core and N workers would oversubscribe the machine N times over.
THREAD_VARS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
# A worker blocked in a collective notices a peer's loss within the coordination service's
# heartbeat timeout (about 10 s), then unwinds: the wait for the chief to end by itself after a
# worker failed, and from SIGTERM to SIGKILL.
GRACE_S = 30.0
POLL_S = 0.2
_PR_SET_PDEATHSIG = 1
_ENTRY = "from tracktower.features.cli import main; main()"

__all__ = [
    "ENV_VAR",
    "FLAG",
    "Role",
    "WorkerLost",
    "free_ports",
    "launch",
    "role",
    "tf_config",
    "worker_argv",
]


class WorkerLost(RuntimeError):
    """A worker of the job stopped (killed, crashed, lost its host), so no step can complete:
    the job ends, its last backup kept for ``--resume``."""


@dataclass(frozen=True)
class Role:
    """This process's place in a multi-worker job: ``task_type`` None when ``TF_CONFIG`` names
    no cluster (a single process, its own chief); ``workers`` counts every training task."""

    task_type: str | None
    index: int
    workers: int
    chief: bool

    @property
    def name(self) -> str:
        return "single process" if self.task_type is None else f"{self.task_type} {self.index}"


def role(environ: Mapping[str, str] | None = None) -> Role:
    """The role ``TF_CONFIG`` gives this process, by TensorFlow's own rule for the chief
    (``multi_worker_util.is_chief``): a ``chief`` task, else worker 0 when there is no chief."""
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not raw:
        return Role(None, 0, 1, True)
    try:
        config = json.loads(raw)
        cluster = dict(config.get("cluster") or {})
        task = dict(config.get("task") or {})
        if not cluster:
            return Role(None, 0, 1, True)
        task_type, index = str(task["type"]), int(task.get("index", 0))
        addresses = list(cluster[task_type])
    except (ValueError, TypeError, KeyError, AttributeError):
        raise DataError(
            f"{ENV_VAR}: expected JSON {{'cluster': {{'worker': ['host:port', ...]}}, 'task': "
            f"{{'type': 'worker', 'index': 0}}}} naming a task of the cluster, got {raw[:200]!r}"
        ) from None
    if task_type not in ("chief", "worker"):
        raise DataError(
            f"{ENV_VAR}: task type {task_type!r} does not train under "
            "MultiWorkerMirroredStrategy; tracktower train runs as a 'chief' or 'worker' task"
        )
    if not 0 <= index < len(addresses):
        raise DataError(f"{ENV_VAR}: task {task_type} {index} is not in the cluster {cluster}")
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    chief = task_type == "chief" or (
        task_type == "worker" and index == 0 and "chief" not in cluster
    )
    return Role(task_type, index, workers, chief)


def tf_config(addresses: Sequence[str], index: int) -> dict[str, Any]:
    """``TF_CONFIG`` for worker ``index`` of a cluster of plain workers (worker 0 is the chief)."""
    return {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}}


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the kernel hands out, all held until all are picked. A port is free
    again once released here, so another process could take it before the worker binds: the
    job then fails to start with "address in use" and is simply started again."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line after the program name, less ``--local-workers N`` (either spelling),
    with ``--set train.strategy=multi_worker`` last so it wins over the user's own ``--set``s."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == FLAG:
            skip = True
        elif not arg.startswith(f"{FLAG}="):
            out.append(arg)
    return [*out, "--set", STRATEGY_OVERRIDE]


def check(workers: int, strategy: str, environ: Mapping[str, str] | None = None) -> None:
    """The flags the launcher refuses, each as one line."""
    if workers < 1:
        raise DataError(f"{FLAG}: expected a number of workers >= 1, got {workers}")
    if strategy not in ("auto", "multi_worker"):
        raise DataError(
            f"{FLAG}: runs train.strategy=multi_worker, but the config sets train.strategy="
            f"{strategy}; drop one of them"
        )
    if (os.environ if environ is None else environ).get(ENV_VAR):
        raise DataError(
            f"{FLAG}: {ENV_VAR} is already set; the launcher makes its own cluster (unset "
            f"{ENV_VAR}, or start each worker yourself without {FLAG})"
        )


def worker_env(base: Mapping[str, str], addresses: Sequence[str], index: int) -> dict[str, str]:
    """The worker's environment: its ``TF_CONFIG``, unbuffered output (it is streamed), and an
    equal share of the cores unless the caller sized TensorFlow's thread pools already."""
    env = dict(base)
    env[ENV_VAR] = json.dumps(tf_config(addresses, index))
    env["PYTHONUNBUFFERED"] = "1"
    share = str(max(1, (os.cpu_count() or 1) // len(addresses)))
    for var in THREAD_VARS:
        env.setdefault(var, share)
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _pump(stream: IO[str], out: IO[str], prefix: str, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"{prefix}{line}")
            out.flush()


def _start(argv: Sequence[str], n: int, procs: list[subprocess.Popen[str]]) -> None:
    """Start the workers into ``procs`` (filled as they start, so an interrupt halfway still
    finds every one started so far to stop)."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(n)]
    cmd = [sys.executable, "-c", _ENTRY, *worker_argv(argv)]
    for index in range(n):
        procs.append(
            subprocess.Popen(
                cmd,
                env=worker_env(os.environ, addresses, index),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,  # a terminal's Ctrl-C reaches the launcher alone
                preexec_fn=_die_with_parent,
            )
        )
        log.info("worker %d (%s): pid %d", index, addresses[index], procs[-1].pid)


def _pumps(procs: Sequence[subprocess.Popen[str]]) -> list[threading.Thread]:
    """Threads copying each worker's stdout and stderr to ours, line by line, prefixed."""
    lock = threading.Lock()
    pumps = [
        threading.Thread(target=_pump, args=(stream, out, f"[w{i}] ", lock), daemon=True)
        for i, proc in enumerate(procs)
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))
    ]
    for pump in pumps:
        pump.start()
    return pumps


def _status(code: int) -> int:
    """A shell's exit status for a child's return code (-9 becomes 137)."""
    return 128 - code if code < 0 else code


def _stop(procs: Sequence[subprocess.Popen[str]], grace: float = GRACE_S) -> None:
    """SIGTERM every live worker's process group, SIGKILL what is left after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        live = [p for p in procs if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _wait(procs: Sequence[subprocess.Popen[str]], grace: float = GRACE_S) -> int:
    """The job's status, which is the chief's. When another worker fails, the chief finds out
    by itself (its next collective op fails within the heartbeat timeout, and it ends with one
    line, exit 4, its backup kept) or needs that worker no more (it was exporting) and finishes;
    only a chief still running ``grace`` seconds later is stopped, and the job then ends with
    the failed worker's status. Workers that finished their share (they exit once ``fit``
    returns, while the chief exports) are not waited for."""
    chief = procs[0]
    failed: tuple[float, int] | None = None  # (when, status) of the first failed worker
    while True:
        if (code := chief.poll()) is not None:
            if code != 0:
                log.error("the chief exited with status %d: stopping the other workers", code)
            return _status(code)
        if failed is None:
            for index, proc in enumerate(procs[1:], start=1):
                if (code := proc.poll()) is not None and code != 0:
                    failed = (time.monotonic(), _status(code))
                    log.error(
                        "worker %d exited with status %d: waiting for the chief to stop "
                        "(restart the command with --resume to continue)",
                        index,
                        failed[1],
                    )
                    break
        elif time.monotonic() - failed[0] > grace:
            log.error("the chief is still running %.0f s later: stopping it", grace)
            return failed[1]
        time.sleep(POLL_S)


def launch(argv: Sequence[str], n: int) -> int:
    """Run the ``train`` command ``argv`` (without the program name) as ``n`` local workers and
    return the job's exit status (see :func:`_wait`); no worker outlives this call."""
    procs: list[subprocess.Popen[str]] = []
    pumps: list[threading.Thread] = []
    try:
        _start(argv, n, procs)
        pumps = _pumps(procs)
        status = _wait(procs)
    except KeyboardInterrupt:
        log.error("interrupted: stopping the workers")
        status = 130
    finally:
        _stop(procs)
        for pump in pumps:
            pump.join(timeout=5)
    return status
