"""Turn a raw frame from any reader into the canonical interactions frame, or say which row is bad.

Kept apart from the file readers so that every source (Parquet, text, MPD JSON) is held to exactly
the same rules: string ids that are neither missing nor blank, a finite non-negative float weight,
an optional integer ordering key, and one row per (user, track).

Ids are held as pandas Categoricals of strings: at the Million Playlist Dataset's 66M rows a
Python string per row would cost ~30 GB, while an integer code costs 4 bytes, and each distinct id
is validated once instead of once per row. The readers return the categories (the vocabulary)
sorted, so code order is string order, which lets the split, the encoder and the fingerprint work
on the codes alone (:func:`codes_of` sorts any other frame's first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tracktower.features.columns import ColumnMap
from tracktower.features.errors import DataError

__all__ = [
    "ColumnMap",
    "as_text",
    "canonical_interactions",
    "check_ids",
    "codes_of",
    "compact",
    "dedupe_interactions",
    "id_categorical",
    "sorted_categorical",
]

_EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


def canonical_interactions(
    raw: pd.DataFrame, path: Path, cols: ColumnMap, *, row_base: int
) -> pd.DataFrame:
    """Validated ``user_id, track_id, weight[, timestamp]``; duplicates are *not* merged yet.

    ``row_base`` is added to a 0-based position to get the row number reported in errors.
    """
    if len(raw) == 0:
        raise DataError("file has no rows", path=path)
    present = [str(c) for c in raw.columns]

    def need(name: str) -> str:
        if name not in raw.columns:
            raise DataError(
                f"missing required column '{name}'; columns present: {', '.join(present)}",
                path=path,
                column=name,
            )
        return name

    def optional(explicit: str | None, *fallbacks: str) -> str | None:
        if explicit is not None:
            return need(explicit)
        return next((f for f in fallbacks if f in raw.columns), None)

    user_col, track_col = need(cols.user), need(cols.track)
    weight_col = optional(cols.weight, "weight", "plays")
    ts_col = optional(cols.timestamp, "timestamp", "position")

    out = pd.DataFrame(
        {
            "user_id": id_categorical(raw[user_col], path, user_col, row_base),
            "track_id": id_categorical(raw[track_col], path, track_col, row_base),
        }
    )
    if weight_col is None:
        out["weight"] = np.ones(len(raw), dtype=np.float64)
    else:
        out["weight"] = _weights(raw[weight_col], path, weight_col, row_base)
    if ts_col is not None:
        out["timestamp"] = _timestamps(raw[ts_col], path, ts_col, row_base)
    return out


def id_categorical(col: pd.Series, path: Path, name: str, row_base: int) -> pd.Categorical:
    """The ids of :func:`check_ids` as a Categorical of strings (categories in any order: the
    readers sort them once all files are united, see :func:`sorted_categorical`).

    Only the distinct values are converted and checked; a bad one is traced back to its first
    row, and that row goes through :func:`check_ids` so the message is exactly the per-row one.
    """
    values = col.reset_index(drop=True)
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes = np.asarray(values.cat.codes.to_numpy(), dtype=np.int64)
        uniques = pd.Series(values.cat.categories)
    else:
        codes, found = pd.factorize(values, use_na_sentinel=True)
        uniques = pd.Series(found)
    if pd.api.types.is_float_dtype(uniques.dtype) and (uniques % 1 == 0).all():
        uniques = uniques.astype("Int64")
    bad_unique = _bad_ids(uniques)
    missing = codes < 0
    if missing.any() or bad_unique.any():
        i = _first(missing | bad_unique[np.maximum(codes, 0)])
        check_ids(values.iloc[[i]], path, name, row_base + i)  # raises the per-row message
        raise DataError("invalid id", path=path, column=name, row=row_base + i)
    text = pd.Index(uniques.astype("str"), dtype="str")
    # Distinct numbers or strings stay distinct as text; a mixed column (1 and "1") may not.
    if uniques.dtype == object and not text.is_unique:
        remap, distinct = pd.factorize(text)
        codes, text = remap[codes], pd.Index(distinct, dtype="str")
    dtype = pd.CategoricalDtype(text)
    return pd.Categorical.from_codes(_narrow(codes, len(text)), dtype=dtype)


def _bad_ids(uniques: pd.Series) -> np.ndarray:
    """Which distinct values :func:`check_ids` rejects: blank, missing, or bytes not UTF-8."""
    try:
        text = uniques.astype("str")
    except UnicodeDecodeError:
        return np.array([not _utf8_text(v) for v in uniques.to_numpy(dtype=object)], dtype=bool)
    blank = (text.str.strip() == "").to_numpy(dtype=bool, na_value=False)
    return blank | uniques.isna().to_numpy()


def _utf8_text(value: object) -> bool:
    if isinstance(value, bytes | bytearray):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return False
        return text.strip() != ""
    return str(value).strip() != ""


def sorted_categorical(codes: np.ndarray, categories: pd.Index) -> pd.Categorical:
    """``codes`` into unique ``categories``, re-coded so that the categories are sorted (string
    order, sorted by Arrow: millions of ids in well under a second)."""
    categories = pd.Index(categories, dtype="str")
    if not categories.is_monotonic_increasing:
        order = pc.array_sort_indices(pa.array(categories.array)).to_numpy()
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        codes = np.where(codes < 0, -1, rank[np.maximum(codes, 0)])
        categories = categories[order]
    dtype = pd.CategoricalDtype(categories)
    return pd.Categorical.from_codes(_narrow(codes, len(categories)), dtype=dtype)


def _narrow(codes: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(codes, dtype=np.int32 if n < 2**31 - 1 else np.int64)


def codes_of(col: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Integer codes and the sorted vocabulary they index, for a categorical or plain id column.

    A plain column (a caller's own frame) is factorised; the canonical categorical one is free.
    """
    if isinstance(col.dtype, pd.CategoricalDtype):
        cat = col.array
        if not cat.categories.is_monotonic_increasing:
            cat = sorted_categorical(cat.codes, cat.categories)
        return np.asarray(cat.codes), cat.categories
    codes, uniques = pd.factorize(col.astype("str"), sort=True)
    return codes, pd.Index(uniques, dtype="str")


