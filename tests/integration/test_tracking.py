"""MLflow helpers and the register stage against a throwaway sqlite store (integration: a real
store, real artifact uploads; the champion policy itself is unit-tested with a registry double)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from builders import write_fake_artifact
from mlflow import MlflowClient

from tracktower.features import artifact as contract
from tracktower.features.errors import DataError
from tracktower.training import stages, tracking

FP_A = "a" * 64
FP_B = "b" * 64


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Schema migrations take ~2 s per fresh sqlite store; run them once and copy the file."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_db: Path
) -> Iterator[MlflowClient]:
    """Isolated tracking + registry store; cwd moved so default artifact roots land in tmp."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(None)
    assert mlflow.get_tracking_uri() == uri
    yield MlflowClient()
    while mlflow.active_run():
        mlflow.end_run()
    # The URI is process-global (None = back to env/default): do not leak it into other tests.
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    """Loadable, so MLflow's input-example validation really runs TracktowerModel.predict."""
    return write_fake_artifact(tmp_path / "export", 20, 50, 8, False)


def test_configure_prefers_argument(store: MlflowClient, tmp_path: Path) -> None:
    tracking.configure(f"sqlite:///{tmp_path}/other.db")
    assert mlflow.get_tracking_uri().endswith("other.db")


def test_params_are_flattened_and_truncated(store: MlflowClient) -> None:
    config = {"model": {"dim": 64, "tower": {"layers": [128, 64]}}, "name": "x", "none": None}
    with tracking.experiment_run("exp", "params") as run:
        tracking.log_params_flat(config)
        tracking.log_params_flat({"blob": "y" * 10_000}, prefix="extra")
    params = store.get_run(run.info.run_id).data.params
    assert params["model.dim"] == "64"
    assert params["model.tower.layers"] == "[128, 64]"
    assert params["name"] == "x"
    assert params["none"] == "None"
    assert params["extra.blob"].endswith("...[truncated]")


