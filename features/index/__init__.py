"""Retrieval indexes: exact and ScaNN search behind one interface (see ``base``).

Importing this package loads neither ScaNN nor TensorFlow; ScaNN is imported (without
TensorFlow, see ``scann_import``) the first time a ScaNN index is built or loaded.
"""

from tracktower.features.index.base import (
    BACKENDS,
    IndexInfo,
    RetrievalIndex,
    load_index,
)
from tracktower.features.index.exact import ExactIndex
from tracktower.features.index.filtered import (
    DEFAULT_OVERFETCH,
    overfetch_search,
    search_excluding,
    top_lists,
)
from tracktower.features.index.recall import MIN_SAMPLE, measure_recall, sample_rows
from tracktower.features.index.scann_index import ScannIndex, default_params
from tracktower.features.index.select import (
    AUTO_MIN_TRACKS,
    DEFAULT_RECALL_FLOOR,
    DEFAULT_RECALL_TARGET,
    build_index,
    choose_backend,
)

__all__ = [
    "AUTO_MIN_TRACKS",
    "BACKENDS",
    "DEFAULT_OVERFETCH",
    "DEFAULT_RECALL_FLOOR",
    "DEFAULT_RECALL_TARGET",
    "MIN_SAMPLE",
    "ExactIndex",
    "IndexInfo",
    "RetrievalIndex",
    "ScannIndex",
    "build_index",
    "choose_backend",
    "default_params",
    "load_index",
    "measure_recall",
    "overfetch_search",
    "sample_rows",
    "search_excluding",
    "top_lists",
]
