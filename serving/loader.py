"""The TensorFlow side of loading an artifact: the history tower for users the model never saw.

Everything else in the artifact is read by ``tracktower.features.artifact``; this is kept apart so
that readers which never score by history (batch, the pyfunc) do not import TensorFlow.
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


def load_history_tower(path: Path) -> Callable[[list[str]], np.ndarray]:
    """``track ids → query embedding`` through the SavedModel's history signature."""
    from tracktower.features.tf import tf

    saved = Path(path) / SAVED_MODEL_DIR
    if not saved.is_dir():
        raise DataError(f"manifest has_history_tower but {SAVED_MODEL_DIR}/ is missing", path=path)
    loaded = tf.saved_model.load(str(saved))
    if HISTORY_SIGNATURE not in loaded.signatures:
        raise DataError(f"saved_model has no '{HISTORY_SIGNATURE}' signature", path=saved)
    fn = loaded.signatures[HISTORY_SIGNATURE]

    def query(track_ids: list[str]) -> np.ndarray:
        out = fn(**{HISTORY_INPUT: tf.constant([track_ids], dtype=tf.string)})
        return np.asarray(out[HISTORY_OUTPUT].numpy()[0], dtype=np.float32)

    query.keep_alive = loaded  # type: ignore[attr-defined]  # the signature needs its module alive
    return query
