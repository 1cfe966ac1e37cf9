"""tf.distribute glue: which strategy, and per-replica values held in host memory.

MultiWorkerMirroredStrategy when TF_CONFIG names several workers, otherwise
MirroredStrategy over the local GPUs (or the default strategy on one device). TF_CONFIG is
as Kubeflow's TFJob or Vertex AI set it, or, with --cluster=slurm, built from the SLURM job
step by TF's SlurmClusterResolver (`set_up_cluster`).

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
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import tensorflow as tf

from dc_tf.config import UserError


def num_workers_in_tf_config() -> int:
  cfg = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
  cluster = cfg.get("cluster", {})
  return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


# --cluster: where this process learns its place in the job (docs/launching-on-a-cluster.md).
CLUSTERS = ("tf_config", "slurm")
# What SlurmClusterResolver reads; srun sets all four for every task of a job step.
SLURM_STEP_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                        "SLURM_STEP_TASKS_PER_NODE")


def slurm_gpus_per_node() -> int | None:
  """The GPUs SlurmClusterResolver may share out among this node's tasks: None when
  CUDA_VISIBLE_DEVICES is already set (SLURM's --gpus-per-task binding, or the user's: kept as
  is; the resolver would renumber it), else what `nvidia-smi --list-gpus` lists, and 0 where
  nvidia-smi is missing or fails (a CPU node; the resolver itself would raise)."""
  if "CUDA_VISIBLE_DEVICES" in os.environ:
    return None
  if not shutil.which("nvidia-smi"):
    return 0
  try:
    out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return 0
  return sum(line.startswith("GPU ") for line in out.splitlines())


def tf_config_from_slurm(port_base: int = 8888, gpus_per_node: int | None = None) -> dict:
  """TF_CONFIG for this SLURM task, from TF's own SlurmClusterResolver: every task a
  'worker' (worker 0, SLURM_PROCID 0, is the chief), at NODE:port_base + its rank on the node.

  Args:
    port_base: the first task of each node listens here, the next on port_base + 1, ...
    gpus_per_node: > 0: the resolver splits them between the node's tasks and sets this task's
      CUDA_VISIBLE_DEVICES (as it does by default); 0 or None (`slurm_gpus_per_node`): it only
      lays out addresses, and each task keeps the devices it sees. Only the cluster and task
      go into TF_CONFIG, so MWMS counts the devices it finds instead of asking the resolver
      for GPUs a CPU node does not have.

  Raises:
    UserError: outside a SLURM job step (naming the missing variables), or a layout the
      resolver gets wrong or refuses.
  """
  env = os.environ
  missing = [v for v in SLURM_STEP_VARIABLES if not env.get(v)]
  if missing:
    raise UserError(f"--cluster=slurm: {', '.join(missing)} not set: this is not a task of a "
                    "SLURM job step. Start train.py with srun inside the job (the sbatch "
                    "script in docs/launching-on-a-cluster.md), or use --cluster=tf_config.")
  num_tasks = int(env["SLURM_STEP_NUM_TASKS"])
  per_node = max(int(re.match(r"\d+", part).group())
                 for part in env["SLURM_STEP_TASKS_PER_NODE"].split(","))
  if gpus_per_node and gpus_per_node < per_node:
    raise UserError(f"--cluster=slurm: {gpus_per_node} GPU(s) on this node for {per_node} "
                    "tasks: run at most one task per GPU (--ntasks-per-node), or bind GPUs to "
                    "tasks yourself (--gpus-per-task=1 sets CUDA_VISIBLE_DEVICES)")
  if gpus_per_node:
    kwargs = dict(gpus_per_node=gpus_per_node)
  else:  # one pretend GPU slot per task: the resolver's port layout, no devices touched
    kwargs = dict(gpus_per_node=num_tasks, gpus_per_task=1, auto_set_gpu=False)
  try:
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port_base, **kwargs)
    cluster = resolver.cluster_spec().as_dict()
  except (RuntimeError, ValueError) as e:
    raise UserError(f"--cluster=slurm: SlurmClusterResolver: {e}") from e
  task_type, task_id = resolver.get_task_info()
  # The resolver sorts node names as strings (node10 before node2) and gives ranks out node by
  # node; SLURM numbers the nodes by number, and --distribution=cyclic deals ranks round the
  # nodes. Either way a rank would be told another node's address and the job would hang.
  host = cluster[task_type][task_id].rsplit(":", 1)[0]
  node = env.get("SLURMD_NODENAME")
  if node and host.split(".")[0] != node.split(".")[0]:
    raise UserError(
        f"--cluster=slurm: SlurmClusterResolver puts task {env['SLURM_PROCID']} on {host}, but "
        f"it runs on {node}: the resolver orders nodes by name (node10 before node2) and ranks "
        "node by node. Use nodes whose names sort in SLURM's order (node[01-16]) and block "
        "distribution, or set TF_CONFIG on each task yourself (--cluster=tf_config).")
  return {"cluster": cluster, "task": {"type": task_type, "index": task_id}}


def set_up_cluster(cluster: str = "tf_config", slurm_port_base: int = 8888) -> None:
  """Makes TF_CONFIG say where this process is in the job; called once at the edge, before
  the strategy is built. "tf_config": as set by Kubeflow's TFJob, Vertex AI or the user (none:
  one worker). "slurm": built from the SLURM job step (`tf_config_from_slurm`)."""
  if cluster not in CLUSTERS:
    raise UserError(f"--cluster={cluster}: expected one of {', '.join(CLUSTERS)}")
  tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)
  if cluster == "tf_config":
    if tasks > 1 and not os.environ.get("TF_CONFIG"):
      raise UserError(f"--cluster=tf_config: this is one of {tasks} tasks of a SLURM job step "
                      "but TF_CONFIG is not set, so each would train alone into the same "
                      "--model_dir: pass --cluster=slurm")
    return
  if os.environ.get("TF_CONFIG"):
    raise UserError("--cluster=slurm builds TF_CONFIG from the SLURM job step, but TF_CONFIG "
                    "is already set (exported into the job?): unset it, or keep it with "
                    "--cluster=tf_config")
  tf_config = tf_config_from_slurm(slurm_port_base, slurm_gpus_per_node())
  os.environ["TF_CONFIG"] = json.dumps(tf_config)
  logging.info("--cluster=slurm: %s %d of %d, cluster %s", tf_config["task"]["type"],
               tf_config["task"]["index"], num_workers_in_tf_config(), tf_config["cluster"])


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


def make_strategy(cpu_replicas: int = 0, local_only: bool = False) -> tf.distribute.Strategy:
  """The strategy for this process; `cpu_replicas` > 1: that many replicas per worker on
  logical CPU devices (testing aid, see above). A stopped peer is caught by `Watchdog`.
  `local_only`: this machine's devices alone, whatever TF_CONFIG says (evaluate.py)."""
  options = tf.distribute.experimental.CommunicationOptions()
  several_workers = num_workers_in_tf_config() > 1 and not local_only
  if cpu_replicas > 1:
    devices = use_cpu_replicas(cpu_replicas)
    if several_workers:
      return _mwms_with_cpu_replicas(cpu_replicas, options)
    return tf.distribute.MirroredStrategy(devices)
  if several_workers:
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
