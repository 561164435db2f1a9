"""The one door to MLflow: every run, metric, dataset and model goes through these helpers.

Training, baselines and notebooks all log the same names in the same shape, so runs stay
comparable in the UI. MLflow is imported inside the functions so that ``tracktower --help`` stays
fast. The champion policy is not here: see :mod:`tracktower.training.champion`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracktower.features import artifact as contract
from tracktower.training.config import flatten

if TYPE_CHECKING:
    import mlflow
    import pandas as pd

    from tracktower.training.config import ExperimentConfig
    from tracktower.training.data import Prepared

MODEL_ARTIFACT_PATH = "model"
RECALL_PLOT_PATH = "plots/recall_at_k.png"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Opens the experiment in the MLflow UI's model-training view (runs, charts, models) rather than
# the GenAI one; the UI reads this experiment tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

_PYFUNC_DISTRIBUTIONS = ("mlflow", "numpy", "pandas", "pyarrow", "scipy", "pydantic")
_MODEL_CODE = (
    "from mlflow.models import set_model\n"
    "from tracktower.serving.pyfunc import TracktowerModel\n\n"
    "set_model(TracktowerModel())\n"
)
_CURVE_KEY = re.compile(r"^(?P<series>.*?(?:recall|ndcg))_at_(?P<k>\d+)$")


# MLflow's own HTTP client settings (tracking, registry and proxied-artifact requests), given
# these defaults where the environment leaves them unset: (default, type, lowest, highest).
# MLflow retries a refused or dropped connection, a timeout and 408/429/500/502/503/504 answers,
# waiting 0, 2, 4, 8, ... s (factor x 2^(n-1), at most 120 s, plus up to JITTER s) between
# attempts: 8 retries at factor 1 outlast an outage of about four minutes (a server restart or
# rolling upgrade, a database failover) and a restart of a few seconds costs a few seconds
# (MLflow's own defaults, 7 retries at factor 2, wait 0, 4, 8, ... s). The timeout is per
# attempt (connect, then each read), so a large artifact upload is not cut off by it.
HTTP_RETRY_SETTINGS: dict[str, tuple[str, type[int] | type[float], float, float | None]] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": ("8", int, 0, 10),  # 10: MLflow's own ceiling
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": ("1", int, 0, 120),  # MLflow reads an integer
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": ("1.0", float, 0, None),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": ("120", int, 1, None),
}


def configure(tracking_uri: str | None) -> None:
    """Pin the store so every entry point agrees where runs live: argument, then
    ``MLFLOW_TRACKING_URI``, then ``sqlite:///mlflow.db`` in the cwd (a registry needs a DB).

    Also fills in MLflow's HTTP retry settings (:func:`http_retry_settings`) in ``os.environ``,
    where MLflow reads them at every request and child processes (workers) inherit them."""
    import mlflow

    os.environ.update(http_retry_settings())
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)


def http_retry_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow's HTTP retry settings in force: the environment's where set, else tracktower's
    defaults (see ``HTTP_RETRY_SETTINGS``). A value MLflow would reject is a one-line DataError
    now, not a traceback at the run's first request to the server."""
    from tracktower.features.errors import DataError

    env = os.environ if environ is None else environ
    settings = {}
    for name, (default, kind, low, high) in HTTP_RETRY_SETTINGS.items():
        raw = env.get(name, default)
        value = _finite_number(kind, raw)
        if value is None or value < low or (high is not None and value > high):
            bound = f"{low:g}..{high:g}" if high is not None else f">= {low:g}"
            raise DataError(f"{name}: expected {kind.__name__} {bound}, got {raw!r}")
        settings[name] = raw.strip()
    return settings


