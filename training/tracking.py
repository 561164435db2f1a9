"""The one door to MLflow: every run, metric, dataset and model goes through these helpers.

Training, baselines and notebooks all log the same names in the same shape, so runs stay
comparable in the UI and the champion rule below is applied identically everywhere. MLflow is
imported inside the functions so that ``tracktower --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlflow
    import pandas as pd

MODEL_ARTIFACT_PATH = "model"
CHAMPION_ALIAS = "champion"
RECALL_PLOT_PATH = "plots/recall_at_k.png"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Mirrored onto the model version: visible in the registry UI, and survives a deleted run.
FINGERPRINT_TAG = "dataset.fingerprint"
RECALL_TAG = "test_recall_at_20"

_PYFUNC_DISTRIBUTIONS = ("mlflow", "numpy", "pandas", "pyarrow", "scipy", "pydantic")
_MODEL_CODE = (
    "from mlflow.models import set_model\n"
    "from tracktower.serving.pyfunc import TracktowerModel\n\n"
    "set_model(TracktowerModel())\n"
)
_CURVE_KEY = re.compile(r"^(?P<series>.*?(?:recall|ndcg))_at_(?P<k>\d+)$")


@dataclass(frozen=True)
class Registration:
    """Outcome of registering a model, including *why* the champion alias did or did not move."""

    model_uri: str
    name: str
    version: str
    champion: bool
    reason: str


def configure(tracking_uri: str | None) -> None:
    """Pin the store so every entry point agrees where runs live: argument, then
    ``MLFLOW_TRACKING_URI``, then ``sqlite:///mlflow.db`` in the cwd (a registry needs a DB)."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)


def end_runs_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's kill, ``pkill``) unwind like Ctrl-C, so the active MLflow run
    ends KILLED instead of staying RUNNING forever. Entry points call it; the library never does."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@contextlib.contextmanager
