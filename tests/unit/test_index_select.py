"""build_index: the auto threshold, measured recall in IndexInfo, retuning and the floor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tracktower.features.errors import DataError
from tracktower.features.index import (
    AUTO_MIN_TRACKS,
    ExactIndex,
    IndexInfo,
    ScannIndex,
    build_index,
    choose_backend,
)
from tracktower.features.index.recall import recall_against


def test_auto_threshold() -> None:
    assert choose_backend(AUTO_MIN_TRACKS - 1) == "exact"
    assert choose_backend(AUTO_MIN_TRACKS) == "scann"
    assert choose_backend(10, "scann") == "scann" and choose_backend(10**7, "exact") == "exact"
    with pytest.raises(DataError, match="auto, exact, scann; got 'faiss'"):
        choose_backend(10, "faiss")


def test_small_catalogue_is_exact_with_recall_one() -> None:
    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((200, 8)).astype(np.float32)
    index, info = build_index(candidates, queries=rng.standard_normal((30, 8)))
    assert isinstance(index, ExactIndex)
    assert (info.backend, info.recall_at_10, info.recall_at_100, info.sample_users) == (
        "exact",
        1.0,
        1.0,
        30,
    )
    _, unmeasured = build_index(candidates)
    assert unmeasured.recall_at_100 is None and unmeasured.sample_users == 0


def test_scann_recall_is_measured_on_a_sample_and_serialisable() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(32, 16))
    candidates = (centres[rng.integers(0, 32, 5000)] + rng.normal(size=(5000, 16))).astype("f4")
    users = (centres[rng.integers(0, 32, 1500)] + rng.normal(size=(1500, 16))).astype("f4")
    index, info = build_index(candidates, "scann", queries=users, sample_size=1000)
    assert isinstance(index, ScannIndex) and info.sample_users == 1000
    assert info.recall_at_100 is not None and info.recall_at_100 >= 0.95
    assert info.recall_at_10 is not None and info.build_seconds > 0
    assert info.params == index.params
    restored = IndexInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert restored == info


def test_retuning_widens_the_search_until_the_floor_holds() -> None:
    rng = np.random.default_rng(2)
    candidates = rng.standard_normal((3000, 16)).astype(np.float32)  # no clusters: hard
    queries = rng.standard_normal((200, 16)).astype(np.float32)
    narrow = {"num_leaves": 8, "leaves_to_search": 1, "reorder": 100, "reorder_per_k": 1}
    index, info = build_index(candidates, "scann", queries=queries, params=narrow)
    assert info.recall_at_100 is not None and info.recall_at_100 >= 0.95
    assert info.params["leaves_to_search"] > 1 and info.params == index.params


def test_an_easy_index_is_narrowed_while_recall_holds_the_target() -> None:
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(40, 16)) * 4
    candidates = (centres[rng.integers(0, 40, 4000)] + rng.normal(size=(4000, 16))).astype("f4")
    users = (centres[rng.integers(0, 40, 300)] + rng.normal(size=(300, 16))).astype("f4")
    wide = {"num_leaves": 40, "leaves_to_search": 32, "reorder": 200, "reorder_per_k": 2}
    _, as_given = build_index(candidates, "scann", queries=users, params=wide)
    assert as_given.params["leaves_to_search"] == 32  # the caller's search settings are kept
    defaults = {k: v for k, v in wide.items() if k != "leaves_to_search"}
    index, info = build_index(candidates, "scann", queries=users, params=defaults)
    leaves = info.params["leaves_to_search"]
    assert leaves < 4 and info.params == index.params  # 10% of 40 leaves, halved at least once
    assert info.recall_at_100 is not None and info.recall_at_100 >= 0.98
    # One step narrower would have missed the target: narrowing stopped where it must.
    truth, _ = ExactIndex(candidates).search(users, 100)
    narrower = index.with_search_params(leaves_to_search=leaves // 2)
    if leaves > 1:
        assert (
            recall_against(narrower, ExactIndex(candidates), users, truth, (100,))["recall_at_100"]
            < 0.98
        )
    _, strict = build_index(candidates, "scann", queries=users, params=defaults, recall_target=1.0)
    assert strict.params["leaves_to_search"] >= leaves


def test_recall_below_the_floor_is_a_one_line_error() -> None:
    rng = np.random.default_rng(3)
    candidates = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((200, 16)).astype(np.float32)
    narrow = {"num_leaves": 50, "leaves_to_search": 1, "reorder": 100, "reorder_per_k": 1}
    with pytest.raises(
        DataError, match=r"recall@100 0\.\d{4} on 200 queries is below the floor"
    ) as err:
        build_index(candidates, "scann", queries=queries, params=narrow, max_retunes=1)
    assert "\n" not in str(err.value) and "leaves_to_search 2/50" in str(err.value)
    with pytest.raises(DataError, match="recall queries must be"):
        build_index(candidates, "scann", queries=queries[:, :4])


def test_index_info_from_bad_json() -> None:
    with pytest.raises(DataError, match="backend must be one of"):
        IndexInfo.from_dict({"backend": "faiss"})
    with pytest.raises(DataError, match="unknown keys \\['extra'\\]"):
        IndexInfo.from_dict({"backend": "exact", "extra": 1})
    with pytest.raises(DataError, match="recall_at_10: expected a number"):
        IndexInfo.from_dict({"backend": "exact", "recall_at_10": "high"})
    with pytest.raises(DataError, match="expected a JSON object"):
        IndexInfo.from_dict([1])
