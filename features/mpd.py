"""Flatten Million Playlist Dataset JSON slices into raw frames (validation happens in canonical).

Playlists become users. Published subsets drop fields (``pos``, ``album_name``, ...), so only
``pid`` and ``track_uri`` are required; the list index stands in for a missing ``pos``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tracktower.features.errors import DataError

__all__ = ["MPD_GLOB", "URI_PREFIX", "read_mpd_frames"]

MPD_GLOB = "mpd.slice.*.json"
URI_PREFIX = "spotify:track:"


def read_mpd_frames(files: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """``(raw interactions, raw tracks, first global row of each file)``.

    Raw interactions use the MPD field names (``pid``, ``track_uri``, ``pos``) so validation
    errors name the field as it appears in the JSON.
    """
    users: list[str] = []
    uris: list[Any] = []
    positions: list[Any] = []
    names: list[Any] = []
    artists: list[Any] = []
    starts = np.zeros(len(files), dtype=np.int64)
    for k, path in enumerate(files):
        starts[k] = len(users)
        for i, playlist in enumerate(_playlists(path)):
            if not isinstance(playlist, dict) or playlist.get("pid") is None:
                raise DataError(f"playlist #{i + 1} has no 'pid'", path=path, column="pid")
            tracks = playlist.get("tracks") or []
            if not isinstance(tracks, list) or not all(isinstance(t, dict) for t in tracks):
                raise DataError(
                    f"playlist pid {playlist['pid']}: 'tracks' must be a list of objects",
                    path=path,
                    column="tracks",
                )
            users.extend([str(playlist["pid"])] * len(tracks))
            uris.extend([t.get("track_uri") for t in tracks])
            positions.extend([t.get("pos", j) for j, t in enumerate(tracks)])
            names.extend([t.get("track_name") for t in tracks])
            artists.extend([t.get("artist_name") for t in tracks])
    ids = pd.Series(uris, dtype="str").str.removeprefix(URI_PREFIX)
    raw = pd.DataFrame(
        {
            "pid": pd.Series(users, dtype="str"),
            "track_uri": ids,
            "pos": pd.Series(positions),
        }
    )
    tracks_raw = pd.DataFrame(
        {
            "track_id": ids,
            "track_name": pd.Series(names, dtype="str"),
            "artist_name": pd.Series(artists, dtype="str"),
        }
    )
    return raw, tracks_raw, starts


def _playlists(path: Path) -> list[Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DataError("no such file", path=path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 JSON ({exc.reason} at byte {exc.start})", path=path) from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", path=path
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    playlists = doc.get("playlists") if isinstance(doc, dict) else None
    if not isinstance(playlists, list):
        raise DataError(
            "not an MPD slice: expected an object with a 'playlists' list",
            path=path,
            column="playlists",
        )
    return playlists
