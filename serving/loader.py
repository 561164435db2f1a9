"""The TensorFlow side of loading an artifact: the history tower for users the model never saw.

Everything else in the artifact is read by ``tracktower.features.artifact``; this is kept apart so
that readers which never score by history (batch, the pyfunc) do not import TensorFlow. The
SavedModel takes the pooled history (the mean of ``history_embeddings`` rows, computed by the
caller from the memory-mapped array) and holds no embedding table, so it is small in every
worker.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tracktower.features.artifact import (
    HISTORY_INPUT,
    HISTORY_OUTPUT,
    HISTORY_SIGNATURE,
    SAVED_MODEL_DIR,
)
from tracktower.features.errors import DataError


def load_history_tower(path: Path, history_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """``pooled histories [batch, history_dim] → query embeddings [batch, dim]`` through the
    SavedModel's signature: one call for a batch, which is what makes batching sessions pay (the
    call's fixed cost, about 0.5 ms, dwarfs a small MLP's arithmetic)."""
    from tracktower.features.tf import tf

    saved = Path(path) / SAVED_MODEL_DIR
    if not saved.is_dir():
        raise DataError(f"manifest has_history_tower but {SAVED_MODEL_DIR}/ is missing", path=path)
    loaded = tf.saved_model.load(str(saved))
    if HISTORY_SIGNATURE not in loaded.signatures:
        raise DataError(f"saved_model has no '{HISTORY_SIGNATURE}' signature", path=saved)
    fn = loaded.signatures[HISTORY_SIGNATURE]
    spec = fn.structured_input_signature[1].get(HISTORY_INPUT)
    if spec is None or spec.shape.as_list()[-1] != history_dim:
        raise DataError(
            f"saved_model signature '{HISTORY_SIGNATURE}' does not take {HISTORY_INPUT} "
            f"[batch, {history_dim}] (history_dim in the manifest)",
            path=saved,
        )

    def query(pooled: np.ndarray) -> np.ndarray:
        batch = tf.constant(np.asarray(pooled, dtype=np.float32).reshape(-1, history_dim))
        out = fn(**{HISTORY_INPUT: batch})
        return np.asarray(out[HISTORY_OUTPUT].numpy(), dtype=np.float32)

    query.keep_alive = loaded  # type: ignore[attr-defined]  # the signature needs its module alive
    return query
