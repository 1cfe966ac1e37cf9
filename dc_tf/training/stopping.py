"""When every worker stops together: preemption, --max_minutes, and the resume check.

A worker deciding alone to stop would leave its peers waiting in a collective, so each
worker asks at the same points and all get one answer from one all-reduce (our equivalent
of PreemptionCheckpointHandler). The same all-reduce checks, after a restore, that every
worker resumed from the same state.
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf

from dc_tf import distribute as dist
from dc_tf.training import checkpointing


class StopAgreement:
  """The stop flags of one worker, agreed over all workers; the stuck-peer watchdog.

  Args:
    strategy: the run's strategy.
    collective_timeout: --collective_timeout seconds; 0 (or a single worker) disables the
      watchdog.
  """

  def __init__(self, strategy: tf.distribute.Strategy, collective_timeout: float):
    self.strategy = strategy
    self._agree = self._make_agreement()
    # --collective_timeout: a worker whose collectives stall that long (a stopped peer) exits.
    self.watchdog = dist.Watchdog(
        collective_timeout if dist.num_workers_in_tf_config() > 1 else 0.0,
        f"worker {dist.worker_index(strategy)} of {dist.num_workers_in_tf_config()}")
    self._warm: set[str] = set()  # collective calls traced already (the first gets more time)
    # A SIGTERM handler (train.py) calls request_preemption(); `preempted` is what all
    # workers agreed on at the last should_stop(). The two are kept apart because the handler
    # runs between bytecodes on this thread: a request that arrives while the agreement's
    # all-reduce is blocked must survive the line that stores the (older) agreed answer.
    self._preemption_requested = False
    self.preempted = False
    self.deadline = float("inf")
    self.out_of_time = False

  def _make_agreement(self):
    """Sum over workers of a local flag: every worker learns that one was preempted, so
    all save at the same step."""
    strategy = self.strategy

    @tf.function
    def agree(flag):  # also sums small float64 vectors (see check_workers_agree)
      def fn(f):
        f = tf.identity(f)  # placed on the replica's device: MWMS needs a destination
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, f)
      return strategy.run(fn, args=(flag,))
    return agree

  def guard(self, what: str):
    """The watchdog armed for one call holding collectives; 10x the timeout the first time
    (tracing and compiling come before the first collective)."""
    grace = 1.0 if what in self._warm else 10.0
    self._warm.add(what)
    return self.watchdog.expect(what, grace)

  def request_preemption(self) -> None:
    """Asks every worker to save and stop at the next agreement (safe in a signal handler)."""
    self._preemption_requested = True

  def should_stop(self) -> bool:
    """True when any worker was preempted (SIGTERM) or reached its --max_minutes deadline.
    Every worker asks at the same points (the head of each epoch and of each loop of steps)
    and gets the same answer from one all-reduce, so all stop, and save, at the same step."""
    local = np.array([self._preemption_requested, time.time() >= self.deadline], np.float32)
    if self.strategy.num_replicas_in_sync > 1:
      n_local = dist.num_local_replicas(self.strategy)
      with self.guard("the stop agreement"):
        out = self._agree(dist.distribute_local(self.strategy, [local] * n_local))
        local = dist.first_local(self.strategy, out).numpy()
    self.preempted, self.out_of_time = bool(local[0] > 0), bool(local[1] > 0)
    return self.preempted or self.out_of_time

  def check_workers_agree(self, step: int, assignment_epoch: int, table_rows: int,
                          model_dir: str) -> None:
    """Workers that resumed from different checkpoints (one found none, or an older one)
    would train on misaligned state: compare (step, assignment epoch, table size) over all
    workers with one all-reduce of their sums and sums of squares, equal only if all agree."""
    if self.strategy.num_replicas_in_sync == 1 or dist.num_workers_in_tf_config() < 2:
      return
    mine = np.array([step, assignment_epoch, table_rows], np.float64)
    n_local = dist.num_local_replicas(self.strategy)
    local = [np.concatenate([mine, mine ** 2])] * n_local
    with self.guard("the stop agreement"):
      total = dist.first_local(self.strategy,
                               self._agree(dist.distribute_local(self.strategy, local))).numpy()
    n = self.strategy.num_replicas_in_sync
    if not np.allclose(n * total[3:], total[:3] ** 2, rtol=0, atol=0.5):
      mean = total[:3] / n
      raise checkpointing.CheckpointError(
          f"workers resumed from different checkpoints: worker {dist.worker_index(self.strategy)} "
          f"has step {int(mine[0])}, assignment epoch {int(mine[1])}, {int(mine[2])} table rows; "
          f"the mean over workers is step {mean[0]:.1f}. Make the chief's "
          f"{os.path.join(model_dir, 'ckpt')} readable by every worker "
          "(shared or copied) and restart all workers with the same command.")
