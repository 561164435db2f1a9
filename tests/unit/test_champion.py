"""The champion policy against an in-memory registry double (no MLflow store, no network)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

from tracktower.training import champion
from tracktower.training.champion import Candidate

FP_A, FP_B = "a" * 64, "b" * 64


@dataclass
class Registry:
    """Just the calls the policy makes, with MLflow's error for a missing alias."""

    versions: dict[str, Any] = field(default_factory=dict)
    alias: str | None = None
    runs: dict[str, Any] = field(default_factory=dict)

    def add(self, version: str, tags: dict[str, str], run_id: str | None = None) -> None:
        self.versions[version] = SimpleNamespace(version=version, tags=dict(tags), run_id=run_id)

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        if self.alias is None:
            raise MlflowException("no alias", error_code=RESOURCE_DOES_NOT_EXIST)
        return self.versions[self.alias]

    def get_run(self, run_id: str) -> Any:
        return self.runs[run_id]

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.versions[version].tags[key] = value

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.alias = version


def test_first_model_becomes_champion() -> None:
    reg = Registry()
    reg.add("1", {})
    decision = champion.apply(reg, "m", "1", Candidate(FP_A, 0.2), None)
    assert decision.promote and reg.alias == "1"
    assert decision.reason == "no champion yet"
    assert reg.versions["1"].tags[champion.DECISION_TAG] == "no champion yet"


@pytest.mark.parametrize(
    ("recall", "moves"),
    [(0.31, True), (0.30, False), (0.29, False)],
    ids=["better", "tie", "worse"],
)
def test_same_dataset_compares_recall(recall: float, moves: bool) -> None:
    reg = Registry()
    reg.add("1", {champion.FINGERPRINT_TAG: FP_A, champion.RECALL_TAG: "0.30"})
    reg.alias = "1"
    reg.add("2", {})
    decision = champion.apply(reg, "m", "2", Candidate(FP_A, recall), None)
    assert decision.promote is moves
    assert reg.alias == ("2" if moves else "1")
    assert "0.30" in decision.reason and f"{recall:.4f}" in decision.reason


def test_other_dataset_is_not_comparable_unless_forced() -> None:
    reg = Registry()
    reg.add("1", {champion.FINGERPRINT_TAG: FP_A, champion.RECALL_TAG: "0.10"})
    reg.alias = "1"
    reg.add("2", {})
    refused = champion.apply(reg, "m", "2", Candidate(FP_B, 0.9), None)
    assert not refused.promote and "different dataset" in refused.reason and reg.alias == "1"
    forced = champion.apply(reg, "m", "2", Candidate(FP_B, 0.9), True)
    assert forced.promote and reg.alias == "2"


def test_never_promote_keeps_the_alias() -> None:
    reg = Registry()
    reg.add("1", {})
    assert not champion.apply(reg, "m", "1", Candidate(FP_A, 0.9), False).promote
    assert reg.alias is None


def test_missing_recall_falls_back_to_the_run_then_refuses() -> None:
    reg = Registry()
    run = SimpleNamespace(
        data=SimpleNamespace(
            params={"dataset.fingerprint": FP_A}, metrics={"test_recall_at_20": 0.4}
        )
    )
    reg.runs["r1"] = run
    reg.add("1", {}, run_id="r1")
    reg.alias = "1"
    reg.add("2", {})
    worse = champion.decide(reg, "m", Candidate(FP_A, 0.3), None)
    assert not worse.promote and "0.4000" in worse.reason
    final = champion.decide(reg, "m", Candidate(FP_A, None), None)
    assert not final.promote and "this model has no test_recall_at_20" in final.reason


def test_unreachable_registry_is_an_error_not_an_empty_registry() -> None:
    class Down(Registry):
        def get_model_version_by_alias(self, name: str, alias: str) -> Any:
            raise MlflowException("connection refused", error_code=INTERNAL_ERROR)

    with pytest.raises(MlflowException):
        champion.decide(Down(), "m", Candidate(FP_A, 0.5), None)


def test_tag_version_records_what_the_policy_compares() -> None:
    reg = Registry()
    reg.add("3", {})
    champion.tag_version(reg, "m", "3", Candidate(FP_B, None))
    assert reg.versions["3"].tags == {champion.FINGERPRINT_TAG: FP_B, champion.RECALL_TAG: ""}


def test_ties_within_tolerance_keep_the_champion_and_show_both_figures() -> None:
    reg = Registry()
    reg.add("1", {champion.FINGERPRINT_TAG: FP_A, champion.RECALL_TAG: "0.3000"})
    reg.alias = "1"
    reg.add("2", {})
    kept = champion.apply(reg, "m", "2", Candidate(FP_A, 0.3008), None, tie_tolerance=0.001)
    assert not kept.promote and reg.alias == "1"
    assert "0.3008" in kept.reason and "0.3000" in kept.reason and "tie" in kept.reason
    moved = champion.apply(reg, "m", "2", Candidate(FP_A, 0.3020), None, tie_tolerance=0.001)
    assert moved.promote and reg.alias == "2"


def test_alias_moves_by_compare_and_set() -> None:
    """A better champion set by another run between decision and move is not overwritten."""

    class Racing(Registry):
        looks = 0

        def get_model_version_by_alias(self, name: str, alias: str) -> Any:
            self.looks += 1
            if self.looks == 2:  # the other run lands right after our first decision
                self.alias = "9"
            return super().get_model_version_by_alias(name, alias)

    reg = Racing()
    reg.add("1", {champion.FINGERPRINT_TAG: FP_A, champion.RECALL_TAG: "0.20"})
    reg.add("9", {champion.FINGERPRINT_TAG: FP_A, champion.RECALL_TAG: "0.50"})
    reg.add("2", {})
    reg.alias = "1"
    decision = champion.apply(reg, "m", "2", Candidate(FP_A, 0.30), None)
    assert not decision.promote and reg.alias == "9"
    assert "0.5000" in decision.reason


@pytest.mark.parametrize(
    ("mine", "popular", "ok"),
    [(0.30, 0.10, True), (0.105, 0.10, True), (0.104, 0.10, False), (0.0, 0.0, False)],
)
def test_registration_gate_needs_a_lift_over_popularity(
    mine: float, popular: float, ok: bool
) -> None:
    decision = champion.gate(Candidate(FP_A, mine, popular), min_lift=1.04)
    assert decision.promote is ok
    if not ok:
        assert decision.reason.startswith("not registered") and f"{popular:.4f}" in decision.reason


def test_final_runs_have_nothing_to_gate() -> None:
    assert champion.gate(Candidate(FP_A, None, None), min_lift=2.0).promote
