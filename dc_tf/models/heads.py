"""The hierarchical heads: a super-class head V and S sub-class heads W_s.

Caron et al., ICCV 2019, Sec. 3.3: the loss is CE(V f(x), s) + CE(W_s f(x), z), where
s in [0, S) is the super-class (super-cluster x rotation, S = 4m) and z in [0, k) the
sub-cluster inside the super-cluster. W is stored as one [S, D, k] tensor so that a
replica computes only the logits of each example's own head (never S*k per example).
"""

from __future__ import annotations

import keras
import tensorflow as tf


class HierarchicalHeads(keras.layers.Layer):
  """Super-class head V (S outputs) and S sub-class heads W_s (k outputs each).

  Args:
    num_super: S, the number of super-classes (4m; 4 for RotNet; 1 for DeepCluster).
    num_sub: k, outputs of each sub-head (0 = no sub-heads, RotNet).
    impl: 'group' (partition the batch by super-class, one matmul per head) or 'gather'
      (gather each example's [D, k] head; memory B*D*k).
    init_std: N(0, init_std) for kernels, zero biases (the original's Linear init).
  """

  def __init__(self, num_super: int, num_sub: int, impl: str = "group",
               init_std: float = 0.01, **kwargs):
    super().__init__(**kwargs)
    self.num_super, self.num_sub, self.impl, self.init_std = num_super, num_sub, impl, init_std

  def build(self, input_shape):
    d = int(input_shape[-1])
    init = keras.initializers.RandomNormal(stddev=self.init_std)
    self.v_kernel = self.add_weight(name="v_kernel", shape=[d, self.num_super], initializer=init)
    self.v_bias = self.add_weight(name="v_bias", shape=[self.num_super], initializer="zeros")
    if self.num_sub:
      self.w_kernel = self.add_weight(name="w_kernel", shape=[self.num_super, d, self.num_sub],
                                      initializer=init)
      self.w_bias = self.add_weight(name="w_bias", shape=[self.num_super, self.num_sub],
                                    initializer="zeros")

  def super_logits(self, h):
    return tf.matmul(h, self.v_kernel) + self.v_bias

  def sub_logits(self, h, super_class):
    """Logits [B, k] of each example's own sub-head W_{super_class}."""
    super_class = tf.cast(super_class, tf.int32)
    if self.impl == "gather":
      w = tf.gather(self.w_kernel, super_class)                       # [B, D, k]
      return tf.einsum("bd,bdk->bk", h, w) + tf.gather(self.w_bias, super_class)
    parts = tf.dynamic_partition(h, super_class, self.num_super)
    index = tf.dynamic_partition(tf.range(tf.shape(h)[0]), super_class, self.num_super)
    logits = [tf.matmul(p, self.w_kernel[s]) + self.w_bias[s] for s, p in enumerate(parts)]
    return tf.dynamic_stitch(index, logits)

  def call(self, h, super_class=None):
    out = {"super_logits": self.super_logits(h)}
    if self.num_sub and super_class is not None:
      out["sub_logits"] = self.sub_logits(h, super_class)
    return out

  def reinitialize(self, seed: int, include_super: bool):
    """Fresh random sub-heads (and V when the super-clusters changed, m > 1), called after
    every reassignment: the new pseudo-labels have no relation to the old ones."""
    rng = tf.random.Generator.from_seed(seed)
    variables = [(self.w_kernel, self.w_bias)] if self.num_sub else []
    if include_super:
      variables.append((self.v_kernel, self.v_bias))
    for kernel, bias in variables:
      kernel.assign(rng.normal(kernel.shape, stddev=self.init_std, dtype=kernel.dtype))
      bias.assign(tf.zeros_like(bias))
    return [v for pair in variables for v in pair]

  def get_config(self):
    return {**super().get_config(), "num_super": self.num_super, "num_sub": self.num_sub,
            "impl": self.impl, "init_std": self.init_std}
