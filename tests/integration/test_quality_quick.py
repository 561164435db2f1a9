"""benchmarks/quality.py end to end on tiny data: one split per seed, choices on VAL, mean ± std."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from tracktower.features import synth

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    return quality


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """An ``mpd-subset`` lookalike: playlists of tracks with artists (for mpd-artist)."""
    interactions, tracks = synth.generate(
        users=400, tracks=600, seed=3, tracks_per_artist=3.0, median_interactions=60.0
    )
    root = tmp_path / "data" / "mpd-subset"
    root.mkdir(parents=True)
    interactions.to_parquet(root / "interactions.parquet")
    tracks.to_parquet(root / "tracks.parquet")
    return tmp_path / "data"


def test_baselines_over_two_seeds_choose_on_validation(quality, data_root, tmp_path) -> None:
    out = tmp_path / "quality.json"
    markdown = tmp_path / "tables.md"
    argv = ["--quick", "--datasets", "mpd-artist", "--systems", "popular,ease,ials"]
    argv += ["--seeds", "0,1", "--data-root", str(data_root), "--output", str(out)]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--markdown", str(markdown)]
    assert quality.main(argv) == 0
    entry = json.loads(out.read_text())["datasets"]["mpd-artist"]
    assert entry["split"] == {"val_fraction": 0.1, "test_fraction": 0.2}
    assert sorted(entry["seeds"]) == ["0", "1"]
    fingerprints = {seed["fingerprint"] for seed in entry["seeds"].values()}
    assert len(fingerprints) == 1  # the same k-cored data, split two ways
    for seed in entry["seeds"].values():
        assert seed["stats"]["val_rows"] > 0 and seed["stats"]["test_rows"] > 0
        systems = {s["system"]: s for s in seed["systems"]}
        assert list(systems) == ["popular", "ease", "ials"]
        ease = systems["ease"]
        assert len(ease["grid"]) == 2 and sum(p["selected"] for p in ease["grid"]) == 1
        best_val = max(p["val_recall_at_20"] for p in ease["grid"])
        assert ease["val_metrics"]["recall_at_20"] == pytest.approx(best_val)
        (chosen,) = [p for p in ease["grid"] if p["selected"]]
        assert ease["params"]["lambda"] == chosen["params"]["lambda"]
        assert "recall_at_20" in ease["metrics"] and "ndcg_at_10" in ease["metrics"]
    summary = entry["summary"]["ease"]["metrics"]["recall_at_20"]
    per_seed = [entry["seeds"][s]["systems"][1]["metrics"]["recall_at_20"] for s in ("0", "1")]
    assert summary["per_seed"] == per_seed
    assert summary["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert summary["std"] == pytest.approx(statistics.stdev(per_seed))
    table = markdown.read_text()
    assert "| ease |" in table and " ± " in table and "Best peer: recall_at_20" in table

    # A subset rerun merges: seed 1's ials stays, seed 0's ease is replaced by this run's.
    argv = ["--quick", "--datasets", "mpd-artist", "--systems", "ease", "--seeds", "0"]
    argv += ["--data-root", str(data_root), "--output", str(out)]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert quality.main(argv) == 0
    merged = json.loads(out.read_text())["datasets"]["mpd-artist"]
    assert [s["system"] for s in merged["seeds"]["0"]["systems"]] == ["popular", "ials", "ease"]
    assert [s["system"] for s in merged["seeds"]["1"]["systems"]] == ["popular", "ease", "ials"]


def test_missing_dataset_skips_locally_and_fails_in_ci(quality, tmp_path, monkeypatch) -> None:
    argv = ["--quick", "--datasets", "msd", "--systems", "popular"]
    argv += ["--data-root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "q.json")]
    monkeypatch.setenv("CI", "false")
    assert quality.main(argv) == 0
    assert json.loads((tmp_path / "q.json").read_text())["datasets"] == {}
    monkeypatch.setenv("CI", "true")
    with pytest.raises(SystemExit, match="dataset 'msd' not found"):
        quality.main(argv)


def test_two_tower_epoch_is_chosen_on_validation(quality, data_root, tmp_path) -> None:
    """tracktower's kept epoch is the one with the best validation Recall@20 of those run."""
    out = tmp_path / "quality.json"
    argv = ["--quick", "--datasets", "mpd-artist", "--systems", "popular,tracktower"]
    argv += ["--max-epochs", "3", "--data-root", str(data_root), "--output", str(out)]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert quality.main(argv) == 0
    entry = json.loads(out.read_text())["datasets"]["mpd-artist"]
    (tower,) = [s for s in entry["seeds"]["0"]["systems"] if s["system"] == "tracktower"]
    epochs = tower["grid"]
    assert 1 <= len(epochs) <= 3 and tower["params"]["epoch"].endswith("/3")
    best = max(epochs, key=lambda row: row["val_recall_at_20"])
    assert tower["params"]["epoch"] == f"{best['epoch']}/3"
    assert tower["val_metrics"]["recall_at_20"] == pytest.approx(best["val_recall_at_20"], abs=1e-4)
    assert tower["metrics"]["recall_at_20"] > 0
    assert "tracktower" in entry["table_markdown"] and "x / " in entry["table_markdown"]


