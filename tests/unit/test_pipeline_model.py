"""The input pipeline, the towers and the loss, on tiny data built here (no training: tests that
fit a model are in tests/integration/test_training.py)."""

import numpy as np
import scipy.sparse as sp
from builders import clustered_matrix

from tracktower.features.tf import tf
from tracktower.training import pipeline
from tracktower.training.config import ModelConfig
from tracktower.training.model import TwoTowerModel


def test_examples_weighting_and_log_q():
    x = sp.csr_matrix(np.array([[1, 0, 9], [0, 4, 1]], dtype=np.float32))
    none = pipeline.make_examples(x, "none")
    assert np.allclose(none.weight, 1.0)
    raw = pipeline.make_examples(x, "raw")
    assert np.isclose(raw.weight.mean(), 1.0)
    assert raw.weight.max() > pipeline.make_examples(x, "log1p").weight.max()
    # track 2 appears twice among 4 examples: q = 0.5 (a per-track table, row 0 for OOV)
    assert np.isclose(np.exp(none.track_log_q[3]), 0.5)
    assert none.user.min() == 1 and none.track.min() == 1  # 0 is reserved for OOV
    w = {(u, t): wt for u, t, wt in zip(raw.user, raw.track, raw.weight, strict=True)}
    assert np.isclose(w[(1, 3)] / w[(2, 2)], 9 / 4)  # each weight stays with its own row


def test_user_weight_power_evens_out_heavy_and_light_users():
    # user 0: 4 rows, user 1: 1 row; play counts 1 everywhere so only the user factor acts
    x = sp.csr_matrix(np.array([[1, 1, 1, 1], [0, 0, 1, 0]], dtype=np.float32))
    for power, share in ((0.0, 4 / 5), (0.5, 4 * 0.5 / (4 * 0.5 + 1)), (1.0, 1 / 2)):
        ex = pipeline.make_examples(x, "none", user_weight_power=power)
        assert np.isclose(ex.weight.mean(), 1.0)  # still scaled to mean 1
        heavy = ex.weight[ex.user == 1].sum() / ex.weight.sum()
        assert np.isclose(heavy, share), power
    raw = pipeline.make_examples(
        x.multiply(np.array([[1, 2, 3, 4]])).tocsr(), "raw", user_weight_power=1.0
    )
    w = {(u, t): wt for u, t, wt in zip(raw.user, raw.track, raw.weight, strict=True)}
    assert np.isclose(w[(1, 4)] / w[(1, 1)], 4.0)  # within a user the play counts still rank


def test_examples_are_written_once_in_a_seeded_random_order():
    x = clustered_matrix()
    coo = x.tocoo()
    expected = sorted(zip(coo.row + 1, coo.col + 1, strict=True))
    first = pipeline.make_examples(x, "none", seed=1)
    assert isinstance(first.rows, np.memmap)
    assert sorted(zip(first.user, first.track, strict=True)) == expected
    again = pipeline.make_examples(x, "none", seed=1).rows
    other = pipeline.make_examples(x, "none", seed=2).rows
    np.testing.assert_array_equal(first.rows, again)
    assert not np.array_equal(first.rows, other)
    assert not np.array_equal(first.user, np.sort(first.user))  # not in matrix order
    assert len(pipeline.make_examples(sp.csr_matrix((3, 4)), "none")) == 0


def test_history_rows_cap_heavy_users_with_a_seeded_random_subset():
    x = sp.csr_matrix(np.array([[1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]], dtype=np.float32))
    capped = pipeline.history_rows(x, np.array([0, 1]), cap=4, seed=0)
    assert capped.shape == (2, 4) and capped.dtype == np.int32
    assert len(set(capped[0])) == 4 and set(capped[0]) <= {1, 2, 3, 4, 5, 6}
    assert list(capped[1]) == [2, 0, 0, 0]
    np.testing.assert_array_equal(capped, pipeline.history_rows(x, np.array([0, 1]), 4, seed=0))
    subsets = {tuple(sorted(pipeline.history_rows(x, np.array([0]), 4, s)[0])) for s in range(8)}
    assert len(subsets) > 1  # the seed picks which four


def test_history_rows_uncapped_are_the_whole_rows_in_any_user_order():
    x = sp.csr_matrix(np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=np.float32))
    rows = pipeline.history_rows(x, np.array([2, 1, 0, 1]))
    np.testing.assert_array_equal(rows, [[0, 0, 0], [1, 2, 3], [2, 0, 0], [1, 2, 3]])
    assert pipeline.history_rows(x, np.array([2])).shape == (1, 1)  # empty history: one 0 slot
    assert pipeline.history_rows(x, np.array([], dtype=np.int64)).shape == (0, 1)


