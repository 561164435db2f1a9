"""The one place ScaNN is imported from, without TensorFlow.

``scann/__init__.py`` (1.4.2) ends with ``try: import tensorflow`` to register ScaNN's TensorFlow
ops. Importing any ``scann`` submodule runs that file first, so a plain import would load
TensorFlow (5-10 s and several hundred MB) into processes that must not pay for it: the server's
batch and pyfunc paths never touch TensorFlow. The numpy API we use (``scann_ops_pybind``) does not
need it.

While importing, ``sys.modules["tensorflow"]`` is set to ``None``, which makes ``import
tensorflow`` raise ``ModuleNotFoundError``, the exception ``scann/__init__.py`` already catches;
the entry is removed right after, so a later ``from tracktower.features.tf import tf`` still works.
When TensorFlow is already imported nothing is masked (ScaNN then also registers its TensorFlow
ops, at no extra import cost). The mask is process-wide for the few hundred milliseconds of the
import, so a thread importing TensorFlow for the first time at that very moment would fail; the
lock makes the masked import happen once, and callers import ScaNN at build or load time, before
serving threads start.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType

__all__ = ["scann_ops_pybind"]

_LOCK = threading.Lock()


def scann_ops_pybind() -> ModuleType:
    """ScaNN's numpy API module (``scann.scann_ops.py.scann_ops_pybind``), imported once."""
    name = "scann.scann_ops.py.scann_ops_pybind"
    with _LOCK:
        loaded = sys.modules.get(name)
        if loaded is not None:
            return loaded
        if "tensorflow" in sys.modules:
            return importlib.import_module(name)
        sys.modules["tensorflow"] = None  # type: ignore[assignment]
        try:
            return importlib.import_module(name)
        finally:
            if sys.modules.get("tensorflow", 0) is None:
                del sys.modules["tensorflow"]
