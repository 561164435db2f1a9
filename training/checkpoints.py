"""Per-run training checkpoints in a persistent directory, and their retention.

Each training run backs its state up (Keras's ``BackupAndRestore``, after every epoch) into its
own directory ``<root>/<key>-<run id>``. ``key`` hashes the config (less what changes nothing the
run learns) with the dataset fingerprint and ``--final``, so the same command run again can find
the directories of its earlier runs to resume from; the run id tells concurrent runs of the same
command apart and names the MLflow run to reopen. Each directory holds an ``owner.json`` (host, pid
and the pid's start time, as the MLflow run's tags record them) so that the sweep at the next
``train`` can tell a dead run's state from a live one's.

Retention: a run that finishes removes its directory; one that dies keeps it (a ``kill -9`` leaves
it no choice) for resuming, until the next ``train`` on this host sweeps the state of dead runs
beyond the newest ``keep_failed`` or older than ``max_age_days``. A live run's directory, or one
owned by another host (its process cannot be checked from here), is never removed.

Resuming (``tracktower train --resume``): :func:`claim_newest` picks the newest directory of a
dead run with the same key that holds a backed-up epoch and makes it this process's by
rewriting its owner record (atomically, under a lock on the root that :func:`sweep` takes too,
so two resuming processes never both take one directory and a sweep never removes one being
taken); the caller then reopens the MLflow run its name carries.

A crash mid-backup is never restored as good: TensorFlow writes a checkpoint under a temporary
prefix, renames it into place, and only then atomically rewrites the ``checkpoint`` state file
that restoring reads, so a torn write leaves the previous epoch's state current.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tracktower.features.errors import DataError
from tracktower.training import tracking
from tracktower.training.config import CheckpointConfig, ExperimentConfig, TrainConfig

log = logging.getLogger(__name__)

ENV_VAR = "TRACKTOWER_CHECKPOINT_DIR"
OWNER_FILE = "owner.json"
LOCK_FILE = ".lock"
# BackupAndRestore's CheckpointManager state file: present once an epoch has been backed up, and
# removed (with the whole "chief" folder) when fit completes.
STATE_FILE = Path("chief") / "checkpoint"
DIR_TAG, KEY_TAG = "tracktower.checkpoint_dir", "tracktower.checkpoint_key"
_NAME = re.compile(r"(?P<key>[0-9a-f]{12})-(?P<run>[0-9A-Za-z]+)")
_DAY = 86_400.0

__all__ = [
    "DIR_TAG",
    "ENV_VAR",
    "KEY_TAG",
    "Owner",
    "claim",
    "claim_newest",
    "default_root",
    "for_run",
    "has_state",
    "prepare_root",
    "read_owner",
    "resumable",
    "run_key",
    "sweep",
]


@dataclass(frozen=True)
class Owner:
    """The process that writes a run's checkpoints, and the run they belong to."""

    host: str
    pid: int
    pid_start: str
    run_id: str
    key: str

    @classmethod
    def current(cls, run_id: str, key: str) -> Owner:
        tags = tracking._owner_tags()
        return cls(
            host=tags[tracking.HOST_TAG],
            pid=int(tags[tracking.PID_TAG]),
            pid_start=tags[tracking.PID_START_TAG],
            run_id=run_id,
            key=key,
        )

    def alive(self) -> bool:
        """True unless the owner is known to be gone: one on another host cannot be checked."""
        if self.host != socket.gethostname():
            return True
        return tracking._alive(self.pid, self.pid_start)


