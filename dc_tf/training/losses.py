"""The hierarchical loss, as pure functions of tensors (Caron et al., ICCV 2019, Eq. 3).

  L = CE(V f(x), s) + CE(W_s f(x), z)

s is the super-class (super-cluster x rotation), z the sub-class inside super-cluster s.
The sub-class term uses only the logits of the example's own head W_s, so the other
heads get neither loss nor gradient. Both terms are summed over the replica's examples
and divided by the *global* batch: summing gradients over replicas then gives the mean.
"""

from __future__ import annotations

import tensorflow as tf


def cross_entropy_sum(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)))


def correct(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                        tf.cast(labels, tf.int32)), tf.float32))


def hierarchical_loss(super_logits: tf.Tensor, super_class: tf.Tensor,
                      sub_logits: tf.Tensor | None, sub_class: tf.Tensor | None,
                      global_batch_size: int) -> dict:
  """Returns {'loss', 'super_loss', 'sub_loss'} scaled by 1/global_batch_size, and the
  un-scaled counts {'super_correct', 'sub_correct'} of this replica.

  With one super-class (DeepCluster mode) the super term is identically zero and is
  skipped; with no sub-heads (RotNet mode) `sub_logits` is None.
  """
  scale = 1.0 / global_batch_size
  zero = tf.constant(0.0)
  if super_logits.shape[-1] > 1:
    super_loss = cross_entropy_sum(super_logits, super_class) * scale
    super_correct = correct(super_logits, super_class)
  else:
    super_loss, super_correct = zero, zero
  if sub_logits is not None:
    # Examples without a sub-class (-1: before the first clustering) get no sub loss.
    has_sub = tf.cast(tf.greater_equal(sub_class, 0), tf.float32)
    safe = tf.maximum(tf.cast(sub_class, tf.int32), 0)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe,
                                                        logits=tf.cast(sub_logits, tf.float32))
    sub_loss = tf.reduce_sum(ce * has_sub) * scale
    hits = tf.cast(tf.equal(tf.argmax(sub_logits, -1, output_type=tf.int32), safe), tf.float32)
    sub_correct = tf.reduce_sum(hits * has_sub)
  else:
    sub_loss, sub_correct = zero, zero
  return {"loss": super_loss + sub_loss, "super_loss": super_loss, "sub_loss": sub_loss,
          "super_correct": super_correct, "sub_correct": sub_correct}


def learning_rates(total_steps: int, base_lr: float, warmup_steps: int = 0,
                   schedule: str = "constant"):
  """The per-step learning rate, computed up front (indexed by the global step)."""
  import numpy as np
  steps = np.arange(max(total_steps, 1), dtype=np.float64)
  lr = np.full_like(steps, base_lr)
  if schedule == "cosine":
    progress = np.clip((steps - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
    lr = base_lr * 0.5 * (1 + np.cos(np.pi * progress))
  if warmup_steps:
    lr = np.where(steps < warmup_steps, base_lr * (steps + 1) / warmup_steps, lr)
  return lr.astype(np.float32)
