"""The DeeperCluster training run: custom, under tf.distribute, resumable.

Per epoch: (every T epochs) reassign -> sample an epoch uniformly over clusters ->
`steps_per_loop` train steps per tf.function call -> checkpoint. Modes: deepercluster
(S = 4m super-classes, k sub-classes), rotnet (S = 4, no clustering), deepcluster
(m = 1, no rotation, k classes).

The run's state and its checkpoint live here; each phase has its own module, read in the
order `fit` calls them: dc_tf.training.reassignment (re-clustering), .epoch (one epoch's
sampling, input and loop), .step (one step on every replica), .stopping (when all workers
stop together, and the check that they resumed alike).
"""

from __future__ import annotations

import json
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from dc_tf import distribute as dist
from dc_tf import placement as placement_lib
from dc_tf.clustering import extract
from dc_tf.config import ExperimentConfig, UserError
from dc_tf.data import reader
from dc_tf.models import heads as heads_lib
from dc_tf.models import vgg
from dc_tf.training import checkpointing, losses, optim, reassignment, stopping
from dc_tf.training import epoch as epoch_lib
from dc_tf.training import step as step_lib


class Trainer:
  """Owns the model, optimizer, cluster state and checkpoints of one run.

  Args:
    config: a validated ExperimentConfig.
    strategy: from `dc_tf.distribute.make_strategy`.
  """

  def __init__(self, config: ExperimentConfig, strategy: tf.distribute.Strategy):
    self.config, self.strategy = config, strategy
    t, mc = config.train, config.model
    if t.jit_compile and strategy.num_replicas_in_sync > 1:
      # The trunk's synchronised batch norm all-reduces inside the compiled function, which
      # tf.distribute cannot nest (merge_call in a nested tf.function): refused up front, not
      # a deep RuntimeError at the first step (issue 25).
      raise UserError(
          f"--jit_compile runs on one replica only; this run has "
          f"{strategy.num_replicas_in_sync} (synchronised batch norm all-reduces inside the "
          "trunk, which XLA cannot compile under tf.distribute): drop --jit_compile")
    self.global_batch = t.batch_per_replica * strategy.num_replicas_in_sync
    self.is_chief = dist.is_chief(strategy)
    # --seed fixes the initial weights and dropout too (Python, NumPy, TF and Keras seeds),
    # so two runs of one command train alike; a resumed run restores them from its checkpoint.
    keras.utils.set_random_seed(t.seed)
    with strategy.scope():
      # --mixed_precision: the trunk computes in bfloat16 with float32 variables (no loss
      # scaling needed, unlike float16); the heads, the loss and the features stay float32.
      # The policy is set only while the trunk is built, so nothing else in the process
      # inherits it.
      previous_policy = keras.config.dtype_policy()
      keras.config.set_dtype_policy("mixed_bfloat16" if t.mixed_precision else previous_policy)
      try:
        self.trunk = vgg.trunk_from_config(mc)
      finally:
        keras.config.set_dtype_policy(previous_policy)
      self.super_head = heads_lib.SuperHead(config.num_super_classes, dtype="float32")
      self.super_head.build([None, mc.fc_units])
      self.variables = self.trunk.trainable_variables + self.super_head.trainable_variables
      self.optimizer = optim.SGD(self.variables, t.lr, t.momentum, t.weight_decay)
      self.step = tf.Variable(0, dtype=tf.int64, name="step", trainable=False)
      self.assignment_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False)
      # The step -> (epoch, position) mapping depends on the global batch: a run resumed
      # with another one would be silently misaligned, so it is saved and checked.
      self.saved_global_batch = tf.Variable(self.global_batch, dtype=tf.int64, trainable=False)
      # What an epoch is, fixed at the run's first start and restored on resume: the pool
      # is the record count before the first clustering and the table's size after it (bad
      # records drop out), so recomputing it would shift the epoch and lr of a resumed run.
      self.epoch_images = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.steps_per_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.sampling_seed = tf.Variable(t.seed, dtype=tf.int64, trainable=False)
    # Sub-heads: each replica holds only its pieces (dc_tf.placement), created on its own
    # device outside the strategy's scope, with their momentum beside them.
    self.placement = placement_lib.HeadPlacement(
        config.num_super_classes, config.num_sub_classes, strategy.num_replicas_in_sync)
    self.sub_heads = None
    if config.num_sub_classes:
      self.sub_heads = heads_lib.SubHeads(
          self.placement, mc.fc_units, placement_lib.local_replica_ids(strategy),
          dist.local_devices(strategy), seed=t.seed)
      self.local_optimizer = optim.LocalSGD(self.sub_heads.local_variables(), t.momentum,
                                            t.weight_decay)
    # Cluster state (explicit, checkpointed): the id -> (super, sub) table and the epoch
    # it was computed at, so a resumed run does not re-cluster. Every worker computes the
    # same table through collectives, so these are plain local variables (outside the
    # strategy scope: MWMS's initial broadcast of an unknown-shape variable crashes).
    none = tf.TensorShape(None)
    self.table_ids = tf.Variable(np.zeros([0], np.int64), shape=none, trainable=False)
    self.table_super = tf.Variable(np.zeros([0], np.int32), shape=none, trainable=False)
    self.table_sub = tf.Variable(np.zeros([0], np.int32), shape=none, trainable=False)
    self.checkpoint = tf.train.Checkpoint(
        global_batch=self.saved_global_batch, epoch_images=self.epoch_images,
        steps_per_epoch=self.steps_per_epoch, sampling_seed=self.sampling_seed,
        trunk=self.trunk, super_head=self.super_head, optimizer=self.optimizer, step=self.step,
        table_ids=self.table_ids, table_super=self.table_super, table_sub=self.table_sub,
        assignment_epoch=self.assignment_epoch)
    ckpt_dir = os.path.join(t.model_dir, "ckpt")
    if not self.is_chief:  # only the chief writes the real checkpoint
      ckpt_dir = os.path.join(t.model_dir, "tmp", f"worker-{dist.worker_index(strategy)}")
    self.manager = tf.train.CheckpointManager(self.checkpoint, ckpt_dir, t.keep_checkpoints)
    self.writer = (tf.summary.create_file_writer(os.path.join(t.model_dir, "tb"))
                   if self.is_chief else tf.summary.create_noop_writer())
    self._train_loop = step_lib.TrainStep(
        strategy, self.trunk, self.super_head, self.sub_heads, self.placement, self.optimizer,
        self.local_optimizer if self.sub_heads is not None else None, self.global_batch,
        self.step, jit_compile=t.jit_compile).loop()
    self.stopping = stopping.StopAgreement(strategy, t.collective_timeout)
    self.previous_labels: np.ndarray | None = None   # the last table's labels, for its NMI
    self.history: list[dict] = []

  # --- the phases (each in its own module) ----------------------------------------------
  def reassign(self, epoch: int) -> dict:
    """Extracts fc7 of every image, whitens, clusters hierarchically, re-inits heads."""
    return reassignment.reassign(self, epoch)

  def reinitialize_heads(self, epoch: int) -> None:
    reassignment.reinitialize_heads(self, epoch)

  def request_preemption(self) -> None:
    """Asks every worker to save and stop at the next agreement (safe in a signal handler)."""
    self.stopping.request_preemption()

  def should_stop(self) -> bool:
    """True when any worker was preempted or reached --max_minutes (agreed by all)."""
    return self.stopping.should_stop()

  @property
  def preempted(self) -> bool:
    return self.stopping.preempted

  @property
  def out_of_time(self) -> bool:
    return self.stopping.out_of_time

  # --- the run -------------------------------------------------------------------------
  def _pool_size(self) -> int:
    if self.config.uses_clustering and len(self.table_ids.numpy()):
      return len(self.table_ids.numpy())
    # Before any clustering: the shards' manifests, not a read of every record on every
    # worker (~10 TB at 96M photos); a shard set without one is counted once, cached here.
    return reader.pool_size(self.config.data.data_pattern, cache_dir=self.config.train.model_dir)

  def _latest_checkpoint(self) -> str | None:
    """The checkpoint to resume from. Every worker prefers the chief's (MODEL_DIR/ckpt, when
    it can read it: a shared or copied folder): after a crash the chief's is the one that is
    known to be complete. A worker that cannot read it falls back to its own copy."""
    chief_dir = os.path.join(self.config.train.model_dir, "ckpt")
    return (tf.train.latest_checkpoint(chief_dir) if tf.io.gfile.isdir(chief_dir) else None) \
        or self.manager.latest_checkpoint

  def restore(self) -> bool:
    latest = self._latest_checkpoint()
    if latest:
      saved = tf.train.load_checkpoint(latest)
      key = "global_batch/.ATTRIBUTES/VARIABLE_VALUE"
      if saved.has_tensor(key) and int(saved.get_tensor(key)) != self.global_batch:
        raise checkpointing.CheckpointError(
            f"{latest} was written with a global batch of {int(saved.get_tensor(key))}; this run "
            f"has {self.global_batch} ({self.strategy.num_replicas_in_sync} replicas x "
            f"--batch_per_replica={self.config.train.batch_per_replica}). Resuming would misalign "
            "the epoch position: set --batch_per_replica so that the global batch is unchanged "
            "(the cluster table and sampler are global, so any worker count works then).")
      self.checkpoint.restore(latest)
      if self.sub_heads is not None:
        checkpointing.restore_pieces(self.config.train.model_dir, int(latest.rsplit("-", 1)[1]),
                                     self._piece_fields(), self.strategy.num_replicas_in_sync)
      logging.info("resumed from %s at step %d", latest, int(self.step.numpy()))
      if len(self.table_ids.numpy()):
        self.previous_labels = (self.table_super.numpy().astype(np.int64) * self.config.clustering.k
                                + self.table_sub.numpy())
        # A crash between the checkpoint and the table's file loses no table: the restored
        # one is written if missing; kept tables are never rewritten on resume.
        epoch = int(self.assignment_epoch.numpy())
        if self.is_chief and epoch not in checkpointing.assignment_epochs(
            self.config.train.model_dir):
          reassignment.keep_table(self, epoch)
    elif self.config.train.init_checkpoint:
      step = checkpointing.restore_trunk(self.trunk, self.config.train.init_checkpoint,
                                         self.config.model)
      logging.info("trunk initialised from %s (step %d)", self.config.train.init_checkpoint, step)
    elif self.config.train.require_init_checkpoint:
      raise checkpointing.CheckpointError(
          f"no checkpoint in {self.config.train.model_dir} and no --init_checkpoint: this preset "
          "starts from a trained trunk (the paper's DeeperCluster starts from RotNet: train "
          "flags/rotnet_yfcc100m.cfg first, then pass --init_checkpoint=runs/rotnet_yfcc100m), "
          "or pass --require_init_checkpoint=false to start from random weights")
    self.stopping.check_workers_agree(int(self.step.numpy()), int(self.assignment_epoch.numpy()),
                                      len(self.table_ids.numpy()), self.config.train.model_dir)
    return bool(latest)

  def _log(self, record: dict) -> None:
    self.history.append(record)
    logging.info("%s", json.dumps(record))
    if self.is_chief:
      with tf.io.gfile.GFile(os.path.join(self.config.train.model_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")

  def _piece_fields(self) -> dict[str, dict]:
    """{piece name: {field: variable}} of this worker's sub-head pieces and their momentum."""
    slot = self.local_optimizer.slot
    return {name: {"kernel": k, "bias": b, "kernel_momentum": slot(k), "bias_momentum": slot(b)}
            for name, (_, k, b) in self.sub_heads.by_name().items()}

  def save(self) -> None:
    """The run's checkpoint at the current step (and this worker's sub-head pieces)."""
    step = int(self.step.numpy())
    if self.sub_heads is not None:  # every worker its own pieces, before the run's checkpoint
      checkpointing.save_pieces(self.config.train.model_dir, dist.worker_index(self.strategy),
                                step, self._piece_fields(), self.strategy.num_replicas_in_sync,
                                self.config.train.keep_checkpoints)
    self.manager.save(checkpoint_number=step)

  def fit(self, max_seconds: float = 0.0) -> list[dict]:
    cfg, t = self.config, self.config.train
    self.restore()
    # The training pipeline repeats until it fills its steps: over a pool with no decodable
    # image it would search forever. Clustering modes find out while extracting; otherwise
    # look for one image now (raises DataError naming the pattern).
    if not cfg.uses_clustering or t.rotnet_warmup_epochs:
      extract.extract(self.trunk, cfg.data.data_pattern, image_size=cfg.model.image_size,
                      batch_size=16, max_images=1, progress=False)
    warmup = t.rotnet_warmup_epochs if cfg.train.mode == "deepercluster" else 0
    if cfg.uses_clustering and not warmup and int(self.assignment_epoch.numpy()) < 0:
      self._log(self.reassign(0))
      self.save()
    if not int(self.steps_per_epoch.numpy()):
      epoch_images = t.epoch_size or max(1, int(t.epoch_fraction * self._pool_size()))
      per_step = self.global_batch // cfg.num_rotations if t.all_rotations else self.global_batch
      self.epoch_images.assign(epoch_images)
      self.steps_per_epoch.assign(max(1, epoch_images // max(per_step, 1)))
    steps_per_epoch = int(self.steps_per_epoch.numpy())
    total_steps = steps_per_epoch * t.epochs
    lrs = losses.learning_rates(total_steps, t.lr, int(t.warmup_epochs * steps_per_epoch),
                                t.schedule)
    start = time.time()
    self.stopping.deadline = start + max_seconds if max_seconds else float("inf")
    while int(self.step.numpy()) < total_steps and not self.should_stop():
      step = int(self.step.numpy())
      epoch, done = divmod(step, steps_per_epoch)
      # Reassign every T epochs, counted from the end of the rotation warm-up.
      since = epoch - warmup
      period_start = warmup + since - since % cfg.clustering.reassign_every
      if (cfg.uses_clustering and epoch >= warmup
          and int(self.assignment_epoch.numpy()) < period_start):
        self._log(self.reassign(epoch))
        self.save()
      record = epoch_lib.train_epoch(self, epoch, done, steps_per_epoch, lrs)
      self._log(record)
      self.save()
    if int(self.step.numpy()) < total_steps:
      logging.info("stopped at step %d after %.0f s (%s); the same command resumes",
                   int(self.step.numpy()), time.time() - start,
                   "preempted" if self.preempted else "--max_minutes")
    return self.history

  def export(self, export_dir: str) -> dict | None:
    if not self.is_chief:
      return None
    from dc_tf import export as export_lib
    cfg, step = self.config, int(self.step.numpy())
    return export_lib.export(
        self.trunk, export_dir, image_size=cfg.model.image_size, config=cfg.to_dict(),
        step=step, epoch=checkpointing.epoch_of(step, int(self.steps_per_epoch.numpy())),
        training_data=cfg.data.data_pattern, weight_decay=cfg.train.weight_decay)
