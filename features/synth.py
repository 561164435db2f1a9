"""Seeded synthetic listening data with structure a two-tower model can learn.

Real data cannot be shipped with the repository, yet tests, CI and the demo notebook need a dataset
whose answer is known: taste clusters (genres) over artists, users who mostly listen within one or
two clusters, Zipf-like popularity within clusters and overall, long-tailed user activity and play
counts. The cluster signal is strong enough that a personalised model clearly beats popularity,
while popularity stays a fair baseline (as on real music data), so a broken model is detectable.

:func:`write_sharded` produces the same structure at any size in bounded memory (users are
generated in chunks, each chunk one Parquet shard), e.g. the Million Playlist Dataset's shape:
``tracktower data synth --preset mpd --out DIR`` writes ``DIR/interactions/part-*.parquet``
(1,000,000 users, ~66.3M (user, track) rows, ~2.2M distinct tracks heard) and
``DIR/tracks.parquet`` (2,262,292 tracks), in ~10 minutes and under 2 GB of memory on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tracktower.features.errors import DataError

__all__ = ["GENRES", "PRESETS", "Sharded", "generate", "save", "write", "write_sharded"]

GENRES = (
    *("rock", "pop", "hip hop", "jazz", "classical", "electronic", "country", "folk", "metal"),
    *("r&b", "reggae", "blues", "latin", "punk", "soul", "indie", "ambient", "k-pop", "funk"),
    "gospel",
)
_SYLLABLE_TEXT = "ka lo mi ra ve su na tor el din bri mar quo zen fa lu tri sol dra vin ro ne ly"
_SYLLABLES = np.array(_SYLLABLE_TEXT.split())
_EPOCH_2024 = 1_704_067_200
# Named sizes for write_sharded. "mpd": the Million Playlist Dataset (1,000,000 playlists,
# 2,262,292 tracks, 66,346,428 rows); the median activity is calibrated so that ~66.3M distinct
# (user, track) rows remain once repeated listens are merged.
PRESETS: dict[str, dict[str, Any]] = {
    "mpd": {"users": 1_000_000, "tracks": 2_262_292, "median_interactions": 52.2},
}
INTERACTIONS_DIR = "interactions"
TRACKS_FILE = "tracks.parquet"
_STAGING_PREFIX = ".synth-"


def generate(
    users: int = 2000,
    tracks: int = 5000,
    seed: int = 0,
    *,
    genres: int | None = None,
    tracks_per_artist: float = 8.0,
    median_interactions: float = 25.0,
    noise: float = 0.1,
    second_genre_share: float = 0.5,
    zipf_exponent: float = 0.9,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(interactions, tracks)``: canonical interactions (``weight`` = play count, ``timestamp``
    in 2024) and track metadata (``title, artist, album, genre, year, duration_ms``).

    Each listening event picks the user's primary genre, a secondary genre (half of the users have
    one) or, with probability ``noise``, any track by global popularity; within a genre, tracks
    follow a Zipf law with ``zipf_exponent``. Repeated events of a pair add up their plays.
    ``genres`` defaults to 20 (fewer below 500 tracks).
    """
    genres = _check(users, tracks, genres, noise, second_genre_share)
    rng = np.random.default_rng(seed)
    cat = _catalogue(rng, tracks, genres, tracks_per_artist, zipf_exponent)
    events = _events(rng, cat, users, tracks, median_interactions, noise, second_genre_share)
    pairs = _merge(events)
    u_width, t_width = len(str(users - 1)), len(str(tracks - 1))
    interactions = pd.DataFrame(
        {
            "user_id": pd.Series([f"u{i:0{u_width}d}" for i in range(users)], dtype="str")
            .iloc[pairs["user"].to_numpy()]
            .to_numpy(),
            "track_id": pd.Series([f"t{i:0{t_width}d}" for i in range(tracks)], dtype="str")
            .iloc[pairs["track"].to_numpy()]
            .to_numpy(),
            "weight": pairs["weight"].to_numpy(dtype=np.float64),
            "timestamp": pairs["timestamp"].to_numpy(dtype=np.int64),
        }
    )
    interactions = interactions.astype({"user_id": "str", "track_id": "str"})
    meta = _metadata(rng, t_width, cat.track_artist, cat.track_genre, cat.n_artists, genres)
    return interactions.reset_index(drop=True), meta


