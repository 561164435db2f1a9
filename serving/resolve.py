"""Turn a model URI (registry alias/version, run, or local directory) into a local artifact dir.

Aliases are looked up once and pinned to the concrete version before downloading, so the name and
version reported by the server are exactly what was loaded even if the alias moves meanwhile.
``models:/`` and ``runs:/`` URIs are turned into storage locations with a client bound to the given
tracking URI before anything is downloaded: MLflow's own resolution of those schemes goes through
the process-wide tracking/registry URI and ignores ``tracking_uri``.
MLflow is imported inside the functions: a local directory never pays for it.

With ``cache_dir`` (the server passes ``model_cache_dir``), a ``models:/`` version is downloaded
once per host, not once per process: into ``cache_dir/<name>-<key>/<version>``, where the key
hashes the tracking store and the name, so two stores' version 3 never meet. The download goes to
a hidden temporary directory beside it and is renamed into place when complete, under an
exclusive ``fcntl`` lock on the model's directory: N workers starting together download once (the
others wait for the lock, then find the version there), and a download cut short (a crash, a full
disk) is never picked up, only removed by the next download. A version directory is only ever
created by that rename, so finding one is proof it is whole and needs no lock. The
``cache_keep`` most recently used versions stay (a use refreshes the directory's mtime); older ones
are removed when a new one arrives. Removing a version a running server has loaded is safe: its
arrays stay mapped until it lets go of them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracktower.features.artifact import MANIFEST_FILE, PYFUNC_ARTIFACT_KEY, read_manifest
from tracktower.features.errors import DataError

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_TMP_PREFIX = ".tmp-"
DEFAULT_CACHE_KEEP = 3
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<name>[^/]+)(?:/(?P<rest>.*?))?/?$")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # the artifact directory (holds manifest.json)
    name: str | None
    version: str | None
    uri: str


def resolve_artifact(
    uri: str,
    *,
    tracking_uri: str | None = None,
    dst_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    cache_keep: int = DEFAULT_CACHE_KEEP,
) -> ResolvedModel:
    """Resolve and, for remote URIs, download; raises DataError with a one-line reason.

    ``cache_dir`` applies to ``models:/`` URIs without ``dst_path``: see the module docstring.
    """
    uri = uri.strip()
    if not uri:
        raise DataError("empty model URI")
    if uri.startswith("models:/"):
        cache = None
        if cache_dir is not None and dst_path is None:
            cache = _HostCache(Path(cache_dir), cache_keep)
        return _resolve_registry(uri, tracking_uri, dst_path, cache)
    if uri.startswith("runs:/"):
        return _from_local(_download(_run_source(uri, tracking_uri), tracking_uri, dst_path), uri)
    if "://" in uri:
        return _from_local(_download(uri, tracking_uri, dst_path), uri)
    path = Path(uri).expanduser()
    if not path.exists():
        raise DataError("no such model directory", path=path)
    return _from_local(path, uri)


def registry_alias(uri: str) -> tuple[str, str] | None:
    """``(name, alias)`` when ``uri`` is ``models:/NAME@ALIAS`` (a URI that can move), else
    None: a version, a run, a local path never change under the server."""
    match = _MODELS_URI.match(uri.strip())
    if match is None or match["alias"] is None:
        return None
    return match["name"], match["alias"]


def alias_version(name: str, alias: str, *, tracking_uri: str | None = None) -> str:
    """The version ``models:/name@alias`` points at now, looked up without downloading."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        found = MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise DataError(
            f"cannot read alias '{alias}' of model '{name}' ({_reason(exc)})",
            path=f"models:/{name}@{alias}",
        ) from exc
    return str(found.version)


def _resolve_registry(
    uri: str, tracking_uri: str | None, dst_path: str | Path | None, cache: _HostCache | None
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
    if cache is not None:
        local = cache.fetch(_store_key(tracking_uri), name, version, source, tracking_uri)
    else:
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


# --- the per-host download cache (see the module docstring) ------------------------------------


def _store_key(tracking_uri: str | None) -> str:
    """The tracking store as one string, a relative sqlite or file path made absolute: the same
    relative URI in two working directories names two stores."""
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return scheme + str(Path(uri.removeprefix(scheme)).expanduser().resolve())
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve())
    return uri


class _HostCache:
    """Registry versions on this host's disk, one download per version (see the module)."""

    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"cache_keep must be >= 1, got {keep}")
        self.root = root.expanduser()
        self.keep = keep

    def model_dir(self, store: str, name: str) -> Path:
        """``<root>/<name>-<key>``: readable, and unique per store and name (the key hashes
        both, so names that sanitise alike or equal names in two stores never share one)."""
        key = hashlib.sha256(f"{store}\n{name}".encode()).hexdigest()[:16]
        return self.root / f"{_SAFE_NAME.sub('_', name)[:64]}-{key}"

    def fetch(
        self, store: str, name: str, version: str, source: str, tracking_uri: str | None
    ) -> Path:
        """The local copy of ``name`` ``version``, downloaded from ``source`` unless present."""
        base = self.model_dir(store, name)
        final = base / version
        if final.is_dir():  # only a complete download is ever renamed into place
            _touch(final)
            return final
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create the model cache ({exc.strerror})", path=base) from exc
        with _locked(base / ".lock"):
            if not final.is_dir():  # another process may have finished it while we waited
                self._download(base, final, source, tracking_uri)
            _touch(final)
            self._prune(base, keep=final)
        return final

    def _download(self, base: Path, final: Path, source: str, tracking_uri: str | None) -> None:
        # Left by a download that died: nobody else is downloading, we hold the lock.
        for stale in base.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=base))
        try:
            local = _download(source, tracking_uri, tmp)
            _locate(local)  # a download without a tracktower model in it is not cached
            os.rename(local, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self, base: Path, keep: Path) -> None:
        """Drop all but the ``self.keep`` most recently used versions (never ``keep``)."""
        versions = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
        versions.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
        for old in versions[self.keep :]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


def _touch(path: Path) -> None:
    """Mark a version as used (its mtime orders pruning); a read-only cache is still usable."""
    with suppress(OSError):
        os.utime(path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` (as ``training.tracking.initialise_store``);
    the kernel releases it if the process dies, so a crash never leaves the cache locked."""
    import fcntl

    try:
        handle = open(path, "a")  # noqa: SIM115  # closed below, after the unlock
    except OSError as exc:
        raise DataError(f"cannot lock the model cache ({exc.strerror})", path=path) from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
