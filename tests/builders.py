"""Fake export artifacts for serving tests: written through the artifact contract, seeded, small.

With a history tower, ``history_embeddings`` is the track embedding table and the SavedModel is a
real TensorFlow module whose ``query_from_pooled_history`` returns the pooled history unchanged,
so a "session" recommendation (the mean of the recent tracks' rows) can be checked against plain
numpy. Every
artifact carries a retrieval index built by ``features.index.build_index`` (exact unless the
caller forces another backend, e.g. ScaNN on a catalogue far below the ``auto`` crossover).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tracktower.features.artifact import (
    FORMAT_VERSION,
    HISTORY_ARRAY,
    HISTORY_INPUT,
    HISTORY_OUTPUT,
    HISTORY_SIGNATURE,
    DatasetInfo,
    Manifest,
    seen_matrix,
    write_artifact,
)
from tracktower.features.dataset import popularity_order
from tracktower.features.index import IndexInfo, RetrievalIndex, build_index, top_lists

SEED = 20240611
_CACHE: dict[tuple[Any, ...], Path] = {}


def user_id(i: int) -> str:
    return f"u{i:05d}"


def track_id(i: int) -> str:
    return f"t{i:06d}"


def fake_arrays(
    n_users: int, n_tracks: int, dim: int, seed: int = SEED, *, integer: bool = False
) -> dict[str, np.ndarray]:
    """``integer`` embeddings in {-1, 0, 1}: every score is exact in any summation order and most
    are tied, so rankings from different BLAS kernels must agree bit for bit."""
    rng = np.random.default_rng(seed)
    seen_rows = []
    for _ in range(n_users):
        n_seen = int(rng.integers(0, max(1, min(20, n_tracks // 2))))
        seen_rows.append(np.sort(rng.choice(n_tracks, size=n_seen, replace=False)))
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in seen_rows])
    indices = np.concatenate(seen_rows).astype(np.int32) if n_users else np.zeros(0, dtype=np.int32)
    counts = np.bincount(indices, minlength=n_tracks).astype(np.float32)
    popular = popularity_order(counts).astype(np.int32)

    def draw(n: int) -> np.ndarray:
        return rng.integers(-1, 2, size=(n, dim)) if integer else rng.normal(size=(n, dim))

    return {
        "track_ids": np.array([track_id(i) for i in range(n_tracks)]),
        "track_embeddings": draw(n_tracks).astype(np.float32),
        "user_ids": np.array([user_id(i) for i in range(n_users)]),
        "user_embeddings": draw(n_users).astype(np.float32),
        "seen_indptr": indptr,
        "seen_indices": indices,
        "popular": popular,
        "popular_scores": counts[popular],
    }


def fake_manifest(
    n_users: int,
    n_tracks: int,
    dim: int,
    with_history_tower: bool,
    *,
    nnz: int,
    model_version: str | None = None,
    seed: int = SEED,
    index: IndexInfo | None = None,
) -> Manifest:
    """``index`` defaults to an unmeasured exact index (what ``build_index`` gives without
    queries)."""
    return Manifest(
        format_version=FORMAT_VERSION,
        model_name="tracktower",
        model_version=model_version,
        run_id="0123456789abcdef",
        created_at="2024-06-11T12:00:00+00:00",
        config={"embedding_dim": dim, "seed": seed},
        dataset=DatasetInfo(fingerprint="f" * 64, rows=nnz, users=n_users, tracks=n_tracks),
        metrics={"test_recall_at_10": 0.25, "test_ndcg_at_10": 0.125},
        embedding_dim=dim,
        has_history_tower=with_history_tower,
        history_dim=dim if with_history_tower else None,
        num_users=n_users,
        num_tracks=n_tracks,
        libraries={"numpy": np.__version__},
        index=(index or IndexInfo("exact")).to_dict(),
    )


def fake_index(
    arrays: dict[str, np.ndarray], backend: str = "exact", **params: Any
) -> tuple[RetrievalIndex, IndexInfo]:
    """The index over the fake track embeddings, recall measured on the fake users (no floor:
    a forced ScaNN index on a tiny catalogue is for checking the approximate path, not recall).
    ``params`` override ScaNN's defaults."""
    return build_index(
        arrays["track_embeddings"],
        backend,  # type: ignore[arg-type]
        queries=arrays["user_embeddings"] if len(arrays["user_embeddings"]) else None,
        recall_floor=0.0,
        params=params or None,
        threads=1,
    )


