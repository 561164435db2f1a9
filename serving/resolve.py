"""Turn a model URI (registry alias/version, run, or local directory) into a local artifact dir.

Aliases are looked up once and pinned to the concrete version before downloading, so the name and
version reported by the server are exactly what was loaded even if the alias moves meanwhile.
``models:/`` and ``runs:/`` URIs are turned into storage locations with a client bound to the given
tracking URI before anything is downloaded: MLflow's own resolution of those schemes goes through
the process-wide tracking/registry URI and ignores ``tracking_uri``.
MLflow is imported inside the functions: a local directory never pays for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracktower.features.artifact import MANIFEST_FILE, PYFUNC_ARTIFACT_KEY, read_manifest
from tracktower.features.errors import DataError

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<name>[^/]+)(?:/(?P<rest>.*?))?/?$")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # the artifact directory (holds manifest.json)
    name: str | None
    version: str | None
    uri: str


def resolve_artifact(
    uri: str, *, tracking_uri: str | None = None, dst_path: str | Path | None = None
) -> ResolvedModel:
    """Resolve and, for remote URIs, download; raises DataError with a one-line reason."""
    uri = uri.strip()
    if not uri:
        raise DataError("empty model URI")
    if uri.startswith("models:/"):
        return _resolve_registry(uri, tracking_uri, dst_path)
    if uri.startswith("runs:/"):
        return _from_local(_download(_run_source(uri, tracking_uri), tracking_uri, dst_path), uri)
    if "://" in uri:
        return _from_local(_download(uri, tracking_uri, dst_path), uri)
    path = Path(uri).expanduser()
    if not path.exists():
        raise DataError("no such model directory", path=path)
    return _from_local(path, uri)


def _resolve_registry(
    uri: str, tracking_uri: str | None, dst_path: str | Path | None
) -> ResolvedModel:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    match = _MODELS_URI.match(uri)
    if match is None:
        raise DataError("expected models:/NAME@ALIAS or models:/NAME/VERSION", path=uri)
    name, alias, version = match["name"], match["alias"], match["version"]
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        raise DataError(f"registered model '{name}' not found ({_reason(exc)})", path=uri) from exc
    try:
        if alias is not None:
            version = str(client.get_model_version_by_alias(name, alias).version)
        else:
            client.get_model_version(name, version)
    except MlflowException as exc:
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        raise DataError(f"model '{name}' has no {what} ({_reason(exc)})", path=uri) from exc
    # Not download_artifacts("models:/..."): MLflow resolves that through the process-wide
    # registry URI and ignores tracking_uri, so it would read another store (or none).
    try:
        source = client.get_model_version_download_uri(name, version)
    except MlflowException as exc:
        raise DataError(f"cannot locate version {version} ({_reason(exc)})", path=uri) from exc
    local = _download(source, tracking_uri, dst_path)
    resolved = _from_local(local, uri)
    return ResolvedModel(resolved.path, name, version, uri)


def _run_source(uri: str, tracking_uri: str | None) -> str:
    """Where ``runs:/ID/NAME[/PATH]`` is stored: the run's logged model NAME, else its artifacts."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    match = _RUNS_URI.match(uri)
    if match is None:
        raise DataError("expected runs:/RUN_ID/PATH", path=uri)
    run_id, name, rest = match["run_id"], match["name"], match["rest"]
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
        logged = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'"
        )
    except MlflowException as exc:
        raise DataError(f"cannot find run {run_id} ({_reason(exc)})", path=uri) from exc
    model = next((m for m in logged if m.source_run_id == run_id), None)
    base = model.artifact_location if model is not None else f"{run.info.artifact_uri}/{name}"
    return f"{base.rstrip('/')}/{rest}" if rest else base


def _reason(exc: Any) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return " ".join(str(message).split())[:200]


def _download(uri: str, tracking_uri: str | None, dst_path: str | Path | None) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri,
            tracking_uri=tracking_uri,
            dst_path=str(dst_path) if dst_path is not None else None,
        )
    except (MlflowException, OSError) as exc:
        raise DataError(f"cannot download model ({_reason(exc)})", path=uri) from exc
    return Path(local)


def _from_local(path: Path, uri: str) -> ResolvedModel:
    """Checked here (format version included) so a bad model fails before anything else loads."""
    artifact = _locate(path)
    manifest = read_manifest(artifact)
    return ResolvedModel(artifact.resolve(), manifest.model_name, manifest.model_version, uri)


def _locate(path: Path) -> Path:
    """The artifact dir itself, or the one logged inside a pyfunc model's ``artifacts/``."""
    if (path / MANIFEST_FILE).is_file():
        return path
    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        declared = _declared_artifact(mlmodel)
        if declared is not None and (path / declared / MANIFEST_FILE).is_file():
            return path / declared
        # Hidden names are write_artifact's staging directories, never artifacts.
        found = sorted(
            m.parent
            for m in (path / "artifacts").glob(f"*/{MANIFEST_FILE}")
            if not m.parent.name.startswith(".")
        )
        if found:
            return found[0]
        raise DataError("MLflow model has no tracktower artifact under artifacts/", path=path)
    raise DataError("neither an artifact (manifest.json) nor an MLflow model (MLmodel)", path=path)


def _declared_artifact(mlmodel: Path) -> str | None:
    import yaml

    try:
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
        entry = spec["flavors"]["python_function"]["artifacts"][PYFUNC_ARTIFACT_KEY]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    value = entry.get("path") if isinstance(entry, dict) else None
    return str(value) if value else None
