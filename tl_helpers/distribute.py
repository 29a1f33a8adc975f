"""Distribution: the tf.distribute strategy, chosen once per process, and who does what.

The strategy follows the machine and `TF_CONFIG`, in this order:

- `TF_CONFIG` names a cluster (chief/worker tasks): `MultiWorkerMirroredStrategy`, TensorFlow's
  synchronous multi-worker engine. Each worker runs the same notebook; the backbone pass splits
  the images between the workers (`Distribution.share`), training runs in lockstep, and only
  the chief writes results (`for_this_worker`).
- more than one GPU: `MirroredStrategy` over all of them.
- otherwise TensorFlow's default strategy (one GPU, or the CPU).

`choose_distribution` decides once and hands a `Distribution` to the backbone pass
(`train.compute_features`) and to training (`train.train_head`); neither decides again.
GPU memory growth is turned on first, since it can only be set before TensorFlow initialises
its devices. Reading `TF_CONFIG` (`cluster_from_environment`, `is_chief`) needs no TensorFlow,
so `run_notebook`'s parent process uses it without importing TensorFlow.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tl_helpers.errors import TLError

if TYPE_CHECKING:
    import tensorflow as tf

    from tl_helpers.config import Config

T = TypeVar("T")

# Images per backbone batch. CPU: small batches keep MobileNet's activations in cache (see
# inference.INFERENCE_BATCH_SIZE, measured on 2 cores). GPU, per device: a common choice for a
# MobileNet-sized base at 224 px (not measured here: the development machine has no GPU);
# the configuration key backbone_batch_size overrides both.
CPU_BACKBONE_BATCH_SIZE = 16
GPU_BACKBONE_BATCH_PER_REPLICA = 64
WORKER_TASK_TYPES = ("chief", "worker")

_strategy: tf.distribute.Strategy | None = None  # TensorFlow allows one multi-worker strategy


@dataclass(frozen=True)
class Cluster:
    """This process's place in the `TF_CONFIG` cluster: workers are numbered chief first."""

    num_workers: int
    worker_index: int

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0


@dataclass(frozen=True)
class Distribution:
    """The chosen strategy and what follows from it, handed to the backbone pass and training.

    `devices`: this machine's devices that the backbone pass splits each batch across (empty:
    TensorFlow's default placement). `backbone_batch_size`: images per backbone batch, all of
    this machine's devices together.
    """

    strategy: Any  # tf.distribute.Strategy
    devices: tuple[str, ...] = ()
    backbone_batch_size: int = CPU_BACKBONE_BATCH_SIZE
    num_workers: int = 1
    worker_index: int = 0

    @property
    def is_chief(self) -> bool:
        """Whether this is the worker that writes the model and results (a process alone is)."""
        return self.worker_index == 0

    @property
    def replicas(self) -> int:
        """Model replicas training in lockstep, all workers together."""
        return self.strategy.num_replicas_in_sync

    def share(self, items: Sequence[T]) -> list[T]:
        """This worker's share of `items`: every num_workers-th, starting at its index."""
        return list(items[self.worker_index :: self.num_workers])

    def barrier(self) -> None:
        """Return once every worker has called it (a collective all-reduce); no-op for one."""
        if self.num_workers > 1:
            self.same_on_all_workers(0)

    def same_on_all_workers(self, number: int) -> int:
        """The chief's `number`, on every worker (all workers must call this together)."""
        if self.num_workers == 1:
            return int(number)
        import tensorflow as tf

        # The chief's replicas each give number / (its replicas), the others 0: the sum is number.
        mine = float(number) / local_replicas(self.strategy) if self.is_chief else 0.0
        strategy = self.strategy

        @tf.function  # eager collectives work too, but TensorFlow warns that they are slow
        def agree() -> tf.Tensor:
            per_replica = strategy.run(lambda: tf.constant(mine, tf.float64))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        with lost_worker_errors(self, "waiting for the other workers"):
            return int(round(float(agree())))

    def describe(self) -> str:
        """One line for the notebook, e.g. "MirroredStrategy: 2 replicas, backbone batch 128"."""
        line = f"{strategy_name(self.strategy)}: {self.replicas} replica(s)"
        if self.num_workers > 1:
            role = "chief" if self.is_chief else "not the chief: writes no results"
            line += f", worker {self.worker_index} of {self.num_workers} ({role})"
        if self.devices:
            line += f", backbone on {len(self.devices)} device(s)"
        return line + f", backbone batch {self.backbone_batch_size}"