def write_fake_artifact(
    dir: str | Path,
    n_users: int,
    n_tracks: int,
    dim: int,
    with_history_tower: bool,
    *,
    model_version: str | None = None,
    seed: int = SEED,
    integer: bool = False,
    index_backend: str = "exact",
    index_params: dict[str, Any] | None = None,
    known_top_k: int = 0,
) -> Path:
    """An artifact at ``dir`` (must not exist), written through ``features.artifact``, with an
    ``index_backend`` index (``index_params`` override ScaNN's defaults) and, when
    ``known_top_k``, known users' lists precomputed that wide (as the export does)."""
    arrays = fake_arrays(n_users, n_tracks, dim, seed, integer=integer)
    index, info = fake_index(arrays, index_backend, **(index_params or {}))
    # Every 10th track has no metadata row, as for tracks missing from the catalog.
    with_meta = [i for i in range(n_tracks) if i % 10 != 9]
    tracks = pd.DataFrame(
        {
            "track_id": [track_id(i) for i in with_meta],
            "title": [f"Title {i}" for i in with_meta],
            "artist": [f"Artist {i % 7}" for i in with_meta],
        }
    )
    manifest = fake_manifest(
        n_users,
        n_tracks,
        dim,
        with_history_tower,
        nnz=len(arrays["seen_indices"]),
        model_version=model_version,
        seed=seed,
        index=info,
    )

    def save_towers(path: Path) -> None:
        _save_towers(path, dim)

    if with_history_tower:
        arrays[HISTORY_ARRAY.name] = arrays["track_embeddings"]
    if known_top_k:
        seen = seen_matrix(arrays)
        lists = top_lists(
            index, arrays["track_embeddings"], arrays["user_embeddings"], known_top_k, seen
        )
        arrays["known_top_indices"], arrays["known_top_scores"] = lists
        manifest = manifest.model_copy(update={"known_top_k": known_top_k})

    return write_artifact(
        dir,
        manifest=manifest,
        arrays=arrays,
        tracks=tracks,
        saved_model=save_towers if with_history_tower else None,
        index=index,
    )


def _save_towers(path: Path, dim: int) -> None:
    """A SavedModel with the contract's one signature: the query is the pooled history."""
    from tracktower.features.tf import tf

    class Towers(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32, name=HISTORY_INPUT)])
        def query_from_pooled_history(self, pooled: Any) -> dict[str, Any]:
            return {HISTORY_OUTPUT: tf.identity(pooled)}

    towers = Towers()
    signature = towers.query_from_pooled_history
    tf.saved_model.save(
        towers,
        str(path),
        signatures={"serving_default": signature, HISTORY_SIGNATURE: signature},
    )


def cached_artifact(
    factory: pytest.TempPathFactory,
    n_users: int = 50,
    n_tracks: int = 200,
    dim: int = 8,
    with_history_tower: bool = False,
    index_backend: str = "exact",
) -> Path:
    """One artifact per parameter set per test session (the SavedModel takes seconds to build)."""
    key = (id(factory), n_users, n_tracks, dim, with_history_tower, index_backend)
    if key not in _CACHE:
        out = factory.mktemp("artifact") / "artifact"
        _CACHE[key] = write_fake_artifact(
            out, n_users, n_tracks, dim, with_history_tower, index_backend=index_backend
        )
    return _CACHE[key]


def brute_force(
    arrays: dict[str, np.ndarray],
    query: np.ndarray,
    k: int,
    excluded: set[int] | frozenset[int] = frozenset(),
) -> list[str]:
    """Reference top-k: full argsort, excluded candidates dropped, ties by lower index."""
    scores = arrays["track_embeddings"] @ query
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [str(arrays["track_ids"][i]) for i in order if int(i) not in excluded][:k]


def seen_of(arrays: dict[str, np.ndarray], u: int) -> set[int]:
    lo, hi = arrays["seen_indptr"][u], arrays["seen_indptr"][u + 1]
    return {int(i) for i in arrays["seen_indices"][lo:hi]}


def synthetic_interactions(path: Path, users: int = 60, tracks: int = 40, seed: int = 0) -> None:
    """An interactions Parquet file: every user has 12 distinct random tracks."""
    rng = np.random.default_rng(seed)
    rows = [
        (f"u{u}", f"t{t}", 1.0)
        for u in range(users)
        for t in rng.choice(tracks, size=12, replace=False)
    ]
    pd.DataFrame(rows, columns=["user_id", "track_id", "weight"]).to_parquet(path)


def clustered_matrix(
    users: int = 120, tracks: int = 200, per_user: int = 12, clusters: int = 4, seed: int = 0
) -> sp.csr_matrix:
    """Users x tracks counts where each user listens inside one of ``clusters`` track blocks."""
    rng = np.random.default_rng(seed)
    size = tracks // clusters
    rows, cols = [], []
    for u in range(users):
        c = u % clusters
        rows += [u] * per_user
        cols += list(rng.choice(np.arange(c * size, (c + 1) * size), per_user, replace=False))
    data = rng.integers(1, 20, len(rows)).astype(np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(users, tracks))


def clustered_dataset(x: sp.csr_matrix, weighting: str) -> Any:
    """A small tf.data training input over ``x`` (TensorFlow imported only when called)."""
    from tracktower.training import pipeline

    return pipeline.training_dataset(
        pipeline.make_examples(x, weighting),
        x,
        batch_size=128,
        history_max_len=10,
        user_id_dropout=0.0,
        seed=0,
    )
