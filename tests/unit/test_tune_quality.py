"""The quality benchmark's ``tracktower-tuned`` system without fitting: opt-in (not in
``--systems all``), never a peer, its own table row with its budget and ratio, its flags."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality() -> Any:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    return quality


def _stat(mean: float) -> dict[str, Any]:
    return {"mean": mean, "std": 0.01, "per_seed": [mean - 0.01, mean + 0.01]}


def _summary(**means: tuple[float, float]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (recall, ndcg) in means.items():
        system = name.replace("_", "-")
        out[system] = {
            "metrics": {"recall_at_20": _stat(recall), "ndcg_at_10": _stat(ndcg)},
            "selected": {"0": "—", "1": "—"},
            "fit_seconds": 1.0,
            "label": system,
        }
    return out


def test_best_peers_exclude_tracktower_and_tracktower_tuned(quality: Any) -> None:
    summary = _summary(
        ease=(0.20, 0.15), ials=(0.21, 0.14), tracktower=(0.30, 0.30), tracktower_tuned=(0.4, 0.4)
    )
    assert quality.best_peers(summary) == {
        "recall_at_20": ("ials", 0.21),
        "ndcg_at_10": ("ease", 0.15),
    }
    only_ours = _summary(tracktower=(0.3, 0.3), tracktower_tuned=(0.4, 0.4))
    assert quality.best_peers(only_ours) == {}


def _run(system: str, value: float, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    metrics = {"recall_at_20": value, "ndcg_at_10": value}
    return {"system": system, "params": params, "metrics": metrics, "fit_seconds": 1.0} | {
        "extra": extra
    }


def test_the_tuned_row_has_its_budget_and_its_ratio_to_the_best_peer(quality: Any) -> None:
    tuned = {"tuned": "lr=0.003 T=0.08", "epoch": "3/9"}
    seeds = {
        str(seed): {
            "systems": [
                _run("ease", 0.2, {"lambda": 100.0}),
                _run("tracktower-tuned", value, tuned, tune_budget_seconds=900.0),
            ]
        }
        for seed, value in enumerate((0.22, 0.26))
    }
    summary = quality.summarise(seeds)
    assert summary["tracktower-tuned"]["label"] == "tracktower (after tune, 900 s)"
    assert summary["tracktower-tuned"]["selected"]["0"] == "lr=0.003 T=0.08; epoch 3/9"
    assert summary["ease"]["label"] == "ease"
    table = quality.markdown_table("t", summary)
    (row,) = [line for line in table.splitlines() if line.startswith("| tracktower (after")]
    assert row.startswith("| tracktower (after tune, 900 s) | 0.2400 ± 0.0283 |")
    assert row.endswith("| 1.200x / 1.200x |")
    assert "Best peer: recall_at_20 ease (0.2000), ndcg_at_10 ease (0.2000)" in table


def test_all_leaves_tracktower_tuned_out_unless_named(quality: Any) -> None:
    every = quality.wanted_systems("all")
    assert every("tracktower") and every("ease") and not every("tracktower-tuned")
    named = quality.wanted_systems("tracktower,tracktower-tuned")
    assert named("tracktower-tuned") and named("tracktower") and not named("ease")
    both = quality.wanted_systems("all,tracktower-tuned")
    assert both("tracktower-tuned") and both("ease") and both("tfrs-tutorial")
    assert not quality.wanted_systems("baselines")("tracktower-tuned")
    assert quality.TWO_TOWER_NAMES.index("tracktower-tuned") == (
        quality.TWO_TOWER_NAMES.index("tracktower") + 1
    )


def test_tune_flags_defaults_quick_and_bad_values(quality: Any, capsys) -> None:
    args = quality.parse_args([])
    assert (args.tune_budget, args.tune_trials) == (900.0, 50)
    args = quality.parse_args(["--quick"])
    assert (args.tune_budget, args.tune_trials) == (60.0, 3)
    args = quality.parse_args(["--quick", "--tune-budget", "5", "--tune-trials", "2"])
    assert (args.tune_budget, args.tune_trials) == (5.0, 2)
    for bad in (["--tune-budget", "0"], ["--tune-budget", "-1"], ["--tune-budget", "nan"]):
        with pytest.raises(SystemExit):
            quality.parse_args(bad)
        assert "expected a number of seconds > 0" in capsys.readouterr().err
    for bad in (["--tune-trials", "0"], ["--tune-trials", "1.5"]):
        with pytest.raises(SystemExit):
            quality.parse_args(bad)
        assert "expected an integer >= 1" in capsys.readouterr().err


def test_short_params_are_short_and_ordered() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import two_tower

    params = {
        "model.temperature": 0.083333,
        "train.learning_rate": 0.0031234,
        "model.track_bias": True,
        "model.query_layers": "linear",
        "model.new_knob": 3,
    }
    assert two_tower.short_params(params) == (
        "lr=0.00312 T=0.0833 bias=true query=linear new_knob=3"
    )
    assert two_tower.short_params({}) == "the input config"
