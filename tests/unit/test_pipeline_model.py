"""The input pipeline and the towers, on tiny data built here."""

import numpy as np
import scipy.sparse as sp

from tracktower.features.tf import tf
from tracktower.training import pipeline
from tracktower.training.config import ModelConfig
from tracktower.training.model import TwoTowerModel


def _clustered(users=120, tracks=200, per_user=12, clusters=4, seed=0):
    rng = np.random.default_rng(seed)
    size = tracks // clusters
    rows, cols = [], []
    for u in range(users):
        c = u % clusters
        rows += [u] * per_user
        cols += list(rng.choice(np.arange(c * size, (c + 1) * size), per_user, replace=False))
    data = rng.integers(1, 20, len(rows)).astype(np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(users, tracks))


def _dataset(x: sp.csr_matrix, weighting: str):
    return pipeline.training_dataset(
        pipeline.make_examples(x, weighting),
        pipeline.history_matrix(x, 40, 0),
        batch_size=128,
        history_max_len=10,
        user_id_dropout=0.0,
        seed=0,
    )


def test_examples_weighting_and_log_q():
    x = sp.csr_matrix(np.array([[1, 0, 9], [0, 4, 1]], dtype=np.float32))
    none = pipeline.make_examples(x, "none")
    assert np.allclose(none.weight, 1.0)
    raw = pipeline.make_examples(x, "raw")
    assert np.isclose(raw.weight.mean(), 1.0)
    assert raw.weight.max() > pipeline.make_examples(x, "log1p").weight.max()
    # track 2 appears twice among 4 examples: q = 0.5
    assert np.isclose(np.exp(none.log_q[none.track == 3]), 0.5).all()
    assert none.user.min() == 1 and none.track.min() == 1  # 0 is reserved for OOV


def test_history_matrix_caps_heavy_users_with_a_random_subset():
    x = sp.csr_matrix(np.array([[1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]], dtype=np.float32))
    table = pipeline.history_matrix(x, 4, 0)
    assert table.shape == (3, 4)
    assert (table[0] == 0).all()
    assert len(set(table[1])) == 4 and set(table[1]) <= {1, 2, 3, 4, 5, 6}
    assert list(table[2]) == [2, 0, 0, 0]


def test_auto_batch_size_scales_with_data():
    assert pipeline.auto_batch_size(1_000) == 256
    assert pipeline.auto_batch_size(400_000) == 1024
    assert pipeline.auto_batch_size(100_000_000) == 8192


def test_training_history_never_contains_the_target_and_is_bounded():
    x = _clustered()
    ex = pipeline.make_examples(x, "none")
    table = pipeline.history_table(x)
    ds = pipeline.training_dataset(
        ex,
        pipeline.history_matrix(x, 40, 0),
        batch_size=64,
        history_max_len=5,
        user_id_dropout=0.5,
        seed=0,
    )
    for batch in ds.take(5):
        hist = batch["history"].numpy()
        assert hist.shape[1] == 5
        assert not np.any(hist == batch["track"].numpy()[:, None])
        assert (batch["user"].numpy() == 0).any()  # some user ids hidden
        for user, track, row in zip(
            batch["user"].numpy(), batch["track"].numpy(), hist, strict=True
        ):
            if user:  # every history item belongs to the example's user, target excluded
                mine = set(x[user - 1].indices + 1) - {track}
                assert set(row[row > 0]) <= mine
                assert len(row[row > 0]) == min(5, len(mine))
    full = pipeline.gather_history(table, tf.constant([1, 0]))
    assert set(full.numpy()[0][full.numpy()[0] > 0] - 1) == set(x[0].indices)
    assert (full.numpy()[1] == 0).all()  # unknown user: empty history


