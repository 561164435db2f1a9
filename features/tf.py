"""The one place TensorFlow is imported from.

TensorFlow Recommenders 0.7.7 refuses Keras 3, so the legacy tf-keras must be selected before
TensorFlow is first imported anywhere in the process. Every module that needs TensorFlow imports it
from here (``from tracktower.features.tf import tf``) instead of ``import tensorflow``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# Without an NVIDIA driver the only C++ "error" TensorFlow prints is its failed CUDA probe; real
# failures still surface as Python exceptions. With a driver present, keep errors visible.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if os.path.exists("/proc/driver/nvidia") else "3")

import tensorflow as tf

__all__ = ["tf"]