def compact(col: pd.Series) -> pd.Series:
    """The column with its unused categories dropped (a filter leaves them behind), in O(rows):
    the vocabulary then says exactly which ids the rows hold."""
    codes, categories = codes_of(col)
    used = np.bincount(codes[codes >= 0], minlength=len(categories)) > 0
    if used.all():
        if isinstance(col.dtype, pd.CategoricalDtype) and col.cat.categories is categories:
            return col  # already sorted and compact
        return pd.Series(sorted_categorical(codes, categories), index=col.index, name=col.name)
    remap = np.append(np.cumsum(used) - 1, -1).astype(_narrow(codes, len(categories)).dtype)
    kept = categories[used]
    return pd.Series(sorted_categorical(remap[codes], kept), index=col.index, name=col.name)


def check_ids(col: pd.Series, path: Path, name: str, row_base: int) -> pd.Series:
    """Ids as strings; integer-valued floats (ids that passed through a NaN column) lose ``.0``."""
    values = col.reset_index(drop=True)
    missing = values.isna().to_numpy()
    if pd.api.types.is_float_dtype(values.dtype) and (values.dropna() % 1 == 0).all():
        values = values.astype("Int64")
    text = as_text(values, path, name, row_base)
    bad = missing | (text.str.strip() == "").to_numpy(dtype=bool, na_value=False)
    if bad.any():
        i = _first(bad)
        what = "missing id" if missing[i] else f"empty id {text.iloc[i]!r}"
        raise DataError(what, path=path, column=name, row=i + row_base)
    return text


