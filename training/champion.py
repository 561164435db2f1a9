"""The champion policy: whether a model is registered, and when ``models:/NAME@champion`` (what
serving follows) may move.

A model is registered only if its test Recall@20 beats the popularity baseline on the same split
by ``promotion.min_lift`` (:func:`gate`; a ``--final`` retrain has no test split and skips it).
It replaces the champion only on a like-for-like win: tested on the same dataset (same
fingerprint, hence comparable metrics) and better by more than ``promotion.tie_tolerance``; a tie
keeps the champion. Forcing either way is the caller's explicit choice (``--promote`` /
``--no-promote``). The alias moves by compare-and-set: the decision names the version it was made
against, the alias is re-read right before it moves, and if another run moved it meanwhile the
decision is made again, so a slow run cannot overwrite a better champion set in between.
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


_CAS_ATTEMPTS = 5


@dataclass(frozen=True)
class Candidate:
    """What the policy compares: the dataset a model was tested on, its test Recall@20 and the
    popularity baseline's on the same split (None where there was no test split)."""

    fingerprint: str
    recall_at_20: float | None
    baseline_recall_at_20: float | None = None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    against: str | None = None  # the champion version the decision was made against


def gate(candidate: Candidate, min_lift: float) -> Decision:
    """Whether the model is worth registering at all: strictly above popularity x ``min_lift``."""
    mine, popular = candidate.recall_at_20, candidate.baseline_recall_at_20
    if mine is None or popular is None:
        return Decision(True, "no test split to compare with popularity (--final)")
    needed = popular * min_lift
    if mine > needed:
        return Decision(True, f"test_recall_at_20 {mine:.4f} > popularity's {popular:.4f}")
    return Decision(
        False,
        f"not registered: test_recall_at_20 {mine:.4f} does not beat popularity's {popular:.4f} "
        f"x promotion.min_lift {min_lift:g} on the same split",
    )


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


def decide(
    client: Any,
    model_name: str,
    candidate: Candidate,
    promote: bool | None,
    tie_tolerance: float = 0.0,
) -> Decision:
    """Apply the policy against the alias as it is now (see the module docstring)."""
    champion = current(client, model_name)
    against = str(champion.version) if champion is not None else None
    if promote is True:
        return Decision(True, "promotion forced (--promote)", against)
    if promote is False:
        return Decision(False, "promotion disabled (--no-promote)", against)
    if champion is None:
        return Decision(True, "no champion yet")
    theirs = _stats(client, champion)
    tag = f"champion v{champion.version}"
    if theirs.fingerprint != candidate.fingerprint:
        return Decision(
            False,
            f"{tag} was evaluated on a different dataset (fingerprint {theirs.fingerprint[:12]} "
            f"vs {candidate.fingerprint[:12]}), metrics are not comparable; use --promote to force",
            against,
        )
    mine, best = candidate.recall_at_20, theirs.recall_at_20
    if mine is None or best is None:
        missing = "this model" if mine is None else tag
        return Decision(
            False, f"{missing} has no test_recall_at_20 to compare; use --promote", against
        )
    if abs(mine - best) <= tie_tolerance:
        return Decision(
            False,
            f"tie: test_recall_at_20 {mine:.4f} vs {tag}'s {best:.4f} is within "
            f"promotion.tie_tolerance {tie_tolerance:g}; {tag} kept",
            against,
        )
    if mine > best:
        return Decision(True, f"test_recall_at_20 {mine:.4f} > {tag}'s {best:.4f}", against)
    return Decision(
        False, f"test_recall_at_20 {mine:.4f} < {tag}'s {best:.4f} on the same dataset", against
    )


def tag_version(client: Any, model_name: str, version: str, candidate: Candidate) -> None:
    """Record on the version what the policy needs later, so it can be judged without its run."""
    recall = "" if candidate.recall_at_20 is None else str(candidate.recall_at_20)
    client.set_model_version_tag(model_name, version, FINGERPRINT_TAG, candidate.fingerprint)
    client.set_model_version_tag(model_name, version, RECALL_TAG, recall)


def apply(
    client: Any,
    model_name: str,
    version: str,
    candidate: Candidate,
    promote: bool | None,
    tie_tolerance: float = 0.0,
) -> Decision:
    """Decide, then move the alias to ``version`` by compare-and-set (see the module docstring)."""
    for _ in range(_CAS_ATTEMPTS):
        decision = decide(client, model_name, candidate, promote, tie_tolerance)
        if decision.promote:
            now = current(client, model_name)
            if (str(now.version) if now is not None else None) != decision.against:
                continue  # another run moved the alias since we looked: decide again
            client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
        client.set_model_version_tag(model_name, version, DECISION_TAG, decision.reason)
        return decision
    reason = f"the champion alias kept moving during {_CAS_ATTEMPTS} attempts; left as it is"
    client.set_model_version_tag(model_name, version, DECISION_TAG, reason)
    return Decision(False, reason)
