"""Most-popular baseline: the floor any personalised model has to clear."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse import csr_matrix


class Popularity:
    """Scores every track by the number of distinct training users who have it.

    Distinct users rather than summed weights: a handful of heavy listeners replaying one song
    should not make it everyone's top recommendation. It is the same ordering serving uses for
    unknown users (the ``popular`` array in the export artifact): both count with
    ``features.dataset.popularity`` and break ties by the lower track index (``ranking.top_k``
    here, ``features.dataset.popularity_order`` in the export).
    """

    name = "popular"

    def __init__(self) -> None:
        self.popularity: np.ndarray | None = None

    def params(self) -> dict[str, Any]:
        return {"model": self.name}

    def fit(self, train_csr: csr_matrix) -> Popularity:
        from tracktower.features.dataset import popularity

        self.popularity = popularity(train_csr).astype(np.float32)
        return self

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        if self.popularity is None:
            raise RuntimeError("Popularity.score called before fit")
        return np.tile(self.popularity, (len(user_rows), 1))