def test_tracktower_tuned_searches_on_validation_then_has_its_own_row(
    quality, data_root, tmp_path
) -> None:
    """Opt-in tracktower-tuned: tune (tiny budget) on this split with TEST emptied, then the
    best config fitted and scored; its own row, compared with the best peer, never one."""
    from mlflow import MlflowClient

    out, uri = tmp_path / "quality.json", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--quick", "--datasets", "mpd-artist", "--systems", "popular,tracktower-tuned"]
    argv += ["--max-epochs", "1", "--tune-trials", "2", "--tune-budget", "120"]
    argv += ["--data-root", str(data_root), "--output", str(out), "--tracking-uri", uri]
    assert quality.main(argv) == 0
    entry = json.loads(out.read_text())["datasets"]["mpd-artist"]
    systems = {s["system"]: s for s in entry["seeds"]["0"]["systems"]}
    assert list(systems) == ["popular", "tracktower-tuned"]
    tuned = systems["tracktower-tuned"]
    extra = tuned["extra"]
    assert extra["n_trials"] == 2 and 1 <= extra["n_complete"] <= 2
    assert extra["tune_budget_seconds"] == 120 and extra["tune_max_trials"] == 2
    assert extra["tune_seconds"] > 0 and extra["best_val_recall_at_20"] > 0
    assert tuned["params"]["epoch"] == "1/1" and tuned["params"]["tuned"]
    assert tuned["metrics"]["recall_at_20"] > 0

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracktower-quality")
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[extra["tune_run_id"]]
    assert parent.data.tags["system"] == "tune" and parent.data.params["base.train.epochs"] == "1"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2
    for run in [parent, *trials]:
        assert not [k for k in run.data.metrics if k.startswith("test_")], "TEST never seen"
    fitted = by_id[tuned["run_id"]]
    assert fitted.data.tags["tune_run_id"] == parent.info.run_id
    assert "test_recall_at_20" in fitted.data.metrics

    summary = entry["summary"]
    assert summary["tracktower-tuned"]["label"] == "tracktower (after tune, 120 s)"
    table = entry["table_markdown"]
    (row,) = [line for line in table.splitlines() if line.startswith("| tracktower (after tune")]
    assert row.startswith("| tracktower (after tune, 120 s) |") and "x / " in row
    assert "Best peer: recall_at_20 popular" in table


def test_each_finished_seed_is_on_disk_before_the_next_starts(
    quality, data_root, tmp_path, monkeypatch
) -> None:
    """A run killed in seed 1 keeps seed 0: the report is rewritten (atomically) per seed."""
    out = tmp_path / "quality.json"
    argv = ["--quick", "--datasets", "mpd-artist", "--systems", "popular", "--seeds", "0,1"]
    argv += ["--data-root", str(data_root), "--output", str(out)]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    real = quality.run_seed
    seen: list[list[str]] = []

    def run_seed(spec, inputs, seed, args, wanted):  # type: ignore[no-untyped-def]
        if out.exists():
            seen.append(sorted(json.loads(out.read_text())["datasets"]["mpd-artist"]["seeds"]))
        if seed == 1:
            raise KeyboardInterrupt
        return real(spec, inputs, seed, args, wanted)

    monkeypatch.setattr(quality, "run_seed", run_seed)
    with pytest.raises(KeyboardInterrupt):
        quality.main(argv)
    assert seen == [["0"]]
    entry = json.loads(out.read_text())["datasets"]["mpd-artist"]
    assert list(entry["seeds"]) == ["0"] and entry["seeds"]["0"]["grids"] == "quick"
    assert not list(tmp_path.glob("*.partial"))
