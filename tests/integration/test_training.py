"""Train a tiny model for real, export it, reload it, and check what MLflow recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import mlflow
import numpy as np
import pytest
import scipy.sparse as sp
from builders import clustered_dataset, clustered_matrix
from mlflow import MlflowClient

from tracktower.features import synth
from tracktower.features.artifact import (
    HISTORY_INPUT,
    HISTORY_OUTPUT,
    HISTORY_SIGNATURE,
    SAVED_MODEL_DIR,
    read_arrays,
    read_index,
    read_manifest,
)
from tracktower.features.errors import DataError
from tracktower.features.index.recall import overlap
from tracktower.features.ranking import score_chunks
from tracktower.features.tf import tf
from tracktower.serving.artifact import Recommender
from tracktower.training import evaluate, stages
from tracktower.training import train as train_module
from tracktower.training.config import IndexConfig, ModelConfig, load_config
from tracktower.training.data import prepare
from tracktower.training.export import ExportInputs, export_artifact
from tracktower.training.model import TwoTowerModel
from tracktower.training.train import fit

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
    return stages.train(_cfg(synth_data), config_path=SMOKE)


def test_first_run_registers_champion_and_beats_popularity_twice(first_run, store):
    assert first_run.champion
    assert first_run.model_uri == "models:/tracktower/1"
    model = first_run.metrics["recall_at_20"]
    baseline = MlflowClient(store).get_run(first_run.baseline_run_id)
    popular = baseline.data.metrics["test_recall_at_20"]
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
    history = client.get_metric_history(first_run.run_id, "epoch_val_recall_at_20")
    assert len(history) >= 1
    kept = two_tower.data.metrics["best_epoch"]
    assert two_tower.data.metrics["val_recall_at_20"] == pytest.approx(
        next(m.value for m in history if m.step == kept)
    ), "plain val_* columns are the kept epoch's"
    assert two_tower.data.tags["mlflow.runName"].startswith("smoke d32 ")
    assert two_tower.data.tags["baseline_run_id"] == first_run.baseline_run_id
    assert two_tower.inputs.dataset_inputs, "dataset not logged as an MLflow input"
    artifacts = {a.path for a in client.list_artifacts(first_run.run_id)}
    assert {"config", "plots"} <= artifacts
    version = client.get_model_version_by_alias("tracktower", "champion")
    assert str(version.version) == "1"


def test_index_is_built_at_export_and_logged(first_run, store):
    """The synthetic catalogue is below the auto crossover: exact, measured on every user."""
    run = MlflowClient(store).get_run(first_run.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["index.backend"] == "auto" and params["index.recall_floor"] == "0.95"
    assert params["index.built.backend"] == "exact"
    users = min(first_run.dataset["users"], 1000)
    assert params["index.built.sample_users"] == str(users)
    assert metrics["index_recall_at_10"] == metrics["index_recall_at_100"] == 1.0
    assert metrics["index_build_seconds"] >= 0
    artifact = Path(mlflow.artifacts.download_artifacts(f"{first_run.model_uri}"))
    manifest = read_manifest(next(artifact.rglob("manifest.json")).parent)
    assert manifest.index_info.backend == "exact" and manifest.index_info.sample_users == users


def test_worse_run_and_final_run_leave_the_champion_alone(first_run, synth_data, store):
    worse = stages.train(_cfg(synth_data, "train.epochs=1", "train.learning_rate=0.00001"))
    assert not worse.champion
    assert worse.metrics["recall_at_20"] < first_run.metrics["recall_at_20"]
    # Same data and split: the popularity baseline is not logged a second time.
    assert worse.baseline_run_id == first_run.baseline_run_id
    client = MlflowClient(store)
    popular_runs = client.search_runs(
        [client.get_run(first_run.run_id).info.experiment_id], "tags.system = 'popular'"
    )
    assert len(popular_runs) == 1
    final = stages.train(_cfg(synth_data, "train.epochs=1"), final=True)
    assert not final.champion and final.metrics == {}
    assert str(client.get_model_version_by_alias("tracktower", "champion").version) == "1"
    assert client.get_run(final.run_id).data.params["final"] == "True"


def test_export_reloads_and_matches_the_in_memory_model(synth_data, tmp_path):
    # No user-id embedding: a known user's exported embedding is then exactly what the history
    # tower makes of their known tracks, which the reloaded SavedModel must reproduce.
    cfg = _cfg(synth_data, "train.epochs=1", "model.use_user_id=false", "train.optimizer=lazy_adam")
    data = prepare(cfg.data, cfg.split)
    result = fit(cfg, data.encoded, data.track_artist)
    # What `tracktower train` does before export: the optimizer's moments are freed, and the
    # model still exports everything checked below.
    moments = [weakref.ref(v) for v in result.model.optimizer.variables]
    assert len(moments) > 3
    train_module.release_training_state(result.model)
    assert [m for m in moments if m() is not None] == []
    enc = data.encoded
    exported = export_artifact(
        ExportInputs(
            model=result.model,
            user_ids=enc.user_ids,
            track_ids=enc.track_ids,
            known=result.known,
            tracks=None,
            manifest={
                "model_name": "tracktower",
                "dataset": {"fingerprint": data.fingerprint, **data.stats},
            },
            # Forced onto a catalogue far below the auto crossover, so the ScaNN path is
            # exported, measured, reloaded and served here.
            index=IndexConfig(backend="scann", recall_floor=0.5),
            seed=3,
        ),
        tmp_path / "artifact",
    )
    artifact = exported.path
    users = np.arange(0, len(enc.user_ids), 37)
    queries = evaluate.user_embeddings(result.model, result.known, users)
    candidates = evaluate.track_embeddings(result.model)
    arrays = read_arrays(artifact, read_manifest(artifact))

    # 1. The arrays hold the in-memory towers' embeddings.
    np.testing.assert_allclose(arrays["user_embeddings"][users], queries, atol=1e-6)
    np.testing.assert_allclose(arrays["track_embeddings"], candidates, atol=1e-6)

    # 2. The reloaded SavedModel, given each user's pooled known tracks (the mean of their
    # history_embeddings rows, as a server pools a session), returns that user's exported
    # embedding under both of its signature names; it holds no embedding table of its own.
    loaded = tf.saved_model.load(str(artifact / SAVED_MODEL_DIR))
    history = arrays["history_embeddings"]
    pooled = np.stack([history[result.known[u].indices].mean(axis=0) for u in users])
    for name in (HISTORY_SIGNATURE, "serving_default"):
        fn = loaded.signatures[name]
        session = fn(**{HISTORY_INPUT: tf.constant(pooled, tf.float32)})[HISTORY_OUTPUT].numpy()
        np.testing.assert_allclose(session, arrays["user_embeddings"][users], atol=1e-5)
    saved_bytes = sum(f.stat().st_size for f in (artifact / SAVED_MODEL_DIR).rglob("*"))
    assert saved_bytes < history.nbytes, (saved_bytes, history.nbytes)

    # 3. No training/serving skew: the server's top-K == the offline evaluation's top-K, and both
    # treat the early-stopping slice as known history (never recommended back).
    assert result.known.nnz == enc.train.nnz + enc.val.nnz > enc.train.nnz
    # Through the exported ScaNN index, recall as measured at export against exact search.
    manifest = read_manifest(artifact)
    info = exported.index
    assert manifest.index == info.to_dict() and info.backend == "scann"
    assert info.sample_users == min(len(enc.user_ids), 1000) and info.recall_at_100 >= 0.5
    assert (artifact / "index" / "tracktower_index.json").is_file()
    served = Recommender.load(artifact).top_k_batch(list(enc.user_ids[users]), 20)
    assert manifest.known_top_k == 100  # served from lists searched this wide at export
    offline = stages.search_index(
        read_index(artifact, manifest, arrays["track_embeddings"]),
        arrays,
        manifest.known_top_k,
        result.known,
        users,
    )[:, :20]
    np.testing.assert_array_equal(served.indices, offline)
    exact = np.concatenate(
        [i for i, _ in score_chunks(queries, candidates, 20, result.known[users])]
    )
    assert overlap(served.indices, exact) >= 0.5
    for row, u in zip(served.indices, users, strict=True):
        assert not set(row) & set(enc.val[u].indices) and not set(row) & set(enc.train[u].indices)
    # 4. Reloaded, the exported model answers the same.
    again = Recommender.load(artifact).top_k_batch(list(enc.user_ids[users]), 20)
    np.testing.assert_array_equal(again.indices, served.indices)


def test_mirrored_strategy_on_two_logical_cpus(synth_data, tmp_path):
    script = f"""
