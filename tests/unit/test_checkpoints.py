"""Per-run checkpoint directories: where they go, what identifies them, and retention (no
TensorFlow, no MLflow store: run directories are built by hand, as a training run leaves them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tracktower.features.errors import DataError
from tracktower.training import checkpoints, stages, tracking
from tracktower.training.checkpoints import Owner
from tracktower.training.config import CheckpointConfig, TrainConfig, config_from_mapping

RUN_A, RUN_B = "a" * 32, "b" * 32
DAY = 86_400.0


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(checkpoints.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _dead_pid() -> int:
    """The pid of a process that has exited (and was waited for)."""
    code = "import os; print(os.getpid())"
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(proc.stdout)


def _owner(
    run_id: str,
    *,
    pid: int | None = None,
    start: str | None = None,
    host: str | None = None,
    key: str = "0123456789ab",
) -> Owner:
    """This process by default; another pid, pid start time or host where given."""
    me = Owner.current(run_id, key)
    return replace(
        me,
        pid=me.pid if pid is None else pid,
        pid_start=me.pid_start if start is None else start,
        host=host or me.host,
    )


def _run_dir(
    root: Path,
    owner: Owner | None,
    *,
    age_days: float = 0.0,
    state: bool = False,
    name: str | None = None,
) -> Path:
    """A run directory as training leaves it: owner record, maybe a backed-up epoch, its age."""
    path = root / (name or f"{owner.key}-{owner.run_id}")  # type: ignore[union-attr]
    path.mkdir(parents=True)
    files = []
    if owner is not None:
        (path / checkpoints.OWNER_FILE).write_text(json.dumps(asdict(owner)))
        files.append(path / checkpoints.OWNER_FILE)
    if state:
        (path / "chief").mkdir()
        (path / checkpoints.STATE_FILE).write_text('model_checkpoint_path: "ckpt-1"\n')
        files.append(path / checkpoints.STATE_FILE)
    stamp = time.time() - age_days * DAY
    for item in [*files, path]:
        os.utime(item, (stamp, stamp))
    return path


# Where checkpoints go.


def test_the_default_root_is_the_user_cache_not_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = checkpoints.prepare_root(TrainConfig())
    assert root == tmp_path / "cache" / "tracktower" / "checkpoints" and root.is_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert checkpoints.default_root() == tmp_path / "home" / ".cache" / "tracktower" / "checkpoints"


def test_the_config_wins_over_the_environment_which_wins_over_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(checkpoints.ENV_VAR, str(tmp_path / "from-env"))
    assert checkpoints.prepare_root(TrainConfig()) == tmp_path / "from-env"
    cfg = TrainConfig(checkpoints=CheckpointConfig(dir=tmp_path / "from-config"))
    assert checkpoints.prepare_root(cfg) == tmp_path / "from-config"


def test_checkpoints_can_be_turned_off_and_are_off_for_the_cpu_strategy() -> None:
    assert (
        checkpoints.prepare_root(TrainConfig(checkpoints=CheckpointConfig(enabled=False))) is None
    )
    # Keras's BackupAndRestore refuses OneDeviceStrategy: no directory rather than a crash.
    assert checkpoints.prepare_root(TrainConfig(strategy="cpu")) is None


def test_an_unwritable_root_is_one_line_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = TrainConfig(checkpoints=CheckpointConfig(dir=blocker / "ckpt"))
    with pytest.raises(DataError, match=r"^train\.checkpoints\.dir: cannot write") as err:
        checkpoints.prepare_root(cfg)
    assert "\n" not in str(err.value) and str(blocker / "ckpt") in str(err.value)
    monkeypatch.setenv(checkpoints.ENV_VAR, str(blocker / "ckpt"))
    with pytest.raises(DataError, match=rf"^{checkpoints.ENV_VAR}: cannot write"):
        checkpoints.prepare_root(TrainConfig())


def test_bad_checkpoint_settings_are_config_errors() -> None:
    with pytest.raises(DataError, match=r"train\.checkpoints\.keep_failed"):
        config_from_mapping({}, ["train.checkpoints.keep_failed=-1"])
    with pytest.raises(DataError, match=r"train\.checkpoints\.max_age_days"):
        config_from_mapping({}, ["train.checkpoints.max_age_days=0"])
    with pytest.raises(DataError, match=r"train\.checkpoints\.directory"):
        config_from_mapping({}, ["train.checkpoints.directory=/x"])


def test_train_refuses_a_bad_checkpoint_dir_before_reading_any_data(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    cfg = config_from_mapping(
        {},
        [
            f"data.interactions={tmp_path / 'missing.parquet'}",
            f"train.checkpoints.dir={tmp_path / 'a-file' / 'ckpt'}",
        ],
    )
    with pytest.raises(DataError, match=r"train\.checkpoints\.dir"):
        stages.train(cfg)


def test_the_train_command_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracktower.training.cli import app

    monkeypatch.setattr(tracking, "configure", lambda uri: None)  # no store is touched
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(checkpoints.ENV_VAR, str(tmp_path / "a-file" / "ckpt"))
    args = ["train", "--interactions", str(tmp_path / "missing.parquet")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and checkpoints.ENV_VAR in lines[0], result.stderr


# What names a run's checkpoints.


def test_the_run_key_is_what_the_run_computes() -> None:
    base = config_from_mapping({})
    key = checkpoints.run_key(base, "f" * 64, final=False)
    assert len(key) == 12 and key == checkpoints.run_key(
        config_from_mapping({}), "f" * 64, final=False
    )
    same = config_from_mapping(
        {"run_name": "other", "train": {"checkpoints": {"dir": "/x", "keep_failed": 9}}}
    )
    assert checkpoints.run_key(same, "f" * 64, final=False) == key
    assert checkpoints.run_key(base, "e" * 64, final=False) != key
    assert checkpoints.run_key(base, "f" * 64, final=True) != key
    # A run of 2 workers is resumed only by 2: the global batch and learning rate follow them.
    two = checkpoints.run_key(base, "f" * 64, final=False, workers=2)
    assert two != key and two != checkpoints.run_key(base, "f" * 64, final=False, workers=3)
    assert checkpoints.run_key(base, "f" * 64, final=False, workers=1) == key
    other = config_from_mapping({}, ["train.learning_rate=0.1"])
    assert checkpoints.run_key(other, "f" * 64, final=False) != key


# Retention.


def test_dead_runs_beyond_the_newest_kept_or_too_old_are_swept(tmp_path: Path) -> None:
    pid = _dead_pid()
    dead = [_run_dir(tmp_path, _owner(f"{i:032x}", pid=pid), age_days=i) for i in range(4)]
    old = _run_dir(tmp_path, _owner(RUN_A, pid=pid, key="fedcba987654"), age_days=30)
    policy = CheckpointConfig(keep_failed=2, max_age_days=14)
    removed = checkpoints.sweep(tmp_path, policy)
    assert sorted(removed) == sorted([dead[2], dead[3], old])
    assert dead[0].is_dir() and dead[1].is_dir()
    assert checkpoints.sweep(tmp_path, policy) == []


def test_live_runs_other_hosts_and_foreign_entries_are_never_swept(tmp_path: Path) -> None:
    live = _run_dir(tmp_path, _owner(RUN_A), age_days=100)  # this very process
    remote = _run_dir(tmp_path, _owner(RUN_B, pid=_dead_pid(), host="elsewhere"), age_days=100)
    young = _run_dir(tmp_path, None, name=f"0123456789ab-{'c' * 32}")  # record not written yet
    foreign = _run_dir(tmp_path, None, name="not-a-run-dir", age_days=100)
    (tmp_path / f"0123456789ab-{'d' * 32}").write_text("a file, not a run directory")
    assert checkpoints.sweep(tmp_path, CheckpointConfig(keep_failed=0, max_age_days=1)) == []
    assert all(p.exists() for p in (live, remote, young, foreign))


def test_a_reused_pid_does_not_keep_a_dead_runs_directory(tmp_path: Path) -> None:
    # Same pid as this process, another start time: the run's process is gone, the pid reused.
    reused = _run_dir(tmp_path, _owner(RUN_A, start="1"))
    ownerless = _run_dir(tmp_path, None, name=f"0123456789ab-{RUN_B}", age_days=30)
    removed = checkpoints.sweep(tmp_path, CheckpointConfig(keep_failed=0, max_age_days=14))
    assert sorted(removed) == sorted([reused, ownerless])


def _runs(root: Path) -> list[Path]:
    """What is in a checkpoint root besides the sweep's lock file (a regular file, which NFS
    can lock; a directory it cannot)."""
    lock = root / checkpoints.LOCK_FILE
    assert not lock.exists() or lock.is_file()
    return [p for p in root.iterdir() if p != lock]


def test_a_finished_run_removes_its_directory_after_sweeping_dead_ones(tmp_path: Path) -> None:
    stale = _run_dir(tmp_path, _owner(RUN_B, pid=_dead_pid()), state=True)
    policy = CheckpointConfig(keep_failed=0)
    with checkpoints.for_run(tmp_path, policy, "0123456789ab", RUN_A) as path:
        assert path == tmp_path / f"0123456789ab-{RUN_A}" and path is not None
        assert not stale.exists()
        assert checkpoints.read_owner(path) == Owner.current(RUN_A, "0123456789ab")
        (path / "chief").mkdir()
        (path / checkpoints.STATE_FILE).write_text("")
    assert _runs(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_run_that_dies_keeps_its_backup_for_resuming(tmp_path: Path, error: type) -> None:
    with (
        pytest.raises(error),
        checkpoints.for_run(tmp_path, CheckpointConfig(), "0123456789ab", RUN_A) as path,
    ):
        assert path is not None
        (path / "chief").mkdir()
        (path / checkpoints.STATE_FILE).write_text("")
        raise error
    assert checkpoints.has_state(tmp_path / f"0123456789ab-{RUN_A}")
    # ... and its directory counts as a live run's until the process is gone.
    assert checkpoints.sweep(tmp_path, CheckpointConfig(keep_failed=0)) == []


def test_a_run_that_dies_before_its_first_backup_leaves_nothing(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        checkpoints.for_run(tmp_path, CheckpointConfig(), "0123456789ab", RUN_A),
    ):
        raise RuntimeError
    assert _runs(tmp_path) == []


def test_no_root_means_no_directory() -> None:
    with checkpoints.for_run(None, CheckpointConfig(), "0123456789ab", RUN_A) as path:
        assert path is None


# Resuming.

KEY = "0123456789ab"


def test_only_dead_runs_of_the_same_key_with_a_backup_are_resumable_newest_first(
    tmp_path: Path,
) -> None:
    pid = _dead_pid()
    older = _run_dir(tmp_path, _owner(RUN_A, pid=pid), age_days=2, state=True)
    newer = _run_dir(tmp_path, _owner(RUN_B, pid=pid), age_days=1, state=True)
    _run_dir(tmp_path, _owner("c" * 32, pid=pid), state=False)  # died before its first backup
    _run_dir(tmp_path, _owner("d" * 32), state=True)  # alive: this very process
    _run_dir(tmp_path, _owner("e" * 32, pid=pid, key="fedcba987654"), state=True)  # other key
    _run_dir(tmp_path, _owner("f" * 32, pid=pid, host="elsewhere"), state=True)  # unknowable
    _run_dir(tmp_path, None, name=f"{KEY}-{'9' * 32}", state=True)  # no owner record
    assert checkpoints.resumable(tmp_path, KEY) == [newer, older]
    assert checkpoints.resumable(tmp_path / "missing", KEY) == []
    assert checkpoints.resumable(None, KEY) == []


def test_claiming_rewrites_the_owner_and_only_one_process_gets_it(tmp_path: Path) -> None:
    dead = _run_dir(tmp_path, _owner(RUN_A, pid=_dead_pid()), state=True)
    mine = checkpoints.claim(dead)
    assert mine == Owner.current(RUN_A, KEY) == checkpoints.read_owner(dead)
    assert sorted(p.name for p in dead.iterdir()) == ["chief", checkpoints.OWNER_FILE]  # no tmp
    assert checkpoints.claim(dead) is None  # now a live run's
    assert checkpoints.resumable(tmp_path, KEY) == []
    assert checkpoints.claim(tmp_path / f"{KEY}-{RUN_B}") is None  # gone meanwhile


def test_claim_newest_takes_the_newest_and_the_sweep_keeps_it(tmp_path: Path) -> None:
    pid = _dead_pid()
    older = _run_dir(tmp_path, _owner(RUN_A, pid=pid), age_days=2, state=True)
    newer = _run_dir(tmp_path, _owner(RUN_B, pid=pid), age_days=1, state=True)
    owner = checkpoints.claim_newest(tmp_path, KEY)
    assert owner is not None and owner.run_id == RUN_B
    with checkpoints.for_run(
        tmp_path, CheckpointConfig(keep_failed=0), KEY, RUN_B, resumed=True
    ) as path:
        assert path == newer and not older.exists()  # a dead run's swept, the claimed one kept
    assert not newer.exists()  # finished: removed like any run's
    assert checkpoints.claim_newest(tmp_path, KEY) is None


def test_a_resumed_directory_must_have_been_claimed(tmp_path: Path) -> None:
    _run_dir(tmp_path, _owner(RUN_A, pid=_dead_pid()), state=True)
    with (
        pytest.raises(RuntimeError, match="not claimed by this process"),
        checkpoints.for_run(tmp_path, CheckpointConfig(), KEY, RUN_A, resumed=True),
    ):
        pass


def test_resume_with_nothing_to_resume_says_so_in_one_line_and_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config_from_mapping({})
    _run_dir(tmp_path, _owner(RUN_A), state=True)  # alive: not resumable
    with caplog.at_level("INFO", logger="tracktower.training.stages"):
        assert stages._claim_for_resume(cfg, tmp_path, KEY) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("--resume: no checkpoint of an earlier run")
    assert KEY in lines[0] and "starting a new run" in lines[0]
