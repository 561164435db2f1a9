"""The artifact contract: what write_artifact writes, read_* give back, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from builders import fake_arrays, fake_manifest, write_fake_artifact

from tracktower.features import artifact
from tracktower.features.artifact import (
    ARRAYS,
    FORMAT_VERSION,
    MANIFEST_FILE,
    IdLookup,
    Manifest,
    array_file,
    read_arrays,
    read_index,
    read_manifest,
    read_track_metadata,
    update_manifest,
    write_artifact,
)
from tracktower.features.errors import DataError

USERS, TRACKS, DIM = 12, 30, 4
_BAD_INDPTR = fake_arrays(USERS, TRACKS, DIM)["seen_indptr"].copy()
_BAD_INDPTR[1] = _BAD_INDPTR[-1] + 1  # same end, but row 1 would run backwards


def _inputs() -> tuple[Manifest, dict[str, np.ndarray], pd.DataFrame]:
    arrays = fake_arrays(USERS, TRACKS, DIM)
    manifest = fake_manifest(USERS, TRACKS, DIM, False, nnz=len(arrays["seen_indices"]))
    tracks = pd.DataFrame({"track_id": arrays["track_ids"][:5], "title": list("abcde")})
    return manifest, arrays, tracks


def _write(out: Path, **changes: Any) -> Path:
    manifest, arrays, tracks = _inputs()
    kwargs: dict[str, Any] = {"manifest": manifest, "arrays": arrays, "tracks": tracks}
    kwargs.update(changes)
    return write_artifact(out, **kwargs)


def _one_line(info: pytest.ExceptionInfo[DataError]) -> str:
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_round_trip_is_memory_mapped_and_equal(tmp_path: Path) -> None:
    manifest, arrays, _ = _inputs()
    path = _write(tmp_path / "a")
    specs = (*ARRAYS, *artifact.ORDER_ARRAYS)
    assert sorted(p.name for p in (path / artifact.ARRAYS_DIR).iterdir()) == sorted(
        f"{spec.name}.npy" for spec in specs
    )
    assert read_manifest(path) == manifest
    for mmap in (True, False):
        got = read_arrays(path, manifest, mmap=mmap)
        assert set(got) == {spec.name for spec in specs}
        for name, value in arrays.items():
            np.testing.assert_array_equal(got[name], value)
            assert got[name].dtype == value.dtype
            assert isinstance(got[name].base, np.memmap) == mmap, name
            assert got[name].flags.writeable != mmap
        for order, ids in (("track_order", "track_ids"), ("user_order", "user_ids")):
            np.testing.assert_array_equal(got[order], np.argsort(arrays[ids], kind="stable"))
    titles, artists = read_track_metadata(path, manifest).rows(np.arange(TRACKS))
    assert titles == [*"abcde", *[None] * (TRACKS - 5)] and artists == [None] * TRACKS
    assert not [p for p in tmp_path.iterdir() if p.name != "a"]  # no staging left behind


def test_ids_are_fixed_width_unicode_on_disk(tmp_path: Path) -> None:
    path = _write(tmp_path / "a")
    for name in ("track_ids", "user_ids"):
        header = array_file(path, name).read_bytes()[:128]
        assert b"'descr': '<U" in header


def test_other_format_version_is_one_line_naming_both(tmp_path: Path) -> None:
    path = _write(tmp_path / "a")
    raw = json.loads((path / MANIFEST_FILE).read_text())
    # A format-1 manifest also lacks today's fields: the version is reported, not those.
    del raw["num_users"]
    (path / MANIFEST_FILE).write_text(json.dumps({**raw, "format_version": 1}))
    with pytest.raises(DataError) as info:
        read_manifest(path)
    assert _one_line(info) == (
        f"{path / MANIFEST_FILE}: artifact format_version 1, this tracktower reads "
        f"format_version {FORMAT_VERSION}; re-export the model with this version"
    )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "unreadable manifest"),
        ("[]", "not a JSON object"),
        (None, "manifest.json is missing"),
    ],
)
def test_bad_manifest_files(tmp_path: Path, content: str | None, match: str) -> None:
    path = _write(tmp_path / "a")
    if content is None:
        (path / MANIFEST_FILE).unlink()
    else:
        (path / MANIFEST_FILE).write_text(content)
    with pytest.raises(DataError, match=match) as info:
        read_manifest(path)
    _one_line(info)


def test_invalid_manifest_field_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "a")
    raw = json.loads((path / MANIFEST_FILE).read_text())
    raw["dataset"]["rows"] = "many"
    (path / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"invalid manifest: dataset\.rows: ") as info:
        read_manifest(path)
    _one_line(info)


def _damage(path: Path, name: str, how: str) -> None:
    file = array_file(path, name)
    if how == "missing":
        file.unlink()
    elif how == "truncated":
        file.write_bytes(file.read_bytes()[:-7])
    elif how == "header":
        file.write_bytes(file.read_bytes()[:40])
    elif how == "garbage":
        file.write_bytes(b"not an npy file")


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize(
    ("name", "how", "match"),
    [
        ("user_embeddings", "missing", "array file is missing"),
        ("track_embeddings", "truncated", "unreadable .npy file"),
        ("seen_indices", "header", "unreadable .npy file"),
        ("track_ids", "garbage", "unreadable .npy file"),
    ],
)
def test_missing_or_corrupt_npy(
    tmp_path: Path, name: str, how: str, match: str, mmap: bool
) -> None:
    path = _write(tmp_path / "a")
    _damage(path, name, how)
    with pytest.raises(DataError, match=match) as info:
        read_arrays(path, read_manifest(path), mmap=mmap)
    assert _one_line(info).startswith(f"{array_file(path, name)}: ")


def _replace(path: Path, name: str, value: np.ndarray) -> None:
    np.save(array_file(path, name), value)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("track_embeddings", np.zeros((TRACKS, DIM + 1), np.float32), r"expected shape \(30, 4\)"),
        ("user_embeddings", np.zeros((USERS - 1, DIM), np.float32), r"expected shape \(12, 4\)"),
        ("track_embeddings", np.zeros((TRACKS, DIM), np.float64), "expected dtype float32"),
        ("user_ids", np.arange(USERS), "expected fixed-width unicode"),
        ("user_ids", np.array(["u"] * USERS), "duplicate id 'u'"),
        ("seen_indptr", _BAD_INDPTR, "not CSR row pointers"),
        ("seen_indices", np.full(1, TRACKS, np.int32), "1 entries but seen_indptr ends at"),
        ("popular", np.zeros(TRACKS, np.int32), "not a permutation"),
        ("popular_scores", np.arange(TRACKS, dtype=np.float32), "non-increasing"),
    ],
)
def test_arrays_that_break_the_contract(
    tmp_path: Path, name: str, value: np.ndarray, match: str
) -> None:
    path = _write(tmp_path / "a")
    _replace(path, name, value)
    with pytest.raises(DataError, match=match) as info:
        read_arrays(path, read_manifest(path))
    assert _one_line(info).startswith(f"{array_file(path, name)}: ")


def test_seen_index_out_of_range(tmp_path: Path) -> None:
    path = _write(tmp_path / "a")
    indices = np.load(array_file(path, "seen_indices"))
    indices[-1] = TRACKS
    _replace(path, "seen_indices", indices)
    with pytest.raises(DataError, match=r"track index outside \[0, 30\)"):
        read_arrays(path, read_manifest(path))


def test_manifest_dims_are_checked_against_the_arrays(tmp_path: Path) -> None:
    path = _write(tmp_path / "a")
    update_manifest(path, embedding_dim=DIM + 1)
    with pytest.raises(DataError, match=r"track_embeddings\.npy: expected shape"):
        read_arrays(path, read_manifest(path))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"track_embeddings": np.zeros((TRACKS, 3), np.float32)}, "array 'track_embeddings'"),
        ({"user_ids": np.array([str(i) for i in range(USERS)], dtype=object)}, "array 'user_ids'"),
        ({"extra": np.zeros(1)}, r"not in the contract \['extra'\]"),
    ],
)
def test_write_validates_before_writing(
    tmp_path: Path, change: dict[str, np.ndarray], match: str
) -> None:
    _, arrays = _inputs()[:2]
    with pytest.raises(DataError, match=match) as info:
        _write(tmp_path / "out" / "a", arrays={**arrays, **change})
    _one_line(info)
    assert not (tmp_path / "out").exists()  # nothing was created, not even the parent


def test_write_refuses_other_versions_and_existing_dirs(tmp_path: Path) -> None:
    manifest = _inputs()[0].model_copy(update={"format_version": 1})
    with pytest.raises(DataError, match=f"this tracktower writes format_version {FORMAT_VERSION}"):
        _write(tmp_path / "a", manifest=manifest)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="already exists"):
        _write(tmp_path / "b")
    tower = _inputs()[0].model_copy(update={"has_history_tower": True, "history_dim": DIM})
    history = {**_inputs()[1], "history_embeddings": np.zeros((TRACKS, DIM), np.float32)}
    with pytest.raises(DataError, match="has_history_tower but no saved_model"):
        _write(tmp_path / "c", manifest=tower, arrays=history)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failed_write_leaves_no_directory(tmp_path: Path) -> None:
    written: list[Path] = []

    def broken_saved_model(path: Path) -> None:
        path.mkdir()
        (path / "saved_model.pb").write_bytes(b"half")
        written.append(path)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path / "a", saved_model=broken_saved_model)
    assert written and not written[0].exists()
    assert list(tmp_path.iterdir()) == []


def test_saved_model_is_written_inside_before_the_rename(tmp_path: Path) -> None:
    seen: list[Path] = []

    def saved_model(path: Path) -> None:
        seen.append(path)
        assert not (tmp_path / "a").exists()
        path.mkdir()
        (path / "saved_model.pb").write_bytes(b"pb")

    path = _write(tmp_path / "a", saved_model=saved_model)
    assert seen[0].name == artifact.SAVED_MODEL_DIR and seen[0].parent.name.startswith(".")
    assert (path / artifact.SAVED_MODEL_DIR / "saved_model.pb").read_bytes() == b"pb"


def test_update_manifest_records_the_version_atomically(tmp_path: Path) -> None:
    path = write_fake_artifact(tmp_path / "a", 3, 6, 2, with_history_tower=False)
    before = read_manifest(path)
    after = update_manifest(path, model_name="tt", model_version="7")
    assert (after.model_name, after.model_version) == ("tt", "7")
    assert read_manifest(path) == before.model_copy(
        update={"model_name": "tt", "model_version": "7"}
    )
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(DataError, match="invalid manifest: num_users: ") as info:
        update_manifest(path, num_users="lots")
    _one_line(info)
    assert read_manifest(path).model_version == "7"


def _write_metadata(path: Path, table: pa.Table) -> None:
    with (
        pa.OSFile(str(path / artifact.TRACKS_FILE), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)


def test_metadata_that_breaks_the_contract(tmp_path: Path) -> None:
    path = _write(tmp_path / "a")
    manifest = read_manifest(path)
    _write_metadata(path, pa.table({"title": ["x"] * TRACKS}))
    with pytest.raises(DataError, match="column 'track_id'"):
        read_track_metadata(path, manifest)
    _write_metadata(path, pa.table({"track_id": ["t"]}))
    with pytest.raises(DataError, match=f"1 rows, the manifest has {TRACKS} tracks"):
        read_track_metadata(path, manifest)
    _write_metadata(path, pa.table({"track_id": ["t"] * TRACKS, "title": list(range(TRACKS))}))
    with pytest.raises(DataError, match="column 'title'"):
        read_track_metadata(path, manifest)
    pd.DataFrame({"track_id": ["t"]}).to_parquet(path / artifact.TRACKS_FILE)
    with pytest.raises(DataError, match="unreadable track metadata") as info:
        read_track_metadata(path, manifest)
    assert _one_line(info).startswith(f"{path / artifact.TRACKS_FILE}: ")


def test_an_order_that_does_not_sort_its_ids_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "a")
    _replace(path, "track_order", np.arange(TRACKS, dtype=np.int64)[::-1].copy())
    with pytest.raises(DataError, match="does not sort track_ids") as info:
        read_arrays(path, read_manifest(path))
    assert _one_line(info).startswith(f"{array_file(path, 'track_order')}: ")
    _replace(path, "track_order", np.full(TRACKS, TRACKS, dtype=np.int64))
    with pytest.raises(DataError, match=r"index outside \[0, 30\)"):
        read_arrays(path, read_manifest(path))


def test_id_lookup_by_binary_search() -> None:
    ids = np.array(["t10", "a", "zz", "t2", "b"])
    lookup = IdLookup(ids, np.argsort(ids, kind="stable"))
    assert [lookup.get(i) for i in ids.tolist()] == [0, 1, 2, 3, 4]
    for unknown in ("", "t1", "t100", "zzz", "a" * 100, "\u00e9"):
        assert lookup.get(unknown) is None
    got = lookup.get_many(["zz", "nope", "a", "x" * 50, "zz"])
    assert got.tolist() == [2, -1, 1, -1, 2] and got.dtype == np.int64
    empty = IdLookup(np.array([], dtype="<U1"), np.array([], dtype=np.int64))
    assert empty.get("a") is None and empty.get_many([]).tolist() == []


def test_history_tower_needs_its_array_and_dim(tmp_path: Path) -> None:
    manifest, arrays, tracks = _inputs()
    with pytest.raises(ValueError, match="history_dim"):
        Manifest.model_validate({**manifest.model_dump(), "has_history_tower": True})
    tower = manifest.model_copy(update={"has_history_tower": True, "history_dim": 3})
    with pytest.raises(DataError, match=r"arrays missing \['history_embeddings'\]"):
        write_artifact(tmp_path / "a", manifest=tower, arrays=arrays, tracks=tracks)
    bad = {**arrays, "history_embeddings": np.zeros((TRACKS, 2), np.float32)}
    with pytest.raises(DataError, match=r"history_embeddings.*expected shape"):
        write_artifact(
            tmp_path / "a", manifest=tower, arrays=bad, tracks=tracks, saved_model=lambda p: None
        )
    path = write_fake_artifact(tmp_path / "b", USERS, TRACKS, DIM, with_history_tower=True)
    matrix = np.load(array_file(path, "history_embeddings"))
    matrix[3, 1] = np.nan
    _replace(path, "history_embeddings", matrix)
    with pytest.raises(DataError, match="row 3 is not finite"):
        read_arrays(path, read_manifest(path))


@pytest.mark.parametrize("name", ["track_embeddings", "user_embeddings"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_refuse_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: float
) -> None:
    path = _write(tmp_path / "a")
    matrix = np.load(array_file(path, name))
    matrix[7, 2] = value
    _replace(path, name, matrix)
    # Blocks of 3 rows: the bad row is found in a later block, at its absolute index.
    monkeypatch.setattr(artifact, "_FINITE_BLOCK_BYTES", 3 * DIM * 4)
    for mmap in (True, False):
        with pytest.raises(
            DataError, match=rf"row 7 is not finite \({value} in column 2\)"
        ) as info:
            read_arrays(path, read_manifest(path), mmap=mmap)
        assert _one_line(info).startswith(f"{array_file(path, name)}: ")


@pytest.mark.parametrize("name", ["track_embeddings", "user_embeddings"])
def test_non_finite_embeddings_are_not_written(tmp_path: Path, name: str) -> None:
    _, arrays = _inputs()[:2]
    matrix = arrays[name].copy()
    matrix[-1, 0] = np.nan
    with pytest.raises(DataError, match=rf"array '{name}': row {len(matrix) - 1} is not finite"):
        _write(tmp_path / "a", arrays={**arrays, name: matrix})
    assert not (tmp_path / "a").exists()


# --- the retrieval index (format 3) --------------------------------------------------------------


@pytest.fixture(scope="module")
def scann_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ScaNN index forced onto a small catalogue (auto would pick exact here)."""
    out = tmp_path_factory.mktemp("scann") / "artifact"
    return write_fake_artifact(out, 40, 300, 8, False, index_backend="scann")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_manifest_records_the_index_and_read_index_loads_it(scann_artifact: Path) -> None:
    manifest = read_manifest(scann_artifact)
    info = manifest.index_info
    assert info.backend == "scann" and info.sample_users == 40
    assert 0.0 <= (info.recall_at_100 or -1) <= 1.0 and info.build_seconds > 0
    arrays = read_arrays(scann_artifact, manifest)
    index = read_index(scann_artifact, manifest, arrays["track_embeddings"])
    assert (index.backend, index.size, index.dim, index.params) == ("scann", 300, 8, info.params)
    # ScaNN stores no copy of the embeddings: the index files are much smaller than them.
    files = [f for f in (scann_artifact / artifact.INDEX_DIR).iterdir()]
    assert (scann_artifact / artifact.INDEX_DIR / "tracktower_index.json") in files
    idx, _ = index.search(arrays["user_embeddings"][:3], 5)
    assert idx.shape == (3, 5) and (idx >= 0).all()


