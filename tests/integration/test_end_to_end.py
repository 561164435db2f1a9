"""The product path with real processes: CLI train → MLflow server registry → uvicorn → HTTP.

Also the no-environment default (``sqlite:///mlflow.db`` in the working directory) and the CLI's
answer to bad input (exit 2, one line, nothing registered).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
TT = [sys.executable, "-c", "from tracktower.features.cli import main; main()"]
# The CLI, reporting at exit which heavy packages the command imported.
PROBE = [
    sys.executable,
    "-c",
    "import sys\n"
    "from tracktower.features.cli import main\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    "    heavy = [m for m in ('tensorflow', 'tracktower.training') if m in sys.modules]\n"
    "    print('imported:', ','.join(heavy), file=sys.stderr)\n",
]


def _imported(stderr: str) -> set[str]:
    (line,) = [line for line in stderr.splitlines() if line.startswith("imported:")]
    return set(filter(None, line.removeprefix("imported:").strip().split(",")))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    )
    env.update(extra)
    return env


def _tt(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600, cmd=TT):
    return subprocess.run(
        [*cmd, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e")
    proc = _tt(
        ["data", "synth", "--out", str(out / "synth"), "--users", "700", "--tracks", "1800"],
        out,
        _env(),
    )
    assert proc.returncode == 0, proc.stderr
    return out / "synth"


def _train(cwd: Path, env: dict[str, str], data: Path, *extra: str) -> subprocess.CompletedProcess:
    return _tt(
        [
            "train",
            "--config",
            str(SMOKE),
            "--interactions",
            str(data / "interactions.parquet"),
            "--tracks",
            str(data / "tracks.parquet"),
            *extra,
        ],
        cwd,
        env,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[[str, dict[str, str]], str]]:
    procs: list[subprocess.Popen] = []

    def start(model: str, env: dict[str, str]) -> str:
        port = _port()
        proc = subprocess.Popen(
            [*TT, "serve", "--model", model, "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail("server not ready in 180 s")

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_train_register_and_serve_champion_through_a_real_mlflow_server(
    mlflow_server: str, synth_dir: Path, tmp_path: Path, server
):
    env = _env(MLFLOW_TRACKING_URI=mlflow_server)
    summary = tmp_path / "summary.json"
    proc = _train(tmp_path, env, synth_dir, "--summary", str(summary))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary.exists()

    url = server("models:/tracktower@champion", env)
    user = pd.read_parquet(synth_dir / "interactions.parquet")["user_id"].iloc[0]
    body = httpx.get(f"{url}/v1/users/{user}/recommendations", params={"k": 5}).json()
    assert body["source"] == "model" and len(body["items"]) == 5
    assert all(item["title"] for item in body["items"])
    assert body["model"]["name"] == "tracktower"
    model_info = httpx.get(f"{url}/v1/model").json()
    assert model_info["version"] == body["model"]["version"]
    unknown = httpx.get(f"{url}/v1/users/nobody-at-all/recommendations").json()
    assert unknown["source"] == "popular"
    bad = httpx.get(f"{url}/v1/users/{user}/recommendations", params={"k": 0})
    assert bad.status_code == 422 and "error" in bad.json()
    assert httpx.get(f"{url}/healthz").status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert "tracktower" in metrics

    users = tmp_path / "users.csv"
    pd.DataFrame({"user_id": [user, "nobody-at-all"]}).to_csv(users, index=False)
    out = tmp_path / "recs.parquet"
    rec = _tt(
        ["recommend", "--users", str(users), "--k", "10", "--output", str(out)], tmp_path, env
    )
    assert rec.returncode == 0, rec.stderr[-2000:]
    recs = pd.read_parquet(out)
    assert list(recs.columns) == ["user_id", "rank", "track_id", "score", "source"]
    assert set(recs["source"]) == {"model", "popular"}
    mine = recs[recs["user_id"] == user]
    assert list(mine["rank"]) == list(range(1, 11))
    assert list(mine["track_id"][:5]) == [i["track_id"] for i in body["items"]]


def _test_lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.startswith("  test ")]


def test_default_store_then_evaluate_and_register_as_separate_stages(
    synth_dir: Path, tmp_path: Path
):
    """Train into ./mlflow.db; re-score the registered model (same data, same split: the same
    figures); register the same run again as a new version without touching the champion."""
    env = _env()
    proc = _train(tmp_path, env, synth_dir, "--set", "train.epochs=1", "--no-baseline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mlflow.db").exists()
    run_id = proc.stdout.split("run ", 1)[1].split(":", 1)[0]
    trained = _test_lines(proc.stdout)
    assert trained and any("recall_at_20" in line for line in trained)

    evaluated = _tt(["evaluate", "--model", "models:/tracktower/1", "--no-log"], tmp_path, env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "the data it was trained on" in evaluated.stdout
    assert _test_lines(evaluated.stdout) == trained

    again = _tt(["register", "--run-id", run_id, "--no-promote"], tmp_path, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "models:/tracktower/2" in again.stdout and "unchanged" in again.stdout
    missing = _tt(["register", "--run-id", "f" * 32], tmp_path, env)
    assert missing.returncode == 2 and "error: no run" in missing.stderr, missing.stderr
    users = tmp_path / "users.txt"
    users.write_text("nobody\n")
    rec = _tt(
        ["recommend", "--users", str(users), "--k", "3", "--output", str(tmp_path / "r.parquet")],
        tmp_path,
        env,
    )
    assert rec.returncode == 0, rec.stderr[-2000:]
    assert len(pd.read_parquet(tmp_path / "r.parquet")) == 3


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("user_id,track_id\n", "no data rows"),
        ("user_id,song\na,b\n", "track_id"),
        ("user_id,track_id,weight\na,b,1\nc,d,-3\n", "row 2"),
        ("user_id,track_id,weight\na,b,1\nc,d,nan\n", "weight"),
        ("user_id,track_id\na,\n", "track_id"),
        # one user, 28 rows: too little to register, refused before any run (safe promotion)
        ("user_id,track_id\n" + "".join(f"solo,t{i}\n" for i in range(28)), "min_users"),
        (
            "user_id,track_id,weight\n"
            + "".join(f"u{u},t{t},0\n" for u in range(30) for t in range(30)),
            "every weight is 0",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_registers_nothing(
    tmp_path: Path, content: str, needle: str
):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    args = ["train", "--config", str(SMOKE), "--interactions", str(bad)]
    proc = _tt(args, tmp_path, _env(), timeout=120, cmd=PROBE)
    assert proc.returncode == 2, proc.stderr
    assert "tensorflow" not in _imported(proc.stderr), "data is validated before TF starts"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "bad.csv" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # validation happens before any run starts


def test_non_utf8_and_missing_tracks_match(tmp_path: Path, synth_dir: Path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("user_id,track_id\nJos\xe9,t1\n".encode("latin-1"))
    proc = _tt(["train", "--config", str(SMOKE), "--interactions", str(latin)], tmp_path, _env())
    assert proc.returncode == 2 and "UTF-8" in proc.stderr, proc.stderr
    tracks = tmp_path / "tracks.csv"
    tracks.write_text("track_id,title\nzzz,Nothing\n")
    proc = _tt(
        [
            "train",
            "--config",
            str(SMOKE),
            "--interactions",
            str(synth_dir / "interactions.parquet"),
            "--tracks",
            str(tracks),
        ],
        tmp_path,
        _env(),
    )
    assert proc.returncode == 2 and "tracks.csv" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_and_its_worker_never_import_training(tmp_path: Path):
    import builders

    artifact = builders.write_fake_artifact(tmp_path / "artifact", 30, 200, 8, True)
    port = _port()
    proc = subprocess.Popen(
        [*PROBE, "serve", "--model", str(artifact), "--port", str(port)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert proc.poll() is None, "server exited before it was ready"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert "tracktower.training" not in _imported(stderr), stderr[-2000:]


def test_a_model_that_does_not_beat_popularity_is_not_registered(synth_dir: Path, tmp_path: Path):
    env = _env()
    proc = _train(
        tmp_path, env, synth_dir, "--set", "train.epochs=1", "--set", "promotion.min_lift=1000"
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "not registered" in proc.stderr and "popularity" in proc.stderr
    assert "Traceback" not in proc.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_model_versions("name = 'tracktower'") == []
