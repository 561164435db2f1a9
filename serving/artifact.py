"""The exported artifact held in memory, and the request-time recommendation logic.

Every ranking goes through the artifact's retrieval index (``features.index``, built and
measured at export, read from ``index/``, never rebuilt here): a known user's query vector, a
session's history-tower query, and batches of known users all search it, and the user's seen
tracks plus any request-time excludes are removed with ``search_excluding`` (over-fetch, filter,
exact fallback for a row the over-fetch cannot fill). On an exact index that is the one shared
top-k routine (``features.ranking``); on ScaNN the returned scores are exact dot products, and the
index can only miss candidates, at the recall the manifest records.

Loading does no work that grows as users x tracks: the arrays are memory-mapped (read-only, shared
by every process mapping the same files, never copied), the index is read as saved, and nothing
is ranked ahead of a request. Nor is anything held per user or per track in a process's own heap:
ids are looked up by binary search over the mapped id arrays (``IdLookup``), titles and artists
are fetched by row from the mapped tracks.arrow, the seen CSR's values are one broadcast 1, and a
session is pooled from the mapped ``history_embeddings``; what a worker owns is the ScaNN index,
the small history-tower SavedModel and its caches, so N workers cost little more than one.

Known users' lists are cached lazily, with a bound (``configure_cache``; the server passes
``known_cache_users`` and ``max_k``): a known user is searched once at the cache width, seen tracks
excluded, and later requests slice that list (measured on 20k users x 24k tracks, 128-d, ScaNN:
0.03 ms for a hit against about 1 ms for a search). Known users are always searched at
``max(k, width)`` and the list cut to k, by single requests and batches alike, cached or not, so
the answer never depends on what happens to be cached (an approximate search for more
candidates is not a prefix of one for fewer); ``search_excluding`` over-fetches every row by the
same width, so a batch answers each user as a single request does. Request-time excludes filter
the list; only when
fewer than k survive and the list did not hold every candidate is the user searched again with
them excluded.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from tracktower.features.artifact import (
    HISTORY_ARRAY,
    IdLookup,
    Manifest,
    TrackMetadata,
    read_arrays,
    read_index,
    read_manifest,
    read_track_metadata,
    seen_matrix,
)
from tracktower.features.errors import DataError
from tracktower.features.index import (
    ExactIndex,
    IndexInfo,
    RetrievalIndex,
    search_excluding,
)
from tracktower.serving.loader import load_history_tower
from tracktower.serving.schemas import Source

log = logging.getLogger(__name__)


class Item(NamedTuple):
    track_id: str
    score: float
    title: str | None
    artist: str | None


class Query(NamedTuple):
    """One request's arguments to :meth:`Recommender.recommend`."""

    user_id: str
    k: int
    exclude_track_ids: Sequence[str] = ()
    recent_track_ids: Sequence[str] = ()


@dataclass(frozen=True)
class Recommendation:
    items: list[Item]
    source: Source


class TopK(NamedTuple):
    """Vectorised result for many users; rows shorter than k are padded with index -1 / -inf."""

    indices: np.ndarray  # int64 [B, k]
    scores: np.ndarray  # float32 [B, k]
    sources: np.ndarray  # <U7 [B]


SPARE_STEP = 16


