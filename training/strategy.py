"""Device placement through ``tf.distribute``, so GPU and multi-worker jobs need no code changes.

Scaling rule (every strategy; one replica changes nothing): ``train.batch_size`` (or its ``auto``
value) is the batch of ONE replica, and a step takes ``batch_size x replicas`` examples, split
across the replicas. The loss is a sum over the batch, and replicas' gradients are summed, so
a step's gradient is the sum over the global batch exactly as on one device with that batch.
The learning rate then follows :func:`scaled_learning_rate`: square root for Adam and Adagrad,
none for SGD (see there why).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator

import numpy as np

from tracktower.features.tf import tf
from tracktower.training.launcher import WorkerLost

log = logging.getLogger(__name__)

# One per process: MultiWorkerMirroredStrategy joins the cluster named by TF_CONFIG when it is
# created, which must happen once and before any other TensorFlow op runs (the collective ops
# and the coordination service are configured into the eager context it then creates).
_MULTI_WORKER: tf.distribute.MultiWorkerMirroredStrategy | None = None


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``auto`` mirrors over GPUs when more than one is visible, else uses the default device.

    ``mirrored`` with no GPU mirrors over the visible logical CPU devices, which is how the
    multi-device path is exercised in tests on machines without accelerators. ``multi_worker``
    is created once per process (the first call joins the cluster; later calls return it).
    """
    global _MULTI_WORKER
    if name == "multi_worker":
        # Workers and their roles come from TF_CONFIG, as with any Keras multi-worker job.
        if _MULTI_WORKER is None:
            _MULTI_WORKER = tf.distribute.MultiWorkerMirroredStrategy()
        return _MULTI_WORKER
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
    raise ValueError(f"unknown strategy {name!r}")


def workers(strategy: tf.distribute.Strategy) -> int:
    """Processes taking part in each step (1 unless multi-worker)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    return int(strategy.extended._num_workers)  # no public accessor


def scaled_learning_rate(optimizer: str, learning_rate: float, replicas: int) -> float:
    """``train.learning_rate`` is the rate for one replica; with more, the global batch grows.

    Adam and Adagrad divide each update by the gradient's running scale, so a bigger batch does
    not make steps bigger, only less noisy: the square-root rule (Malladi et al., 2022, "On the
    SDEs and scaling rules for adaptive gradient algorithms") keeps their dynamics, ``lr x
    sqrt(replicas)``. Plain SGD needs no factor here: the loss is a sum over the batch, so its
    gradient, and with it SGD's step, already grows linearly with the global batch (the linear
    scaling rule, built in).
    """
    if optimizer in ("adam", "lazy_adam", "adagrad"):
        return learning_rate * math.sqrt(max(replicas, 1))
    return learning_rate


# What a collective op raises once a peer is gone: the coordination service's missed heartbeats
# (about 10 s after the loss) abort every pending collective with UnavailableError.
_PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.DeadlineExceededError,
)


@contextlib.contextmanager
def worker_loss() -> Iterator[None]:
    """A peer's loss as :class:`~tracktower.training.launcher.WorkerLost`, one line naming it,
    instead of TensorFlow's page of graph traceback."""
    try:
        yield
    except _PEER_ERRORS as exc:
        text = " ".join(str(exc.message).split())
        found = re.search(r"tasks are unhealthy \(stopped sending heartbeats\): (\S+)", text)
        what = f"{found[1]} stopped sending heartbeats" if found else text[:300]
        raise WorkerLost(
            f"a worker of the multi-worker job was lost ({what}); the job cannot go on without "
            "it: start the same command again with --resume to continue from the last "
            "backed-up epoch"
        ) from None


def share_from_chief(strategy: tf.distribute.Strategy, text: str | None) -> str:
    """The chief's ``text`` on every worker (others pass None); ``text`` itself unless
    multi-worker. Every worker must call it at the same point: it is two all-reduces in which
    only the chief's first replica contributes, so the sum is the chief's value."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return text or ""
    data = np.frombuffer((text or "").encode(), dtype=np.uint8).astype(np.int32)
    with worker_loss():
        length = int(_sum_of_first_replica(strategy, np.array([len(data)], np.int32))[0])
        padded = np.zeros(length, np.int32)
        padded[: min(len(data), length)] = data[:length]
        codes = _sum_of_first_replica(strategy, padded)
    return codes.astype(np.uint8).tobytes().decode()


def _sum_of_first_replica(strategy: tf.distribute.Strategy, values: np.ndarray) -> np.ndarray:
    """All-reduce (SUM) in which replica 0, the chief's first, contributes ``values`` and every
    other replica zeros: TensorFlow's collectives have no broadcast, and this is one."""
    if values.size == 0:
        return values

    def contribution() -> tf.Tensor:
        mine = tf.constant(values)
        first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
        return tf.where(first, mine, tf.zeros_like(mine))

    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(contribution), axis=None)
    return np.asarray(total.numpy())


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