# What TensorFlow raises on a worker when another stops or cannot be reached during a
# collective (its health check aborts the collectives: "Collective ops is aborted by: ...").
_LOST_WORKER_ERRORS = (
    "UnavailableError",
    "DeadlineExceededError",
    "CancelledError",
    "AbortedError",
)


@contextlib.contextmanager
def lost_worker_errors(distribution: Distribution | None, step: str) -> Iterator[None]:
    """Turn TensorFlow's error for a lost worker, in a multi-worker run, into one TLError line
    saying what happened and what to do; any other error, or one process alone, is unchanged."""
    try:
        yield
    except Exception as err:
        lost = type(err).__name__ in _LOST_WORKER_ERRORS and type(err).__module__.startswith(
            "tensorflow"
        )
        if not lost or distribution is None or distribution.num_workers < 2:
            raise
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TLError(
            f"Worker {distribution.worker_index} of {distribution.num_workers}, {step}: another "
            f"worker stopped or cannot be reached ({type(err).__name__}: {detail[:200]}). A "
            "multi-worker run needs every worker until its end: start the notebook again on "
            "every machine, TF_CONFIG unchanged; the features already in the shared store are "
            "reused."
        ) from err


def strategy_name(strategy: Any) -> str:
    """The strategy's public name (TensorFlow's class for MultiWorkerMirroredStrategy differs)."""
    name = type(strategy).__name__
    if name == "CollectiveAllReduceStrategy":
        return "MultiWorkerMirroredStrategy"
    return "default strategy" if name.startswith("_Default") else name


def local_replicas(strategy: Any) -> int:
    """The strategy's replicas on this machine."""
    return len(strategy.extended.worker_devices)


# --------------------------------------------------------------------------- TF_CONFIG


