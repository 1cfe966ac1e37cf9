"""The DeeperCluster training loop: custom, under tf.distribute, resumable.

Per epoch: (every T epochs) reassign -> sample an epoch uniformly over clusters ->
`steps_per_loop` train steps per tf.function call -> checkpoint. Modes: deepercluster
(S = 4m super-classes, k sub-classes), rotnet (S = 4, no clustering), deepcluster
(m = 1, no rotation, k classes).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import normalized_mutual_info_score
from tqdm import tqdm

from dc_tf import distribute as dist
from dc_tf import placement as placement_lib
from dc_tf.clustering import extract, hierarchy
from dc_tf.clustering import replicas as replicas_lib
from dc_tf.config import ExperimentConfig, UserError
from dc_tf.data import preprocess, reader, sampler
from dc_tf.models import heads as heads_lib
from dc_tf.models import vgg
from dc_tf.training import checkpointing, losses, optim

COLLAPSE_SHARE = 0.5     # one cluster holding more than this share of the images: alarm
METRICS = ("loss", "super_loss", "sub_loss", "super_correct", "sub_correct")


@tf.custom_gradient
def _dense_gradient(x):
  """Identity whose gradient is dense. The gradients of all_gather and all_reduce are
  collectives that need the same kind of tensor on every replica; gathering rows of the
  global batch gives IndexedSlices on some replicas and dense zeros on others."""
  return tf.identity(x), tf.convert_to_tensor


class TrainingDiverged(RuntimeError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


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
    self._features = (tf.function(self._trunk_features, jit_compile=True) if t.jit_compile
                      else self._trunk_features)
    self._train_loop = self._make_train_loop()
    self._agree = self._make_agreement()
    # --collective_timeout: a worker whose collectives stall that long (a stopped peer) exits.
    self.watchdog = dist.Watchdog(
        t.collective_timeout if dist.num_workers_in_tf_config() > 1 else 0.0,
        f"worker {dist.worker_index(strategy)} of {dist.num_workers_in_tf_config()}")
    self._warm: set[str] = set()  # collective calls traced already (the first gets more time)
    # A SIGTERM handler (train.py) calls request_preemption(); `preempted` is what all
    # workers agreed on at the last should_stop(). The two are kept apart because the handler
    # runs between bytecodes on this thread: a request that arrives while the agreement's
    # all-reduce is blocked must survive the line that stores the (older) agreed answer.
    self._preemption_requested = False
    self.preempted = False
    self.previous_labels: np.ndarray | None = None
    self._deadline = float("inf")
    self.out_of_time = False
    self.history: list[dict] = []

  # --- one step ------------------------------------------------------------------------
  def _trunk_features(self, images):
    """ReLU(fc7) of this replica's images. It holds no collective, so XLA can compile it,
    and its gradient, whole (--jit_compile); the heads and the collectives follow outside."""
    # The training pipeline hands over uint8 pixels: normalised here, on the replica's device.
    out = self.trunk(preprocess.normalize(images), training=True)
    return tf.nn.relu(tf.cast(out["fc7"], tf.float32))  # heads take ReLU(fc7)

  def _replica_step(self, batch):
    """Forward, backward and update on one replica. Trunk and V: gradients summed over all
    replicas (each replica's loss is already divided by the global batch). Sub-heads: this
    replica's pieces score the global batch's features, gathered, and are updated here with
    the per-super-class mean gradient (dc_tf.training.losses states the semantics)."""
    ctx = tf.distribute.get_replica_context()
    n, many = self.global_batch, self.strategy.num_replicas_in_sync > 1
    pieces = []
    if self.sub_heads is not None:
      pieces = self.sub_heads.of_replica(int(tf.get_static_value(ctx.replica_id_in_sync_group)))
    piece_vars = [v for _, kernel, bias in pieces for v in (kernel, bias)]
    # tf.identity places each collective's input on this replica's device (MWMS needs one).
    gather = (lambda x: _dense_gradient(ctx.all_gather(tf.identity(x), axis=0))) if many \
        else tf.identity
    with tf.GradientTape() as tape:
      h = self._features(batch["image"])
      terms = losses.super_class_loss(self.super_head(h), batch["super_class"], n)
      if self.sub_heads is not None:
        h_all, super_all, sub_all = (gather(h), gather(batch["super_class"]),
                                     gather(batch["sub_class"]))
        terms.update(losses.partitioned_sub_loss(
            h_all, super_all, sub_all, pieces, global_batch_size=n,
            sharded=self.placement.sharded,
            cross_replica_max=lambda x: tf.reduce_max(
                ctx.all_gather(tf.identity(x[None]), axis=0), axis=0),
            cross_replica_sum=lambda x: _dense_gradient(
                ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(x)))))
      else:
        terms.update(sub_loss=tf.constant(0.0), sub_correct=tf.constant(0.0))
      terms["loss"] = terms["super_loss"] + terms["sub_loss"]
    grads = tape.gradient(terms["loss"], self.variables + piece_vars)
    shared = optim.sum_gradients(grads[:len(self.variables)])
    ctx.merge_call(lambda strategy, g: self.optimizer.apply(g), args=(shared,))
    if pieces:
      local = grads[len(self.variables):]
      updates = []
      for i, (piece, kernel, bias) in enumerate(pieces):
        scale = losses.sub_head_gradient_scale(super_all, sub_all, piece.head, n)
        updates += [(local[2 * i] * scale, kernel), (local[2 * i + 1] * scale, bias)]
      self.local_optimizer.apply(updates, self.optimizer.learning_rate)
    terms["skipped"] = tf.cast(tf.reduce_max(batch["skipped"]), tf.float32)
    return terms

  def _make_train_loop(self):
    strategy = self.strategy

    def loop(iterator, steps):
      totals = {k: tf.constant(0.0) for k in (*METRICS, "skipped")}
      for _ in tf.range(steps):
        terms = strategy.run(self._replica_step, args=(next(iterator),))
        reduced = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, terms[k], axis=None)
                   for k in (*METRICS, "skipped")}
        # Rebind (not mutate) the dict, so autograph carries it as a loop variable.
        totals = {k: (tf.maximum(totals[k], reduced[k]) if k == "skipped"
                      else totals[k] + reduced[k]) for k in totals}
        self.step.assign_add(1)
      return totals
    return tf.function(loop, jit_compile=False)

  def _make_agreement(self):
    """Sum over workers of a local flag: every worker learns that one was preempted, so
    all save at the same step (our equivalent of PreemptionCheckpointHandler)."""
    strategy = self.strategy

    @tf.function
    def agree(flag):  # also sums small float64 vectors (see _check_workers_agree)
      def fn(f):
        f = tf.identity(f)  # placed on the replica's device: MWMS needs a destination
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, f)
      return strategy.run(fn, args=(flag,))
    return agree

  def _guard(self, what: str):
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
    and gets the same answer from one all-reduce, so all stop, and save, at the same step; a
    worker deciding alone would leave the others waiting in a collective."""
    local = np.array([self._preemption_requested, time.time() >= self._deadline], np.float32)
    if self.strategy.num_replicas_in_sync > 1:
      n_local = dist.num_local_replicas(self.strategy)
      with self._guard("the stop agreement"):
        out = self._agree(dist.distribute_local(self.strategy, [local] * n_local))
        local = dist.first_local(self.strategy, out).numpy()
    self.preempted, self.out_of_time = bool(local[0] > 0), bool(local[1] > 0)
    return self.preempted or self.out_of_time

  # --- reassignment --------------------------------------------------------------------
  def reassign(self, epoch: int) -> dict:
    """Extracts fc7 of every image, whitens, clusters hierarchically, re-inits heads."""
    cfg, t0 = self.config, time.time()
    logging.info("reassignment at epoch %d: extracting features, then k-means", epoch)
    # Every local replica extracts its share on its device; the rows stay in host memory,
    # one array per replica, for the clustering's per-replica passes (issue 25).
    feats = extract.extract_per_replica(
        self.strategy, self.trunk, cfg.data.data_pattern, image_size=cfg.model.image_size,
        batch_size=max(self.config.train.batch_per_replica, 128), progress=self.is_chief,
        dtype=np.dtype(cfg.clustering.feature_dtype))
    local_f = [f.pop("fc7") for f in feats]
    local_ids = [f["image_id"] for f in feats]
    skipped = max(f["skipped"] for f in feats)
    c = cfg.clustering
    traffic = replicas_lib.Traffic()
    with self._guard("clustering"):
      assignment = hierarchy.cluster(
          self.strategy, local_f, local_ids, m=cfg.num_super_clusters, k=c.k,
          iters=c.kmeans_iters, pca_dim=c.pca_dim, pca_sample=c.pca_sample,
          seed=c.seed + 1000 * epoch, init=c.kmeans_init, chunk_size=c.chunk_size,
          progress=self.watchdog.beat,
          fit_sample=c.fit_sample // dist.num_local_replicas(self.strategy), in_place=True,
          traffic=traffic)
    del local_f   # whitened in place by the clustering; not needed any more
    self.table_ids.assign(assignment.image_ids)
    self.table_super.assign(assignment.super_cluster)
    self.table_sub.assign(assignment.sub_cluster)
    self.assignment_epoch.assign(epoch)
    if cfg.train.reinit_heads:
      self.reinitialize_heads(epoch)
    labels = assignment.flat_labels
    sizes = np.bincount(labels)
    stats = {"event": "reassign", "epoch": epoch, "images": int(len(labels)),
             "seconds": round(time.time() - t0, 2), "empty_resplit": assignment.resplit,
             "nonempty_clusters": int((sizes > 0).sum()),
             "largest_cluster_share": float(sizes.max() / len(labels)),
             "skipped_records": int(skipped),
             "host_to_device_bytes": traffic.to_device,
             "device_to_host_bytes": traffic.from_device,
             "cross_replica_bytes": traffic.cross_replica}
    if stats["largest_cluster_share"] > COLLAPSE_SHARE:
      logging.warning("collapse alarm: one cluster holds %.0f%% of the images (> %.0f%%): "
                      "features may be collapsing (lower --lr, check the data)",
                      100 * stats["largest_cluster_share"], 100 * COLLAPSE_SHARE)
      stats["collapse_alarm"] = True
    if self.previous_labels is not None and len(self.previous_labels) == len(labels):
      stats["nmi_previous"] = float(normalized_mutual_info_score(self.previous_labels, labels))
    self.previous_labels = labels
    if cfg.train.knn_monitor and cfg.data.eval_pattern:
      stats["knn_top1"] = self._knn_monitor()
    with self.writer.as_default(step=int(self.step.numpy())):
      tf.summary.histogram("clusters/sizes", sizes)
      for key in ("nmi_previous", "knn_top1", "largest_cluster_share", "empty_resplit"):
        if key in stats:
          tf.summary.scalar(f"clusters/{key}", stats[key])
    return stats

  def reinitialize_heads(self, epoch: int) -> None:
    """Fresh sub-heads (and V when the super-clusters changed, m > 1) with zero momentum:
    the new pseudo-labels have no relation to the old ones."""
    seed = self.config.train.seed + 7919 * (epoch + 1)
    if self.sub_heads is not None:
      self.local_optimizer.reset_slots(self.sub_heads.reinitialize(seed))
    if self.config.num_super_clusters > 1:
      self.optimizer.reset_slots(self.super_head.reinitialize(seed))

  def _knn_monitor(self) -> float:
    """Leave-one-out 20-NN (cosine) top-1 on the labelled eval slice: are features forming?"""
    from dc_tf.evaluation import metrics
    try:
      feats = extract.extract(self.trunk, self.config.data.eval_pattern,
                              image_size=self.config.model.image_size, progress=False)
    except reader.DataError as e:
      logging.warning("kNN monitor off: %s", e)
      return float("nan")
    if (feats["label"] < 0).all():
      return float("nan")
    return metrics.knn_leave_one_out(feats["fc7"], feats["label"])

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
    self._check_workers_agree()
    return bool(latest)

  def _check_workers_agree(self) -> None:
    """Workers that resumed from different checkpoints (one found none, or an older one)
    would train on misaligned state: compare (step, assignment epoch, table size) over all
    workers with one all-reduce of their sums and sums of squares, equal only if all agree."""
    if self.strategy.num_replicas_in_sync == 1 or dist.num_workers_in_tf_config() < 2:
      return
    mine = np.array([int(self.step.numpy()), int(self.assignment_epoch.numpy()),
                     len(self.table_ids.numpy())], np.float64)
    n_local = dist.num_local_replicas(self.strategy)
    local = [np.concatenate([mine, mine ** 2])] * n_local
    with self._guard("the stop agreement"):
      total = dist.first_local(self.strategy,
                               self._agree(dist.distribute_local(self.strategy, local))).numpy()
    n = self.strategy.num_replicas_in_sync
    if not np.allclose(n * total[3:], total[:3] ** 2, rtol=0, atol=0.5):
      mean = total[:3] / n
      raise checkpointing.CheckpointError(
          f"workers resumed from different checkpoints: worker {dist.worker_index(self.strategy)} "
          f"has step {int(mine[0])}, assignment epoch {int(mine[1])}, {int(mine[2])} table rows; "
          f"the mean over workers is step {mean[0]:.1f}. Make the chief's "
          f"{os.path.join(self.config.train.model_dir, 'ckpt')} readable by every worker "
          "(shared or copied) and restart all workers with the same command.")

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

  def _save(self) -> None:
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
      self._save()
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
    self._deadline = start + max_seconds if max_seconds else float("inf")
    while int(self.step.numpy()) < total_steps and not self.should_stop():
      step = int(self.step.numpy())
      epoch, done = divmod(step, steps_per_epoch)
      # Reassign every T epochs, counted from the end of the rotation warm-up.
      since = epoch - warmup
      period_start = warmup + since - since % cfg.clustering.reassign_every
      if (cfg.uses_clustering and epoch >= warmup
          and int(self.assignment_epoch.numpy()) < period_start):
        self._log(self.reassign(epoch))
        self._save()
      record = self._train_epoch(epoch, done, steps_per_epoch, lrs)
      self._log(record)
      self._save()
    if int(self.step.numpy()) < total_steps:
      logging.info("stopped at step %d after %.0f s (%s); the same command resumes",
                   int(self.step.numpy()), time.time() - start,
                   "preempted" if self.preempted else "--max_minutes")
    return self.history

  def _plan(self, epoch: int, epoch_images: int) -> reader.EpochPlan | None:
    if not self.config.uses_clustering or not len(self.table_ids.numpy()):
      return None  # RotNet, or the rotation warm-up: every image once, no sub-class
    cfg = self.config
    labels = self.table_super.numpy().astype(np.int64) * cfg.clustering.k + self.table_sub.numpy()
    mult = sampler.epoch_multiplicity(labels, epoch_images, int(self.sampling_seed.numpy()), epoch,
                                      uniform=cfg.train.uniform_sampler)
    return reader.EpochPlan(self.table_ids.numpy(), mult, self.table_super.numpy(),
                            self.table_sub.numpy())

  def _train_epoch(self, epoch, done, steps_per_epoch, lrs) -> dict:
    cfg, t = self.config, self.config.train
    plan = self._plan(epoch, int(self.epoch_images.numpy()))

    # One dataset per worker, and each of its G local replicas takes one batch per step:
    # the worker's dataset holds G batches per step.
    n_local = dist.num_local_replicas(self.strategy)

    def dataset_fn(ctx):
      return reader.build_train_dataset(
          cfg.data.data_pattern, image_size=cfg.model.image_size,
          batch_size=ctx.get_per_replica_batch_size(self.global_batch),
          steps=steps_per_epoch * n_local, plan=plan, num_rotations=cfg.num_rotations,
          all_rotations=t.all_rotations, seed=int(self.sampling_seed.numpy()), epoch=epoch,
          skip_steps=done * n_local,
          crop_scale_min=cfg.data.crop_scale_min,
          shuffle_buffer=cfg.data.shuffle_buffer, input_context=ctx)

    iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
    totals = {k: 0.0 for k in (*METRICS, "skipped")}
    remaining, seen, t0 = steps_per_epoch - done, 0, time.time()
    bar = tqdm(total=steps_per_epoch, initial=done, unit="step", desc=f"epoch {epoch}",
               disable=not self.is_chief, leave=False)
    last_save = int(self.step.numpy())
    while remaining > 0:
      if self.should_stop():
        logging.warning("%s: saving a checkpoint at step %d", "preempted (SIGTERM) on a worker"
                        if self.preempted else "--max_minutes reached", int(self.step.numpy()))
        break
      n = min(t.steps_per_loop, remaining)
      self.optimizer.learning_rate.assign(float(lrs[min(int(self.step.numpy()), len(lrs) - 1)]))
      with self._guard("training steps"):
        out = {k: float(v) for k, v in self._train_loop(iterator, tf.constant(n)).items()}
      if not np.isfinite(out["loss"]):
        raise TrainingDiverged(
            f"loss is {out['loss']} at step {int(self.step.numpy())} (epoch {epoch}); the "
            f"last good checkpoint in {self.manager.directory} is kept. Lower --lr or check "
            "the data.")
      for k in METRICS:
        totals[k] += out[k]
      totals["skipped"] = max(totals["skipped"], out["skipped"])
      remaining -= n
      seen += n
      rate = seen * self.global_batch / max(time.time() - t0, 1e-9)
      bar.update(n)
      bar.set_postfix(loss=f"{totals['loss'] / seen:.3f}", img_s=f"{rate:.0f}")
      step = int(self.step.numpy())
      with self.writer.as_default(step=step):
        tf.summary.scalar("train/loss", out["loss"] / n)
        tf.summary.scalar("train/lr", self.optimizer.learning_rate)
        tf.summary.scalar("train/images_per_second", rate)
      if t.checkpoint_every and step - last_save >= t.checkpoint_every:
        self._save()
        last_save = step
    bar.close()
    # The epoch's iterator is released on a short-lived thread: destroyed on this thread, an
    # iterator sometimes blocked for ~19-47 s, idle (in 1 to 3 of the demo's 6 epochs; root
    # cause not found). The list is its only reference, so the thread's clear() is what
    # destroys it (handing the iterator itself over raced: whichever side dropped its
    # reference last destroyed it, sometimes this one). Not a daemon thread: Python joins it
    # before finalising, whereas a daemon thread still inside TF's destructor at exit is
    # forced to unwind through C++ and aborts the process ("exception not rethrown"; seen
    # on a worker that exits right after its last epoch).
    holder = [iterator]
    del iterator
    threading.Thread(target=holder.clear, name="release-epoch-iterator").start()
    examples = max(seen * self.global_batch, 1)
    record = {"event": "epoch", "epoch": epoch, "step": int(self.step.numpy()),
              "lr": float(lrs[min(epoch * steps_per_epoch, len(lrs) - 1)]),
              "examples_seen": int(self.step.numpy()) * self.global_batch,
              "seconds": round(time.time() - t0, 2),
              "images_per_second": round(examples / max(time.time() - t0, 1e-9), 1),
              "loss": totals["loss"] / max(seen, 1),
              "super_loss": totals["super_loss"] / max(seen, 1),
              "sub_loss": totals["sub_loss"] / max(seen, 1),
              "super_accuracy": totals["super_correct"] / examples,
              "sub_accuracy": totals["sub_correct"] / examples,
              "skipped_records": int(totals["skipped"])}
    k_sub = cfg.num_sub_classes
    if k_sub and seen and abs(record["sub_loss"] - np.log(k_sub)) < 0.01 * np.log(k_sub):
      logging.warning("collapse alarm: sub-class loss %.3f sits at ln k = %.3f for the whole "
                      "epoch: the sub-heads learn nothing", record["sub_loss"], np.log(k_sub))
      record["collapse_alarm"] = True
    with self.writer.as_default(step=int(self.step.numpy())):
      for k in ("super_accuracy", "sub_accuracy", "super_loss", "sub_loss"):
        tf.summary.scalar(f"train/{k}", record[k])
    return record

  def export(self, export_dir: str) -> dict | None:
    if not self.is_chief:
      return None
    from dc_tf import export as export_lib
    cfg = self.config
    return export_lib.export(self.trunk, export_dir, image_size=cfg.model.image_size,
                             config=cfg.to_dict(), epoch=int(self.step.numpy()),
                             training_data=cfg.data.data_pattern,
                             weight_decay=cfg.train.weight_decay)
