"""Execute both notebooks end to end, so they keep working as the package under them changes.

The notebooks are documentation that imports the package; nothing else would notice when a renamed
function, metric or tag silently breaks them. Notebook 2 reads real runs from a real training
subprocess, so a change in what training logs shows up here too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
SMOKE = REPO / "configs" / "smoke.yaml"
NOTEBOOK_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 900


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernelspec that runs *this* interpreter, searched before any other.

    A user-level or system ``python3`` spec may point at another Python without tracktower
    installed; JUPYTER_PATH entries win over every other kernelspec location.
    """
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    root = tmp_path / "jupyter"
    write_kernel_spec(root / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
    return "python3"


def _execute(name: str, kernel: str, cwd: Path) -> nbformat.NotebookNode:
    """Run a notebook; the kernel inherits this process's environment (TRACKTOWER_NB_*, MLflow)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=NOTEBOOK_TIMEOUT_S,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    return nb


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in _code_cells(nb):
        for out in cell.outputs:
            if out.output_type == "stream" and out.name == "stdout":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in out.get("data", {}) for cell in _code_cells(nb) for out in cell.outputs
    )


def _cli() -> str:
    """The venv's console script next to this interpreter (PATH may hold another one)."""
    script = Path(sys.executable).with_name("tracktower")
    return str(script) if script.exists() else shutil.which("tracktower") or "tracktower"


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [_cli(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"tracktower {args[0]} failed:\n{proc.stderr[-3000:]}"


def test_committed_notebooks_have_no_outputs() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(_code_cells(nb)) if c.outputs or c.execution_count]
        assert not dirty, f"{path.name}: strip outputs of code cells {dirty}"


def test_data_exploration_on_synthetic_data(
    kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracktower.features import synth

    data = tmp_path / "synth"
    synth.write(data, users=300, tracks=800, seed=2)
    monkeypatch.setenv("TRACKTOWER_NB_DATA", str(data))

    nb = _execute("01_data_exploration.ipynb", kernel, tmp_path)

    text = _text(nb)
    assert f"source: {data}" in text
    assert "density" in text
    assert "users eligible for evaluation" in text
    assert _images(nb) >= 4  # popularity, per-user, weights, artists


def test_compare_runs_reads_both_systems_from_a_real_training_run(
    kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = tmp_path / "synth"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    # cwd=tmp_path: with a sqlite store MLflow puts artifacts under ./mlruns of the cwd.
    synth_args = ["--out", str(data), "--users", "600", "--tracks", "1500", "--seed", "1"]
    _run(["data", "synth", *synth_args], tmp_path, env)
    _run(
        [
            "train",
            "--config", str(SMOKE),
            "--interactions", str(data / "interactions.parquet"),
            "--tracks", str(data / "tracks.parquet"),
        ],
        tmp_path,
        env,
    )  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TRACKTOWER_NB_EXPERIMENT", "tracktower-smoke")

    nb = _execute("02_compare_runs.ipynb", kernel, tmp_path)

    text = _text(nb)
    assert "2 runs; systems: popular, two_tower" in text
    assert "two_tower" in text and "popular" in text
    assert "test_recall_at_20" in text
    assert "best val Recall@20" in text  # per-epoch history was found
    assert _images(nb) == 2  # Recall@K and the epoch curves


@pytest.mark.parametrize("store", ["empty", "absent"])
def test_compare_runs_without_runs_stops_gracefully(
    store: str, kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in the experiment name or a fresh checkout must print advice, not a traceback."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    if store == "empty":
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments()  # creates the schema, no runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TRACKTOWER_NB_EXPERIMENT", "no-such-experiment")

    nb = _execute("02_compare_runs.ipynb", kernel, tmp_path)

    assert "No runs found in experiment 'no-such-experiment'" in _text(nb)
    assert _images(nb) == 0
    assert db.exists() == (store == "empty")  # looking must not create a store
