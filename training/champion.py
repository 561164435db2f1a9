"""The champion policy: when ``models:/NAME@champion`` (what serving follows) may move.

A model replaces the champion only on a like-for-like win: it was tested on the same dataset (same
fingerprint, hence comparable metrics) and its test Recall@20 is not worse. Forcing either way is
the caller's explicit choice (``--promote`` / ``--no-promote``). The decision is re-made right
before the alias moves, against whatever the alias points to then, so a run that decided long ago
(before a slow upload) cannot overwrite a better champion that another run set meanwhile.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

CHAMPION_ALIAS = "champion"
# Mirrored onto each model version: visible in the registry UI, and survives a deleted run.
FINGERPRINT_TAG = "dataset.fingerprint"
RECALL_TAG = "test_recall_at_20"
DECISION_TAG = "champion_decision"


@dataclass(frozen=True)
class Candidate:
    """What the policy compares: the dataset a model was tested on and its test Recall@20."""

    fingerprint: str
    recall_at_20: float | None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def current(client: Any, model_name: str) -> Any | None:
    """The version the alias points to, or None when there is no such model or alias yet.

    Only "does not exist" counts as none: an unreachable registry must fail, not look empty.
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def _stats(client: Any, version: Any) -> Candidate:
    """A registered version's fingerprint and Recall@20: its tags, else its run."""
    fingerprint = version.tags.get(FINGERPRINT_TAG)
    recall = version.tags.get(RECALL_TAG)
    if (fingerprint is None or recall is None) and version.run_id:
        with contextlib.suppress(Exception):  # deleted run: fall back to what the tags say
            run = client.get_run(version.run_id)
            fingerprint = fingerprint or run.data.params.get("dataset.fingerprint")
            recall = recall if recall is not None else run.data.metrics.get("test_recall_at_20")
    value = float(recall) if recall not in (None, "") else None
    return Candidate(str(fingerprint) if fingerprint else "", value)


def decide(client: Any, model_name: str, candidate: Candidate, promote: bool | None) -> Decision:
    """Apply the policy against the alias as it is now (see the module docstring)."""
    if promote is True:
        return Decision(True, "promotion forced (--promote)")
    if promote is False:
        return Decision(False, "promotion disabled (--no-promote)")
    champion = current(client, model_name)
    if champion is None:
        return Decision(True, "no champion yet")
    theirs = _stats(client, champion)
    tag = f"champion v{champion.version}"
    if theirs.fingerprint != candidate.fingerprint:
        return Decision(
            False,
            f"{tag} was evaluated on a different dataset (fingerprint {theirs.fingerprint[:12]} "
            f"vs {candidate.fingerprint[:12]}), metrics are not comparable; use --promote to force",
        )
    mine = candidate.recall_at_20
    if mine is None or theirs.recall_at_20 is None:
        missing = "this model" if mine is None else tag
        return Decision(False, f"{missing} has no test_recall_at_20 to compare; use --promote")
    if mine >= theirs.recall_at_20:
        return Decision(True, f"test_recall_at_20 {mine:.4f} >= {tag}'s {theirs.recall_at_20:.4f}")
    return Decision(
        False,
        f"test_recall_at_20 {mine:.4f} < {tag}'s {theirs.recall_at_20:.4f} on the same dataset",
    )


def tag_version(client: Any, model_name: str, version: str, candidate: Candidate) -> None:
    """Record on the version what the policy needs later, so it can be judged without its run."""
    recall = "" if candidate.recall_at_20 is None else str(candidate.recall_at_20)
    client.set_model_version_tag(model_name, version, FINGERPRINT_TAG, candidate.fingerprint)
    client.set_model_version_tag(model_name, version, RECALL_TAG, recall)


def apply(
    client: Any, model_name: str, version: str, candidate: Candidate, promote: bool | None
) -> Decision:
    """Decide against the current alias and move it to ``version`` when the policy says so."""
    decision = decide(client, model_name, candidate, promote)
    client.set_model_version_tag(model_name, version, DECISION_TAG, decision.reason)
    if decision.promote:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    return decision
