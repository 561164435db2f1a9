"""Pieces of the staged pipeline that need no TensorFlow and no MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from pydantic import BaseModel, Field, ValidationError

from tracktower.features.dataset import encode_ids, reindex
from tracktower.features.errors import DataError, one_line
from tracktower.training import stages
from tracktower.training.config import config_from_mapping, flatten, load_config


def _encoded() -> object:
    from tracktower.features.dataset import Encoded

    train = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=np.float32))
    val = sp.csr_matrix(np.array([[0, 0, 1, 0], [0, 0, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 0, 0, 1], [1, 0, 0, 0]], dtype=np.float32))
    return Encoded(
        user_ids=np.array(["u1", "u2"]),
        track_ids=np.array(["t1", "t2", "t3", "t4"]),
        train=train,
        val=val,
        test=test,
        val_unknown=np.array([0, 0]),
        test_unknown=np.array([2, 0]),
    )


def test_test_heldout_excludes_everything_the_model_was_given() -> None:
    held = stages.heldout(_encoded(), "test")  # type: ignore[arg-type]
    assert held.exclude.toarray().tolist() == [[1, 1, 1, 0], [0, 1, 1, 0]]
    assert held.truth.toarray().tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]
    assert held.unknown.tolist() == [2, 0]


def test_validation_heldout_excludes_train_only() -> None:
    held = stages.heldout(_encoded(), "val")  # type: ignore[arg-type]
    assert held.exclude.toarray().tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]
    with pytest.raises(ValueError, match="split"):
        stages.heldout(_encoded(), "train")  # type: ignore[arg-type]


def test_reindex_moves_rows_and_counts_unknown_columns() -> None:
    m = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0]], dtype=np.float32))
    rows = np.array([1, -1, 0])  # source row 1 is absent from the target
    cols = np.array([0, 1, -1])  # source column 2 is absent from the target
    out, unknown = reindex(m, rows, cols, (2, 2), unknown=np.array([5, 7, 0]))
    assert out.toarray().tolist() == [[4, 0], [1, 0]]
    # target row 1 came from source row 0: one unknown column entry plus its own 5
    assert unknown.tolist() == [0, 6]


def test_reindex_onto_the_same_vocabulary_is_the_identity() -> None:
    vocab = np.array(["a", "b", "c"])
    idx = encode_ids(vocab, vocab)
    m = sp.random(3, 3, density=0.5, format="csr", random_state=0, dtype=np.float32)
    out, unknown = reindex(m, idx, idx, (3, 3))
    assert (out != m).nnz == 0 and unknown.tolist() == [0, 0, 0]


def test_run_names_tell_configs_apart() -> None:
    base = config_from_mapping({})
    other = config_from_mapping({}, ["model.temperature=0.1"])
    assert stages.run_name(base, Path("configs/mpd.yaml"), final=False).startswith("mpd ")
    assert stages.run_name(base, None, final=False) != stages.run_name(other, None, final=False)
    assert stages.run_name(base, None, final=True).endswith(" final")
    named = config_from_mapping({"run_name": "my run"})
    assert stages.run_name(named, None, final=True) == "my run"


def test_config_from_a_manifest_mapping_reports_the_field(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^somewhere: field model.embedding_dim: "):
        config_from_mapping({"model": {"embedding_dim": 0}}, where="somewhere")
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 0\n")
    with pytest.raises(DataError, match=r"c.yaml: field train.epochs: "):
        load_config(path)


def test_flatten_takes_a_config_or_a_mapping() -> None:
    cfg = config_from_mapping({})
    flat = flatten(cfg)
    assert flat["model.embedding_dim"] == cfg.model.embedding_dim
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": 2}) == {"a.b": 1, "a.c.d": "x", "e": 2}


def test_one_line_for_data_and_validation_errors() -> None:
    class Settings(BaseModel):
        port: int = Field(ge=0)
        host: str

    with pytest.raises(ValidationError) as info:
        Settings.model_validate({"port": -1})
    assert one_line(info.value).startswith("port: ")
    assert one_line(info.value).endswith("(+1 more)")
    assert one_line(info.value, env_prefix="TT_").startswith("TT_PORT: ")
    assert one_line(DataError("bad\n value", path="f.csv", row=3)) == "f.csv, row 3: bad value"


def test_stage_timer_records_finished_stages_only():
    import pytest

    from tracktower.training.stages import StageTimer

    timer = StageTimer()
    with timer("prepare"):
        pass
    with timer("prepare"):
        pass
    with pytest.raises(KeyboardInterrupt), timer("export"):
        raise KeyboardInterrupt
    assert set(timer.seconds) == {"prepare"}
    assert timer.seconds["prepare"] >= 0.0


def test_release_after_fit_frees_the_rows_and_keeps_what_export_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before export: the optimizer state goes (train.release_training_state, stubbed here so
    this stays free of TensorFlow) and the interaction rows too, while ``stats`` and the
    encoded data the export and evaluation read stay as they were."""
    import types

    import pandas as pd

    from tracktower.training.data import Prepared

    released: list[object] = []
    fake = types.ModuleType("tracktower.training.train")
    fake.release_training_state = released.append  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "tracktower.training.train", fake)
    rows = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u2", "u1", "u2"]})
    data = Prepared(
        interactions=rows,
        tracks=None,
        labels=np.array([0, 0, 0, 0, 1, 2, 2], dtype=np.int8),
        encoded=_encoded(),  # type: ignore[arg-type]
        fingerprint="f",
        source="s",
        track_artist=None,
    )
    model = object()
    result = types.SimpleNamespace(model=model)
    after = stages.release_after_fit(data, result)  # type: ignore[arg-type]
    assert released == [model]
    assert after.stats == data.stats and after.stats["rows"] == 7
    assert after.encoded is data.encoded and after.fingerprint == "f"
    assert len(after.interactions.columns) == 0 and after.interactions.memory_usage().sum() < 200
