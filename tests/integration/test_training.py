"""Train a tiny model for real, export it, reload it, and check what MLflow recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tracktower.features import synth
from tracktower.features.ranking import score_chunks
from tracktower.features.tf import tf
from tracktower.serving.artifact import Recommender
from tracktower.training import evaluate
from tracktower.training.config import load_config
from tracktower.training.data import prepare
from tracktower.training.export import ExportInputs, export_artifact
from tracktower.training.run import train_and_register
from tracktower.training.train import fit

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.write(out, users=800, tracks=2000, seed=3)
    return out


def _cfg(data: Path, *extra: str):
    return load_config(
        SMOKE,
        [
            f"data.interactions={data / 'interactions.parquet'}",
            f"data.tracks={data / 'tracks.parquet'}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    cwd = Path.cwd()
    os.chdir(root)  # a sqlite store puts run artifacts under ./mlruns: keep them out of the repo
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    mlflow.set_tracking_uri(None)
    os.chdir(cwd)


@pytest.fixture(scope="module")
def first_run(synth_data: Path, store: str):
    return train_and_register(_cfg(synth_data), config_path=SMOKE)


def test_first_run_registers_champion_and_beats_popularity_twice(first_run):
    assert first_run.champion
    assert first_run.model_uri == "models:/tracktower/1"
    model = first_run.metrics["recall_at_20"]
    popular = first_run.baseline_metrics["recall_at_20"]
    assert model >= 2 * popular, (model, popular)


def test_mlflow_has_both_systems_with_the_same_metric_names(first_run, store):
    client = MlflowClient(store)
    baseline = client.get_run(first_run.baseline_run_id)
    two_tower = client.get_run(first_run.run_id)
    test_names = {k for k in two_tower.data.metrics if k.startswith("test_")}
    assert test_names == {k for k in baseline.data.metrics if k.startswith("test_")}
    assert {"test_recall_at_20", "test_ndcg_at_10", "test_coverage_at_10"} <= test_names
    assert two_tower.data.params["model.embedding_dim"] == "32"
    assert two_tower.data.params["dataset.fingerprint"] == first_run.dataset["fingerprint"]
    history = client.get_metric_history(first_run.run_id, "val_recall_at_20")
    assert len(history) >= 1
    assert two_tower.inputs.dataset_inputs, "dataset not logged as an MLflow input"
    artifacts = {a.path for a in client.list_artifacts(first_run.run_id)}
    assert {"config", "plots"} <= artifacts
    version = client.get_model_version_by_alias("tracktower", "champion")
    assert str(version.version) == "1"


def test_worse_run_and_final_run_leave_the_champion_alone(first_run, synth_data, store):
    worse = train_and_register(
        _cfg(synth_data, "train.epochs=1", "train.learning_rate=0.00001"), baseline=False
    )
    assert not worse.champion
    assert worse.metrics["recall_at_20"] < first_run.metrics["recall_at_20"]
    final = train_and_register(_cfg(synth_data, "train.epochs=1"), final=True)
    assert not final.champion and final.metrics == {}
    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias("tracktower", "champion").version) == "1"
    assert client.get_run(final.run_id).data.params["final"] == "True"


def test_export_reloads_and_matches_the_in_memory_model(synth_data, tmp_path):
    cfg = _cfg(synth_data, "train.epochs=1")
    data = prepare(cfg.data, cfg.split)
    result = fit(cfg, data.encoded, data.track_artist)
    enc = data.encoded
    artifact = export_artifact(
        ExportInputs(
            result.model,
            result.table,
            enc.user_ids,
            enc.track_ids,
            result.known,
            None,
            {
                "model_name": "tracktower",
                "dataset": {"fingerprint": data.fingerprint, **data.stats},
            },
        ),
        tmp_path / "artifact",
        top_k=20,
    )
    users = np.arange(0, len(enc.user_ids), 37)
    queries = evaluate.user_embeddings(result.model, result.table, users)
    candidates = evaluate.track_embeddings(result.model)

    # 1. SavedModel signature == plain numpy brute force over the in-memory towers.
    loaded = tf.saved_model.load(str(artifact / "saved_model"))
    out = loaded.signatures["serving_default"](user_id=tf.constant(enc.user_ids[users]))
    brute = np.argsort(-(queries @ candidates.T), axis=1, kind="stable")[:, :20]
    got = np.vectorize(lambda b: b.decode())(out["track_ids"].numpy())
    np.testing.assert_array_equal(got, enc.track_ids[brute])
    np.testing.assert_allclose(
        out["scores"].numpy(), np.take_along_axis(queries @ candidates.T, brute, 1), atol=1e-5
    )

    # 2. History signature == in-memory query tower with the user id hidden.
    hist = [enc.track_ids[enc.train[u].indices] for u in users[:3]]
    width = max(len(h) for h in hist)
    padded = np.array([list(h) + [""] * (width - len(h)) for h in hist])
    session = loaded.signatures["query_from_history"](track_ids=tf.constant(padded))
    idx = np.array(
        [
            [i + 1 for i in enc.train[u].indices] + [0] * (width - enc.train[u].nnz)
            for u in users[:3]
        ],
        dtype=np.int32,
    )
    expected = result.model.query_tower(
        {"user": tf.zeros(3, tf.int32), "history": tf.constant(idx)}
    ).numpy()
    np.testing.assert_allclose(session["query_embedding"].numpy(), expected, atol=1e-5)

    # 3. No training/serving skew: the server's top-K == the offline evaluation's top-K, and both
    # treat the early-stopping slice as known history (never recommended back).
    assert result.known.nnz == enc.train.nnz + enc.val.nnz > enc.train.nnz
    served = Recommender.load(artifact).top_k_batch(list(enc.user_ids[users]), 20)
    offline = np.concatenate(
        [i for i, _ in score_chunks(queries, candidates, 20, result.known[users])]
    )
    np.testing.assert_array_equal(served.indices, offline)
    for row, u in zip(served.indices, users, strict=True):
        assert not set(row) & set(enc.val[u].indices)


def test_mirrored_strategy_on_two_logical_cpus(synth_data, tmp_path):
    script = f"""
import json
from tracktower.features.tf import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from tracktower.training.config import load_config
from tracktower.training.data import prepare
from tracktower.training.train import fit
cfg = load_config({str(SMOKE)!r}, ["data.interactions={synth_data / "interactions.parquet"}",
    "train.strategy=mirrored", "train.epochs=1"])
data = prepare(cfg.data, cfg.split)
result = fit(cfg, data.encoded, data.track_artist, checkpoint_dir={str(tmp_path / "ckpt")!r})
print(json.dumps({{"strategy": result.strategy, "replicas": result.replicas,
                  "history": result.history}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["strategy"] == "MirroredStrategy"
    assert out["replicas"] == 2
    assert np.isfinite(out["history"][0]["loss"])
    assert out["history"][0]["val_recall_at_20"] > 0
    assert any(p.name.startswith("ckpt-") for p in (tmp_path / "ckpt").iterdir())
