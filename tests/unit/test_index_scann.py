"""ScannIndex on a small clustered catalogue: recall, exact scores, ordering, save/load, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tracktower.features.errors import DataError
from tracktower.features.index import (
    ExactIndex,
    RetrievalIndex,
    ScannIndex,
    default_params,
    load_index,
    measure_recall,
)
from tracktower.features.index.scann_index import META_FILE


def clustered(
    seed: int, n: int, dim: int, queries: int, clusters: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Points and queries around shared cluster centres (noise as large as the centre spread,
    so a query's top 100 spans several clusters)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))
    near = centres[rng.integers(0, clusters, queries)] + rng.normal(size=(queries, dim))
    return points.astype(np.float32), near.astype(np.float32)


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray, ScannIndex]:
    points, queries = clustered(0, n=20_000, dim=32, queries=300)
    return points, queries, ScannIndex.build(points, seed=0)


def test_recall_against_exact(catalogue: tuple[np.ndarray, np.ndarray, ScannIndex]) -> None:
    points, queries, index = catalogue
    recall = measure_recall(index, points, queries)
    assert recall["recall_at_10"] >= 0.95 and recall["recall_at_100"] >= 0.95, recall
    assert isinstance(index, RetrievalIndex)
    assert (index.backend, index.size, index.dim) == ("scann", 20_000, 32)
    assert index.params == default_params(20_000, seed=0)
    assert index.params["num_leaves"] == 141 and index.params["leaves_to_search"] == 15


def test_scores_are_exact_and_ordered(catalogue: tuple[np.ndarray, np.ndarray, ScannIndex]) -> None:
    points, queries, index = catalogue
    idx, top = index.search(queries, 50)
    assert idx.dtype == np.int64 and top.dtype == np.float32 and idx.shape == (300, 50)
    assert (idx >= 0).all() and all(len(set(row)) == 50 for row in idx.tolist())
    exact = np.einsum("bd,bkd->bk", queries.astype(np.float64), points[idx].astype(np.float64))
    np.testing.assert_allclose(top, exact, rtol=1e-5, atol=1e-4)
    assert (np.diff(top, axis=1) <= 0).all()


def test_ties_go_to_the_lower_index_and_short_catalogues_pad() -> None:
    points, queries = clustered(1, n=300, dim=8, queries=5, clusters=4)
    points[200] = points[7] = queries[0] * 10  # two identical best candidates for query 0
    every = {"num_leaves": 6, "leaves_to_search": 6, "reorder": 300}  # all rescored
    index = ScannIndex.build(points, every)
    idx, top = index.search(queries, 310)
    assert idx[0, :2].tolist() == [7, 200] and top[0, 0] == top[0, 1]
    assert (idx[:, 300:] == -1).all() and np.isneginf(top[:, 300:]).all()
    want, _ = ExactIndex(points).search(queries, 300)
    np.testing.assert_array_equal(idx[:, :300], want)


def test_seeded_builds_are_reproducible() -> None:
    points, queries = clustered(2, n=3000, dim=16, queries=50)
    first = ScannIndex.build(points, seed=3).search(queries, 20)
    second = ScannIndex.build(points, seed=3).search(queries, 20)
    np.testing.assert_array_equal(first[0], second[0])


def test_save_load_round_trip(
    catalogue: tuple[np.ndarray, np.ndarray, ScannIndex], tmp_path: Path
) -> None:
    points, queries, index = catalogue
    index.save(tmp_path / "built")
    assert (tmp_path / "built" / META_FILE).is_file()
    assert not (tmp_path / "built" / "dataset.npy").exists()  # embeddings are not copied
    shutil.move(tmp_path / "built", tmp_path / "moved")  # paths inside are relative
    np.save(tmp_path / "emb.npy", points)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    loaded = load_index(tmp_path / "moved", "scann", index.params, mapped)
    for k in (10, 100):
        want, got = index.search(queries, k), loaded.search(queries, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    wider = loaded.with_search_params(leaves_to_search=30)
    assert wider.params["leaves_to_search"] == 30 and loaded.params["leaves_to_search"] == 15
    with pytest.raises(DataError, match="not empty"):
        index.save(tmp_path / "moved")


def test_bad_queries_and_params(catalogue: tuple[np.ndarray, np.ndarray, ScannIndex]) -> None:
    points, _, index = catalogue
    with pytest.raises(DataError, match=r"queries must be float32 \[batch, 32\].*\(4, 16\)"):
        index.search(np.ones((4, 16), dtype=np.float32), 10)
    with pytest.raises(ValueError, match="only"):
        index.with_search_params(num_leaves=3)
    with pytest.raises(DataError, match="unknown \\['leaves'\\]"):
        ScannIndex.build(points[:500], {"leaves": 3})
    with pytest.raises(DataError, match="NaN or infinite"):
        ScannIndex.build(np.full((100, 4), np.nan, dtype=np.float32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict]:
    points, _ = clustered(4, n=2000, dim=8, queries=1)
    index = ScannIndex.build(points)
    path = tmp_path_factory.mktemp("saved") / "index"
    index.save(path)
    return path, points, index.params


def broken_copy(saved: tuple[Path, np.ndarray, dict], tmp_path: Path) -> Path:
    path = tmp_path / "index"
    shutil.copytree(saved[0], path)
    return path


def test_mismatched_index_is_one_line(saved: tuple[Path, np.ndarray, dict], tmp_path: Path) -> None:
    path, points, params = saved
    with pytest.raises(DataError, match="dim 8, the artifact has 9"):
        load_index(path, "scann", params, np.ones((2000, 9), dtype=np.float32))
    with pytest.raises(DataError, match="num_tracks 2000, the artifact has 1999"):
        load_index(path, "scann", params, points[:1999])
    with pytest.raises(DataError, match="the manifest says"):
        load_index(path, "scann", {**params, "seed": 5}, points)
    with pytest.raises(DataError, match="missing \\['reorder'\\]"):
        load_index(path, "scann", {k: v for k, v in params.items() if k != "reorder"}, points)
    with pytest.raises(DataError, match="needs its directory"):
        load_index(None, "scann", params, points)


def test_missing_or_truncated_files_are_one_line(
    saved: tuple[Path, np.ndarray, dict], tmp_path: Path
) -> None:
    _, points, params = saved
    with pytest.raises(DataError, match=f"{META_FILE} is missing"):
        load_index(tmp_path / "nowhere", "scann", params, points)
    copy = broken_copy(saved, tmp_path / "a")
    hashed = copy / "hashed_dataset.npy"
    hashed.write_bytes(hashed.read_bytes()[: hashed.stat().st_size // 2])
    with pytest.raises(DataError, match=r"unreadable ScaNN index: .*File too short"):
        load_index(copy, "scann", params, points)
    copy = broken_copy(saved, tmp_path / "b")
    (copy / "serialized_partitioner.pb").unlink()
    with pytest.raises(DataError, match="unreadable ScaNN index"):
        load_index(copy, "scann", params, points)
    copy = broken_copy(saved, tmp_path / "c")
    meta = json.loads((copy / META_FILE).read_text())
    (copy / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="index format_version 99"):
        load_index(copy, "scann", params, points)
    (copy / META_FILE).write_text("{not json")
    with pytest.raises(DataError, match="unreadable index metadata"):
        load_index(copy, "scann", params, points)


def test_default_params_rule() -> None:
    big = default_params(2_262_292)
    assert (big["num_leaves"], big["leaves_to_search"]) == (1504, 151)
    assert big["training_sample_size"] == 200_000
    assert default_params(1_000_000)["num_leaves"] == 1000
    assert default_params(10_000_000)["num_leaves"] == 2048
    small = default_params(120)
    assert (small["num_leaves"], small["leaves_to_search"], small["training_sample_size"]) == (
        2,
        1,
        120,
    )
    assert default_params(10)["num_leaves"] == 1