def test_auto_batch_size_scales_with_data():
    assert pipeline.auto_batch_size(1_000) == 256
    assert pipeline.auto_batch_size(400_000) == 1024
    assert pipeline.auto_batch_size(100_000_000) == 8192


def test_training_history_never_contains_the_target_and_is_bounded():
    x = clustered_matrix()
    ex = pipeline.make_examples(x, "none")
    ds = pipeline.training_dataset(
        ex,
        x,
        batch_size=64,
        history_max_len=5,
        user_id_dropout=0.5,
        seed=0,
    )
    hidden = 0
    for batch in ds.take(5):
        hist = batch["history"].numpy()
        assert hist.shape[1] == 5
        assert not np.any(hist == batch["track"].numpy()[:, None])
        hidden += int((batch["user"].numpy() == 0).sum())
        for user, track, row in zip(
            batch["user"].numpy(), batch["track"].numpy(), hist, strict=True
        ):
            if user:  # every history item belongs to the example's user, target excluded
                mine = set(x[user - 1].indices + 1) - {track}
                assert set(row[row > 0]) <= mine
                assert len(row[row > 0]) == min(5, len(mine))
    assert hidden > 0  # some user ids hidden


def test_history_dropout_hides_a_fresh_share_of_each_history_and_nothing_else():
    x = clustered_matrix()
    ex = pipeline.make_examples(x, "none")

    def batches(p: float) -> list[dict[str, np.ndarray]]:
        ds = pipeline.training_dataset(
            ex,
            x,
            batch_size=64,
            history_max_len=5,
            user_id_dropout=0.0,
            seed=0,
            history_dropout=p,
        )
        return [{k: v.numpy() for k, v in b.items()} for b in ds.take(20)]

    full, dropped = batches(0.0), batches(0.5)
    shown = kept = 0
    for a, b in zip(full, dropped, strict=True):
        np.testing.assert_array_equal(a["track"], b["track"])  # same examples, same order
        # every track still shown was in the full history, in its place; the rest is padding
        same = (b["history"] == a["history"]) | (b["history"] == 0)
        assert same.all()
        shown += int((a["history"] > 0).sum())
        kept += int((b["history"] > 0).sum())
    assert 0.4 < kept / shown < 0.6
    # a new draw every pass: the same examples lose different tracks in the second epoch
    again = batches(0.5)
    assert any(
        not np.array_equal(a["history"], b["history"]) for a, b in zip(dropped, again, strict=True)
    )


def test_mixed_negatives_loss_is_the_sampled_softmax_written_out(monkeypatch):
    """Retrieval with extra columns: temperature, logQ on every column, accidental hits masked in
    the batch and among the uniform negatives, and the weighted sum as the loss scale."""
    tf.keras.utils.set_random_seed(0)
    cfg = ModelConfig(
        embedding_dim=4,
        use_user_id=False,
        query_layers=[],
        temperature=0.1,
        uniform_negatives=3,
        negatives="in_batch",
    )
    model = TwoTowerModel(cfg, 5, 10)
    track = np.array([1, 2, 2, 7], np.int32)  # rows 1 and 2 share their positive
    extra = np.array([2, 9, 4], np.int32)  # the uniform draw hits track 2 once more
    features = {
        "user": tf.zeros(4, tf.int32),
        "history": tf.constant([[1, 3], [4, 0], [5, 6], [8, 0]]),
        "track": tf.constant(track),
        "weight": tf.constant([1.0, 2.0, 0.5, 1.0]),
        "log_q": tf.constant(np.log([0.1, 0.3, 0.3, 0.05]).astype(np.float32)),
    }
    ids = np.concatenate([track, extra])
    q = model.query_tower(features).numpy()
    c = model.candidate_tower(tf.constant(ids)).numpy()
    monkeypatch.setattr(tf.random, "uniform", lambda *a, **k: tf.constant(extra))
    loss = float(model.compute_loss(features))

    log_q = np.concatenate([np.log([0.1, 0.3, 0.3, 0.05]), np.full(3, -np.log(10.0))])
    scores = (q @ c.T) / 0.1 - log_q[None, :]
    expected = 0.0
    for i, weight in enumerate([1.0, 2.0, 0.5, 1.0]):
        keep = (ids != track[i]) | (np.arange(len(ids)) == i)
        row = scores[i][keep]
        expected += weight * (np.log(np.exp(row - row.max()).sum()) + row.max() - scores[i, i])
    assert np.isclose(loss, expected, rtol=1e-4), (loss, expected)


