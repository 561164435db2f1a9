"""The exported artifact held in memory, and the request-time recommendation logic.

Everything derivable from the artifact (contiguous float32 matrices, the seen-items CSR, id→index
maps, metadata aligned to candidate index) is built once in :meth:`Recommender.load`, so a request
for a known user is one matrix-vector product plus ``tracktower.features.ranking.top_k``, the
routine offline evaluation uses too (so served rankings cannot drift from evaluated ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import scipy.sparse as sp

from tracktower.features import ranking
from tracktower.features.errors import DataError
from tracktower.serving.loader import (
    Manifest,
    load_arrays,
    load_history_tower,
    load_manifest,
    load_metadata,
)

Source = Literal["model", "popular", "session"]


class Item(NamedTuple):
    track_id: str
    score: float
    title: str | None
    artist: str | None


@dataclass(frozen=True)
class Recommendation:
    items: list[Item]
    source: Source


class TopK(NamedTuple):
    """Vectorised result for many users; rows shorter than k are padded with index -1 / -inf."""

    indices: np.ndarray  # int64 [B, k]
    scores: np.ndarray  # float32 [B, k]
    sources: np.ndarray  # <U7 [B]


class Recommender:
    """An immutable, thread-safe view of one artifact; see the module docstring."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        arrays: dict[str, np.ndarray],
        titles: list[str | None],
        artists: list[str | None],
        history_tower: Callable[[list[str]], np.ndarray] | None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.track_ids: np.ndarray = arrays["track_ids"].astype(str)
        self.user_ids: np.ndarray = arrays["user_ids"].astype(str)
        self.track_embeddings = np.ascontiguousarray(arrays["track_embeddings"], dtype=np.float32)
        self.user_embeddings = np.ascontiguousarray(arrays["user_embeddings"], dtype=np.float32)
        n, u = len(self.track_ids), len(self.user_ids)
        self.seen = sp.csr_matrix(
            (
                np.ones(len(arrays["seen_indices"]), dtype=np.float32),
                arrays["seen_indices"].astype(np.int32),
                arrays["seen_indptr"].astype(np.int64),
            ),
            shape=(u, n),
        )
        self.popular = arrays["popular"].astype(np.int64)
        self.popular_scores = arrays["popular_scores"].astype(np.float32)
        self._popular_list: list[int] = self.popular.tolist()
        self._track_list: list[str] = self.track_ids.tolist()
        self._titles = titles
        self._artists = artists
        self._track_index = {t: i for i, t in enumerate(self._track_list)}
        self._user_index = {v: i for i, v in enumerate(self.user_ids.tolist())}
        self._history_tower = history_tower

    @classmethod
    def load(cls, path: str | Path, *, history_tower: bool = True) -> Recommender:
        """Read an artifact directory; ``history_tower=False`` skips TensorFlow (batch, pyfunc)."""
        path = Path(path)
        if not path.is_dir():
            raise DataError("artifact directory does not exist", path=path)
        manifest = load_manifest(path)
        arrays = load_arrays(path, manifest.embedding_dim)
        titles, artists = load_metadata(path, arrays["track_ids"])
        tower = None
        if history_tower and manifest.has_history_tower:
            tower = load_history_tower(path)
        return cls(path, manifest, arrays, titles, artists, tower)

    @property
    def n_tracks(self) -> int:
        return len(self._track_list)

    @property
    def n_users(self) -> int:
        return len(self._user_index)

    @property
    def has_history_tower(self) -> bool:
        return self._history_tower is not None

    def user_index(self, user_id: str) -> int | None:
        return self._user_index.get(user_id)

    def track_indices(self, track_ids: Iterable[str]) -> list[int]:
        """Candidate indices of the known ids, in order; unknown ids are not candidates anyway."""
        get = self._track_index.get
        return [i for i in (get(t) for t in track_ids) if i is not None]

    def recommend(
        self,
        user_id: str,
        k: int,
        exclude_track_ids: Sequence[str] = (),
        recent_track_ids: Sequence[str] = (),
    ) -> Recommendation:
        """Top-k for one user.

        Recently played tracks are excluded like explicit excludes whatever the source: a listener
        who just heard a track is not helped by having it recommended back.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        excluded = self.track_indices([*exclude_track_ids, *recent_track_ids])
        u = self._user_index.get(user_id)
        if u is not None:
            seen = self.seen.indices[self.seen.indptr[u] : self.seen.indptr[u + 1]]
            return self._score(self.user_embeddings[u], k, excluded, "model", seen)
        recent = self.track_indices(recent_track_ids)
        if recent and self._history_tower is not None:
            query = self._history_tower([self._track_list[i] for i in recent])
            return self._score(query, k, excluded, "session")
        return self._popular(k, excluded)

    def _score(
        self,
        query: np.ndarray,
        k: int,
        excluded: list[int],
        src: Source,
        seen: np.ndarray | None = None,
    ) -> Recommendation:
        # The user's CSR row is masked here as a plain slice rather than passed to top_k: same
        # -inf-before-selection semantics, without a scipy row-indexing per request.
        scores = (self.track_embeddings @ query)[None, :]
        if seen is not None:
            scores[0, seen] = -np.inf
        if excluded:
            scores[0, excluded] = -np.inf
        idx, top = ranking.top_k(scores, min(k, self.n_tracks))
        return Recommendation(self._items(idx[0], top[0]), src)

    def _popular(self, k: int, excluded: list[int]) -> Recommendation:
        skip = set(excluded)
        chosen = []
        for pos, i in enumerate(self._popular_list):
            if i not in skip:
                chosen.append(pos)
                if len(chosen) == k:
                    break
        return Recommendation(
            self._items(self.popular[chosen], self.popular_scores[chosen]), "popular"
        )

    def _items(self, indices: np.ndarray, scores: np.ndarray) -> list[Item]:
        return [
            Item(self._track_list[i], s, self._titles[i], self._artists[i])
            for i, s in zip(indices.tolist(), scores.tolist(), strict=True)
            if s != -np.inf and i >= 0
        ]

    def top_k_batch(self, user_ids: Sequence[str], k: int) -> TopK:
        """Known users scored in memory-bounded matmul blocks, seen excluded; unknown → popular."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.n_tracks)
        rows = np.array([self._user_index.get(v, -1) for v in user_ids], dtype=np.int64)
        known = rows >= 0
        indices = np.empty((len(rows), k), dtype=np.int64)
        scores = np.empty((len(rows), k), dtype=np.float32)
        indices[~known] = self.popular[:k]
        scores[~known] = self.popular_scores[:k]
        if known.any():
            users = rows[known]
            blocks = ranking.score_chunks(
                self.user_embeddings[users], self.track_embeddings, k, self.seen, rows=users
            )
            idx, top = (np.concatenate(parts) for parts in zip(*blocks, strict=True))
            indices[known], scores[known] = idx, top
        sources = np.where(known, "model", "popular")
        return TopK(indices, scores, sources)

    def recommend_batch(self, user_ids: Sequence[str], k: int) -> list[Recommendation]:
        result = self.top_k_batch(user_ids, k)
        return [
            Recommendation(self._items(idx, top), src)
            for idx, top, src in zip(
                result.indices, result.scores, result.sources.tolist(), strict=True
            )
        ]