def cluster_from_environment(environ: dict[str, str] | None = None) -> Cluster | None:
    """This process's place in the cluster `TF_CONFIG` names; None when it names none."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        tf_config = json.loads(text)
        cluster, task = tf_config.get("cluster") or {}, tf_config.get("task") or {}
        task_type, task_index = task.get("type"), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as err:
        raise TLError(
            f"TF_CONFIG is not valid JSON with a cluster and a task ({err}). Set it to e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}, or unset it to run on this machine alone.'
        ) from None
    if not cluster:
        return None
    return _cluster(cluster, task_type, task_index)


def _cluster(cluster: dict[str, list], task_type: object, task_index: int) -> Cluster:
    """Number the chief and workers of a TF_CONFIG cluster, chief first; refuse other tasks."""
    other = sorted(set(cluster) - set(WORKER_TASK_TYPES))
    if other or task_type not in WORKER_TASK_TYPES:
        raise TLError(
            f"TF_CONFIG: task types {other or [task_type]} are not used here: "
            'MultiWorkerMirroredStrategy needs only "chief" and "worker" tasks. Remove '
            "the others from TF_CONFIG's cluster and task."
        )
    chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
    members = len(chiefs) if task_type == "chief" else len(workers)
    if not 0 <= task_index < members:
        raise TLError(
            f"TF_CONFIG: task {task_type} {task_index} is not in the cluster "
            f"({members} {task_type} address(es)). Set task.index below {members}."
        )
    worker_index = task_index if task_type == "chief" else len(chiefs) + task_index
    return Cluster(num_workers=len(chiefs) + len(workers), worker_index=worker_index)


def is_chief(environ: dict[str, str] | None = None) -> bool:
    """Whether this process writes the results: the chief, worker 0, or a process alone."""
    cluster = cluster_from_environment(environ)
    return cluster is None or cluster.is_chief


# --------------------------------------------------------------------------- the choice


def choose_distribution(backbone_batch_size: int = 0, devices: Sequence[str] = ()) -> Distribution:
    """Choose the strategy once for this process (see the module doc) and what follows.

    `backbone_batch_size`: images per backbone batch on this machine; 0 chooses for the device
    (CPU_BACKBONE_BATCH_SIZE on CPU, GPU_BACKBONE_BATCH_PER_REPLICA per GPU). `devices`: mirror
    over these logical devices instead of the GPUs (tests use two logical CPUs). Called again
    (a re-run of the cell), it returns the strategy chosen first.
    """
    global _strategy
    import tensorflow as tf

    gpus = enable_memory_growth()
    cluster = cluster_from_environment()
    if _strategy is None:
        _strategy = _new_strategy(cluster, len(gpus), list(devices))
    local = tuple(_local_devices(_strategy))
    distribution = Distribution(
        strategy=_strategy,
        devices=local if len(local) > 1 else (),
        backbone_batch_size=choose_backbone_batch_size(backbone_batch_size, len(gpus), len(local)),
        num_workers=cluster.num_workers if cluster else 1,
        worker_index=cluster.worker_index if cluster else 0,
    )
    print(f"TensorFlow {tf.__version__}, {len(gpus)} GPU(s); {distribution.describe()}")
    return distribution


def choose_backbone_batch_size(configured: int, num_gpus: int, num_devices: int) -> int:
    """`configured` when above 0; else CPU_BACKBONE_BATCH_SIZE on a machine without GPUs, and
    GPU_BACKBONE_BATCH_PER_REPLICA per device (at least one) on a machine with GPUs."""
    if configured > 0:
        return int(configured)
    if num_gpus == 0:
        return CPU_BACKBONE_BATCH_SIZE
    return GPU_BACKBONE_BATCH_PER_REPLICA * max(1, num_devices)


def _new_strategy(cluster: Cluster | None, num_gpus: int, devices: list[str]) -> Any:
    """MultiWorkerMirroredStrategy with a cluster; MirroredStrategy over several devices."""
    import tensorflow as tf

    if cluster is not None:
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as err:  # "Collective ops must be configured at program startup"
            raise TLError(
                f"TF_CONFIG is set but TensorFlow is already running ({err}). Choose the "
                "distribution before anything else uses TensorFlow: restart the kernel and run "
                "the cells from the top."
            ) from err
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy(devices)
    if num_gpus > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _local_devices(strategy: Any) -> list[str]:
    """The strategy's devices on this machine; none for the default strategy."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list: default placement
        return []


def enable_memory_growth() -> list:
    """Let each GPU's memory grow as needed (not all taken at once); return the GPUs.

    Memory growth can only be set before TensorFlow initialises the GPUs; once they are, it
    stays as it was (a re-run in the same kernel).
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # GPUs already initialised: the setting cannot change any more
    return gpus


def reset_for_tests() -> None:
    """Forget the chosen strategy (tests that choose again in one process)."""
    global _strategy
    _strategy = None


# --------------------------------------------------------------------------- the chief's files


def for_this_worker(cfg: Config, distribution: Distribution) -> Config:
    """`cfg` on the chief; on another worker, outputs sent to a temporary folder.

    As TensorFlow's multi-worker guide recommends, a worker that is not the chief runs every
    step but writes its model, results and figures to a temporary folder, deleted when the
    process ends, and skips quantization and conversion (`chief` False); the feature store
    stays shared. Its quantization settings stay the chief's, so that fine-tuning trains on
    the same rows on every worker (`quantize.lower_quantization`).
    """
    if distribution.is_chief:
        return cfg
    scratch = tempfile.mkdtemp(prefix=f"tl-worker{distribution.worker_index}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    print(f"Worker {distribution.worker_index}: the chief writes the results; this one {scratch}")
    return dataclasses.replace(
        cfg,
        output_dir=Path(scratch, "output"),
        evaluate_result_dir=Path(scratch, "evaluation"),
        tensorboard_log_dir=Path(scratch, "tensorboard") if cfg.tensorboard_log_dir else None,
        chief=False,
    )
