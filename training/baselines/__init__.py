"""Non-neural baselines scored with the same split and metric code as the two-tower model.

Every baseline follows :class:`Recommender`: ``fit`` on the users x tracks training matrix, then
``score`` dense rows for some users. Evaluation, top-k and metrics live elsewhere
(``runner.evaluate_recommender``), so a baseline cannot accidentally use a friendlier top-k or
metric than the two-tower model it is compared against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from scipy.sparse import csr_matrix

BASELINES = ("popular", "ease", "ials", "rp3beta")
# EASE refuses more tracks than this: its dense item-item matrix needs n^2 x 4 bytes (3.6 GB).
DEFAULT_MAX_ITEMS = 30_000


@runtime_checkable
class Recommender(Protocol):
    """What the runner needs from a baseline; models keep their own hyper-parameters."""

    name: str

    def fit(self, train_csr: csr_matrix) -> Recommender: ...

    def score(self, user_rows: np.ndarray) -> np.ndarray:
        """float32 [len(user_rows), n_tracks], higher is better; seen tracks NOT excluded (the
        evaluation excludes them). A new array each call: the top-k overwrites it in place."""
        ...

    def params(self) -> dict[str, Any]:
        """Hyper-parameters as logged to MLflow (flat, scalar values)."""
        ...


def make_recommender(name: str, **params: Any) -> Recommender:
    """Build a baseline by name; imports lazily so ``implicit`` is only needed for iALS."""
    if name == "popular":
        from tracktower.training.baselines.popular import Popularity

        return Popularity(**params)
    if name == "ease":
        from tracktower.training.baselines.ease import EASE

        return EASE(**params)
    if name == "ials":
        from tracktower.training.baselines.ials import IALS

        return IALS(**params)
    if name == "rp3beta":
        from tracktower.training.baselines.rp3beta import RP3beta

        return RP3beta(**params)
    from tracktower.features.errors import DataError

    raise DataError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