def test_exact_index_writes_an_empty_index_dir(tmp_path: Path) -> None:
    path = _write(tmp_path / "a")
    assert list((path / artifact.INDEX_DIR).iterdir()) == []
    manifest = read_manifest(path)
    index = read_index(path, manifest, read_arrays(path, manifest)["track_embeddings"])
    assert index.backend == "exact" and index.size == TRACKS


def test_manifest_without_a_valid_index_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "a")
    raw = json.loads((path / MANIFEST_FILE).read_text())
    for bad, match in ((None, "index"), ({"backend": "annoy"}, "backend must be one of")):
        (path / MANIFEST_FILE).write_text(json.dumps({**raw, "index": bad}))
        with pytest.raises(DataError, match=match) as info:
            read_manifest(path)
        _one_line(info)


def test_writer_checks_the_index_against_the_manifest(tmp_path: Path) -> None:
    from builders import fake_index

    manifest, arrays, tracks = _inputs()
    index, info = fake_index(arrays, "scann")
    with pytest.raises(DataError, match="manifest index is scann but no index was given"):
        write_artifact(
            tmp_path / "a",
            manifest=manifest.model_copy(update={"index": info.to_dict()}),
            arrays=arrays,
            tracks=tracks,
        )
    with pytest.raises(DataError, match="does not match the manifest"):
        _write(tmp_path / "b", index=index)  # the manifest says exact
    assert list(tmp_path.iterdir()) == []