def test_log_q_correction_is_exact_below_tfrs_probability_floor():
    """A catalogue-scale q (below TFRS's 1e-6 clip) must still be corrected exactly."""
    cfg = ModelConfig(
        embedding_dim=4,
        use_user_id=False,
        query_layers=[],
        temperature=0.1,
        uniform_negatives=0,
        negatives="in_batch",
        track_bias=False,
        use_artist=False,
    )
    model = TwoTowerModel(cfg, 5, 10)
    track = np.array([1, 3, 5, 7], np.int32)
    q = np.array([2e-9, 6e-8, 3e-9, 4e-7])
    features = {
        "user": tf.zeros(4, tf.int32),
        "history": tf.constant([[1, 3], [4, 0], [5, 6], [8, 0]]),
        "track": tf.constant(track),
        "weight": tf.ones(4),
        "log_q": tf.constant(np.log(q).astype(np.float32)),
    }
    loss = float(model.compute_loss(features))
    scores = (
        model.query_tower(features).numpy() @ model.candidate_tower(tf.constant(track)).numpy().T
    ) / 0.1 - np.log(q)[None, :]
    expected = sum(
        np.log(np.exp(row - row.max()).sum()) + row.max() - row[i] for i, row in enumerate(scores)
    )
    assert np.isclose(loss, expected, rtol=1e-4), (loss, expected)


def test_full_softmax_is_chosen_by_catalogue_size():
    x = clustered_matrix()
    assert TwoTowerModel(ModelConfig(embedding_dim=8), x.shape[0], x.shape[1]).full_softmax
    capped = ModelConfig(embedding_dim=8, full_softmax_max_tracks=100)
    assert not TwoTowerModel(capped, x.shape[0], x.shape[1]).full_softmax
    assert not TwoTowerModel(
        ModelConfig(embedding_dim=8, negatives="in_batch"), x.shape[0], x.shape[1]
    ).full_softmax


def test_untied_track_embeddings_give_the_history_its_own_table():
    tied = TwoTowerModel(ModelConfig(embedding_dim=4), 3, 5)
    untied = TwoTowerModel(ModelConfig(embedding_dim=4, tie_track_embeddings=False), 3, 5)
    assert tied.query_tower.track_embedding is tied.candidate_tower.track_embedding
    assert untied.query_tower.track_embedding is not untied.candidate_tower.track_embedding


def test_history_pooling_through_distinct_rows_is_the_masked_mean_and_its_gradient():
    cfg = ModelConfig(embedding_dim=4, use_user_id=False, tie_track_embeddings=False)
    model = TwoTowerModel(cfg, 3, 6)
    table = model.query_tower.track_embedding.embeddings
    history = tf.constant([[1, 2, 2, 0], [3, 1, 0, 0], [0, 0, 0, 0]])
    with tf.GradientTape() as tape:
        pooled = model.query_tower.pool(history)
        loss = tf.reduce_sum(pooled * tf.range(1.0, 5.0))
    grad = tf.convert_to_tensor(tape.gradient(loss, table)).numpy()
    rows = table.numpy()
    expected = np.stack([(rows[1] + 2 * rows[2]) / 3, (rows[3] + rows[1]) / 2, np.zeros(4)])
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-6)
    # d loss / d row: its count in each history over that history's length, times (1..4)
    weight = np.zeros(7)
    weight[[1, 2]] += [1 / 3, 2 / 3]
    weight[[3, 1]] += [1 / 2, 1 / 2]
    np.testing.assert_allclose(grad, weight[:, None] * np.arange(1.0, 5.0), rtol=1e-6)


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

    constant = _optimizer(TrainConfig(), 10, 0.01).get_config()["learning_rate"]
    assert np.isclose(constant, 0.01)
    cfg = TrainConfig(lr_schedule="cosine", learning_rate=0.01, epochs=3)
    schedule = _optimizer(cfg, 10, cfg.learning_rate).get_config()["learning_rate"]
    assert schedule["class_name"] == "CosineDecay"
    assert schedule["config"]["decay_steps"] == 30 and schedule["config"]["alpha"] == 0.0


def test_weight_decay_shrinks_every_weight_by_rate_times_decay():
    from tracktower.training.config import TrainConfig
    from tracktower.training.train import _optimizer

    for name in ("adam", "lazy_adam", "adagrad", "sgd"):
        assert (
            _optimizer(TrainConfig(optimizer=name), 10, 0.01).get_config()["weight_decay"] is None
        )
    opt = _optimizer(TrainConfig(weight_decay=0.5), 10, 0.01)
    assert opt.get_config()["weight_decay"] == 0.5
    var = tf.Variable(tf.ones([3, 2]))
    opt.apply_gradients([(tf.zeros([3, 2]), var)])  # a zero gradient: only the decay acts
    np.testing.assert_allclose(var.numpy(), 1.0 - 0.01 * 0.5, rtol=1e-6)


