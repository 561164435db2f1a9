"""``tracktower tune`` without training: the data-aware search space, the trial configs it
produces, the best YAML's round trip through ``load_config``, the epoch hook, and bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from tracktower.features import synth
from tracktower.features.errors import DataError
from tracktower.training import tune
from tracktower.training.cli import app
from tracktower.training.config import ExperimentConfig, load_config
from tracktower.training.data import prepare
from tracktower.training.pipeline import auto_batch_size

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "configs" / name for name in ("default.yaml", "mpd.yaml", "smoke.yaml")]
SMOKE = REPO / "configs" / "smoke.yaml"
MPD = REPO / "configs" / "mpd.yaml"

TINY = tune.DataShape(examples=6_000, users=300, tracks=400, history_p99=60, weighted=True)
MSD_LIKE = tune.DataShape(
    examples=30_000, users=1_600, tracks=9_000, history_p99=120, weighted=True
)
MPD_LIKE = tune.DataShape(
    examples=450_000, users=7_000, tracks=23_000, history_p99=170, weighted=False
)
HUGE = tune.DataShape(
    examples=50_000_000, users=1_000_000, tracks=2_000_000, history_p99=900, weighted=True
)
SHAPES = [TINY, MSD_LIKE, MPD_LIKE, HUGE]


def _space(shape: tune.DataShape, cfg: ExperimentConfig | None = None, fixed=()):
    cfg = cfg or load_config(None)
    return {p.key: p for p in tune.search_space(shape, cfg, fixed)}


# --- the rule -------------------------------------------------------------------------------


def test_small_catalogue_may_use_the_full_softmax_and_has_no_uniform_negatives():
    space = _space(TINY)
    assert space["model.negatives"].choices == ("full", "in_batch")
    assert "model.uniform_negatives" not in space, "400 tracks: a quarter is below 1024"


def test_large_catalogue_is_in_batch_with_uniform_negatives_up_to_a_quarter_of_it():
    space = _space(HUGE)
    assert "model.negatives" not in space, "2M tracks is above full_softmax_max_tracks"
    assert space["model.uniform_negatives"].choices == (0, 1024, 4096, 16384)
    assert _space(MSD_LIKE)["model.uniform_negatives"].choices == (0, 1024)


def test_full_softmax_threshold_is_the_configs_own():
    mpd = load_config(MPD)  # full_softmax_max_tracks: 8192
    assert "model.negatives" not in _space(MSD_LIKE, mpd)
    assert "model.negatives" in _space(MSD_LIKE, load_config(None))  # 50,000


def test_batch_choices_surround_the_automatic_batch_and_leave_enough_steps():
    for shape in SHAPES:
        choices = _space(shape)["train.batch_size"].choices
        auto = auto_batch_size(shape.examples)
        assert min(choices) >= tune.MIN_BATCH
        assert max(choices) <= max(tune.MIN_BATCH, shape.examples / tune.MIN_STEPS_PER_EPOCH)
        assert set(choices) <= {auto // 2, auto, auto * 2, max(choices)}
    assert _space(MPD_LIKE)["train.batch_size"].choices == (1024, 2048, 4096)
    assert tune.batch_choices(500) == (32,), "500 examples: 20 steps an epoch need batch <= 25"


def test_epochs_come_from_a_range_of_steps():
    ranges = [tune.epoch_range(s.examples) for s in SHAPES]
    lows = [low for low, _ in ranges]
    assert list(lows) == sorted(lows, reverse=True), "more data, fewer epochs"
    for shape, (low, high) in zip(SHAPES, ranges, strict=True):
        assert 1 <= low < high <= tune.MAX_EPOCHS
        choices = tune.batch_choices(shape.examples)
        steps = math.ceil(shape.examples / choices[len(choices) // 2])
        if low > 1:
            assert (low - 1) * steps < tune.MIN_STEPS <= low * steps
    assert tune.epoch_range(MPD_LIKE.examples) == (2, 14)
    # 2,500 examples: batches capped at 64 (20 steps an epoch), so 40 steps, not 10 at 256.
    assert tune.epoch_range(2_500) == (8, 30)


def test_embedding_size_and_history_length_follow_the_data():
    assert tune.embedding_dims(30) == (32,)
    assert tune.embedding_dims(1_000) == (32, 64)
    assert tune.embedding_dims(23_000) == (32, 64, 128, 256)
    assert tune.history_lengths(10) == (25,)
    assert tune.history_lengths(150) == (25, 50, 100, 200)
    assert tune.history_lengths(100) == (25, 50, 100)
    assert tune.history_lengths(5_000) == tune.HISTORY_LENGTHS


def test_weighting_is_searched_only_when_play_counts_vary():
    assert _space(TINY)["train.weighting"].choices == ("none", "log1p")
    assert "train.weighting" not in _space(MPD_LIKE)


def test_fixed_keys_and_sections_are_not_searched():
    fixed = tune.fixed_keys(["train.epochs=2", "model.query_layers=[64]", " train.seed = 3"])
    assert fixed == {"train.epochs", "model.query_layers", "train.seed"}
    space = _space(TINY, fixed=fixed)
    assert "train.epochs" not in space and "model.query_layers" not in space
    assert "train.learning_rate" in space
    assert not [k for k in _space(TINY, fixed={"model"}) if k.startswith("model.")]


def test_no_history_means_no_history_knobs_and_a_user_id_always():
    cfg = load_config(None, ["model.use_history=false"])
    space = _space(TINY, cfg)
    assert "model.history_max_len" not in space
    values = tune.base_values(cfg, TINY)
    assert space["model.use_user_id"].when is not None
    assert not space["model.use_user_id"].when(values), "use_user_id must stay on"


# --- trials ---------------------------------------------------------------------------------


def test_conditional_parameters_are_drawn_only_when_they_apply():
    cfg = load_config(None)
    space = tune.search_space(MSD_LIKE, cfg)
    values = tune.base_values(cfg, MSD_LIKE)
    params: dict[str, Any] = {
        "train.learning_rate": 0.01,
        "train.lr_schedule": "cosine",
        "train.batch_size": 256,
        "train.epochs": 5,
        "train.weighting": "none",
        "model.embedding_dim": 64,
        "model.temperature": 0.1,
        "model.track_bias": True,
        "model.tie_track_embeddings": False,
        "model.query_layers": "mlp",
        "model.history_max_len": 50,
        "model.history_dropout": 0.25,
        "model.use_user_id": False,
        "model.negatives": "full",
    }
    # FixedTrial raises on any parameter it was not given: neither of the conditional ones is
    # asked for (no user id, full softmax).
    chosen = tune.suggest(optuna.trial.FixedTrial(params), space, values)
    assert chosen == params
    cfg2 = tune.trial_config(cfg, chosen)
    assert cfg2.model.query_layers == [128], "mlp: one hidden layer of twice the embedding"
    assert cfg2.model.negatives == "full" and cfg2.train.batch_size == 256
    assert cfg2.model.history_dropout == 0.25
    assert cfg2.model.uniform_negatives == cfg.model.uniform_negatives
    with_uniform = {**params, "model.negatives": "in_batch", "model.uniform_negatives": 1024}
    with_uniform |= {"model.use_user_id": True, "model.user_id_dropout": 0.3}
    chosen = tune.suggest(optuna.trial.FixedTrial(with_uniform), space, values)
    assert chosen["model.uniform_negatives"] == 1024 and chosen["model.user_id_dropout"] == 0.3


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_point_of_the_space_is_a_valid_config(config: Path):
    base = load_config(config)
    for shape in SHAPES:
        space = tune.search_space(shape, base)
        values = tune.base_values(base, shape)
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1)
        )
        for _ in range(25):
            trial = study.ask()
            chosen = tune.suggest(trial, space, values)
            cfg = tune.trial_config(base, chosen)
            for key, value in chosen.items():
                assert next(p for p in space if p.key == key).contains(value)
            assert cfg.model.query_layers in ([], [2 * cfg.model.embedding_dim])
            assert cfg.eval == base.eval and cfg.data == base.data and cfg.split == base.split
            study.tell(trial, 0.0)


def test_first_trial_is_the_input_config_where_the_space_can_express_it():
    base = load_config(MPD)
    space = tune.search_space(MPD_LIKE, base)
    first = tune.initial_params(space, tune.base_values(base, MPD_LIKE))
    assert first["model.uniform_negatives"] == 4096 and first["train.epochs"] == 5
    cfg = tune.trial_config(base, first)
    assert cfg.train.batch_size == auto_batch_size(MPD_LIKE.examples)
    assert cfg.model == base.model, "negatives not searched above the threshold: auto kept"
    small = tune.initial_params(tune.search_space(TINY, base), tune.base_values(base, TINY))
    assert small["model.negatives"] == "full", "auto resolved as the model resolves it"
    assert cfg.train.model_dump(exclude={"batch_size"}) == base.train.model_dump(
        exclude={"batch_size"}
    )
    # A value outside the space is left to the sampler, not enqueued out of range.
    odd = load_config(MPD, ["model.temperature=5.0", "train.epochs=99"])
    first = tune.initial_params(space, tune.base_values(odd, MPD_LIKE))
    assert "model.temperature" not in first and "train.epochs" not in first


class _FakeTrial:
    def __init__(self, prune_at: int | None = None) -> None:
        self.reports: list[tuple[float, int]] = []
        self.prune_at = prune_at

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))

    def should_prune(self) -> bool:
        return self.prune_at is not None and self.reports[-1][1] >= self.prune_at


def test_epoch_hook_reports_logs_and_prunes():
    logged: list[tuple[dict, int]] = []
    trial = _FakeTrial(prune_at=2)
    hook = tune.EpochReporter(
        trial, "val_recall_at_20", math.inf, log_row=lambda row, step: logged.append((row, step))
    )
    hook(1, {"loss": 3.0, "val_recall_at_20": 0.2, "val_ndcg_at_10": 0.1})
    with pytest.raises(optuna.TrialPruned):
        hook(2, {"loss": 2.0, "val_recall_at_20": 0.1})
    assert trial.reports == [(0.2, 1), (0.1, 2)]
    assert hook.best == 0.2 and hook.best_epoch == 1
    assert hook.best_row == {"val_recall_at_20": 0.2, "val_ndcg_at_10": 0.1}
    assert [step for _, step in logged] == [1, 2] and hook.epoch == 2
    assert logged[-1][0] == {"loss": 2.0, "val_recall_at_20": 0.1}


def test_epoch_hook_stops_the_fit_at_the_deadline():
    now = [100.0]
    hook = tune.EpochReporter(
        _FakeTrial(), "val_recall_at_20", 105.0, log_row=lambda r, s: None, clock=lambda: now[0]
    )
    hook(1, {"val_recall_at_20": 0.3})
    now[0] = 105.0
    with pytest.raises(tune.DeadlineReached):
        hook(2, {"val_recall_at_20": 0.25})
    assert hook.best == 0.3 and hook.best_epoch == 1


def test_without_test_empties_the_test_partition_only(tmp_path: Path):
    synth.write(tmp_path, users=60, tracks=80, seed=1)
    data = prepare(
        load_config(SMOKE, [f"data.interactions={tmp_path / 'interactions.parquet'}"]).data,
        load_config(SMOKE).split,
    )
    assert data.encoded.test.nnz > 0
    kept = tune.without_test(data)
    assert kept.encoded.test.nnz == 0 and not kept.encoded.test_unknown.any()
    assert kept.encoded.test.shape == data.encoded.test.shape
    assert (kept.encoded.train != data.encoded.train).nnz == 0
    assert (kept.encoded.val != data.encoded.val).nnz == 0
    shape = tune.data_shape(kept.encoded)
    assert shape.examples == data.encoded.train.nnz and shape.tracks == data.encoded.n_tracks
    assert shape.weighted, "synthetic play counts vary"


# --- the best YAML --------------------------------------------------------------------------


def test_best_yaml_round_trips_through_load_config(tmp_path: Path):
    base = load_config(MPD, ["data.interactions=/data/x.parquet", "data.tracks=/data/t.parquet"])
    space = tune.search_space(MPD_LIKE, base)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(3))
    cfg = tune.trial_config(
        base, tune.suggest(study.ask(), space, tune.base_values(base, MPD_LIKE))
    )
    out = tmp_path / "best.yaml"
    options = tune.TuneOptions(trials=1, timeout=1.0, out=out)
    out.write_text(tune.best_yaml(cfg, options, "tracktower tune: trial 0\nsecond line"))
    text = out.read_text()
    assert text.startswith("# tracktower tune: trial 0\n# second line\n")
    loaded = load_config(out)
    assert loaded.data.interactions is None and loaded.data.tracks is None, "flag paths left out"
    assert loaded.model_dump(exclude={"data"}) == cfg.model_dump(exclude={"data"})
    assert loaded.data.model_dump(exclude={"interactions", "tracks"}) == cfg.data.model_dump(
        exclude={"interactions", "tracks"}
    )
    named = tune.TuneOptions(trials=1, timeout=1.0, out=out, interactions_path=Path("in.parquet"))
    out.write_text(tune.best_yaml(cfg, named))
    loaded = load_config(out)
    assert loaded.data.interactions == Path("in.parquet") and loaded.data.tracks is None
    assert loaded.data.min_track_users == base.data.min_track_users == 5


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trials", "timeout", "field"),
    [
        (0, 10.0, "--trials"),
        (-3, 10.0, "--trials"),
        (1, 0.0, "--timeout"),
        (1, -1.0, "--timeout"),
        (1, math.nan, "--timeout"),
        (1, math.inf, "--timeout"),
    ],
)
def test_bad_budgets_are_one_line_errors(trials: int, timeout: float, field: str):
    with pytest.raises(DataError, match=f"^{field}: expected"):
        tune.check_budget(trials, timeout)


def _cli(tmp_path: Path, *args: str):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["tune", "--config", str(SMOKE), "--tracking-uri", uri]
    return CliRunner().invoke(app, [*common, "--out", str(tmp_path / "best.yaml"), *args])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trials", "0"], "error: --trials: expected an integer >= 1, got 0"),
        (["--timeout", "0"], "error: --timeout: expected a number of seconds > 0, got 0"),
        (["--set", "model.nope=1"], "model.nope: Extra inputs are not permitted"),
        (["--set", "train.early_stopping.metric=recall_at_7"], "needs 7 in eval.ks"),
        ([], "no interactions given"),
        (["--interactions", "/nonexistent/x.parquet"], "/nonexistent/x.parquet"),
    ],
)
@pytest.mark.usefixtures("_cli_globals_restored")
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str):
    result = _cli(tmp_path, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "best.yaml").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.usefixtures("_cli_globals_restored")
def test_cli_refuses_a_directory_as_out(tmp_path: Path):
    result = CliRunner().invoke(
        app, ["tune", "--config", str(SMOKE), "--out", str(tmp_path), "--interactions", "x"]
    )
    assert result.exit_code == 2 and "--out: expected a YAML file path" in result.stderr
