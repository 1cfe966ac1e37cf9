"""One training step on every replica, and the tf.function that runs `steps` of them.

The step is the paper's hierarchical loss (Caron et al. 2019, Sec. 3.2) under tf.distribute:
the trunk and the super-class head V are mirrored and updated with the gradient summed over
replicas; each sub-head piece lives on one replica (dc_tf.placement) and is updated there
(dc_tf.training.losses states which mean each gradient is).
"""

from __future__ import annotations

import tensorflow as tf

from dc_tf import placement as placement_lib
from dc_tf.data import preprocess
from dc_tf.training import losses, optim

METRICS = ("loss", "super_loss", "sub_loss", "super_correct", "sub_correct")


@tf.custom_gradient
def _dense_gradient(x):
  """Identity whose gradient is dense. The gradients of all_gather and all_reduce are
  collectives that need the same kind of tensor on every replica; gathering rows of the
  global batch gives IndexedSlices on some replicas and dense zeros on others."""
  return tf.identity(x), tf.convert_to_tensor


class TrainStep:
  """Forward, backward and update on every replica, `steps` times a call.

  Args:
    strategy: the run's tf.distribute strategy.
    trunk: the VGG trunk (mirrored); its fc7 output feeds the heads.
    super_head: V, S = 4m super-classes (mirrored).
    sub_heads: the W_s pieces this worker holds, or None when there is no sub-class.
    placement: which replica holds which piece (dc_tf.placement.HeadPlacement).
    optimizer: SGD over `variables` (trunk + V), applied in cross-replica context.
    local_optimizer: LocalSGD of the sub-head pieces, or None.
    global_batch: examples per step over all replicas (each loss is divided by it).
    step: the run's step counter, incremented once a step.
    jit_compile: compile the trunk's forward and backward with XLA (one replica only).
  """

  def __init__(self, strategy, trunk, super_head, sub_heads, placement, optimizer,
               local_optimizer, global_batch: int, step: tf.Variable, jit_compile: bool = False):
    self.strategy, self.trunk, self.super_head = strategy, trunk, super_head
    self.sub_heads, self.placement = sub_heads, placement
    self.optimizer, self.local_optimizer = optimizer, local_optimizer
    self.global_batch, self.step = global_batch, step
    self.variables = trunk.trainable_variables + super_head.trainable_variables
    self._features = (tf.function(self._trunk_features, jit_compile=True) if jit_compile
                      else self._trunk_features)
    # Every local replica reads its worker's one pipeline, whose `skipped` field is that
    # worker's running count of bad records: one replica a worker reports it, so the
    # cross-replica sum counts each worker once (summing all G local copies counted G times).
    self._reporting_replica = min(placement_lib.local_replica_ids(strategy))

  def _trunk_features(self, images):
    """ReLU(fc7) of this replica's images. It holds no collective, so XLA can compile it,
    and its gradient, whole (--jit_compile); the heads and the collectives follow outside."""
    # The training pipeline hands over uint8 pixels: normalised here, on the replica's device.
    out = self.trunk(preprocess.normalize(images), training=True)
    return tf.nn.relu(tf.cast(out["fc7"], tf.float32))  # heads take ReLU(fc7)

  def replica_step(self, batch):
    """Forward, backward and update on one replica. Trunk and V: gradients summed over all
    replicas (each replica's loss is already divided by the global batch). Sub-heads: this
    replica's pieces score the global batch's features, gathered, and are updated here with
    the per-super-class mean gradient (dc_tf.training.losses states the semantics)."""
    ctx = tf.distribute.get_replica_context()
    n, many = self.global_batch, self.strategy.num_replicas_in_sync > 1
    replica = int(tf.get_static_value(ctx.replica_id_in_sync_group))
    pieces = self.sub_heads.of_replica(replica) if self.sub_heads is not None else []
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
    skipped = tf.cast(tf.reduce_max(batch["skipped"]), tf.float32)
    terms["skipped"] = skipped if replica == self._reporting_replica else tf.zeros_like(skipped)
    return terms

  def loop(self):
    """tf.function(iterator, steps) -> {metric: sum over the steps and replicas}; `skipped`
    is the largest running count seen (summed over workers), not a sum over steps."""
    strategy = self.strategy

    def loop(iterator, steps):
      totals = {k: tf.constant(0.0) for k in (*METRICS, "skipped")}
      for _ in tf.range(steps):
        terms = strategy.run(self.replica_step, args=(next(iterator),))
        reduced = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, terms[k], axis=None)
                   for k in (*METRICS, "skipped")}
        # Rebind (not mutate) the dict, so autograph carries it as a loop variable.
        totals = {k: (tf.maximum(totals[k], reduced[k]) if k == "skipped"
                      else totals[k] + reduced[k]) for k in totals}
        self.step.assign_add(1)
      return totals
    return tf.function(loop, jit_compile=False)
