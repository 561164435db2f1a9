"""Device placement through ``tf.distribute``, so GPU jobs need no code changes."""

from __future__ import annotations

import logging

from tracktower.features.tf import tf

log = logging.getLogger(__name__)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``auto`` mirrors over GPUs when more than one is visible, else uses the default device.

    ``mirrored`` with no GPU mirrors over the visible logical CPU devices, which is how the
    multi-device path is exercised in tests on machines without accelerators.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus)
    if name == "multi_worker":
        # Workers and their roles come from TF_CONFIG, as with any Keras multi-worker job.
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}")


def configure_precision(mixed: bool) -> str:
    """Mixed float16 pays off only on GPUs with tensor cores; on CPU it is slower: skipped."""
    policy = "float32"
    if mixed:
        if tf.config.list_physical_devices("GPU"):
            policy = "mixed_float16"
        else:
            log.warning("mixed_precision requested but no GPU is visible; training in float32")
    tf.keras.mixed_precision.set_global_policy(policy)
    return policy