import json
from tracktower.features.tf import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from tracktower.training.config import IndexConfig, ModelConfig, load_config
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
    # A completed run leaves no backup behind (BackupAndRestore ran under the mirrored strategy).
    assert not list((tmp_path / "ckpt").rglob("ckpt-*"))


def _scripted_validation(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> list:
    """Each epoch's validation returns the next score; the weights it saw are recorded."""
    weights: list[list[np.ndarray]] = []

    def scripted(self: train_module._Validation) -> dict[str, float]:
        weights.append(self.model.get_weights())
        return {"recall_at_20": scores[len(weights) - 1]}

    monkeypatch.setattr(train_module._Validation, "_validate", scripted)
    return weights


@pytest.mark.parametrize(
    ("scores", "epochs", "best"),
    [
        ([0.1, 0.3, 0.2], 3, 2),  # runs out of epochs after a worse one: still restores
        ([0.3, 0.2, 0.1, 0.5], 4, 1),  # patience 2 stops after epoch 3, before the better one
    ],
)
def test_fit_keeps_the_best_epochs_weights_and_reports_its_metrics(
    synth_data, monkeypatch, scores, epochs, best
):
    weights = _scripted_validation(monkeypatch, scores)
    cfg = _cfg(synth_data, f"train.epochs={epochs}", "train.early_stopping.patience=2")
    data = prepare(cfg.data, cfg.split)
    result = fit(cfg, data.encoded, data.track_artist)
    assert [row["val_recall_at_20"] for row in result.history] == scores[:3]  # 3 epochs each
    assert result.best_epoch == best
    assert result.best_val == {"val_recall_at_20": scores[best - 1]}
    kept = result.model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(kept, weights[best - 1], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(kept, weights[-1], strict=True))


def test_max_steps_caps_each_epoch_and_progress_goes_to_the_hook(synth_data, monkeypatch):
    _scripted_validation(monkeypatch, [0.1, 0.2])
    cfg = _cfg(
        synth_data,
        "train.epochs=2",
        "train.max_steps=5",
        "train.lr_schedule=cosine",
        "train.early_stopping.patience=5",
    )
    data = prepare(cfg.data, cfg.split)
    seen: list[tuple[int, dict[str, float]]] = []
    result = fit(cfg, data.encoded, data.track_artist, on_progress=lambda s, f: seen.append((s, f)))
    # 5 steps an epoch, for the step count and the cosine schedule alike.
    assert int(result.model.optimizer.iterations.numpy()) == 10
    schedule = result.model.optimizer.get_config()["learning_rate"]
    assert schedule["config"]["decay_steps"] == 10
    # Every tenth of a 5-step epoch is a step: the hook sees global steps 1..10.
    assert [step for step, _ in seen] == list(range(1, 11))
    for step, figures in seen:
        assert figures["examples_per_sec"] > 0 and np.isfinite(figures["loss"])
        assert figures["epoch_fraction"] == pytest.approx(((step - 1) % 5 + 1) / 5)
    assert seen[4][1]["eta_seconds"] == 0.0 < seen[0][1]["eta_seconds"]
    row = result.history[0]
    assert row["examples_per_sec"] * row["epoch_seconds"] == pytest.approx(5 * result.batch_size)


def test_unknown_early_stopping_metric_is_a_one_line_error(synth_data):
    cfg = _cfg(synth_data, "train.epochs=1", "train.early_stopping.metric=recall_at_30")
    data = prepare(cfg.data, cfg.split)
    with pytest.raises(DataError, match=r"train\.early_stopping\.metric: 'recall_at_30'"):
        fit(cfg, data.encoded, data.track_artist)


def test_an_interrupted_fit_resumes_from_its_checkpoint_dir(synth_data, tmp_path):
    cfg = _cfg(synth_data, "train.epochs=3", "train.early_stopping.patience=5")
    data = prepare(cfg.data, cfg.split)
    backup = tmp_path / "backup"

    def interrupt(epoch: int, row: dict[str, float]) -> None:
        if epoch == 2:  # before epoch 2's backup: the job dies with epoch 1 saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, data.encoded, data.track_artist, checkpoint_dir=backup, on_epoch=interrupt)
    assert list(backup.rglob("ckpt-*"))
    seen: list[int] = []
    result = fit(
        cfg,
        data.encoded,
        data.track_artist,
        checkpoint_dir=backup,
        on_epoch=lambda e, r: seen.append(e),
    )
    assert seen == [2, 3] and len(result.history) == 2
    steps = len(data.encoded.train.data) // result.batch_size
    # The optimizer resumed too (its step count drives the learning-rate schedule).
    assert int(result.model.optimizer.iterations.numpy()) == 3 * steps
    assert not list(backup.rglob("ckpt-*"))


# Tiny models on clustered data built here: each tower and loss learns something.


def test_model_learns_clusters_better_than_chance():
    tf.keras.utils.set_random_seed(0)
    x = clustered_matrix()
    cfg = ModelConfig(embedding_dim=16, query_layers=[32], temperature=0.1)
    model = TwoTowerModel(cfg, x.shape[0], x.shape[1])
    model.compile(optimizer=tf.keras.optimizers.Adam(0.02))
    ds = clustered_dataset(x, "none")
    losses = model.fit(ds, epochs=6, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    q = evaluate.user_embeddings(model, x, np.arange(x.shape[0]))
    c = evaluate.track_embeddings(model)
    top = np.argsort(-(q @ c.T), axis=1)[:, :20]
    same_cluster = (top // 50) == (np.arange(x.shape[0]) % 4)[:, None]
    assert same_cluster.mean() > 0.8  # chance is 0.25


def test_mixed_negatives_loss_runs_and_decreases():
    tf.keras.utils.set_random_seed(0)
    x = clustered_matrix()
    cfg = ModelConfig(
        embedding_dim=8,
        query_layers=[],
        use_user_id=False,
        uniform_negatives=32,
        negatives="in_batch",
    )
    model = TwoTowerModel(cfg, x.shape[0], x.shape[1])
    model.compile(optimizer=tf.keras.optimizers.Adam(0.02))
    ds = clustered_dataset(x, "log1p")
    losses = model.fit(ds, epochs=3, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_full_softmax_learns():
    tf.keras.utils.set_random_seed(0)
    x = clustered_matrix()
    model = TwoTowerModel(ModelConfig(embedding_dim=8), x.shape[0], x.shape[1])
    assert model.full_softmax
    model.compile(optimizer=tf.keras.optimizers.Adam(0.02))
    losses = model.fit(clustered_dataset(x, "none"), epochs=3, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_user_embeddings_equal_the_eager_per_batch_reference(monkeypatch: pytest.MonkeyPatch):
    """Users sorted by history length into large traced batches give what the query tower gives
    eagerly, 1,024 users at a time padded to each batch's longest history (the former path),
    for users without history, heavy users and users asked for twice, in the caller's order."""
    from tracktower.training.pipeline import history_rows

    rng = np.random.default_rng(5)
    n_users, n_tracks = 1500, 900
    lengths = np.minimum(rng.lognormal(3.0, 1.0, n_users).astype(int), 800)
    lengths[:5] = 0
    rows = np.repeat(np.arange(n_users), lengths)
    known = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, rng.integers(0, n_tracks, len(rows)))),
        shape=(n_users, n_tracks),
    )
    known.sum_duplicates()
    model = TwoTowerModel(ModelConfig(embedding_dim=16), n_users, n_tracks)
    users = np.concatenate([rng.permutation(n_users), [3, 7, 7]])
    want = []
    for start in range(0, len(users), 1024):
        batch = users[start : start + 1024]
        feats = {
            "user": tf.constant(batch.astype(np.int32) + 1),
            "history": tf.constant(history_rows(known, batch)),
        }
        want.append(model.query_tower(feats).numpy())
    monkeypatch.setattr(evaluate, "MAX_SLOTS", 5000)  # many batches, some of one heavy user
    monkeypatch.setattr(evaluate, "MAX_USERS", 300)
    got = evaluate.user_embeddings(model, known, users)
    assert got.dtype == np.float32 and got.shape == (len(users), model.output_dim)
    np.testing.assert_allclose(got, np.concatenate(want), atol=1e-5, rtol=0)
    assert evaluate.user_embeddings(model, known, users[:0]).shape == (0, model.output_dim)
