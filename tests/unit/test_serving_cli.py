"""``serve`` / ``recommend`` commands, with uvicorn replaced by a recorder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from builders import cached_artifact, user_id
from typer.testing import CliRunner

from tracktower.serving.cli import app

ENV = [
    "TRACKTOWER_MODEL_URI",
    "TRACKTOWER_HOST",
    "TRACKTOWER_PORT",
    "TRACKTOWER_WORKERS",
    "TRACKTOWER_API_KEYS",
    "TRACKTOWER_ALLOW_UNAUTHENTICATED",
    "TRACKTOWER_MAX_HEADER_BYTES",
    "TRACKTOWER_KEEP_ALIVE_TIMEOUT_SECONDS",
]
KEY = "k" * 16 + "-valid-key"


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
    # httptools (pinned in pyproject) through the protocol that adds the head/read limits.
    assert call["http"] == "tracktower.serving.protocol:LimitedHttpToolsProtocol"
    assert call["loop"] == "uvloop" and call["ws"] == "none"
    assert "(httptools, uvloop); no API keys" in result.stderr


def _recorded_serve(env: pytest.MonkeyPatch, args: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    import uvicorn

    calls: list[dict[str, Any]] = []
    env.setattr(uvicorn, "run", lambda target, **kwargs: calls.append(kwargs))
    return CliRunner().invoke(app, ["serve", *args]), calls


def test_serve_passes_server_limits_to_uvicorn(artifact: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("TRACKTOWER_MAX_HEADER_BYTES", "4096")
    env.setenv("TRACKTOWER_KEEP_ALIVE_TIMEOUT_SECONDS", "3")
    result, calls = _recorded_serve(env, ["--model", str(artifact)])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["h11_max_incomplete_event_size"] == 4096
    assert call["timeout_keep_alive"] == 3
    assert call["limit_concurrency"] == 1000 and call["timeout_graceful_shutdown"] == 15


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org", "[::]"])
def test_serve_refuses_an_exposed_address_without_keys(
    artifact: Path, env: pytest.MonkeyPatch, host: str
) -> None:
    result, calls = _recorded_serve(env, ["--model", str(artifact), "--host", host])
    assert result.exit_code == 2 and not calls
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.output
    assert line.startswith(f"error: refusing to serve on {host} without authentication")
    assert "TRACKTOWER_API_KEYS" in line and "--allow-unauthenticated" in line


def test_serve_refusal_comes_before_loading_the_model(
    tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    result, _ = _recorded_serve(env, ["--model", str(tmp_path / "missing"), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "refusing to serve on 0.0.0.0" in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"])
def test_serve_allows_loopback_without_keys(
    artifact: Path, env: pytest.MonkeyPatch, host: str
) -> None:
    result, calls = _recorded_serve(env, ["--model", str(artifact), "--host", host])
    assert result.exit_code == 0, result.output
    assert calls[0]["host"] == host


def test_serve_exposed_with_keys_or_explicit_opt_out(
    artifact: Path, env: pytest.MonkeyPatch
) -> None:
    args = ["--model", str(artifact), "--host", "0.0.0.0"]
    env.setenv("TRACKTOWER_API_KEYS", f"{KEY},{KEY}2")
    result, calls = _recorded_serve(env, args)
    assert result.exit_code == 0 and calls[0]["host"] == "0.0.0.0", result.output
    assert "; 2 API key(s)" in result.stderr and KEY not in result.output
    env.delenv("TRACKTOWER_API_KEYS")
    result, calls = _recorded_serve(env, [*args, "--allow-unauthenticated"])
    assert result.exit_code == 0 and calls[0]["host"] == "0.0.0.0", result.output
    assert "warning: serving 0.0.0.0 without authentication" in result.stderr
    env.delenv("TRACKTOWER_ALLOW_UNAUTHENTICATED")
    env.setenv("TRACKTOWER_ALLOW_UNAUTHENTICATED", "true")  # the Docker image's opt-out
    result, calls = _recorded_serve(env, args)
    assert result.exit_code == 0 and calls[0]["host"] == "0.0.0.0", result.output


def test_bad_api_key_is_named_by_position_not_echoed(
    artifact: Path, env: pytest.MonkeyPatch
) -> None:
    env.setenv("TRACKTOWER_API_KEYS", f"{KEY}, short-secret")
    result, calls = _recorded_serve(env, ["--model", str(artifact)])
    assert result.exit_code == 2 and not calls
    assert result.stderr.startswith("error: TRACKTOWER_API_KEYS: ")
    assert "API key 2 must be at least 16 characters" in result.stderr
    assert "short-secret" not in result.output


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


def test_serve_reports_a_broken_index_in_one_line(
    artifact: Path, tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    import shutil

    from tracktower.features.artifact import INDEX_DIR

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    shutil.rmtree(broken / INDEX_DIR)
    result = CliRunner().invoke(app, ["serve", "--model", str(broken)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "index/ is missing" in result.stderr
