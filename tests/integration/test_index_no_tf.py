"""Building, saving, loading and searching a ScaNN index never imports TensorFlow.

``scann/__init__.py`` imports TensorFlow when it is installed (it is, for training); serving's
batch and pyfunc paths must not pay for that. A fresh interpreter is the only place where
"TensorFlow was never imported" can be checked, hence the subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    import tracktower.features.index as ix

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("scann", "tensorflow"))
    assert not loaded, f"importing the index package loaded {loaded}"
    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((2000, 16)).astype(np.float32)
    index, info = ix.build_index(candidates, "scann", queries=candidates[:50])
    index.save(Path(sys.argv[1]) / "index")
    again = ix.load_index(Path(sys.argv[1]) / "index", "scann", info.params, candidates)
    idx, _ = again.search(candidates[:3], 5)
    assert idx.shape == (3, 5) and info.recall_at_100 is not None
    assert "scann" in sys.modules, "ScaNN was not used"
    tf = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
    assert not tf, f"tensorflow was imported (or is still masked): {tf[:5]}"
    print("ok", type(index).__name__)
    """
)


def test_scann_index_imports_no_tensorflow(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok ScannIndex")
