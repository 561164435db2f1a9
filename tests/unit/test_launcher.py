"""Multi-worker roles from TF_CONFIG and the local launcher's pieces (no subprocess, no
TensorFlow: real processes are in tests/integration/test_multi_worker.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from tracktower.features.errors import DataError
from tracktower.training import launcher
from tracktower.training.launcher import Role


def _env(cluster: dict[str, list[str]], task_type: str, index: int) -> dict[str, str]:
    return {
        "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})
    }


WORKERS = {"worker": ["127.0.0.1:1000", "127.0.0.1:1001", "127.0.0.1:1002"]}
WITH_CHIEF = {"chief": ["127.0.0.1:999"], **WORKERS}


# TF_CONFIG construction.


def test_the_launchers_tf_config_is_a_cluster_of_workers_with_this_ones_index() -> None:
    addresses = ["127.0.0.1:5000", "127.0.0.1:5001"]
    config = launcher.tf_config(addresses, 1)
    assert config == {
        "cluster": {"worker": ["127.0.0.1:5000", "127.0.0.1:5001"]},
        "task": {"type": "worker", "index": 1},
    }
    # What it makes of its own output: worker 0 leads, the other follows.
    for index, chief in ((0, True), (1, False)):
        env = {"TF_CONFIG": json.dumps(launcher.tf_config(addresses, index))}
        assert launcher.role(env) == Role("worker", index, 2, chief)


def test_each_worker_gets_its_tf_config_and_a_share_of_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 8)
    addresses = ["127.0.0.1:5000", "127.0.0.1:5001"]
    env = launcher.worker_env({"PATH": "/bin"}, addresses, 1)
    assert json.loads(env["TF_CONFIG"]) == launcher.tf_config(addresses, 1)
    assert env["PATH"] == "/bin" and env["PYTHONUNBUFFERED"] == "1"
    assert env["TF_NUM_INTRAOP_THREADS"] == env["TF_NUM_INTEROP_THREADS"] == "4"
    # The caller's own sizing wins; never fewer than one thread.
    env = launcher.worker_env({"TF_NUM_INTRAOP_THREADS": "3"}, addresses * 5, 0)
    assert env["TF_NUM_INTRAOP_THREADS"] == "3" and env["TF_NUM_INTEROP_THREADS"] == "1"


def test_free_ports_are_distinct_loopback_ports() -> None:
    ports = launcher.free_ports(4)
    assert len(set(ports)) == 4 and all(0 < p < 65536 for p in ports)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--local-workers", "2", "--resume", "--set", "train.epochs=3"],
        ["train", "--local-workers=2", "--resume", "--set", "train.epochs=3"],
        ["train", "--resume", "--set", "train.epochs=3", "--local-workers", "2"],
    ],
)
def test_workers_run_the_same_command_without_the_flag_as_multi_worker(argv: list[str]) -> None:
    assert launcher.worker_argv(argv) == [
        "train", "--resume", "--set", "train.epochs=3", "--set", "train.strategy=multi_worker",
    ]  # fmt: skip


# Chief detection.


def test_no_tf_config_is_a_single_process_that_is_its_own_chief() -> None:
    assert launcher.role({}) == Role(None, 0, 1, True)
    assert launcher.role({"TF_CONFIG": "  "}).chief
    assert launcher.role({"TF_CONFIG": json.dumps({"cluster": {}})}) == Role(None, 0, 1, True)
    assert launcher.role({}).name == "single process"


@pytest.mark.parametrize(
    ("cluster", "task_type", "index", "chief"),
    [
        (WORKERS, "worker", 0, True),  # no chief task: worker 0 leads
        (WORKERS, "worker", 2, False),
        (WITH_CHIEF, "chief", 0, True),
        (WITH_CHIEF, "worker", 0, False),  # a chief task exists: worker 0 is an ordinary one
    ],
)
def test_the_chief_is_the_chief_task_else_worker_0(
    cluster: dict[str, list[str]], task_type: str, index: int, chief: bool
) -> None:
    role = launcher.role(_env(cluster, task_type, index))
    assert role == Role(task_type, index, len(cluster.get("chief", [])) + 3, chief)
    assert role.name == f"{task_type} {index}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", r"^TF_CONFIG: expected JSON"),
        (json.dumps({"cluster": WORKERS}), r"^TF_CONFIG: expected JSON"),  # no task
        (json.dumps({"cluster": WORKERS, "task": {"type": "ps"}}), r"^TF_CONFIG: expected JSON"),
        (json.dumps(_env(WORKERS, "worker", 3)["TF_CONFIG"]), r"^TF_CONFIG: expected JSON"),
    ],
)
def test_a_bad_tf_config_is_one_line(raw: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        launcher.role({"TF_CONFIG": raw})
    assert "\n" not in str(err.value)


def test_tasks_outside_the_cluster_or_that_do_not_train_are_refused() -> None:
    with pytest.raises(DataError, match=r"^TF_CONFIG: task worker 3 is not in the cluster"):
        launcher.role(_env(WORKERS, "worker", 3))
    evaluator = {**WORKERS, "evaluator": ["127.0.0.1:2000"]}
    with pytest.raises(DataError, match=r"task type 'evaluator' does not train"):
        launcher.role(_env(evaluator, "evaluator", 0))


# Bad flags.


@pytest.mark.parametrize(
    ("workers", "strategy", "environ", "message"),
    [
        (0, "auto", {}, r"^--local-workers: expected a number of workers >= 1, got 0$"),
        (-2, "multi_worker", {}, r"got -2"),
        (2, "mirrored", {}, r"train\.strategy=mirrored; drop one of them$"),
        (2, "cpu", {}, r"train\.strategy=cpu"),
        (2, "auto", {"TF_CONFIG": "{}"}, r"^--local-workers: TF_CONFIG is already set"),
    ],
)
def test_bad_launcher_flags_are_refused(
    workers: int, strategy: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        launcher.check(workers, strategy, environ)


def test_good_launcher_flags_pass() -> None:
    launcher.check(1, "auto", {})
    launcher.check(3, "multi_worker", {"TF_CONFIG": ""})


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--local-workers", "0"], "--local-workers: expected a number of workers >= 1"),
        (["--local-workers", "2", "--set", "train.strategy=mirrored"], "train.strategy=mirrored"),
    ],
)
def test_the_train_command_refuses_bad_launcher_flags_in_one_line(
    monkeypatch: pytest.MonkeyPatch, flags: list[str], needle: str
) -> None:
    from tracktower.training.cli import app

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setattr(launcher, "launch", pytest.fail)  # nothing may start
    result = CliRunner().invoke(app, ["train", "--interactions", "missing.parquet", *flags])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


# The job's status.


@dataclass
class _Proc:
    """A worker process as ``_wait`` sees it: None while running, then its return code."""

    codes: list[int | None]

    def poll(self) -> int | None:
        return self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]


def test_the_job_ends_with_the_chief_when_it_ends_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "POLL_S", 0.0)
    # The other worker finished its fit and exited 0 while the chief still exports.
    procs = [_Proc([None, None, 0]), _Proc([0])]
    assert launcher._wait(procs) == 0  # type: ignore[arg-type]
    assert launcher._wait([_Proc([None, 3]), _Proc([None])]) == 3  # type: ignore[arg-type]
    assert launcher._wait([_Proc([-15])]) == 143  # type: ignore[arg-type]


def test_after_a_worker_fails_the_job_still_ends_with_the_chiefs_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launcher, "POLL_S", 0.0)
    # The chief notices the loss at its next collective and exits 4 (WorkerLost) ...
    procs = [_Proc([None, None, None, 4]), _Proc([None, -9])]
    assert launcher._wait(procs) == 4  # type: ignore[arg-type]
    # ... or it was exporting, needed the worker no more, and finishes.
    assert launcher._wait([_Proc([None, None, 0]), _Proc([1])]) == 0  # type: ignore[arg-type]


def test_a_chief_that_does_not_stop_after_a_worker_failed_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launcher, "POLL_S", 0.0)
    procs = [_Proc([None]), _Proc([None]), _Proc([None, -9])]
    assert launcher._wait(procs, grace=0.05) == 137  # type: ignore[arg-type]
