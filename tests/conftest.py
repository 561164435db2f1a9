"""Shared fixtures: the licensed real data next to the repository, and a tiny in-code dataset.

Training checkpoints (``train.checkpoints``) and the server's downloaded registry models
(``model_cache_dir``) default to the user's cache directory; the tests, their subprocesses
included, write them to a directory of their own, removed at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"
_CHECKPOINTS = tempfile.mkdtemp(prefix="tracktower-tests-cache-")
os.environ["TRACKTOWER_CHECKPOINT_DIR"] = str(Path(_CHECKPOINTS) / "checkpoints")
os.environ["TRACKTOWER_MODEL_CACHE_DIR"] = str(Path(_CHECKPOINTS) / "models")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_CHECKPOINTS, ignore_errors=True)


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """Handlers added during a test are removed after it: the CLI's ``basicConfig`` and
    ``uvicorn.Config`` bind handlers to the sys.stderr of the moment, which is pytest's (or
    CliRunner's) capture of that one test, closed afterwards; a later test logging through them
    would write to a closed stream and break pytest's own reporting."""
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (real MPD/MSD samples; licensed, never copied into the repo).

    Missing data skips locally but fails in CI, where silently skipping would hide that the tests
    against real data never ran.
    """
    path = SHARED_DATA.resolve()
    if not (path / "mpd-subset").is_dir() or not (path / "msd-sample").is_dir():
        message = f"shared data not found at {path}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def tiny_interactions() -> pd.DataFrame:
    """Four users, six tracks; u1 and u2 share taste, u3 is light, u4 has exactly five rows."""
    rows = [
        ("u1", "t1", 3.0, 100),
        ("u1", "t2", 1.0, 101),
        ("u1", "t3", 2.0, 102),
        ("u1", "t4", 1.0, 103),
        ("u1", "t5", 5.0, 104),
        ("u1", "t6", 1.0, 105),
        ("u2", "t1", 1.0, 200),
        ("u2", "t2", 2.0, 201),
        ("u2", "t3", 1.0, 202),
        ("u2", "t4", 4.0, 203),
        ("u2", "t5", 1.0, 204),
        ("u2", "t6", 1.0, 205),
        ("u3", "t1", 1.0, 300),
        ("u3", "t6", 2.0, 301),
        ("u4", "t2", 1.0, 400),
        ("u4", "t3", 1.0, 401),
        ("u4", "t4", 1.0, 402),
        ("u4", "t5", 1.0, 403),
        ("u4", "t6", 1.0, 404),
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "track_id", "weight", "timestamp"])
    return frame.astype({"user_id": "str", "track_id": "str", "timestamp": "int64"})


@pytest.fixture
def _cli_globals_restored() -> Iterator[None]:
    """``tune`` and ``train --tune-trials`` set MLflow's tracking URI and route Optuna's log
    through ``logging``, process-wide; the tests that run them get the defaults back after."""
    import mlflow
    import optuna

    yield
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None = back to env/default
    optuna.logging.disable_propagation()
    optuna.logging.enable_default_handler()