def as_text(values: pd.Series, path: Path, name: str, row_base: int) -> pd.Series:
    """``values.astype("str")`` for a positionally indexed column, with bytes that are not UTF-8
    reported as the file, column and row they came from.

    A Parquet ``binary`` column arrives as Python ``bytes``; pandas decodes them as UTF-8 and
    raises a bare UnicodeDecodeError (no row, no file) on the first invalid one. Valid UTF-8
    bytes are accepted: they are text stored under a looser Parquet type.
    """
    try:
        return values.astype("str")
    except UnicodeDecodeError:
        pass
    for i, value in enumerate(values.to_numpy(dtype=object)):
        if isinstance(value, bytes | bytearray):
            try:
                bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"binary value {bytes(value[:40])!r} is not UTF-8 text; "
                    "store the column as UTF-8 strings",
                    path=path,
                    column=name,
                    row=i + row_base,
                ) from None
    raise DataError("column is not UTF-8 text", path=path, column=name)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _weights(col: pd.Series, path: Path, name: str, row_base: int) -> np.ndarray:
    values = col.reset_index(drop=True)
    if pd.api.types.is_bool_dtype(values.dtype) or pd.api.types.is_numeric_dtype(values.dtype):
        w = values.to_numpy(dtype=np.float64, na_value=np.nan)
        unparsable = np.zeros(len(w), dtype=bool)
    else:
        text = as_text(values, path, name, row_base)
        blank = (values.isna() | (text.str.strip() == "")).to_numpy()
        w = pd.to_numeric(text.where(~blank), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        unparsable = np.isnan(w) & ~blank
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(w) | (w < 0)
    if not bad.any():
        return w
    i = _first(bad)
    where = {"path": path, "column": name, "row": i + row_base}
    if unparsable[i]:
        raise DataError(f"expected a non-negative number, got {values.iloc[i]!r}", **where)
    if np.isnan(w[i]):
        raise DataError("missing weight (NaN or blank); weights must be numbers >= 0", **where)
    if np.isinf(w[i]):
        raise DataError(f"weight must be finite, got {w[i]}", **where)
    raise DataError(f"weight must be >= 0, got {w[i]:g}", **where)


def _timestamps(col: pd.Series, path: Path, name: str, row_base: int) -> np.ndarray:
    """Integers pass through; datetimes and ISO strings become epoch seconds (UTC)."""
    values = col.reset_index(drop=True)
    where = {"path": path, "column": name}
    if isinstance(values.dtype, np.dtype) and values.dtype.kind in "iu":
        return values.to_numpy(dtype=np.int64)  # no missing values, no float round trip
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        dt = values.dt.tz_localize("UTC") if values.dt.tz is None else values
        bad = dt.isna().to_numpy()
    elif pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(
        values.dtype
    ):
        ts = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(ts)
        if bad.any():
            raise DataError("missing timestamp", **where, row=_first(bad) + row_base)
        return np.floor(ts).astype(np.int64)
    else:
        text = as_text(values, path, name, row_base)
        numeric = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        is_num = np.isfinite(numeric)
        if is_num.all():
            return np.floor(numeric).astype(np.int64)
        dt = pd.to_datetime(text.where(~is_num), utc=True, errors="coerce", format="ISO8601")
        bad = dt.isna().to_numpy() & ~is_num
        if not bad.any():
            seconds = ((dt - _EPOCH) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
            return np.where(is_num, np.floor(numeric), seconds).astype(np.int64)
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"expected epoch seconds or an ISO-8601 time, got {values.iloc[i]!r}",
            **where,
            row=i + row_base,
        )
    return ((dt - _EPOCH) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def dedupe_interactions(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, track), first-seen order: weights summed, latest timestamp kept.

    Works on integer codes. A sort of the pair keys proves the common case (no duplicates)
    without a hash table over every row; only a frame that has duplicates pays for grouping.
    """
    users, _ = codes_of(frame["user_id"])
    tracks, track_vocab = codes_of(frame["track_id"])
    key = users.astype(np.int64) * max(len(track_vocab), 1) + tracks
    ordered = np.sort(key)
    if not (ordered[1:] == ordered[:-1]).any():
        return frame.reset_index(drop=True)
    del ordered
    groups, uniques = pd.factorize(key)  # group g is the g-th distinct pair in first-seen order
    # Labels appear in increasing order of first sight: a row is first iff it beats all before.
    first = groups > np.concatenate([[-1], np.maximum.accumulate(groups)[:-1]])
    out = frame.loc[first, ["user_id", "track_id"]].reset_index(drop=True)
    out["weight"] = np.bincount(groups, weights=frame["weight"].to_numpy(), minlength=len(uniques))
    if "timestamp" in frame:
        latest = pd.Series(frame["timestamp"].to_numpy()).groupby(groups).max()
        out["timestamp"] = latest.to_numpy(dtype=np.int64)
    return out