def _check(
    users: int, tracks: int, genres: int | None, noise: float, second_genre_share: float
) -> int:
    """The number of genres to use, once the sizes are known to be valid."""
    if users < 1 or tracks < 2:
        raise DataError(f"need users >= 1 and tracks >= 2, got users={users}, tracks={tracks}")
    if genres is None:  # 20 genres by default, fewer for toy sizes so each keeps ~25 tracks
        genres = int(np.clip(tracks // 25, 1, 20))
    if not 1 <= genres <= tracks:
        raise DataError(f"genres must be in [1, tracks], got {genres}")
    if not 0.0 <= noise <= 1.0 or not 0.0 <= second_genre_share <= 1.0:
        raise DataError("noise and second_genre_share must be in [0, 1]")
    return genres


def _merge(events: pd.DataFrame) -> pd.DataFrame:
    """Repeated events of a pair as one row (plays summed, last time kept), in each user's
    listening order."""
    pairs = events.groupby(["user", "track"], sort=True).agg(
        weight=("plays", "sum"), timestamp=("timestamp", "max")
    )
    return pairs.reset_index().sort_values(["user", "timestamp", "track"], kind="stable")


@dataclass(frozen=True)
class _Catalogue:
    track_artist: np.ndarray
    track_genre: np.ndarray
    n_artists: int
    genre_pop: np.ndarray
    by_genre: np.ndarray
    within: np.ndarray
    global_pop: np.ndarray


def _catalogue(
    rng: np.random.Generator,
    tracks: int,
    genres: int,
    tracks_per_artist: float,
    zipf_exponent: float,
) -> _Catalogue:
    """Artists, their genres, and each track's popularity within its genre and overall."""
    n_artists = int(np.clip(round(tracks / tracks_per_artist), genres, tracks))
    sizes = 1 + rng.multinomial(tracks - n_artists, _normalise(rng.lognormal(0, 0.6, n_artists)))
    track_artist = np.repeat(np.arange(n_artists), sizes)
    artist_genre = rng.permutation(np.arange(n_artists) % genres)
    track_genre = artist_genre[track_artist]

    genre_pop = _normalise(1.0 / np.arange(1, genres + 1) ** 0.6)
    # Zipf within each genre over a ranking driven by artist popularity and per-track luck.
    appeal = rng.lognormal(0, 0.8, n_artists)[track_artist] * rng.lognormal(0, 1.0, tracks)
    by_genre = np.lexsort((-appeal, track_genre))
    genre_start = np.searchsorted(track_genre[by_genre], np.arange(genres))
    rank_in_genre = np.arange(tracks) - genre_start[track_genre[by_genre]]
    within = np.empty(tracks)
    within[by_genre] = 1.0 / (rank_in_genre + 1.0) ** zipf_exponent
    within /= np.bincount(track_genre, weights=within)[track_genre]
    global_pop = within * genre_pop[track_genre]
    return _Catalogue(track_artist, track_genre, n_artists, genre_pop, by_genre, within, global_pop)


def _events(
    rng: np.random.Generator,
    cat: _Catalogue,
    users: int,
    tracks: int,
    median_interactions: float,
    noise: float,
    second_genre_share: float,
) -> pd.DataFrame:
    """Listening events: a primary genre, maybe a secondary one, a long-tailed activity."""
    genres = len(cat.genre_pop)
    primary = rng.choice(genres, size=users, p=cat.genre_pop)
    secondary = rng.choice(genres, size=users, p=cat.genre_pop)
    has_second = (rng.random(users) < second_genre_share) & (secondary != primary) & (genres > 1)
    primary_share = np.where(has_second, rng.uniform(0.55, 0.85, users), 1.0)
    activity = np.clip(np.rint(rng.lognormal(np.log(median_interactions), 0.8, users)), 3, None)
    activity = np.minimum(activity, max(3, tracks // 4)).astype(np.int64)

    user = np.repeat(np.arange(users), activity)
    roll = rng.random(len(user))
    genre = np.where(roll < primary_share[user], primary[user], secondary[user])
    is_noise = rng.random(len(user)) < noise
    track = np.empty(len(user), dtype=np.int64)
    track[~is_noise] = _sample_within(
        cat.by_genre, cat.within, cat.track_genre, genre[~is_noise], rng
    )
    track[is_noise] = _sample(np.cumsum(cat.global_pop), int(is_noise.sum()), rng)
    return pd.DataFrame(
        {
            "user": user,
            "track": track,
            "plays": rng.geometric(0.35, len(user)).astype(np.float64),
            "timestamp": _EPOCH_2024 + rng.integers(0, 365 * 86_400, len(user)),
        }
    )


def write(out_dir: str | Path, **kwargs: Any) -> tuple[Path, Path]:
    """Write ``interactions.parquet`` and ``tracks.parquet`` (kwargs as for :func:`generate`)."""
    return save(out_dir, *generate(**kwargs))


def save(
    out_dir: str | Path, interactions: pd.DataFrame, tracks: pd.DataFrame
) -> tuple[Path, Path]:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a directory", path=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create directory: {exc.strerror or exc}", path=out) from None
    paths = out / "interactions.parquet", out / "tracks.parquet"
    interactions.to_parquet(paths[0], index=False)
    tracks.to_parquet(paths[1], index=False)
    return paths


@dataclass(frozen=True)
class Sharded:
    """What :func:`write_sharded` wrote."""

    interactions: Path  # directory of part-NNNNN.parquet, readable by io.read_interactions
    tracks: Path
    rows: int
    users: int
    tracks_heard: int
    catalogue: int
    shards: int


def write_sharded(
    out_dir: str | Path,
    *,
    users: int,
    tracks: int,
    seed: int = 0,
    chunk_users: int = 50_000,
    genres: int | None = None,
    tracks_per_artist: float = 8.0,
    median_interactions: float = 25.0,
    noise: float = 0.1,
    second_genre_share: float = 0.5,
    zipf_exponent: float = 0.9,
) -> Sharded:
    """:func:`generate`'s data at any size in memory bounded by ``chunk_users``: one shard per
    chunk of users (all of a user's events in one chunk, so repeats merge there), published
    into ``out_dir`` (``interactions/`` and ``tracks.parquet``) only once complete.

    Same seed and ``chunk_users``, same files; the values differ from :func:`generate`'s, whose
    single random stream cannot be cut into chunks. A run that is killed leaves only a hidden
    staging directory, which readers skip and the next run removes.
    """
    genres = _check(users, tracks, genres, noise, second_genre_share)
    if chunk_users < 1:
        raise DataError(f"chunk_users must be >= 1, got {chunk_users}")
    out = _output_dir(out_dir)
    staging = out / f"{_STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.partial"
    staging.mkdir()
    try:
        rng = np.random.default_rng(seed)
        cat = _catalogue(rng, tracks, genres, tracks_per_artist, zipf_exponent)
        t_width = len(str(tracks - 1))
        meta = _metadata(rng, t_width, cat.track_artist, cat.track_genre, cat.n_artists, genres)
        meta.to_parquet(staging / TRACKS_FILE, index=False)
        track_ids = pa.array(meta["track_id"].to_numpy(dtype=object), type=pa.string())
        del meta
        (staging / INTERACTIONS_DIR).mkdir()
        heard = np.zeros(tracks, dtype=bool)
        rows, shards = 0, 0
        for shards, start in enumerate(range(0, users, chunk_users), start=1):
            n = min(chunk_users, users - start)
            crng = np.random.default_rng([seed, shards])  # one stream per chunk
            events = _events(crng, cat, n, tracks, median_interactions, noise, second_genre_share)
            pairs = _merge(events)
            del events
            heard[pairs["track"].to_numpy()] = True
            table = _shard(pairs, start, len(str(users - 1)), track_ids)
            pq.write_table(table, staging / INTERACTIONS_DIR / f"part-{shards - 1:05d}.parquet")
            rows += table.num_rows
        _publish(staging, out, (INTERACTIONS_DIR, TRACKS_FILE))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Sharded(
        out / INTERACTIONS_DIR, out / TRACKS_FILE, rows, users, int(heard.sum()), tracks, shards
    )


def _shard(pairs: pd.DataFrame, first_user: int, u_width: int, track_ids: pa.Array) -> pa.Table:
    """A chunk's merged pairs as canonical columns; ids are built by Arrow, not per row in
    Python (one string per user of the chunk, a gather of the catalogue's track ids)."""
    user = pairs["user"].to_numpy()
    names = pa.array([f"u{first_user + i:0{u_width}d}" for i in range(int(user.max()) + 1)])
    return pa.table(
        {
            "user_id": names.take(pa.array(user)),
            "track_id": track_ids.take(pa.array(pairs["track"].to_numpy())),
            "weight": pa.array(pairs["weight"].to_numpy(dtype=np.float64)),
            "timestamp": pa.array(pairs["timestamp"].to_numpy(dtype=np.int64)),
        }
    )


def _output_dir(out_dir: str | Path) -> Path:
    """``out_dir`` created if need be, with staging left by dead runs removed."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a directory", path=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create directory: {exc.strerror or exc}", path=out) from None
    for stale in out.glob(f"{_STAGING_PREFIX}*.partial"):
        pid = stale.name.removeprefix(_STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _publish(staging: Path, out: Path, names: tuple[str, ...]) -> None:
    """Rename each finished output into place; a previous one is first moved into the staging
    directory (removed afterwards), so the destination never holds a half-written file."""
    for name in names:
        target = out / name
        if target.exists() or target.is_symlink():
            os.replace(target, staging / f"old-{name}")
        os.replace(staging / name, target)
        with contextlib.suppress(OSError):  # durability of the renames, where supported
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / x.sum()


def _sample(cdf: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(size) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _sample_within(
    by_genre: np.ndarray,
    within: np.ndarray,
    track_genre: np.ndarray,
    genre: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Inverse-CDF sampling from each draw's genre at once: cumulative probabilities are offset
    by the genre number, so one sorted array serves every genre."""
    p = within[by_genre]
    g = track_genre[by_genre]
    cdf = g + np.cumsum(p) - np.concatenate([[0.0], np.cumsum(np.bincount(g, weights=p))])[g]
    u = genre + rng.random(len(genre)) * (1 - 1e-12)
    pos = np.searchsorted(cdf, u, side="right")
    # Guard float round-off at a genre's edges: stay inside the drawn genre.
    first = np.searchsorted(g, genre, side="left")
    last = np.searchsorted(g, genre, side="right") - 1
    return by_genre[np.clip(pos, first, last)]


def _words(rng: np.random.Generator, n: int, max_words: int) -> list[str]:
    counts = rng.integers(1, max_words + 1, n)
    syl = rng.integers(0, len(_SYLLABLES), (n, max_words, 3))
    lengths = rng.integers(1, 4, (n, max_words))
    return [
        " ".join(
            "".join(_SYLLABLES[syl[i, w, : lengths[i, w]]]).capitalize() for w in range(counts[i])
        )
        for i in range(n)
    ]


def _metadata(
    rng: np.random.Generator,
    t_width: int,
    track_artist: np.ndarray,
    track_genre: np.ndarray,
    n_artists: int,
    n_genres: int,
) -> pd.DataFrame:
    tracks = len(track_artist)
    artist_names = [f"{name} {i}" for i, name in enumerate(_words(rng, n_artists, 2))]
    album_of = rng.integers(0, 3, tracks)  # up to three albums per artist
    album_titles = np.array(_words(rng, n_artists * 3, 2), dtype=object)
    album_year = rng.integers(1965, 2025, n_artists * 3)
    album_key = track_artist * 3 + album_of
    genre_names = [
        GENRES[g] if g < len(GENRES) else f"genre {g}" for g in range(track_genre.max() + 1)
    ]
    frame = pd.DataFrame(
        {
            "track_id": [f"t{i:0{t_width}d}" for i in range(tracks)],
            "title": _words(rng, tracks, 3),
            "artist": np.array(artist_names, dtype=object)[track_artist],
            "album": album_titles[album_key],
            "genre": np.array(genre_names, dtype=object)[track_genre],
            "year": album_year[album_key].astype(np.int64),
            "duration_ms": np.rint(rng.lognormal(np.log(210_000), 0.25, tracks)).astype(np.int64),
        }
    )
    return frame.astype({c: "str" for c in ("track_id", "title", "artist", "album", "genre")})
