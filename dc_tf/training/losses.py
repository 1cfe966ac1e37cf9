"""The hierarchical loss, as pure functions of tensors (Caron et al., ICCV 2019, Eq. 3).

  L = CE(V f(x), s) + CE(W_s f(x), z)

s is the super-class (super-cluster x rotation), z the sub-class inside super-cluster s.

Which mean each gradient is (the original, facebookresearch/DeeperCluster, trains W_s on
a group of GPUs fed only super-class s, averages W_s's gradient inside that group and the
trunk's and V's over all GPUs):
  * trunk and V: the mean over the global batch of N examples. Each replica sums its
    terms and divides by N; the cross-replica sum of gradients is then the mean.
  * W_s: the mean over the n_s examples of the global batch whose super-class is s (and
    that have a sub-class). The sub term below is scaled by 1/N for the trunk, so the
    replica that owns W_s multiplies W_s's gradient by N / n_s (`sub_head_gradient_scale`).
A plain 1/N for W_s would train each head S times slower than the original (S = 16 at
the paper preset).

The sub term is computed on the whole global batch's features, gathered to every replica
(`h` of N rows): each replica scores only the rows of the heads it owns, against only the
columns it owns (`dc_tf.placement`). When a head is split between replicas (R > S), its
softmax spans them: row maxima are exchanged with `cross_replica_max`, exp-sums with
`cross_replica_sum` (both supplied by the caller; `all_reduce` is differentiable). Each
term of L is computed by exactly one replica (the log-sum-exp of a row by the owner of its
head's first columns, the target logit by the owner of the target's column), so summing the
replicas' losses gives L and gradients through the collectives need no correction.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

NEG = -1e30  # "no logit here" in row maxima (finite, so differences never give NaN)


def cross_entropy_sum(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)))


def correct(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                        tf.cast(labels, tf.int32)), tf.float32))


def super_class_loss(super_logits: tf.Tensor, super_class: tf.Tensor,
                     global_batch_size: int) -> dict:
  """{'super_loss': sum of CE / N, 'super_correct': hits} over this replica's examples.
  With one super-class (DeepCluster) the term is identically zero and skipped."""
  if super_logits.shape[-1] <= 1:
    return {"super_loss": tf.constant(0.0), "super_correct": tf.constant(0.0)}
  return {"super_loss": cross_entropy_sum(super_logits, super_class) / global_batch_size,
          "super_correct": correct(super_logits, super_class)}


def partitioned_sub_loss(h: tf.Tensor, super_class: tf.Tensor, sub_class: tf.Tensor,
                         pieces: Sequence, *, global_batch_size: int, sharded: bool,
                         cross_replica_max: Callable | None = None,
                         cross_replica_sum: Callable | None = None) -> dict:
  """This replica's share of the sub-class term, over the global batch.

  Args:
    h: [N, D] float32, ReLU(fc7) of every example of the global batch.
    super_class, sub_class: [N] int; sub_class < 0 (before the first clustering) has no term.
    pieces: (Piece, kernel [D, w], bias [w]) this replica owns.
    global_batch_size: N.
    sharded: heads are split between replicas; then both cross_replica_* are required:
      `cross_replica_max([N]) -> [N]` (no gradient needed), `cross_replica_sum([N]) -> [N]`.
  Returns:
    {'sub_loss': this replica's terms / N, 'sub_correct': its hits}.
  """
  if not sharded:
    return _whole_heads_sub_loss(h, super_class, sub_class, pieces, global_batch_size)
  n = tf.shape(h)[0]
  super_class, sub_class = tf.cast(super_class, tf.int32), tf.cast(sub_class, tf.int32)
  loss, hits = tf.constant(0.0), tf.constant(0.0)
  row_max, lse_owner = tf.fill([n], NEG), tf.zeros([n])
  parts = []
  for piece, kernel, bias in pieces:
    rows = tf.where((super_class == piece.head) & (sub_class >= 0))[:, 0]
    z = tf.matmul(tf.gather(h, rows), kernel) + bias                       # [n_s, w]
    target = tf.gather(sub_class, rows) - piece.start
    mine = tf.cast((target >= 0) & (target < piece.width), tf.float32)      # target column here
    z_target = tf.gather(z, tf.clip_by_value(target, 0, piece.width - 1), batch_dims=1)
    row_max = tf.tensor_scatter_nd_max(row_max, rows[:, None], tf.reduce_max(z, axis=1))
    if piece.start == 0:  # this replica adds the log-sum-exp of these rows
      lse_owner = tf.tensor_scatter_nd_max(lse_owner, rows[:, None], tf.ones_like(mine))
    parts.append((rows, z, z_target, mine))
  if sharded:
    row_max = cross_replica_max(row_max)
  row_max = tf.stop_gradient(row_max)
  exp_sum = tf.zeros([n])
  for rows, z, z_target, mine in parts:
    m = tf.gather(row_max, rows)
    loss -= tf.reduce_sum(z_target * mine)
    hits += tf.reduce_sum(mine * tf.cast(z_target >= m, tf.float32))
    exp_sum = tf.tensor_scatter_nd_add(
        exp_sum, rows[:, None], tf.reduce_sum(tf.exp(z - m[:, None]), axis=1))
  if sharded:
    exp_sum = cross_replica_sum(exp_sum)
  # Every replica uses every row of exp_sum (masked), so the gradients the collectives
  # exchange have the same form on all replicas. An owned row's exp_sum is >= 1 (its max
  # term); the others get +1, so no log(0).
  loss += tf.reduce_sum(lse_owner * (row_max + tf.math.log(exp_sum + 1.0 - lse_owner)))
  return {"sub_loss": loss / global_batch_size, "sub_correct": hits}


def _whole_heads_sub_loss(h, super_class, sub_class, pieces, global_batch_size) -> dict:
  """The unsharded case (R <= S): this replica holds whole heads, so each row's softmax is
  local. The rows are split between the held heads in one dynamic_partition (rows of other
  replicas' heads, and rows without a sub-class, go to a last, unused part), each head
  scores its rows, and one fused cross-entropy runs over the concatenated logits."""
  if not pieces:
    return {"sub_loss": tf.constant(0.0), "sub_correct": tf.constant(0.0)}
  super_class, sub_class = tf.cast(super_class, tf.int32), tf.cast(sub_class, tf.int32)
  num_heads = max(max(p.head for p, _, _ in pieces) + 1, 1)
  local = np.full(num_heads, len(pieces), np.int32)
  for i, (piece, _, _) in enumerate(pieces):
    local[piece.head] = i
  part = tf.gather(tf.constant(local), tf.clip_by_value(super_class, 0, num_heads - 1))
  part = tf.where((sub_class >= 0) & (super_class < num_heads), part, len(pieces))
  rows = tf.dynamic_partition(h, part, len(pieces) + 1)
  targets = tf.dynamic_partition(sub_class, part, len(pieces) + 1)
  logits = tf.concat([tf.matmul(rows[i], kernel) + bias
                      for i, (_, kernel, bias) in enumerate(pieces)], axis=0)
  labels = tf.concat(targets[:len(pieces)], axis=0)
  return {"sub_loss": cross_entropy_sum(logits, labels) / global_batch_size,
          "sub_correct": correct(logits, labels)}


def sub_head_gradient_scale(super_class: tf.Tensor, sub_class: tf.Tensor, head: int,
                            global_batch_size: int) -> tf.Tensor:
  """N / n_s: turns W_s's share of the 1/N-scaled loss into the mean over its n_s examples."""
  n_s = tf.reduce_sum(tf.cast((tf.cast(super_class, tf.int32) == head)
                              & (tf.cast(sub_class, tf.int32) >= 0), tf.float32))
  return global_batch_size / tf.maximum(n_s, 1.0)


def learning_rates(total_steps: int, base_lr: float, warmup_steps: int = 0,
                   schedule: str = "constant"):
  """The per-step learning rate, computed up front (indexed by the global step)."""
  steps = np.arange(max(total_steps, 1), dtype=np.float64)
  lr = np.full_like(steps, base_lr)
  if schedule == "cosine":
    progress = np.clip((steps - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
    lr = base_lr * 0.5 * (1 + np.cos(np.pi * progress))
  if warmup_steps:
    lr = np.where(steps < warmup_steps, base_lr * (steps + 1) / warmup_steps, lr)
  return lr.astype(np.float32)
