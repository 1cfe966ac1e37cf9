"""The hierarchical heads: a super-class head V (mirrored) and S sub-heads W_s (partitioned).

Caron et al., ICCV 2019, Sec. 3.3: the loss is CE(V f(x), s) + CE(W_s f(x), z), where
s in [0, S) is the super-class (super-cluster x rotation, S = 4m) and z in [0, k) the
sub-cluster inside super-cluster s.

V is small (D x S) and mirrored on every replica, like the trunk. The sub-heads are not:
the S*k columns are cut into pieces (`dc_tf.placement`), and each replica creates only
the pieces it owns, as plain variables on its own device, outside the strategy's scope
(`synchronization=ON_READ` variables would hold per-replica values, but checkpoints merge
them into one; shared/design/partitioned-heads.md). The loss that uses them is
`dc_tf.training.losses.partitioned_sub_loss`.

Initial values do not depend on the layout: column block b (of BLOCK columns) of head s is
drawn from a stateless seed (seed, s, b), and a piece takes the columns it covers, so one
replica and 64 replicas start from the same W.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from dc_tf.placement import HeadPlacement, Piece

BLOCK = 256  # columns per seeded block of a head's initial values


class SuperHead(keras.layers.Layer):
  """V: ReLU(fc7) -> S super-class logits (the original's Linear init: N(0, 0.01), zero bias).

  Args:
    num_super: S, the number of super-classes (4m; 4 for RotNet; 1 for DeepCluster).
    init_std: standard deviation of the kernel's normal initialisation.
  """

  def __init__(self, num_super: int, init_std: float = 0.01, **kwargs):
    super().__init__(**kwargs)
    self.num_super, self.init_std = num_super, init_std

  def build(self, input_shape):
    d = int(input_shape[-1])
    self.kernel = self.add_weight(name="v_kernel", shape=[d, self.num_super],
                                  initializer=keras.initializers.RandomNormal(stddev=self.init_std))
    self.bias = self.add_weight(name="v_bias", shape=[self.num_super], initializer="zeros")

  def call(self, h):
    return tf.matmul(h, self.kernel) + self.bias

  def reinitialize(self, seed: int) -> list:
    rng = tf.random.Generator.from_seed(seed)
    self.kernel.assign(rng.normal(self.kernel.shape, stddev=self.init_std))
    self.bias.assign(tf.zeros_like(self.bias))
    return [self.kernel, self.bias]

  def get_config(self):
    return {**super().get_config(), "num_super": self.num_super, "init_std": self.init_std}


def piece_initial_kernel(piece: Piece, dim: int, seed: int, init_std: float) -> tf.Tensor:
  """The [dim, piece.width] initial kernel of `piece`, equal to the same columns of the whole
  head drawn block by block: independent of how the head is cut."""
  first, last = piece.start // BLOCK, (piece.stop - 1) // BLOCK
  blocks = [tf.random.stateless_normal([dim, BLOCK], seed=[seed, piece.head * 1_000_003 + b],
                                       stddev=init_std) for b in range(first, last + 1)]
  whole = tf.concat(blocks, axis=1)
  return whole[:, piece.start - first * BLOCK:piece.stop - first * BLOCK]


class SubHeads(tf.Module):
  """This worker's pieces of the sub-heads, one set per local replica.

  Args:
    placement: which replica owns which columns of which head.
    dim: D, the feature dimension (fc7 units).
    replica_ids: the global replica id of each local device.
    devices: the local devices (None: the default device).
    seed: initial values (see `piece_initial_kernel`).
    init_std: as V's.
  """

  def __init__(self, placement: HeadPlacement, dim: int, replica_ids: list[int],
               devices: list[str | None], seed: int, init_std: float = 0.01):
    super().__init__(name="sub_heads")
    self.placement, self.dim, self.init_std = placement, dim, init_std
    self.replica_ids = list(replica_ids)
    self.pieces: dict[int, list[tuple[Piece, tf.Variable, tf.Variable]]] = {}
    for rid, device in zip(self.replica_ids, devices):
      with tf.device(device):
        self.pieces[rid] = [
            (p, tf.Variable(piece_initial_kernel(p, dim, seed, init_std), name=f"{p.name}_kernel"),
             tf.Variable(tf.zeros([p.width]), name=f"{p.name}_bias"))
            for p in placement.pieces(rid)]

  def of_replica(self, replica_id: int) -> list[tuple[Piece, tf.Variable, tf.Variable]]:
    if replica_id not in self.pieces:
      raise RuntimeError(f"replica {replica_id} is not local to this worker "
                         f"(local replicas: {self.replica_ids})")
    return self.pieces[replica_id]

  def local_variables(self) -> list[tf.Variable]:
    return [v for rid in self.replica_ids for _, k, b in self.pieces[rid] for v in (k, b)]

  def by_name(self) -> dict[str, tuple[Piece, tf.Variable, tf.Variable]]:
    return {p.name: (p, k, b) for rid in self.replica_ids for p, k, b in self.pieces[rid]}

  def reinitialize(self, seed: int) -> list[tf.Variable]:
    """Fresh heads after a reassignment (the new pseudo-labels have nothing to do with the
    old ones); returns the variables whose momentum must be reset."""
    for piece, kernel, bias in self.by_name().values():
      kernel.assign(piece_initial_kernel(piece, self.dim, seed, self.init_std))
      bias.assign(tf.zeros_like(bias))
    return self.local_variables()

  def full_kernels(self) -> dict[int, np.ndarray]:
    """{head: [D, columns held here]} concatenated in column order (tests, inspection)."""
    out: dict[int, list] = {}
    for piece, kernel, _ in sorted(self.by_name().values(), key=lambda x: (x[0].head, x[0].start)):
      out.setdefault(piece.head, []).append(kernel.numpy())
    return {s: np.concatenate(parts, axis=1) for s, parts in out.items()}