def _spare(excluded: int) -> int:
    """Spare results a search over-fetches for ``excluded`` tracks: each excluded track displaces
    at most one result, so this many always leave k. Rounded up to a multiple of SPARE_STEP so
    that sessions of similar length are searched together; it depends only on the request, so
    the index is asked the same question whatever a request is batched with (the tower's
    float32 rounding may still differ with the batch's size)."""
    return -(-excluded // SPARE_STEP) * SPARE_STEP


def check_artifact(path: str | Path) -> IndexInfo:
    """Check, in the calling process, everything ``Recommender.load`` reads except the history
    tower: manifest, arrays and the saved index (loaded and dropped). ``tracktower serve`` runs it
    before starting workers, so a bad artifact is one ``error:`` line and exit 2; the arrays it
    reads stay in the page cache for the workers."""
    path = Path(path)
    if not path.is_dir():
        raise DataError("artifact directory does not exist", path=path)
    manifest = read_manifest(path)
    arrays = read_arrays(path, manifest, mmap=True)
    read_index(path, manifest, arrays["track_embeddings"])
    return manifest.index_info


class Recommender:
    """An immutable, thread-safe view of one artifact; see the module docstring."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        arrays: dict[str, np.ndarray],
        metadata: TrackMetadata,
        history_tower: Callable[[np.ndarray], np.ndarray] | None,  # [B, hist] -> [B, dim]
        index: RetrievalIndex,
    ) -> None:
        # ``arrays`` follow the artifact contract (read_arrays checked them), usually as read-only
        # memory maps, used in place: ascontiguousarray is a no-op on a C-contiguous float32 map,
        # and the seen CSR shares seen_indices / seen_indptr with a zero-stride 1 as its values.
        self.path = path
        self.manifest = manifest
        self.track_ids: np.ndarray = arrays["track_ids"]
        self.user_ids: np.ndarray = arrays["user_ids"]
        self.track_embeddings = np.ascontiguousarray(arrays["track_embeddings"], dtype=np.float32)
        self.user_embeddings = np.ascontiguousarray(arrays["user_embeddings"], dtype=np.float32)
        self.seen = seen_matrix(arrays)
        self.popular: np.ndarray = arrays["popular"]
        self.popular_scores: np.ndarray = arrays["popular_scores"]
        self._metadata = metadata
        self._tracks = IdLookup(self.track_ids, arrays["track_order"])
        self._users = IdLookup(self.user_ids, arrays["user_order"])
        self._history: np.ndarray | None = arrays.get(HISTORY_ARRAY.name)
        # Lists precomputed at export (manifest.known_top_k wide), or none (width 0).
        self._lists = (arrays.get("known_top_indices"), arrays.get("known_top_scores"))
        self._list_width = manifest.known_top_k if self._lists[0] is not None else 0
        self._history_tower = history_tower if self._history is not None else None
        self.index = index
        self.index_info: IndexInfo = manifest.index_info
        # The exact fallback of search_excluding (rows the over-fetch cannot fill); for an exact
        # artifact it is the index itself.
        self._exact = index if isinstance(index, ExactIndex) else ExactIndex(self.track_embeddings)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cache_users = 0
        self._cache_width = 0

    def configure_cache(self, users: int, width: int) -> None:
        """Keep up to ``users`` known users' top-``width`` lists (least recently used dropped
        first; 8 bytes per entry); 0 disables. Clears what is cached: the width changes what a
        known user is searched for (see the module docstring)."""
        if users < 0 or width < 0:
            raise ValueError(f"cache users and width must be >= 0, got {users}, {width}")
        with self._cache_lock:
            self._cache.clear()
            self._cache_users = users
            self._cache_width = min(width, self.n_tracks) if users else 0

    @property
    def cache_width(self) -> int:
        """Width of the cached known-user lists (0: no cache)."""
        return self._cache_width

    @property
    def cached_users(self) -> int:
        return len(self._cache)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        history_tower: bool = True,
        cache_users: int = 0,
        cache_width: int = 0,
    ) -> Recommender:
        """Read an artifact directory (arrays memory-mapped, the saved index loaded as is);
        ``history_tower=False`` skips TensorFlow (batch, pyfunc). Every problem with the files,
        the index's included, is a one-line DataError. ``cache_users`` / ``cache_width``: see
        ``configure_cache``."""
        path = Path(path)
        if not path.is_dir():
            raise DataError("artifact directory does not exist", path=path)
        manifest = read_manifest(path)
        arrays = read_arrays(path, manifest, mmap=True)
        index = read_index(path, manifest, arrays["track_embeddings"])
        metadata = read_track_metadata(path, manifest)
        tower = None
        if history_tower and manifest.has_history_tower and manifest.history_dim:
            tower = load_history_tower(path, manifest.history_dim)
        recommender = cls(path, manifest, arrays, metadata, tower, index)
        recommender.configure_cache(cache_users, cache_width)
        return recommender

    @property
    def n_tracks(self) -> int:
        return len(self.track_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def has_history_tower(self) -> bool:
        return self._history_tower is not None

    def user_index(self, user_id: str) -> int | None:
        return self._users.get(user_id)

    def track_indices(self, track_ids: Iterable[str]) -> list[int]:
        """Candidate indices of the known ids, in order; unknown ids are not candidates anyway."""
        ids = list(track_ids)
        if not ids:
            return []
        found = self._tracks.get_many(ids)
        return found[found >= 0].tolist()

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
        return self.recommend_many([Query(user_id, k, exclude_track_ids, recent_track_ids)])[0]

    def recommend_many(self, queries: Sequence[Query]) -> list[Recommendation]:
        """Each query answered as :meth:`recommend` answers it alone, the sessions among them
        together: one history-tower call for all, one index search per (k, ``_spare``).

        A session's search over-fetches by its own ``_spare``, so the rows searched
        together ask the index exactly what each would ask alone; only the tower's float32
        rounding may differ between a batch and a single row (different matrix kernels).
        """
        out: list[Recommendation | None] = [None] * len(queries)
        sessions: list[tuple[int, np.ndarray, np.ndarray]] = []
        for i, q in enumerate(queries):
            if q.k < 1:
                raise ValueError(f"k must be >= 1, got {q.k}")
            n_excl = len(q.exclude_track_ids)
            found = self._tracks.get_many([*q.exclude_track_ids, *q.recent_track_ids])
            excluded = found[found >= 0].tolist()
            u = self._users.get(q.user_id)
            if u is not None:
                out[i] = self._known(u, q.k, excluded)
                continue
            recent = found[n_excl:]
            recent = recent[recent >= 0]
            if len(recent) and self._history_tower is not None:
                sessions.append((i, recent, np.unique(excluded)))
            else:
                out[i] = self._popular(q.k, excluded)
        if sessions:
            self._sessions(queries, sessions, out)
        return [rec for rec in out if rec is not None]

    def _known(self, u: int, k: int, excluded: list[int]) -> Recommendation:
        # Without a cache a list to filter would be searched just for this request.
        if not excluded or k <= max(self._cache_width, self._list_width):
            listed = self._from_list(self._known_list(u, k), k, excluded)
            if listed is not None:
                return listed
        seen = self.seen.indices[self.seen.indptr[u] : self.seen.indptr[u + 1]]
        return self._search_many(
            self.user_embeddings[[u]], k, [np.union1d(seen, excluded)], "model"
        )[0]

    def _sessions(
        self,
        queries: Sequence[Query],
        sessions: list[tuple[int, np.ndarray, np.ndarray]],
        out: list[Recommendation | None],
    ) -> None:
        """Fill ``out`` at the sessions' positions: (position, recent track indices, sorted
        unique excluded indices) each."""
        assert self._history_tower is not None and self._history is not None
        history = self._history
        # The model's masked mean over the known tracks, as in training (duplicates count).
        pooled = np.stack(
            [history[recent].mean(axis=0, dtype=np.float32) for _, recent, _ in sessions]
        )
        vectors = np.asarray(self._history_tower(pooled), dtype=np.float32).reshape(
            len(sessions), -1
        )
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (i, _, excluded) in enumerate(sessions):
            groups.setdefault((queries[i].k, _spare(len(excluded))), []).append(j)
        for (k, _), rows in groups.items():
            found = self._search_many(vectors[rows], k, [sessions[j][2] for j in rows], "session")
            for j, rec in zip(rows, found, strict=True):
                out[sessions[j][0]] = rec

    def cached(self, user_id: str, k: int) -> Recommendation | None:
        """A known user's top-k from the cache, or None (not cached, not known, or k wider than
        the cache): the router answers these on the event loop, everything else in a thread.
        A list precomputed at export counts as cached."""
        if not 1 <= k <= max(self._cache_width, self._list_width):
            return None
        u = self._users.get(user_id)
        if u is None:
            return None
        if k <= self._list_width:
            indices, scores = self._precomputed(u)
            return Recommendation(self._items(indices[:k], scores[:k]), "model")
        with self._cache_lock:
            hit = self._cache.get(u)
            if hit is not None:
                self._cache.move_to_end(u)
        if hit is None:
            return None
        return Recommendation(self._items(hit[0][:k], hit[1][:k]), "model")

    def _width(self, k: int) -> int:
        return min(max(k, self._cache_width), self.n_tracks)

    def _precomputed(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        indices, scores = self._lists
        assert indices is not None and scores is not None
        return indices[u], scores[u]

    def _known_list(self, u: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """User ``u``'s top list, seen excluded: precomputed at export when ``k`` fits it, else
        ``_width(k)`` wide, cached, or searched (and cached when ``k`` fits the cache)."""
        if k <= self._list_width:
            return self._precomputed(u)
        cacheable = k <= self._cache_width
        if cacheable:
            with self._cache_lock:
                hit = self._cache.get(u)
                if hit is not None:
                    self._cache.move_to_end(u)
                    return hit
        rows = np.array([u])
        idx, top = search_excluding(
            self.index, self._exact, self.user_embeddings[rows], self._width(k), self.seen, rows
        )
        listed = (idx[0].astype(np.int32), top[0])
        if cacheable:
            with self._cache_lock:
                self._cache[u] = listed
                while len(self._cache) > self._cache_users:
                    self._cache.popitem(last=False)
        return listed

    def _from_list(
        self, listed: tuple[np.ndarray, np.ndarray], k: int, excluded: list[int]
    ) -> Recommendation | None:
        """Top-k of a known user's list with ``excluded`` dropped, or None when fewer than k
        survive and the list did not already hold every candidate (it ends in -1 padding or is
        the whole catalogue)."""
        indices, scores = listed
        if not excluded:
            return Recommendation(self._items(indices[:k], scores[:k]), "model")
        skip = set(excluded)
        keep = [j for j, i in enumerate(indices.tolist()) if i not in skip]
        complete = indices[-1] < 0 or len(indices) == self.n_tracks
        if len(keep) < k and not complete:
            return None
        keep = keep[:k]
        return Recommendation(self._items(indices[keep], scores[keep]), "model")

    def _search_many(
        self, queries: np.ndarray, k: int, excluded: list[np.ndarray], src: Source
    ) -> list[Recommendation]:
        """Queries through the index, row b without the sorted unique track indices
        ``excluded[b]``; every row's exclusion count must have the same ``_spare``."""
        q = np.asarray(queries, dtype=np.float32).reshape(len(excluded), -1)
        k = min(k, self.n_tracks)
        counts = [len(e) for e in excluded]
        spare = {_spare(n) for n in counts}
        if len(spare) != 1:
            raise ValueError(f"rows searched together must over-fetch alike, got {spare}")
        if not any(counts):
            idx, top = self.index.search(q, k)
        else:
            indptr = np.concatenate([[0], np.cumsum(counts)])
            exclude = sp.csr_matrix(
                (np.ones(indptr[-1], dtype=np.float32), np.concatenate(excluded), indptr),
                shape=(len(excluded), self.n_tracks),
            )
            idx, top = search_excluding(
                self.index, self._exact, q, k, exclude, overfetch=spare.pop()
            )
        return [Recommendation(self._items(i, t), src) for i, t in zip(idx, top, strict=True)]

    def _popular(self, k: int, excluded: list[int]) -> Recommendation:
        # At most len(excluded) of the first k + len(excluded) are excluded.
        head = self.popular[: k + len(excluded)]
        keep = np.nonzero(~np.isin(head, excluded))[0][:k] if excluded else np.arange(len(head))
        return Recommendation(self._items(head[keep], self.popular_scores[keep]), "popular")

    def _items(self, indices: np.ndarray, scores: np.ndarray) -> list[Item]:
        # Python lists: for the <= max_k items of a request they are cheaper than numpy masks.
        kept = [
            (i, s)
            for i, s in zip(indices.tolist(), scores.tolist(), strict=True)
            if i >= 0 and s != -np.inf
        ]
        if not kept:
            return []
        rows = [i for i, _ in kept]
        titles, artists = self._metadata.rows(rows)
        ids = self.track_ids[rows].tolist()
        return [
            Item(t, s, title, artist)
            for t, (_, s), title, artist in zip(ids, kept, titles, artists, strict=True)
        ]

    def top_k_batch(self, user_ids: Sequence[str], k: int) -> TopK:
        """Known users' lists precomputed at export when k fits them, else searched through the
        index in one batch at ``max(k, cache width)``, seen excluded, cut to k (what
        ``recommend`` returns for each; see the module docstring); unknown users → popular.
        Batches do not fill the cache: a batch of many users would evict the interactive
        ones."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.n_tracks)
        rows = self._users.get_many(list(user_ids))
        known = rows >= 0
        indices = np.empty((len(rows), k), dtype=np.int64)
        scores = np.empty((len(rows), k), dtype=np.float32)
        indices[~known] = self.popular[:k]
        scores[~known] = self.popular_scores[:k]
        users = rows[known]
        if len(users) and k <= self._list_width:
            lists, list_scores = self._lists
            assert lists is not None and list_scores is not None
            indices[known], scores[known] = lists[users, :k], list_scores[users, :k]
        elif len(users):
            idx, top = search_excluding(
                self.index,
                self._exact,
                self.user_embeddings[users],
                self._width(k),
                self.seen,
                users,
            )
            indices[known], scores[known] = idx[:, :k], top[:, :k]
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