def test_dataset_knows_its_steps_per_epoch_for_the_lr_schedule():
    x = clustered_matrix()
    ex = pipeline.make_examples(x, "none")
    for batch_size, steps in ((128, len(ex) // 128), (len(ex) + 1, 1)):
        ds = pipeline.training_dataset(
            ex,
            x,
            batch_size=batch_size,
            history_max_len=10,
            user_id_dropout=0.0,
            seed=0,
        )
        assert int(ds.cardinality()) == steps == sum(1 for _ in ds)


def _epoch(ds) -> list[tuple[int, int]]:
    return [
        (int(u), int(t))
        for batch in ds
        for u, t in zip(batch["user"].numpy(), batch["track"].numpy(), strict=True)
    ]


def test_each_epoch_sees_every_example_once_in_a_new_order_through_a_small_buffer():
    x = clustered_matrix()  # 1440 examples = 45 batches of 32
    ex = pipeline.make_examples(x, "none", seed=0)
    ds = pipeline.training_dataset(
        ex,
        x,
        batch_size=32,
        history_max_len=5,
        user_id_dropout=0.0,
        seed=0,
        shuffle_buffer=100,  # groups of 100 examples: 15 groups, the last one partial
        with_history=False,
    )
    assert int(ds.cardinality()) == 45
    one, two = _epoch(ds), _epoch(ds)
    everything = sorted(zip(ex.user.tolist(), ex.track.tolist(), strict=True))
    assert sorted(one) == sorted(two) == everything
    assert one != two
    first = next(iter(ds))
    assert "history" not in first  # built only when the model reads it
    share = np.bincount(x.indices, minlength=x.shape[1]) / x.nnz
    np.testing.assert_allclose(
        np.exp(first["log_q"].numpy()), share[first["track"].numpy() - 1], rtol=1e-5
    )


def test_max_steps_caps_each_epoch_and_the_steps_follow_the_cap():
    x = clustered_matrix()
    ex = pipeline.make_examples(x, "none")
    assert pipeline.steps_per_epoch(len(ex), 32) == 45
    assert pipeline.steps_per_epoch(len(ex), 32, max_steps=7) == 7
    assert pipeline.steps_per_epoch(len(ex), 32, max_steps=100) == 45
    assert pipeline.steps_per_epoch(10, 32) == 1
    ds = pipeline.training_dataset(
        ex, x, batch_size=32, history_max_len=5, user_id_dropout=0.0, seed=0, max_steps=7
    )
    assert int(ds.cardinality()) == 7 == sum(1 for _ in ds)
    assert _epoch(ds)[:32] != _epoch(ds)[:32]  # a new window of the data each epoch


def test_history_table_is_bounded_and_row_zero_is_the_unknown_user():
    x = clustered_matrix(per_user=12)
    table = pipeline.history_table(x, 6, seed=0)
    assert table.shape == (x.shape[0] + 1, 6) and not table[0].any()
    for user in (1, 50, 120):
        assert set(table[user]) <= set(x[user - 1].indices + 1) and (table[user] > 0).all()
    light = pipeline.history_table(x, 100, seed=0)
    assert light.shape == (x.shape[0] + 1, 12)  # as wide as the longest history, no wider


def test_lazy_adam_is_an_optimizer_choice_scaled_like_adam():
    from tracktower.training.config import TrainConfig
    from tracktower.training.optimizers import LazyAdam
    from tracktower.training.strategy import scaled_learning_rate
    from tracktower.training.train import _optimizer

    cfg = TrainConfig().model_copy(update={"optimizer": "lazy_adam"})
    assert isinstance(_optimizer(cfg, 10, 0.01), LazyAdam)
    assert scaled_learning_rate("lazy_adam", 0.01, 4) == scaled_learning_rate("adam", 0.01, 4)


def test_the_scratch_file_lives_as_long_as_its_dataset():
    """TensorFlow keeps a numpy_function for the life of the process: the examples' memory map
    (and with it the scratch file's disk space) must not be kept with it."""
    import gc
    import weakref

    x = clustered_matrix()
    ex = pipeline.make_examples(x, "none")
    rows = weakref.ref(ex.rows)
    ds = pipeline.training_dataset(
        ex, x, batch_size=32, history_max_len=5, user_id_dropout=0.0, seed=0
    )
    del ex
    gc.collect()
    assert rows() is not None and sum(1 for _ in ds) == 45  # the dataset alone holds them
    del ds
    gc.collect()
    assert rows() is None
