from pathlib import Path

import pytest

from tracktower.features import io
from tracktower.features.errors import DataError
from tracktower.training.config import ExperimentConfig, flatten, load_config
from tracktower.training.metrics import DEFAULT_KS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["default.yaml", "mpd.yaml", "smoke.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, ExperimentConfig)


def test_overrides_reach_nested_fields_and_parse_yaml_values():
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        ["train.epochs=7", "model.query_layers=[256, 64]", "model.use_artist=false"],
    )
    assert cfg.train.epochs == 7
    assert cfg.model.query_layers == [256, 64]
    assert cfg.model.use_artist is False


def test_flatten_gives_dotted_scalars():
    flat = flatten(ExperimentConfig())
    assert flat["model.embedding_dim"] == 64
    assert flat["train.early_stopping.patience"] == 2
    assert all(not isinstance(v, dict) for v in flat.values())


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ("train:\n  epochs: 0\n", [], "train.epochs"),
        ("train:\n  epoch: 3\n", [], "train.epoch"),
        ("model:\n  use_user_id: false\n  use_history: false\n", [], "use_user_id"),
        ("train: [unclosed\n", [], "invalid YAML"),
        ("- a list\n", [], "mapping"),
        ("", ["train.optimizer=rmsprop"], "train.optimizer"),
        ("", ["noequals"], "key=value"),
        ("train:\n  epochs: 3\n", ["train.epochs.x=1"], "not a section"),
        ("split:\n  val_fraction: 0.5\n  test_fraction: 0.45\n", [], "10%"),
        ("data:\n  columns:\n    usr: listener\n", [], "data.columns.usr"),
        ("", ["data.columns.user="], "data.columns.user"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, text, overrides, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_columns_are_what_the_reader_takes(tmp_path):
    src = tmp_path / "plays.csv"
    src.write_text("listener,song,count\na,x,3\nb,y,1\n")
    columns = {"user": "listener", "track": "song", "weight": "count"}
    cfg = load_config(None, [f"data.columns.{key}={name}" for key, name in columns.items()])
    assert isinstance(cfg.data.columns, io.ColumnMap)
    frame = io.read_interactions(src, cfg.data.columns)
    assert frame["weight"].tolist() == [3.0, 1.0]
    assert flatten(cfg)["data.columns.weight"] == "count"


def test_default_ks_are_the_metrics_defaults():
    assert tuple(ExperimentConfig().eval.ks) == DEFAULT_KS
