"""MLflow pyfunc wrapper, so the registered model can be scored by any MLflow consumer.

It delegates to :class:`~tracktower.serving.artifact.Recommender` (the same code the HTTP server
runs) and never loads the TensorFlow history tower: pyfunc inputs carry user ids only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from tracktower.features.artifact import PYFUNC_ARTIFACT_KEY
from tracktower.features.errors import DataError

OUTPUT_COLUMNS = ["user_id", "rank", "track_id", "score", "source"]
DEFAULT_K = 10


class TracktowerModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from tracktower.serving.artifact import Recommender

        self.recommender = Recommender.load(
            context.artifacts[PYFUNC_ARTIFACT_KEY], history_tower=False
        )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if "user_id" not in model_input.columns:
            raise DataError("missing column", column="user_id")
        default_k = int((params or {}).get("k", DEFAULT_K))
        ids = model_input["user_id"]
        if ids.map(lambda v: isinstance(v, list | tuple | dict | np.ndarray)).any():
            raise DataError("expected one id per row, got a list", column="user_id")
        user_ids = ids.astype(str).tolist()
        if "k" in model_input.columns:
            ks = pd.to_numeric(model_input["k"]).fillna(default_k).astype(int).tolist()
        else:
            ks = [default_k] * len(user_ids)
        if any(k < 1 for k in ks):
            raise DataError("k must be >= 1", column="k")
        return recommendations_frame(self.recommender, user_ids, ks)


def recommendations_frame(recommender: Any, user_ids: list[str], ks: list[int]) -> pd.DataFrame:
    """Rows in input order; users sharing a k are scored in one vectorised call."""
    from tracktower.serving.batch import long_format

    frames = []
    wanted = np.asarray(ks, dtype=np.int64)
    for k in sorted(set(ks)):
        positions = np.flatnonzero(wanted == k)
        users = [user_ids[p] for p in positions]
        frame = long_format(recommender, users, recommender.top_k_batch(users, k))
        frame["_pos"] = positions[frame.pop("_row").to_numpy()]
        frames.append(frame)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in OUTPUT_COLUMNS})
    out = pd.concat(frames, ignore_index=True).sort_values(["_pos", "rank"], kind="stable")
    return out.drop(columns="_pos").reset_index(drop=True)


def model_signature() -> Any:
    """Signature with a ``k`` param: without it MLflow silently drops ``params={"k": ...}``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id"), ColSpec("long", "k", required=False)]),
        outputs=Schema(
            [
                ColSpec("string", "user_id"),
                ColSpec("long", "rank"),
                ColSpec("string", "track_id"),
                ColSpec("float", "score"),
                ColSpec("string", "source"),
            ]
        ),
        params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]),
    )