def default_root() -> Path:
    """``$XDG_CACHE_HOME/tracktower/checkpoints``, else under ``~/.cache``: persistent, per user,
    and not the temp dir, which a reboot or a temp cleaner empties."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tracktower" / "checkpoints"


def prepare_root(train: TrainConfig) -> Path | None:
    """The checkpoint root for this run, created and proven writable; None when checkpoints are
    off. Called before any data is read, so a bad directory fails in a second with one line
    naming the setting, not after the first epoch."""
    policy = train.checkpoints
    if not policy.enabled:
        return None
    if train.strategy == "cpu":
        log.warning("no checkpoints: Keras's BackupAndRestore cannot back up train.strategy=cpu")
        return None
    where, path = _configured(policy)
    path = path.expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise DataError(
            f"{where}: cannot write checkpoints to {path} ({exc.strerror or exc}); name a "
            "writable directory, or set train.checkpoints.enabled=false"
        ) from None
    return path


def _configured(policy: CheckpointConfig) -> tuple[str, Path]:
    """The root and the setting it came from: the config, then the environment, then the
    default (named so an error says what to change)."""
    if policy.dir is not None:
        return "train.checkpoints.dir", policy.dir
    if env := os.environ.get(ENV_VAR):
        return ENV_VAR, Path(env)
    return f"train.checkpoints.dir (default, or ${ENV_VAR})", default_root()


def run_key(cfg: ExperimentConfig, fingerprint: str, *, final: bool, workers: int = 1) -> str:
    """Twelve hex digits naming what a run computes: the config, less its run name and these
    checkpoint settings, the dataset fingerprint, ``--final`` and the number of workers (the
    global batch and the learning rate follow it, so a run is resumed only by as many)."""
    config = cfg.model_dump(mode="json", exclude={"run_name": True, "train": {"checkpoints"}})
    what = {"config": config, "data": fingerprint, "final": final}
    if workers != 1:  # keys of single-process runs stay as they were
        what["workers"] = workers
    text = json.dumps(what, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_owner(path: Path) -> Owner | None:
    """The run directory's owner record; None when it is absent or unreadable."""
    try:
        raw = json.loads((path / OWNER_FILE).read_text(encoding="utf-8"))
        return Owner(**{k: raw[k] for k in Owner.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def has_state(path: Path) -> bool:
    """Whether a backed-up epoch is there to resume from."""
    return (path / STATE_FILE).is_file()


def _last_written(path: Path) -> float:
    """Newest modification time of the directory and its backup: the backup lives one level
    down, so the run directory's own time stops at its creation."""
    times = [path.stat().st_mtime]
    for sub in (path / OWNER_FILE, path / STATE_FILE):
        with contextlib.suppress(OSError):
            times.append(sub.stat().st_mtime)
    return max(times)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on ``root/.lock``, a regular file opened for writing: NFS, where a
    checkpoint root shared by several hosts lives, implements flock as a byte-range lock,
    which a directory (read-only) cannot take. The sweep ignores the file (not a run's name)."""
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def resumable(root: Path | None, key: str) -> list[Path]:
    """Directories of dead runs with ``key`` that hold a backed-up epoch, newest first."""
    found: list[tuple[float, Path]] = []
    for path in root.iterdir() if root is not None and root.is_dir() else ():
        match = _NAME.fullmatch(path.name)
        if match is None or match["key"] != key or not has_state(path):
            continue
        owner = read_owner(path)
        with contextlib.suppress(OSError):
            if owner is not None and owner.key == key and not owner.alive():
                found.append((_last_written(path), path))
    return [path for _, path in sorted(found, reverse=True)]


def claim(path: Path) -> Owner | None:
    """Make a dead run's directory this process's (same run id and key); None when it is gone
    or no longer dead (taken by another process meanwhile)."""
    with _locked(path.parent):
        owner = read_owner(path)
        if owner is None or owner.alive() or not has_state(path):
            return None
        mine = Owner.current(owner.run_id, owner.key)
        _write_owner(path, mine)
    log.info("checkpoints: %s (resuming run %s)", path, mine.run_id)
    return mine


def claim_newest(root: Path | None, key: str) -> Owner | None:
    """The newest resumable directory for ``key`` (see :func:`resumable`), claimed."""
    for path in resumable(root, key):
        if (owner := claim(path)) is not None:
            return owner
    return None


def sweep(root: Path, policy: CheckpointConfig, *, now: float | None = None) -> list[Path]:
    """Remove the run directories of dead runs beyond the newest ``policy.keep_failed`` or older
    than ``policy.max_age_days``; returns what was removed.

    A directory with no owner record is one whose creation was cut short (the record is written
    a moment after the directory) and goes only once older than the age limit.
    """
    if not root.is_dir():
        return []
    with _locked(root):
        return _sweep(root, policy, time.time() if now is None else now)


def _sweep(root: Path, policy: CheckpointConfig, now: float) -> list[Path]:
    max_age = policy.max_age_days * _DAY
    dead: list[tuple[float, Path]] = []
    doomed: list[Path] = []
    for path in root.iterdir():
        if not _NAME.fullmatch(path.name) or not path.is_dir():
            continue
        with contextlib.suppress(OSError):  # removed meanwhile by a concurrent sweep
            owner, written = read_owner(path), _last_written(path)
            if owner is None and now - written > max_age:
                doomed.append(path)
            elif owner is not None and not owner.alive():
                dead.append((written, path))
    dead.sort(reverse=True)
    doomed += [p for i, (t, p) in enumerate(dead) if i >= policy.keep_failed or now - t > max_age]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed the checkpoints of a dead run: %s", path)
    return doomed


def _write_owner(path: Path, owner: Owner) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path, suffix=".tmp", delete=False) as tmp:
        json.dump(asdict(owner), tmp)
    os.replace(tmp.name, path / OWNER_FILE)  # never a half-written record


def _create(root: Path, owner: Owner) -> Path:
    path = root / f"{owner.key}-{owner.run_id}"
    path.mkdir()
    _write_owner(path, owner)
    return path


@contextlib.contextmanager
def for_run(
    root: Path | None, policy: CheckpointConfig, key: str, run_id: str, *, resumed: bool = False
) -> Iterator[Path | None]:
    """The run's checkpoint directory for the duration of its training (None when ``root`` is).

    Dead runs' directories are swept first. ``resumed``: the directory exists, already
    :func:`claim`ed by this process, and Keras restores its backup. On success the directory is
    removed; on any failure or interrupt it is kept if it holds a backed-up epoch to resume
    from, removed otherwise.
    """
    if root is None:
        yield None
        return
    if resumed:  # claimed first: the sweep sees it as a live run's
        path = root / f"{key}-{run_id}"
        if read_owner(path) != Owner.current(run_id, key):
            raise RuntimeError(f"checkpoint directory {path} was not claimed by this process")
        sweep(root, policy)
    else:
        sweep(root, policy)
        path = _create(root, Owner.current(run_id, key))
        log.info("checkpoints: %s", path)
    try:
        yield path
    except BaseException:
        if has_state(path):
            log.info("checkpoints kept for resuming: %s", path)
        else:
            shutil.rmtree(path, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