def _finite_number(kind: type[int] | type[float], raw: str) -> float | None:
    try:
        value = kind(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def initialise_store(uri: str) -> None:
    """Create or migrate a sqlite store under an exclusive file lock (at the first run's start,
    not at ``configure``: bad input must leave no store behind).

    MLflow creates and migrates the schema on first use; two processes doing that at once on a
    fresh file race inside alembic and one dies with a migration traceback. Serialising the first
    touch per process makes concurrent first-time starts safe (the later one finds it done).
    Server-backed stores initialise themselves and need nothing here.
    """
    import fcntl

    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def experiment_run(
    experiment: str, run_name: str, tags: dict[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Start a run that records the code version and ends FAILED when the body raises.

    MLflow infers the commit from ``sys.argv[0]`` (the console script in the venv for
    ``tracktower train``), so we ask git about this package's source tree instead."""
    import mlflow

    all_tags = {**dict(tags or {}), **_owner_tags()}
    if commit := git_commit():
        all_tags.setdefault("mlflow.source.git.commit", commit)
    initialise_store(mlflow.get_tracking_uri())
    exp = mlflow.set_experiment(experiment)
    if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
        mlflow.MlflowClient().set_experiment_tag(
            exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
        )
    end_dead_runs(exp.experiment_id)
    # start_run's context manager ends the run FAILED on any exception; an interrupt (Ctrl-C, or
    # SIGTERM after end_runs_on_sigterm) is not a failure of the run, so it ends KILLED.
    with mlflow.start_run(run_name=run_name, tags=all_tags) as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


HOST_TAG, PID_TAG, PID_START_TAG = "tracktower.host", "tracktower.pid", "tracktower.pid_start"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), which tells a live process from a later one
    that reused its pid; None where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_tags() -> dict[str, str]:
    pid = os.getpid()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(pid),
        PID_START_TAG: _process_start(pid) or "",
    }


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return not start or _process_start(pid) in (start, None)


def end_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose process on this host is gone.

    A ``kill -9`` (or a lost machine) never lets a run end itself, so it would stay RUNNING
    forever; the next run started against the store cleans up after it. Runs from other hosts
    cannot be checked from here and are left alone.
    """
    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    ended = []
    for run in client.search_runs([experiment_id], query, max_results=200):
        tags = run.data.tags
        pid = int(tags.get(PID_TAG, "0") or 0)
        if pid and not _alive(pid, tags.get(PID_START_TAG, "")):
            client.set_tag(
                run.info.run_id, "tracktower.ended_by", f"pid {os.getpid()}: process gone"
            )
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(str(run.info.run_id))
    return ended


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


def log_params_flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Log a nested config as ``a.b.c`` params so each knob is a sortable column in the UI.

    Over-long values are truncated (marked) rather than failing a run after hours of training."""
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    base = prefix if not prefix or prefix.endswith(".") else f"{prefix}."
    logged = {f"{base}{key}": str(value) for key, value in flatten(params).items()}
    for key, text in logged.items():
        if len(text) > MAX_PARAM_VAL_LENGTH:
            logged[key] = text[: MAX_PARAM_VAL_LENGTH - 14] + "...[truncated]"
    if logged:
        mlflow.log_params(logged)
    return logged


def log_dataset_input(
    df: pd.DataFrame,
    *,
    fingerprint: str,
    name: str,
    source: str,
    context: str = "training",
    sample_rows: int = 100,
) -> None:
    """Record exactly which interactions a run saw, so the champion rule can refuse comparisons
    across datasets and anyone can tell two runs apart by data, not just by config.

    MLflow gets a metadata-only dataset (the fingerprint as digest, a schema inferred from
    ``sample_rows`` rows): a pandas dataset would profile and copy all rows, 66M at MPD scale.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.utils import _infer_schema

    from tracktower.features.io import vocabulary

    if "://" not in source:
        source = str(Path(source).expanduser().resolve())
    sample = df.head(sample_rows)
    sample = sample.astype({c: "str" for c in sample.columns if sample[c].dtype == "category"})
    with warnings.catch_warnings():
        # Local paths match two equivalent source types; MLflow warns and picks one. Harmless.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        resolved = resolve_dataset_source(source)
        # The sample's int64 timestamp column draws a hint about missing values in integer
        # columns: meant for model signatures, not for a record of the data.
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        schema = _infer_schema(sample)
    dataset = MetaDataset(  # type: ignore[abstract]  # concrete at runtime (profile: None)
        resolved, name=name, digest=fingerprint[:36], schema=schema
    )
    mlflow.log_input(dataset, context=context, tags={"fingerprint": fingerprint})
    users, tracks = (len(vocabulary(df[c])) if c in df else 0 for c in ("user_id", "track_id"))
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


def split_key(split: Mapping[str, Any]) -> str:
    """A short stable hash of the split settings: with the dataset fingerprint it identifies the
    exact test set, which is what makes two runs' test metrics comparable."""
    text = json.dumps(dict(split), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def find_baseline_run(experiment: str, system: str, fingerprint: str, split: str) -> str | None:
    """The id of a FINISHED ``system`` run on this dataset fingerprint and split, if any."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = (
        f"tags.system = '{system}' and tags.split = '{split}' and "
        f"params.`dataset.fingerprint` = '{fingerprint}' and attributes.status = 'FINISHED'"
    )
    runs = mlflow.MlflowClient().search_runs([exp.experiment_id], query, max_results=1)
    return str(runs[0].info.run_id) if runs else None


def log_dataset(data: Prepared, *, name: str | None = None) -> None:
    """The prepared dataset as the run's input (see :func:`log_dataset_input`)."""
    log_dataset_input(
        data.interactions,
        fingerprint=data.fingerprint,
        name=name or Path(data.source).name or "interactions",
        source=data.source,
    )


def log_config(
    cfg: ExperimentConfig, flat: Mapping[str, Any], path: Path | None, *, final: bool
) -> None:
    """The whole config as params (one sortable column per knob) and as files."""
    import mlflow

    log_params_flat({**flat, "final": final})
    if path is not None:
        mlflow.log_artifact(str(path), "config")
    mlflow.log_text(cfg.model_dump_json(indent=2), "config/resolved.json")


def log_test_metrics(metrics: Mapping[str, float], *, title: str) -> None:
    log_metrics(metrics, prefix="test_")
    log_recall_plot(metrics, title=title)


def log_model(artifact_dir: Path) -> Any:
    """Log the artifact as a pyfunc model of the active run, without registering it.

    Models-from-code: the model holds an import, not a cloudpickle of the class, so it loads with
    whatever tracktower version is installed and MLflow does not warn.
    """
    import mlflow

    from tracktower.serving.pyfunc import model_signature

    artifact_dir = Path(artifact_dir)
    manifest = contract.read_manifest(artifact_dir)
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "tracktower_model.py"
        code.write_text(_MODEL_CODE, encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_PATH,
            python_model=code,
            artifacts={contract.PYFUNC_ARTIFACT_KEY: str(artifact_dir.resolve())},
            pip_requirements=pip_requirements(),
            signature=model_signature(),
            input_example=_input_example(artifact_dir, manifest),
        )


def _input_example(artifact_dir: Path, manifest: Any) -> Any:
    """A real user id, so MLflow's validation at log time scores the model path and the UI shows
    a request that actually returns recommendations (an unknown user if there is none)."""
    import pandas as pd

    users = contract.read_arrays(artifact_dir, manifest)["user_ids"]
    user = str(users[0]) if len(users) else "example-user"
    return pd.DataFrame({"user_id": [user], "k": [10]})


def logged_model(client: Any, run: Any) -> Any:
    """The tracktower model that ``run`` logged; a one-line DataError when it has none."""
    from tracktower.features.errors import DataError

    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"name = '{MODEL_ARTIFACT_PATH}' and source_run_id = '{run.info.run_id}'",
    )
    if not models:
        raise DataError(f"run {run.info.run_id} logged no '{MODEL_ARTIFACT_PATH}' model")
    return models[0]


def register_version(client: Any, model: Any, name: str) -> str:
    """A new version of registered model ``name`` for a logged model; returns its number."""
    import mlflow

    version = mlflow.register_model(f"models:/{model.model_id}", name)
    return str(version.version)


def record_version_in_manifest(client: Any, model: Any, name: str, version: str) -> None:
    """Write the registry name and version into the logged artifact's manifest, so a copy of the
    artifact says which version it is wherever it is served from."""
    import mlflow.artifacts
    import yaml

    base = model.artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load(
            Path(mlflow.artifacts.download_artifacts(f"{base}/MLmodel", dst_path=tmp)).read_text()
        )
        inner = spec["flavors"]["python_function"]["artifacts"][contract.PYFUNC_ARTIFACT_KEY][
            "path"
        ]
        local = Path(
            mlflow.artifacts.download_artifacts(
                f"{base}/{inner}/{contract.MANIFEST_FILE}", dst_path=f"{tmp}/artifact"
            )
        )
        contract.update_manifest(local.parent, model_name=name, model_version=version)
        client.log_model_artifact(model.model_id, str(local), inner)


@contextlib.contextmanager
def resumed_run(run_id: str) -> Iterator[None]:
    """Make ``run_id`` the active run: it already is while ``train`` runs; ``register`` on a
    finished run reopens it and ends it FINISHED again."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id):
        yield


def set_tags(tags: Mapping[str, str]) -> None:
    import mlflow

    mlflow.set_tags(dict(tags))


def get_run(client: Any, run_id: str) -> Any:
    """The run, or a one-line DataError when the store has no such run."""
    from mlflow.exceptions import MlflowException

    from tracktower.features.errors import DataError

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        reason = " ".join(str(getattr(exc, "message", exc)).split())[:200]
        raise DataError(f"no run {run_id} in {client.tracking_uri} ({reason})") from None