def test_model_learns_clusters_better_than_chance():
    x = _clustered()
    cfg = ModelConfig(embedding_dim=16, query_layers=[32], temperature=0.1)
    model = TwoTowerModel(cfg, x.shape[0], x.shape[1])
    model.compile(optimizer=tf.keras.optimizers.Adam(0.02))
    table = pipeline.history_table(x)
    ds = _dataset(x, "none")
    losses = model.fit(ds, epochs=6, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    users = tf.range(1, x.shape[0] + 1)
    q = model.query_tower({"user": users, "history": pipeline.gather_history(table, users)})
    c = model.candidate_tower(tf.range(1, x.shape[1] + 1))
    top = np.argsort(-(q.numpy() @ c.numpy().T), axis=1)[:, :20]
    same_cluster = (top // 50) == (np.arange(x.shape[0]) % 4)[:, None]
    assert same_cluster.mean() > 0.8  # chance is 0.25


def test_mixed_negatives_loss_runs_and_decreases():
    x = _clustered()
    cfg = ModelConfig(
        embedding_dim=8,
        query_layers=[],
        use_user_id=False,
        uniform_negatives=32,
        negatives="in_batch",
    )
    model = TwoTowerModel(cfg, x.shape[0], x.shape[1])
    model.compile(optimizer=tf.keras.optimizers.Adam(0.02))
    ds = _dataset(x, "log1p")
    losses = model.fit(ds, epochs=3, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_full_softmax_is_chosen_by_catalogue_size_and_learns():
    x = _clustered()
    small = TwoTowerModel(ModelConfig(embedding_dim=8), x.shape[0], x.shape[1])
    assert small.full_softmax
    capped = ModelConfig(embedding_dim=8, full_softmax_max_tracks=100)
    assert not TwoTowerModel(capped, x.shape[0], x.shape[1]).full_softmax
    assert not TwoTowerModel(
        ModelConfig(embedding_dim=8, negatives="in_batch"), x.shape[0], x.shape[1]
    ).full_softmax
    small.compile(optimizer=tf.keras.optimizers.Adam(0.02))
    ds = _dataset(x, "none")
    losses = small.fit(ds, epochs=3, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_untied_track_embeddings_give_the_history_its_own_table():
    tied = TwoTowerModel(ModelConfig(embedding_dim=4), 3, 5)
    untied = TwoTowerModel(ModelConfig(embedding_dim=4, tie_track_embeddings=False), 3, 5)
    assert tied.query_tower.track_embedding is tied.candidate_tower.track_embedding
    assert untied.query_tower.track_embedding is not untied.candidate_tower.track_embedding


def test_track_bias_is_one_more_column_so_scores_stay_dot_products():
    cfg = ModelConfig(embedding_dim=4, use_user_id=False, track_bias=True, temperature=0.1)
    model = TwoTowerModel(cfg, 3, 5)
    model.candidate_tower(tf.range(1, 6))  # builds the layers
    model.candidate_tower.bias.set_weights([np.arange(6, dtype=np.float32)[:, None]])
    q = model.query_tower({"user": tf.constant([1]), "history": tf.constant([[1, 2]])}).numpy()
    c = model.candidate_tower(tf.range(1, 6)).numpy()
    assert q.shape == (1, 5) and c.shape == (5, 5) and q[0, -1] == 1.0
    cosine = q[:, :4] @ c[:, :4].T
    # the loss divides by the temperature: dot / T == cosine / T + bias
    np.testing.assert_allclose((q @ c.T) / 0.1, cosine / 0.1 + np.arange(1, 6), rtol=1e-5)


def test_cosine_schedule_spans_all_allowed_epochs():
    from tracktower.training.config import TrainConfig
    from tracktower.training.train import _optimizer

    constant = _optimizer(TrainConfig(learning_rate=0.01), 10).get_config()["learning_rate"]
    assert np.isclose(constant, 0.01)
    cfg = TrainConfig(lr_schedule="cosine", learning_rate=0.01, epochs=3)
    schedule = _optimizer(cfg, 10).get_config()["learning_rate"]
    assert schedule["class_name"] == "CosineDecay"
    assert schedule["config"]["decay_steps"] == 30 and schedule["config"]["alpha"] == 0.0


def test_dataset_knows_its_steps_per_epoch_for_the_lr_schedule():
    x = _clustered()
    ex = pipeline.make_examples(x, "none")
    for batch_size, steps in ((128, len(ex) // 128), (len(ex) + 1, 1)):
        ds = pipeline.training_dataset(
            ex,
            pipeline.history_matrix(x, 40, 0),
            batch_size=batch_size,
            history_max_len=10,
            user_id_dropout=0.0,
            seed=0,
        )
        assert int(ds.cardinality()) == steps == sum(1 for _ in ds)
