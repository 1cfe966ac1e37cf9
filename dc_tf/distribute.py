"""tf.distribute glue: which strategy, and per-replica values held in host memory.

MultiWorkerMirroredStrategy when TF_CONFIG names several workers, otherwise
MirroredStrategy over the local GPUs (or the default strategy on one device).
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf


def num_workers_in_tf_config() -> int:
  cfg = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
  cluster = cfg.get("cluster", {})
  return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def make_strategy(collective_timeout: float = 0.0) -> tf.distribute.Strategy:
  """The strategy for this process. `collective_timeout` (seconds, 0 = none) makes a
  collective fail instead of hanging when a peer is stopped or gone."""
  options = tf.distribute.experimental.CommunicationOptions(
      timeout_seconds=collective_timeout or None)
  if num_workers_in_tf_config() > 1:
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
  gpus = tf.config.list_logical_devices("GPU")
  if len(gpus) > 1:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True
  return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def worker_index(strategy) -> int:
  resolver = getattr(strategy, "cluster_resolver", None)
  return int(resolver.task_id or 0) if resolver is not None and resolver.task_type else 0


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
