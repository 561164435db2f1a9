"""Schemathesis over the server's own OpenAPI document: every check, positive and negative data,
its examples, coverage and fuzzing phases, against the app in-process (schemathesis' ASGI
transport runs the real lifespan, middleware and routers; no socket, no server process).

Zero failures means the document is exactly as strict as the server: every request it allows is
answered 2xx (none refused as "valid data rejected"), every request it forbids is refused with a
4xx, every status, header and body that comes back is declared, and with API keys each operation
refuses requests without a valid one. Run both without keys and with them (then schemathesis
also probes every operation with the key removed and with a wrong one).

The limits are small: generated data crosses them often, so a limit the document misstates
cannot hide, and no request the document allows can exceed ``max_body_bytes`` (which a JSON
Schema cannot state: a large valid body is answered 413, declared, but a "valid request
rejected" to schemathesis); ``_largest_valid_body`` checks that.

The document is the app's own (``app.openapi()``, what ``/openapi.json`` serves; the unit tests
cover the route), loaded with ``from_dict`` at collection, with the app attached as
``from_asgi`` does. ``from_asgi`` itself would fetch it through the app, starting the lifespan
(loading the model) at collection time, and ``schemathesis.pytest.from_fixture`` fails under
pytest 9 (it reads ``request.node._nodeid``, which pytest 9 no longer has).

Hypothesis runs derandomized, so CI runs the same cases every time; ``max_examples`` (fuzzing
cases per operation) is asserted when the module finishes, so a generator that silently gives up
cannot pass for a thorough run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from builders import write_fake_artifact
from hypothesis import HealthCheck, settings
from schemathesis.python.asgi import shutdown_lifespans

from tracktower.serving.app import create_app
from tracktower.serving.settings import Settings

MAX_EXAMPLES = 100
KEY = "schemathesis-key-0123456789"
# Small enough that generated data often crosses them (a list of 4, an id of 9 characters), so
# a document that states a limit wrongly, or not at all, fails here; large enough for the
# document's own examples.
LIMITS: dict[str, Any] = {
    "max_k": 20,
    "default_k": 5,
    "max_id_length": 8,
    "max_track_ids": 3,
    "max_batch_users": 4,
}
HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
# (test, operation, phase) -> cases run
CASES: Counter[tuple[str, str, str]] = Counter()


def _largest_valid_body(limits: dict[str, Any]) -> int:
    """Bytes of the longest JSON body the document allows: every id at max_id_length, each code
    point an astral character escaped as a surrogate pair (12 bytes), plus quotes and commas."""
    ident = limits["max_id_length"] * 12 + 3
    single = ident * (1 + 2 * limits["max_track_ids"])
    batch = ident * limits["max_batch_users"]
    return max(single, batch) + 200  # field names, k, braces


# The apps exist from collection on (parametrize needs their documents), but the model only
# loads when the first request starts an app's lifespan: the module fixture writes it first.
ARTIFACT = Path(tempfile.gettempdir()) / f"tracktower-schemathesis-{os.getpid()}" / "artifact"


def _schema(**extra: Any) -> Any:
    """The app's own document, driving that same app in-process: the ASGI transport, as
    ``schemathesis.openapi.from_asgi`` sets it up, minus the request for the document (which
    would start the lifespan, so load the model, at collection time)."""
    app_settings = Settings(model_uri=str(ARTIFACT), **LIMITS, **extra)
    assert _largest_valid_body(LIMITS) < app_settings.max_body_bytes
    app = create_app(app_settings)
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.app = app
    return schema


open_schema = _schema()
keyed_schema = _schema(api_keys=KEY)


@pytest.fixture(scope="module", autouse=True)
def artifact() -> Iterator[Path]:
    shutil.rmtree(ARTIFACT.parent, ignore_errors=True)
    path = write_fake_artifact(ARTIFACT, 50, 200, 8, False)
    yield path
    shutdown_lifespans()  # the models unload and the heap is unfrozen before the next tests
    shutil.rmtree(ARTIFACT.parent, ignore_errors=True)
    for test in ("open", "keyed"):
        _check_counts(test)


def _count(test: str, case: Any) -> None:
    phase = case.meta.phase.name.value if case.meta is not None else "explicit"
    CASES[(test, case.operation.label, phase)] += 1


def _check_counts(test: str) -> None:
    """Every operation that takes input (parameters, a body, or a key) got MAX_EXAMPLES fuzzing
    cases; one that takes none has one possible request, which was sent."""
    fuzzed: Counter[str] = Counter()
    for (ran, operation, phase), n in CASES.items():
        if ran == test:
            fuzzed[operation] += n if phase == "fuzzing" else 0
    no_input = {"GET /healthz", "GET /readyz"} | ({"GET /v1/model"} if test == "open" else set())
    for operation, n in fuzzed.items():
        expected = 1 if operation in no_input else MAX_EXAMPLES
        assert n >= expected, f"{test} {operation}: {n} fuzzing cases, expected {expected}"


@open_schema.parametrize()
@HYPOTHESIS
def test_open_api_is_described_exactly(case: Any) -> None:
    _count("open", case)
    case.call_and_validate()


@keyed_schema.parametrize()
@HYPOTHESIS
def test_keyed_api_is_described_exactly(case: Any) -> None:
    """The key in a header a client would send; ``ignored_auth`` then re-sends each operation
    without it and with a wrong one, expecting 401."""
    _count("keyed", case)
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"})
