"""Recommender: the served ranking must equal a plain numpy brute force, for every source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import (
    brute_force,
    cached_artifact,
    fake_arrays,
    seen_of,
    track_id,
    user_id,
    write_fake_artifact,
)

from tracktower.features.artifact import ARRAYS_DIR
from tracktower.features.errors import DataError
from tracktower.serving.artifact import Recommender


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def rec(artifact: Path) -> Recommender:
    return Recommender.load(artifact)


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return fake_arrays(50, 200, 8)


def test_known_users_match_brute_force(rec: Recommender, arrays: dict[str, np.ndarray]) -> None:
    for u in range(50):
        got = rec.recommend(user_id(u), 10)
        assert got.source == "model"
        expected = brute_force(arrays, arrays["user_embeddings"][u], 10, seen_of(arrays, u))
        assert [item.track_id for item in got.items] == expected
        scores = [item.score for item in got.items]
        assert scores == sorted(scores, reverse=True)


def _memory_mapped(array: object) -> bool:
    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def test_large_arrays_are_memory_mapped_not_copied(rec: Recommender) -> None:
    large = [rec.track_embeddings, rec.user_embeddings, rec.track_ids, rec.user_ids]
    assert all(_memory_mapped(a) for a in [*large, rec.seen.indices, rec.popular])
    assert not rec.track_embeddings.flags.writeable


def test_request_excludes_are_removed(rec: Recommender, arrays: dict[str, np.ndarray]) -> None:
    first = [item.track_id for item in rec.recommend(user_id(3), 5).items]
    again = rec.recommend(user_id(3), 5, exclude_track_ids=[first[0], first[2], "no-such-track"])
    excluded = seen_of(arrays, 3) | {int(first[0][1:]), int(first[2][1:])}
    expected = brute_force(arrays, arrays["user_embeddings"][3], 5, excluded)
    assert [item.track_id for item in again.items] == expected
    assert first[0] not in expected and first[1] in expected


def test_metadata_is_aligned_and_optional(rec: Recommender) -> None:
    items = rec.recommend(user_id(0), 200).items
    for item in items:
        i = int(item.track_id[1:])
        if i % 10 == 9:
            assert item.title is None and item.artist is None
        else:
            assert item.title == f"Title {i}" and item.artist == f"Artist {i % 7}"


def test_unknown_user_gets_popular(rec: Recommender, arrays: dict[str, np.ndarray]) -> None:
    got = rec.recommend("stranger", 5)
    assert got.source == "popular"
    assert [item.track_id for item in got.items] == [
        track_id(int(i)) for i in arrays["popular"][:5]
    ]
    assert [item.score for item in got.items] == arrays["popular_scores"][:5].tolist()
    top = got.items[0].track_id
    without = rec.recommend("stranger", 5, exclude_track_ids=[top])
    assert top not in [item.track_id for item in without.items]
    assert len(without.items) == 5


def test_recent_ids_without_history_tower_fall_back_to_popular(rec: Recommender) -> None:
    popular = [item.track_id for item in rec.recommend("stranger", 3).items]
    got = rec.recommend("stranger", 3, recent_track_ids=[popular[0]])
    assert got.source == "popular"
    assert popular[0] not in [item.track_id for item in got.items]


def test_k_larger_than_catalogue_and_exhausted_users(tmp_path: Path) -> None:
    path = write_fake_artifact(
        tmp_path / "a", n_users=3, n_tracks=6, dim=4, with_history_tower=False
    )
    rec = Recommender.load(path)
    arrays = fake_arrays(3, 6, 4)
    for u in range(3):
        got = rec.recommend(user_id(u), 50)
        assert len(got.items) == 6 - len(seen_of(arrays, u))
        assert all(np.isfinite(item.score) for item in got.items)
    all_ids = [track_id(i) for i in range(6)]
    assert rec.recommend("stranger", 3, exclude_track_ids=all_ids).items == []
    assert rec.recommend(user_id(0), 3, exclude_track_ids=all_ids).items == []


def test_batch_equals_single(rec: Recommender) -> None:
    users = [user_id(7), "stranger", user_id(0), user_id(7)]
    batch = rec.recommend_batch(users, 10)
    assert [r.source for r in batch] == ["model", "popular", "model", "model"]
    for user, got in zip(users, batch, strict=True):
        single = rec.recommend(user, 10)
        assert [i.track_id for i in got.items] == [i.track_id for i in single.items]
        np.testing.assert_allclose(
            [i.score for i in got.items], [i.score for i in single.items], rtol=1e-5
        )


def test_reload_gives_identical_results(artifact: Path, rec: Recommender, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(artifact, tmp_path / "copy"))
    again = Recommender.load(copy)
    for user in [user_id(1), user_id(42), "stranger"]:
        assert again.recommend(user, 20) == rec.recommend(user, 20)
    assert again.manifest == rec.manifest


def test_session_uses_history_tower(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = cached_artifact(tmp_path_factory, with_history_tower=True)
    rec = Recommender.load(path)
    arrays = fake_arrays(50, 200, 8)
    recent = [track_id(3), track_id(17), "unknown-track", track_id(150)]
    got = rec.recommend("new-listener", 10, recent_track_ids=recent)
    assert got.source == "session"
    query = arrays["track_embeddings"][[3, 17, 150]].mean(axis=0)
    expected = brute_force(arrays, query, 10, {3, 17, 150})
    assert [item.track_id for item in got.items] == expected
    # Known users are never scored by TensorFlow, and unknown-only history falls back.
    assert rec.recommend(user_id(2), 5, recent_track_ids=recent).source == "model"
    assert rec.recommend("x", 5, recent_track_ids=["nope"]).source == "popular"
    assert (
        Recommender.load(path, history_tower=False)
        .recommend("new-listener", 10, recent_track_ids=recent)
        .source
        == "popular"
    )


def _broken(tmp_path: Path, edit: str) -> Path:
    path = write_fake_artifact(tmp_path / "b", 4, 10, 4, with_history_tower=False)
    manifest = json.loads((path / "manifest.json").read_text())
    if edit == "no-manifest":
        (path / "manifest.json").unlink()
    elif edit == "format":
        manifest["format_version"] = 1
    elif edit == "dim":
        manifest["embedding_dim"] = 5
    elif edit == "field":
        del manifest["dataset"]
    elif edit == "no-arrays":
        shutil.rmtree(path / ARRAYS_DIR)
    elif edit == "num-users":
        manifest["num_users"] = 5
    elif edit == "tower":
        manifest["has_history_tower"] = True
    if (path / "manifest.json").exists():
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    "edit", ["no-manifest", "format", "dim", "field", "no-arrays", "num-users", "tower"]
)
def test_invalid_artifacts_raise_data_error(tmp_path: Path, edit: str) -> None:
    with pytest.raises(DataError) as info:
        Recommender.load(_broken(tmp_path, edit))
    assert "\n" not in str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Recommender.load(tmp_path / "nope")