def test_dataset_input_is_visible_on_the_run(store: MlflowClient, tmp_path: Path) -> None:
    df = pd.DataFrame({"user_id": ["u1", "u1", "u2"], "track_id": ["t1", "t2", "t1"]})
    df["weight"] = 1.0
    with tracking.experiment_run("exp", "data") as run:
        tracking.log_dataset_input(df, fingerprint=FP_A, name="synth", source="data/x.parquet")
    fetched = store.get_run(run.info.run_id)
    assert fetched.inputs is not None
    (dataset_input,) = fetched.inputs.dataset_inputs
    assert dataset_input.dataset.name == "synth"
    assert dataset_input.dataset.digest == FP_A[:36]
    assert str(tmp_path / "data" / "x.parquet") in dataset_input.dataset.source
    tags = {t.key: t.value for t in dataset_input.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["fingerprint"] == FP_A
    params = fetched.data.params
    assert (params["dataset.fingerprint"], params["dataset.rows"]) == (FP_A, "3")
    assert (params["dataset.users"], params["dataset.tracks"]) == ("2", "2")


def test_git_commit_tag(
    store: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], check=True)
    sha = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    monkeypatch.setattr(tracking, "_source_dir", lambda: repo)
    with tracking.experiment_run("exp", "git", tags={"kind": "test"}) as run:
        pass
    tags = store.get_run(run.info.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == sha
    assert tags["kind"] == "test"
    assert tags["mlflow.runName"] == "git"


def test_experiments_open_in_the_model_training_view(store: MlflowClient) -> None:
    with tracking.experiment_run("kind", "r"):
        pass
    exp = store.get_experiment_by_name("kind")
    assert exp is not None
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_popularity_baseline_is_found_by_fingerprint_and_split(store: MlflowClient) -> None:
    key = tracking.split_key({"seed": 0, "test_fraction": 0.2})
    with tracking.experiment_run("exp", "popularity", tags={"system": "popular", "split": key}):
        mlflow.log_param("dataset.fingerprint", FP_A)
    found = tracking.find_baseline_run("exp", "popular", FP_A, key)
    assert found is not None
    assert tracking.find_baseline_run("exp", "popular", FP_B, key) is None
    other = tracking.split_key({"seed": 1, "test_fraction": 0.2})
    assert other != key and tracking.find_baseline_run("exp", "popular", FP_A, other) is None
    assert tracking.find_baseline_run("no-such-experiment", "popular", FP_A, key) is None


def test_run_ends_failed_on_exception(store: MlflowClient) -> None:
    with pytest.raises(RuntimeError), tracking.experiment_run("exp", "boom") as run:
        raise RuntimeError("boom")
    assert store.get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_metrics_and_recall_plot(store: MlflowClient) -> None:
    metrics = {"recall_at_10": 0.1, "recall_at_20": np.float32(0.2), "ndcg_at_10": 0.05}
    with tracking.experiment_run("exp", "plot") as run:
        tracking.log_metrics(metrics, prefix="test_")
        tracking.log_metrics({"recall_at_10": 0.01, "bad": float("nan")}, prefix="val_", step=2)
        path = tracking.log_recall_plot({f"test_{k}": v for k, v in metrics.items()}, title="t")
        assert tracking.log_recall_plot({"loss": 1.0}, title="none") is None
    data = store.get_run(run.info.run_id).data
    assert data.metrics["test_recall_at_20"] == pytest.approx(0.2)
    assert "val_bad" not in data.metrics
    assert [m.step for m in store.get_metric_history(run.info.run_id, "val_recall_at_10")] == [2]
    assert path == "plots/recall_at_k.png"
    files = [f.path for f in store.list_artifacts(run.info.run_id, "plots")]
    assert files == [path]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path)
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _register(
    artifact_dir: Path, fingerprint: str, recall: float | None, promote: bool | None
) -> stages.Registration:
    """What ``train`` does: params, metric and model on the run, then the register stage."""
    with tracking.experiment_run("exp", "train") as run:
        mlflow.log_param("dataset.fingerprint", fingerprint)
        if recall is not None:
            tracking.log_metrics({"recall_at_20": recall}, prefix="test_")
        tracking.log_model(artifact_dir)
        return stages.register(run.info.run_id, model_name="tracktower", promote=promote)


def _champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias("tracktower", "champion").version)


def test_champion_rule(store: MlflowClient, artifact_dir: Path) -> None:
    first = _register(artifact_dir, FP_A, 0.30, None)
    assert (first.version, first.champion, first.reason) == ("1", True, "no champion yet")
    assert first.model_uri == "models:/tracktower/1"

    worse = _register(artifact_dir, FP_A, 0.20, None)
    assert not worse.champion and _champion(store) == "1"
    assert "0.2000 < champion v1's 0.3000" in worse.reason

    better = _register(artifact_dir, FP_A, 0.35, None)
    assert better.champion and _champion(store) == "3"

    other_data = _register(artifact_dir, FP_B, 0.99, None)
    assert not other_data.champion and _champion(store) == "3"
    assert "different dataset" in other_data.reason

    forced = _register(artifact_dir, FP_B, 0.01, True)
    assert forced.champion and _champion(store) == "5"

    never = _register(artifact_dir, FP_B, 0.99, False)
    assert not never.champion and _champion(store) == "5"
    assert "disabled" in never.reason

    version = store.get_model_version("tracktower", "6")
    assert version.tags["dataset.fingerprint"] == FP_B
    assert version.tags["champion_decision"] == never.reason
    assert version.tags["test_recall_at_20"] == "0.99"


def test_promote_false_never_creates_a_champion(store: MlflowClient, artifact_dir: Path) -> None:
    reg = _register(artifact_dir, FP_A, 0.5, False)
    assert not reg.champion
    with pytest.raises(mlflow.MlflowException):
        _champion(store)


