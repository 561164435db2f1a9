"""``serve`` / ``recommend`` commands, with uvicorn replaced by a recorder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from builders import cached_artifact, user_id
from typer.testing import CliRunner

from tracktower.serving.cli import app

ENV = ["TRACKTOWER_MODEL_URI", "TRACKTOWER_HOST", "TRACKTOWER_PORT", "TRACKTOWER_WORKERS"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Every variable serve writes is registered with monkeypatch, so it is restored."""
    for name in ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_recommend_command(artifact: Path, tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    users = tmp_path / "users.csv"
    users.write_text(f"user_id\n{user_id(0)}\nnew\n")
    out = tmp_path / "recs.parquet"
    args = ["recommend", "--model", str(artifact), "--users", str(users), "--k", "3"]
    result = CliRunner().invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 6 rows" in result.output
    assert pd.read_parquet(out)["user_id"].tolist() == [user_id(0)] * 3 + ["new"] * 3


def test_recommend_rejects_k_zero(artifact: Path, tmp_path: Path) -> None:
    args = ["recommend", "--model", str(artifact), "--users", "u.txt", "--output", "o.parquet"]
    result = CliRunner().invoke(app, [*args, "--k", "0"])
    assert result.exit_code == 2


def test_serve_passes_options_through_env(artifact: Path, env: pytest.MonkeyPatch) -> None:
    import os

    import uvicorn

    calls: list[dict[str, Any]] = []

    def fake_run(target: str, **kwargs: Any) -> None:
        calls.append({"target": target, **kwargs, "env": {k: os.environ.get(k) for k in ENV}})

    env.setattr(uvicorn, "run", fake_run)
    args = ["serve", "--model", str(artifact), "--port", "8123", "--workers", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["target"] == "tracktower.serving.app:factory" and call["factory"] is True
    assert (call["host"], call["port"], call["workers"]) == ("127.0.0.1", 8123, 2)
    assert call["env"]["TRACKTOWER_MODEL_URI"] == str(artifact)
    assert call["env"]["TRACKTOWER_PORT"] == "8123"
    assert call["access_log"] is False
    assert (call["http"], call["loop"]) == ("httptools", "uvloop")  # pinned in pyproject
    assert "(httptools, uvloop)" in result.stderr


def test_serve_reports_missing_model(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: no such model directory"


def test_bad_environment_is_a_data_error(artifact: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("TRACKTOWER_PORT", "not-a-port")
    result = CliRunner().invoke(app, ["serve", "--model", str(artifact)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: TRACKTOWER_PORT: ")


def test_recommend_bad_users_file(artifact: Path, tmp_path: Path) -> None:
    args = ["recommend", "--model", str(artifact), "--users", str(tmp_path / "none.csv")]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2
    assert "users file does not exist" in result.stderr
    assert "Traceback" not in result.output
