"""tf.distribute glue: which strategy, and per-replica values held in host memory.

MultiWorkerMirroredStrategy when TF_CONFIG names several workers, otherwise
MirroredStrategy over the local GPUs (or the default strategy on one device).

Workers are numbered as MWMS numbers them (`worker_index`): the chief first, then the
workers; replica ids follow, worker by worker (`dc_tf.placement.local_replica_ids`).

`cpu_replicas` > 1 runs that many replicas per worker on logical CPU devices, so layouts of
several replicas per worker (a machine with 8 GPUs) can be run and tested on a CPU box.
MWMS itself gives a CPU-only worker one device; for this testing aid its device list is
replaced with the logical CPUs (a private hook of TF 2.21, used for CPU replicas only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time

import numpy as np
import tensorflow as tf


def num_workers_in_tf_config() -> int:
  cfg = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
  cluster = cfg.get("cluster", {})
  return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def use_cpu_replicas(n: int) -> list[str]:
  """Splits the CPU into n logical devices (before TensorFlow starts); returns their names."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu) or []
  if len(current) < n:
    try:
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
      raise RuntimeError(f"cannot make {n} CPU replicas: TensorFlow has already started "
                         f"with {max(len(current), 1)} CPU device(s)") from e
  return [f"/cpu:{i}" for i in range(n)]


def _mwms_with_cpu_replicas(n: int, options):
  from tensorflow.python.distribute import collective_all_reduce_strategy as cars
  extended = cars.CollectiveAllReduceExtended
  original = extended._initialize_local_devices

  def cpu_devices(self, cluster_resolver, worker_device):
    del cluster_resolver
    return tuple(f"{worker_device}/device:CPU:{i}" for i in range(n)), "CPU"
  extended._initialize_local_devices = cpu_devices
  try:
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
  finally:
    extended._initialize_local_devices = original


def make_strategy(cpu_replicas: int = 0) -> tf.distribute.Strategy:
  """The strategy for this process; `cpu_replicas` > 1: that many replicas per worker on
  logical CPU devices (testing aid, see above). A stopped peer is caught by `Watchdog`."""
  options = tf.distribute.experimental.CommunicationOptions()
  if cpu_replicas > 1:
    devices = use_cpu_replicas(cpu_replicas)
    if num_workers_in_tf_config() > 1:
      return _mwms_with_cpu_replicas(cpu_replicas, options)
    return tf.distribute.MirroredStrategy(devices)
  if num_workers_in_tf_config() > 1:
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
  gpus = tf.config.list_logical_devices("GPU")
  if len(gpus) > 1:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """The one worker that writes the run's checkpoint, summaries and export."""
  return worker_index(strategy) == 0


def worker_index(strategy) -> int:
  """This worker's index among all training workers: 0 for the chief (or worker 0 when
  TF_CONFIG names no chief), then the workers in order; the same numbering MWMS uses for
  its replica ids. Evaluators do not train and have no index."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return 0
  task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
  if task_type == "chief":
    return 0
  if task_type == "worker":
    return task_id + len(resolver.cluster_spec().as_dict().get("chief", []))
  raise ValueError(f"TF_CONFIG task type {task_type!r} does not train: only 'chief' and "
                   "'worker' tasks run train.py")


def local_devices(strategy) -> list[str | None]:
  """This worker's replica devices (None: the default strategy's one device)."""
  try:
    return list(strategy.extended.worker_devices)
  except RuntimeError:
    return [None]


def num_local_replicas(strategy) -> int:
  try:
    return len(strategy.extended.worker_devices)
  except RuntimeError:  # the default strategy: one replica, this process
    return 1


def distribute_local(strategy, local_values: list) -> tf.distribute.DistributedValues:
  """Per-replica values from this worker's list (one entry per local replica)."""
  n_local = num_local_replicas(strategy)
  if len(local_values) != n_local:
    raise ValueError(f"expected {n_local} local values, got {len(local_values)}")

  def value_fn(ctx):
    return tf.convert_to_tensor(local_values[ctx.replica_id_in_sync_group % n_local])
  return strategy.experimental_distribute_values_from_function(value_fn)


def first_local(strategy, value):
  """The value of the first local replica (for all-reduced results, all are equal)."""
  return strategy.experimental_local_results(value)[0]


def all_local(strategy, value) -> list[np.ndarray]:
  return [v.numpy() for v in strategy.experimental_local_results(value)]


def split_local(strategy, array: np.ndarray) -> list[np.ndarray]:
  """Splits this worker's rows between its local replicas."""
  return list(np.array_split(array, num_local_replicas(strategy)))


class Watchdog:
  """The stuck-peer guard: a worker whose collective makes no progress for `timeout` seconds
  (a peer stopped, dead or unreachable) exits non-zero instead of waiting forever.

  One thread for the whole process, armed only around calls that hold collectives
  (`expect`) and pushed back by `beat` (each k-means iteration). TensorFlow's own
  per-collective timeout (CommunicationOptions.timeout_seconds) starts a timer thread per
  collective call, each living for the whole timeout; at a few hundred collectives a second
  they exhaust the process's threads ("std::system_error: Resource temporarily
  unavailable", issue 16), so it is not used.

  Args:
    timeout: seconds; 0 disables the guard (every method is then a no-op).
    describe: the worker's name for the message, e.g. "worker 0 of 2".
  """

  EXIT_CODE = 3

  def __init__(self, timeout: float, describe: str = "worker"):
    self.timeout, self.describe = timeout, describe
    self._deadline: float | None = None
    self._what = ""
    self._lock = threading.Lock()
    if timeout:
      threading.Thread(target=self._watch, daemon=True, name="collective-watchdog").start()

  @contextlib.contextmanager
  def expect(self, what: str, grace: float = 1.0):
    """Arms the guard for a call that holds collectives; `grace` multiplies the timeout (a
    first call traces and compiles before its first collective)."""
    if not self.timeout:
      yield
      return
    with self._lock:
      outer = (self._deadline, self._what)
      self._deadline, self._what = time.monotonic() + grace * self.timeout, what
    try:
      yield
    finally:
      with self._lock:
        self._deadline, self._what = outer if outer[0] is None else (
            time.monotonic() + self.timeout, outer[1])

  def beat(self) -> None:
    """Progress inside an armed call: the deadline moves to `timeout` from now."""
    with self._lock:
      if self._deadline is not None:
        self._deadline = max(self._deadline, time.monotonic() + self.timeout)

  def _watch(self) -> None:
    period = min(1.0, self.timeout / 20)
    while True:
      time.sleep(period)
      with self._lock:
        late = self._deadline is not None and time.monotonic() > self._deadline
        what = self._what
      if late:
        message = (f"{self.describe}: a collective failed: no progress in {what} for "
                   f"{self.timeout:g} s (--collective_timeout): a peer worker is stopped, dead, "
                   "crashed or unreachable. Restart every worker with the same command: "
                   "training resumes from the last checkpoint in --model_dir.")
        logging.error("%s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(self.EXIT_CODE)
