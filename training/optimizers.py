"""Optimizers whose per-step cost follows the batch, not the catalogue.

tf-keras's Adam, given the sparse gradient of an embedding lookup, still decays the first and
second moments of EVERY row of the table each step (``m.assign_add(-m * (1 - beta_1))`` over
the whole slot), then rewrites every row of the table itself: three passes over
``tracks x dim`` floats per table per step, whatever the batch touched. At 2.26M tracks x 128
that is most of a step. :class:`LazyAdam` updates only the rows the batch gathered, as
TF-Addons' ``LazyAdam`` did: a row's moments decay only on the steps that touch it.
"""

from __future__ import annotations

from typing import Any

from tracktower.features.tf import tf


class LazyAdam(tf.keras.optimizers.Adam):
    """Adam whose sparse (``IndexedSlices``) updates read and write only the gathered rows.

    Dense gradients (the towers' dense layers, or a full-softmax loss that touches every row)
    take Adam's own path, so on dense gradients it is Adam exactly. On sparse ones a row's
    moments are those of Adam run on that row's own sequence of updates, with the bias
    correction of the global step, as in TF-Addons. The base optimizer has already summed
    duplicate indices when ``update_step`` runs, so each row is updated once per step.

    XLA is off by default: a sparse update's row count changes every step, and XLA would
    compile once per distinct count.
    """

    def __init__(self, learning_rate: Any = 0.001, *, jit_compile: bool = False, **kwargs: Any):
        if kwargs.get("amsgrad"):
            raise ValueError("LazyAdam does not implement amsgrad")
        super().__init__(learning_rate=learning_rate, jit_compile=jit_compile, **kwargs)

    def update_step(self, gradient: Any, variable: tf.Variable) -> Any:
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        beta_1_power = tf.pow(beta_1, step)
        beta_2_power = tf.pow(beta_2, step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        epsilon = (
            self.epsilon * tf.sqrt(1 - beta_2_power) if self.adaptive_epsilon else self.epsilon
        )

        key = self._var_key(variable)
        m = self._momentums[self._index_dict[key]]
        v = self._velocities[self._index_dict[key]]
        rows, grad = gradient.indices, gradient.values
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * grad
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(grad)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        return variable.scatter_sub(
            tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + epsilon), rows)
        )
