"""LazyAdam against tf-keras's Adam and against Adam written out in numpy, on tiny variables."""

import numpy as np
import pytest

from tracktower.features.tf import tf
from tracktower.training.optimizers import LazyAdam


def _run(optimizer, grads, initial):
    var = tf.Variable(initial)
    for grad in grads:
        optimizer.apply_gradients([(grad, var)])
    return var.numpy(), optimizer


def test_dense_gradients_are_plain_adam():
    rng = np.random.default_rng(0)
    initial = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [tf.constant(rng.normal(size=(5, 3)).astype(np.float32)) for _ in range(4)]
    lazy, _ = _run(LazyAdam(0.1), grads, initial)
    adam, _ = _run(tf.keras.optimizers.Adam(0.1), grads, initial)
    np.testing.assert_allclose(lazy, adam, rtol=1e-6, atol=1e-7)
    assert not np.allclose(lazy, initial)


def test_sparse_gradients_touching_every_row_are_plain_adam():
    rng = np.random.default_rng(1)
    initial = rng.normal(size=(4, 2)).astype(np.float32)
    grads = [
        tf.IndexedSlices(
            tf.constant(rng.normal(size=(4, 2)).astype(np.float32)),
            tf.constant(rng.permutation(4).astype(np.int32)),
            tf.constant([4, 2]),
        )
        for _ in range(3)
    ]
    lazy, _ = _run(LazyAdam(0.05), grads, initial)
    adam, _ = _run(tf.keras.optimizers.Adam(0.05), grads, initial)
    np.testing.assert_allclose(lazy, adam, rtol=1e-5, atol=1e-6)


def test_untouched_rows_and_their_moments_stay_untouched():
    """Rows 0 and 3 take one step each at different global steps; rows 1, 2, 4 never move,
    and a duplicated index is one row update with the summed gradient."""
    initial = np.arange(10, dtype=np.float32).reshape(5, 2)
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-7
    g1 = np.array([[1.0, -2.0], [0.5, 0.5]], np.float32)  # row 0 twice: summed
    g2 = np.array([[3.0, 1.0]], np.float32)
    grads = [
        tf.IndexedSlices(tf.constant(g1), tf.constant([0, 0]), tf.constant([5, 2])),
        tf.IndexedSlices(tf.constant(g2), tf.constant([3]), tf.constant([5, 2])),
    ]
    out, opt = _run(LazyAdam(lr, beta_1=b1, beta_2=b2, epsilon=eps), grads, initial)

    def adam_row(x, g, step):  # one Adam step from zero moments at global step ``step``
        m, v = (1 - b1) * g, (1 - b2) * g * g
        alpha = lr * np.sqrt(1 - b2**step) / (1 - b1**step)
        return x - alpha * m / (np.sqrt(v) + eps)

    np.testing.assert_allclose(out[0], adam_row(initial[0], g1.sum(0), 1), rtol=1e-5)
    np.testing.assert_allclose(out[3], adam_row(initial[3], g2[0], 2), rtol=1e-5)
    np.testing.assert_array_equal(out[[1, 2, 4]], initial[[1, 2, 4]])
    m = opt._momentums[0].numpy()
    np.testing.assert_array_equal(m[[1, 2, 4]], 0.0)
    # Row 0's moment did not decay on step 2, which touched only row 3 (Adam's would have).
    np.testing.assert_allclose(m[0], (1 - b1) * g1.sum(0), rtol=1e-6)


def test_amsgrad_is_refused():
    with pytest.raises(ValueError, match="amsgrad"):
        LazyAdam(0.1, amsgrad=True)
