"""Fake export artifacts for serving tests: valid per the contract, seeded, small.

The optional SavedModel is a real TensorFlow module whose ``query_from_history`` mean-pools the
track embedding table, so a "session" recommendation can be checked against plain numpy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

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
    popular = np.argsort(-counts, kind="stable").astype(np.int32)

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
) -> Path:
    """Write manifest.json, arrays.npz, tracks.parquet (and saved_model/) into ``dir``."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = fake_arrays(n_users, n_tracks, dim, seed, integer=integer)
    np.savez(out / "arrays.npz", allow_pickle=False, **arrays)
    # Every 10th track has no metadata row, as for tracks missing from the catalog.
    with_meta = [i for i in range(n_tracks) if i % 10 != 9]
    pd.DataFrame(
        {
            "track_id": [track_id(i) for i in with_meta],
            "title": [f"Title {i}" for i in with_meta],
            "artist": [f"Artist {i % 7}" for i in with_meta],
        }
    ).to_parquet(out / "tracks.parquet", index=False)
    top_k = min(10, n_tracks)
    manifest = {
        "format_version": 1,
        "model_name": "tracktower",
        "model_version": model_version,
        "run_id": "0123456789abcdef",
        "created_at": "2024-06-11T12:00:00+00:00",
        "config": {"embedding_dim": dim, "seed": seed},
        "dataset": {
            "fingerprint": "f" * 64,
            "rows": len(arrays["seen_indices"]),
            "users": n_users,
            "tracks": n_tracks,
        },
        "metrics": {"test_recall_at_10": 0.25, "test_ndcg_at_10": 0.125},
        "embedding_dim": dim,
        "top_k": top_k,
        "has_history_tower": with_history_tower,
        "libraries": {"numpy": np.__version__},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if with_history_tower:
        _save_towers(out / "saved_model", arrays, top_k)
    return out


def _save_towers(path: Path, arrays: dict[str, np.ndarray], top_k: int) -> None:
    from tracktower.features.tf import tf

    def table(ids: np.ndarray) -> Any:
        init = tf.lookup.KeyValueTensorInitializer(
            tf.constant(ids.astype(str)), tf.range(len(ids), dtype=tf.int64)
        )
        return tf.lookup.StaticHashTable(init, default_value=-1)

    class Towers(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.user_table = table(arrays["user_ids"])
            self.track_table = table(arrays["track_ids"])
            self.user_embeddings = tf.Variable(arrays["user_embeddings"], trainable=False)
            self.track_embeddings = tf.Variable(arrays["track_embeddings"], trainable=False)
            self.track_ids = tf.constant(arrays["track_ids"].astype(str))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(self, user_id: Any) -> dict[str, Any]:
            idx = tf.maximum(self.user_table.lookup(user_id), 0)
            queries = tf.gather(self.user_embeddings, idx)
            scores = tf.matmul(queries, self.track_embeddings, transpose_b=True)
            top = tf.math.top_k(scores, k=top_k)
            return {"track_ids": tf.gather(self.track_ids, top.indices), "scores": top.values}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string)])
        def query_from_history(self, track_ids: Any) -> dict[str, Any]:
            idx = self.track_table.lookup(track_ids)
            mask = tf.cast(idx >= 0, tf.float32)
            vectors = tf.gather(self.track_embeddings, tf.maximum(idx, 0)) * mask[..., None]
            count = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)
            return {"query_embedding": tf.reduce_sum(vectors, axis=1) / count}

    towers = Towers()
    tf.saved_model.save(
        towers,
        str(path),
        signatures={
            "serving_default": towers.serve,
            "query_from_history": towers.query_from_history,
        },
    )


def cached_artifact(
    factory: pytest.TempPathFactory,
    n_users: int = 50,
    n_tracks: int = 200,
    dim: int = 8,
    with_history_tower: bool = False,
) -> Path:
    """One artifact per parameter set per test session (the SavedModel takes seconds to build)."""
    key = (id(factory), n_users, n_tracks, dim, with_history_tower)
    if key not in _CACHE:
        out = factory.mktemp("artifact")
        _CACHE[key] = write_fake_artifact(out, n_users, n_tracks, dim, with_history_tower)
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