def experiment_run(
    experiment: str, run_name: str, tags: dict[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Start a run that records the code version and ends FAILED when the body raises.

    MLflow infers the commit from ``sys.argv[0]`` (the console script in the venv for
    ``tracktower train``), so we ask git about this package's source tree instead."""
    import mlflow

    all_tags = dict(tags or {})
    if commit := git_commit():
        all_tags.setdefault("mlflow.source.git.commit", commit)
    mlflow.set_experiment(experiment)
    # start_run's context manager ends the run FAILED on any exception; an interrupt (Ctrl-C, or
    # SIGTERM after end_runs_on_sigterm) is not a failure of the run, so it ends KILLED.
    with mlflow.start_run(run_name=run_name, tags=all_tags) as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


def _source_dir() -> Path | None:
    """Only an editable install's source tree: the cwd may be any unrelated repository."""
    here = Path(__file__).resolve().parent
    return None if "site-packages" in here.parts else here


def git_commit() -> str | None:
    """HEAD of the git checkout the code runs from, or None outside one (wheel, Docker image)."""
    if (directory := _source_dir()) is None:
        return None
    cmd = ["git", "-C", str(directory), "rev-parse", "--verify", "-q", "HEAD"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):  # no git binary (slim Docker image)
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def _flatten(params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_params_flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Log a nested config as ``a.b.c`` params so each knob is a sortable column in the UI.

    Over-long values are truncated (marked) rather than failing a run after hours of training."""
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    base = prefix if not prefix or prefix.endswith(".") else f"{prefix}."
    logged = {key: str(value) for key, value in _flatten(params, base).items()}
    for key, text in logged.items():
        if len(text) > MAX_PARAM_VAL_LENGTH:
            logged[key] = text[: MAX_PARAM_VAL_LENGTH - 14] + "...[truncated]"
    if logged:
        mlflow.log_params(logged)
    return logged


def log_dataset_input(
    df: pd.DataFrame, *, fingerprint: str, name: str, source: str, context: str = "training"
) -> None:
    """Record exactly which interactions a run saw, so the champion rule can refuse comparisons
    across datasets and anyone can tell two runs apart by data, not just by config."""
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    if "://" not in source:
        source = str(Path(source).expanduser().resolve())
    with warnings.catch_warnings():
        # Local paths match two equivalent source types; MLflow warns and picks one. Harmless.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        dataset = from_pandas(df, source=source, name=name, digest=fingerprint[:36])
    mlflow.log_input(dataset, context=context, tags={"fingerprint": fingerprint})
    users, tracks = (int(df[c].nunique()) if c in df else 0 for c in ("user_id", "track_id"))
    mlflow.log_params(
        {"dataset.fingerprint": fingerprint, "dataset.rows": len(df)}
        | {"dataset.users": users, "dataset.tracks": tracks}
    )


def log_metrics(metrics: Mapping[str, float], *, prefix: str = "", step: int | None = None) -> None:
    """Log metrics under one naming scheme (``val_*`` per epoch, ``test_*`` once) as plain floats;
    numpy scalars and non-finite values would otherwise leak through as odd types or break plots."""
    import mlflow

    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_recall_plot(metrics: Mapping[str, float], *, title: str) -> str | None:
    """Plot Recall@K and NDCG@K curves: a picture of the whole cut-off range shows trade-offs a
    single Recall@20 column hides. Returns the artifact path, or None if no ``*_at_K`` keys."""
    import mlflow
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in servers/threads

    series: dict[str, list[tuple[int, float]]] = {}
    for key, value in metrics.items():
        match = _CURVE_KEY.match(key)
        if match and math.isfinite(float(value)):
            series.setdefault(match["series"], []).append((int(match["k"]), float(value)))
    if not series:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for label, points in sorted(series.items()):
        ks, values = zip(*sorted(points), strict=True)
        ax.plot(ks, values, marker="o", label=label)
    ax.set(xscale="log", xlabel="K (cut-off)", ylabel="metric value", ylim=(0, None), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, RECALL_PLOT_PATH)
    return RECALL_PLOT_PATH


def pip_requirements() -> list[str]:
    """Pins for what ``TracktowerModel`` imports, at the installed versions.

    Explicit pins stop MLflow inferring them by loading the model in a subprocess (slow, may use
    the network). No TensorFlow: the pyfunc never loads the history tower. tracktower is not on
    PyPI, so whoever loads the pyfunc must have it installed (the Docker image does).
    """
    return [f"{dist}=={metadata.version(dist)}" for dist in _PYFUNC_DISTRIBUTIONS]


def _input_example(artifact_dir: Path) -> pd.DataFrame:
    """A real user id when available, so MLflow's validation at log time scores the model path
    and the UI shows a request that actually returns recommendations."""
    import numpy as np
    import pandas as pd

    user = "example-user"  # unknown user: still validates the popularity path
    with (
        contextlib.suppress(Exception),
        np.load(artifact_dir / "arrays.npz", allow_pickle=False) as arrays,
    ):
        user = str(arrays["user_ids"][0])
    return pd.DataFrame({"user_id": [user], "k": [10]})


def _champion_stats(client: Any, champion: Any) -> tuple[str | None, float | None]:
    """Fingerprint and test Recall@20 of the current champion: version tags, else its run."""
    fingerprint = champion.tags.get(FINGERPRINT_TAG)
    recall = champion.tags.get(RECALL_TAG)
    if (fingerprint is None or recall is None) and champion.run_id:
        with contextlib.suppress(Exception):  # deleted run: fall back to what the tags say
            run = client.get_run(champion.run_id)
            fingerprint = fingerprint or run.data.params.get("dataset.fingerprint")
            recall = recall if recall is not None else run.data.metrics.get("test_recall_at_20")
    return fingerprint, (float(recall) if recall not in (None, "") else None)


def _decide(
    client: Any, model_name: str, fingerprint: str, recall: float | None, promote: bool | None
) -> tuple[bool, str]:
    from mlflow.exceptions import MlflowException

    if promote is True:
        return True, "promotion forced (--promote)"
    if promote is False:
        return False, "promotion disabled (--no-promote)"
    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as exc:
        # Missing model / missing alias only; an unreachable registry must not look like "none".
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return True, "no champion yet"
    champ_fp, champ_recall = _champion_stats(client, champion)
    tag = f"champion v{champion.version}"
    if champ_fp != fingerprint:
        return False, (
            f"{tag} was evaluated on a different dataset (fingerprint {str(champ_fp)[:12]} vs "
            f"{fingerprint[:12]}), metrics are not comparable; use --promote to force"
        )
    if recall is None or champ_recall is None:
        missing = "this model" if recall is None else tag
        return False, f"{missing} has no test_recall_at_20 to compare; use --promote to force"
    if recall >= champ_recall:
        return True, f"test_recall_at_20 {recall:.4f} >= {tag}'s {champ_recall:.4f}"
    return False, f"test_recall_at_20 {recall:.4f} < {tag}'s {champ_recall:.4f} on the same dataset"


def log_and_register_model(
    artifact_dir: Path,
    *,
    model_name: str,
    fingerprint: str,
    test_recall_at_20: float | None,
    promote: bool | None,
) -> Registration:
    """Log the artifact as a pyfunc in the active run, register it, and move ``champion`` (which
    serving follows) only on a like-for-like win: same dataset fingerprint, Recall@20 not worse,
    unless the caller forces it either way."""
    import mlflow

    from tracktower.serving.pyfunc import model_signature

    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{artifact_dir}: no manifest.json, not an exported artifact")
    client = mlflow.MlflowClient()
    # Decide first: an unreachable registry fails before the (slower) model upload.
    champion, reason = _decide(client, model_name, fingerprint, test_recall_at_20, promote)
    with tempfile.TemporaryDirectory() as tmp:
        # Models-from-code: the model dir holds an import, not a cloudpickle of the class, so it
        # loads with whatever tracktower version is installed and MLflow does not warn.
        code = Path(tmp) / "tracktower_model.py"
        code.write_text(_MODEL_CODE, encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_PATH,
            python_model=code,
            artifacts={"artifact": str(artifact_dir.resolve())},
            pip_requirements=pip_requirements(),
            signature=model_signature(),
            input_example=_input_example(artifact_dir),
            registered_model_name=model_name,
        )
    version = str(info.registered_model_version)
    recall_text = "" if test_recall_at_20 is None else str(test_recall_at_20)
    tags = {FINGERPRINT_TAG: fingerprint, RECALL_TAG: recall_text, "champion_decision": reason}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if champion:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    if mlflow.active_run() is not None:
        mlflow.set_tags({"registered_model": f"{model_name}/{version}", "champion": str(champion)})
    return Registration(f"models:/{model_name}/{version}", model_name, version, champion, reason)