def test_a_finished_run_is_registered_later(store: MlflowClient, artifact_dir: Path) -> None:
    with tracking.experiment_run("exp", "train") as run:
        mlflow.log_param("dataset.fingerprint", FP_A)
        tracking.log_metrics({"recall_at_20": 0.25}, prefix="test_")
        tracking.log_model(artifact_dir)
    run_id = run.info.run_id
    assert not store.search_model_versions("name = 'tracktower'")
    reg = stages.register(run_id, model_name="tracktower", promote=None)
    assert (reg.version, reg.champion) == ("1", True)
    finished = store.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["registered_model"] == "tracktower/1"
    with pytest.raises(DataError, match="no run"):
        stages.register("0" * 32, model_name="tracktower", promote=None)


def test_a_failed_run_is_not_registered(store: MlflowClient, artifact_dir: Path) -> None:
    with pytest.raises(RuntimeError), tracking.experiment_run("exp", "train") as run:
        tracking.log_model(artifact_dir)
        raise RuntimeError("fit diverged")
    with pytest.raises(DataError, match="FAILED"):
        stages.register(run.info.run_id, model_name="tracktower", promote=None)


def test_registered_model_resolves_to_the_artifact(
    store: MlflowClient, artifact_dir: Path, tmp_path: Path
) -> None:
    _register(artifact_dir, FP_A, 0.30, None)
    local = Path(
        mlflow.artifacts.download_artifacts(
            "models:/tracktower@champion", dst_path=str(tmp_path / "d")
        )
    )
    manifests = list(local.rglob("manifest.json"))
    assert len(manifests) == 1
    manifest = contract.read_manifest(manifests[0].parent)
    assert (manifest.model_name, manifest.model_version) == ("tracktower", "1")
    assert (local / "tracktower_model.py").is_file(), "models-from-code, not a pickle"
    requirements = (local / "requirements.txt").read_text()
    assert "tensorflow" not in requirements and "mlflow==" in requirements
    example = json.loads((local / "input_example.json").read_text())
    assert example["data"][0][0] == "u00000"
    model = mlflow.pyfunc.load_model("models:/tracktower@champion")
    recs = model.predict(pd.DataFrame({"user_id": ["u00001", "nobody"], "k": [3, 2]}))
    assert list(recs.columns) == ["user_id", "rank", "track_id", "score", "source"]
    assert recs["source"].tolist() == ["model"] * 3 + ["popular"] * 2


def test_missing_manifest_is_rejected(store: MlflowClient, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest\.json"), tracking.experiment_run("exp", "x"):
        tracking.log_model(tmp_path)


def test_sigterm_ends_the_active_run_killed_not_running(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = f"""
import time
import mlflow
from tracktower.features.cli import end_runs_on_sigterm
from tracktower.training import tracking
mlflow.set_tracking_uri({uri!r})
end_runs_on_sigterm()
with tracking.experiment_run("sigterm", "victim"):
    print("ready", flush=True)
    time.sleep(60)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sigterm")
    assert exp is not None
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.status == "KILLED"


def test_a_run_whose_process_was_killed_is_ended_by_the_next_run(tmp_path: Path) -> None:
    """kill -9 leaves no chance to end a run; the next run against the store ends it KILLED."""
    import signal
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = f"""
import time
from tracktower.training import tracking
tracking.configure({uri!r})
with tracking.experiment_run("crash", "victim") as run:
    print(run.info.run_id, flush=True)
    time.sleep(120)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    victim = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    client = MlflowClient(uri)
    assert client.get_run(victim).info.status == "RUNNING"
    tracking.configure(uri)
    try:
        with tracking.experiment_run("crash", "next"):
            pass
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    ended = client.get_run(victim)
    assert ended.info.status == "KILLED"
    assert "process gone" in ended.data.tags["tracktower.ended_by"]


def test_first_time_store_initialisation_is_safe_when_concurrent(tmp_path: Path) -> None:
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    script = (
        "from tracktower.training import tracking\n"
        f"tracking.configure({uri!r})\n"
        "with tracking.experiment_run('race', 'r'):\n"
        "    pass\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    exp = MlflowClient(uri).get_experiment_by_name("race")
    assert exp is not None
    assert len(MlflowClient(uri).search_runs([exp.experiment_id])) == 3