def test_index_is_saved_inside_before_the_rename(tmp_path: Path) -> None:
    from builders import fake_index

    manifest, arrays, tracks = _inputs()
    index, info = fake_index(arrays, "scann")
    seen: list[Path] = []
    save = index.save

    def spy(directory: Path) -> None:
        seen.append(directory)
        assert not (tmp_path / "a").exists()
        save(directory)

    index.save = spy  # type: ignore[method-assign]
    manifest = manifest.model_copy(update={"index": info.to_dict()})
    path = write_artifact(
        tmp_path / "a", manifest=manifest, arrays=arrays, tracks=tracks, index=index
    )
    assert seen[0].name == artifact.INDEX_DIR and seen[0].parent.name.startswith(".")
    assert (path / artifact.INDEX_DIR / "tracktower_index.json").is_file()


def _broken(path: Path, edit: str) -> None:
    """Break the index of the artifact at ``path`` the way ``edit`` says."""
    index_dir = path / artifact.INDEX_DIR
    meta_file = index_dir / "tracktower_index.json"
    if edit == "missing dir":
        import shutil

        shutil.rmtree(index_dir)
    elif edit == "truncated":
        hashed = index_dir / "hashed_dataset.npy"
        hashed.write_bytes(hashed.read_bytes()[: hashed.stat().st_size // 2])
    elif edit == "missing file":
        (index_dir / "serialized_partitioner.pb").unlink()
    else:
        key, value = {
            "dim": ("dim", 9),
            "tracks": ("num_tracks", 299),
            "version": ("format_version", 99),
        }[edit]
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({**meta, key: value}))


BROKEN_INDEXES = [
    ("missing dir", "index/ is missing; re-export"),
    ("truncated", "unreadable ScaNN index: .*File too short"),
    ("missing file", "unreadable ScaNN index"),
    ("dim", "index built for dim 9, the artifact has 8"),
    ("tracks", "index built for num_tracks 299, the artifact has 300"),
    ("version", "index format_version 99, this tracktower reads 1"),
]


@pytest.mark.parametrize(("edit", "match"), BROKEN_INDEXES)
def test_broken_index_is_one_line(
    scann_artifact: Path, tmp_path: Path, edit: str, match: str
) -> None:
    path = _copy(scann_artifact, tmp_path / "a")
    _broken(path, edit)
    manifest = read_manifest(path)
    with pytest.raises(DataError, match=match) as info:
        read_index(path, manifest, read_arrays(path, manifest)["track_embeddings"])
    _one_line(info)


def test_index_params_in_the_manifest_must_match_the_build(
    scann_artifact: Path, tmp_path: Path
) -> None:
    path = _copy(scann_artifact, tmp_path / "a")
    manifest = read_manifest(path)
    params = {**manifest.index["params"], "num_leaves": manifest.index["params"]["num_leaves"] + 1}
    update_manifest(path, index={**manifest.index, "params": params})
    manifest = read_manifest(path)
    with pytest.raises(DataError, match="the manifest says") as info:
        read_index(path, manifest, read_arrays(path, manifest)["track_embeddings"])
    _one_line(info)
