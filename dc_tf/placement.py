"""Which replica holds which sub-head columns: decided here, read by the trainer and `--plan`.

DeeperCluster's sub-heads W_s (s < S = 4m super-classes, each D x k) are its memory: at the
paper preset 16 x 4096 x 80,000 weights, 21 GB. No replica holds them all. The S*k columns
are cut into *pieces*, each a column range [start, stop) of one head W_s, and every piece
lives on exactly one replica (its variables, its momentum, its gradient):

  R <= S  replica r holds the whole heads {s : s mod R = r}: at most ceil(S/R) heads;
  R >  S  replica r holds one column shard of head r mod S: head s is split between the
          replicas {r : r mod S = s} (its *group*, floor(R/S) or ceil(R/S) of them).

The trainer asks `placement.pieces(replica_id)` and never computes this itself; the
memory plan counts bytes from the same pieces. Which replica id a local device has is
`local_replica_ids` (ids follow the strategy's order: worker by worker, device by device).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, order=True)
class Piece:
  """Columns [start, stop) of sub-head W_head (sub-classes start..stop-1 of that head)."""
  head: int
  start: int
  stop: int

  @property
  def width(self) -> int:
    return self.stop - self.start

  @property
  def name(self) -> str:
    """Layout-independent name: a checkpoint written under one replica count can be read
    (and re-cut) under another."""
    return f"s{self.head}_c{self.start}-{self.stop}"

  @classmethod
  def from_name(cls, name: str) -> "Piece":
    head, cols = name.split("_c")
    start, stop = cols.split("-")
    return cls(int(head[1:]), int(start), int(stop))


@dataclasses.dataclass(frozen=True)
class HeadPlacement:
  """Places S sub-heads of k columns each over R replicas.

  Args:
    num_heads: S, the number of super-classes (0 or k = 0: no sub-heads, RotNet).
    k: columns (sub-classes) of each head.
    num_replicas: R, replicas in sync over all workers.
  """
  num_heads: int
  k: int
  num_replicas: int

  def __post_init__(self):
    if self.num_replicas < 1:
      raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
    if self.k and self.num_heads and self.group_size(0) > self.k:
      raise ValueError(f"{self.num_replicas} replicas cannot share {self.num_heads} heads of "
                       f"k={self.k} columns: a shard would be empty (use k >= "
                       f"{self.group_size(0)})")

  @property
  def sharded(self) -> bool:
    """True when some head is split between replicas (its softmax spans them)."""
    return bool(self.k and self.num_heads) and self.num_replicas > self.num_heads

  def group(self, head: int) -> list[int]:
    """The replicas holding parts of W_head, in column order."""
    if self.num_replicas <= self.num_heads:
      return [head % self.num_replicas]
    return list(range(head, self.num_replicas, self.num_heads))

  def group_size(self, head: int) -> int:
    return len(self.group(head))

  def pieces(self, replica: int) -> tuple[Piece, ...]:
    """The pieces replica `replica` holds (empty for RotNet)."""
    if not (self.k and self.num_heads):
      return ()
    if self.num_replicas <= self.num_heads:
      return tuple(Piece(s, 0, self.k) for s in range(replica, self.num_heads, self.num_replicas))
    head = replica % self.num_heads
    rank, size = replica // self.num_heads, self.group_size(head)
    bounds = [self.k * i // size for i in range(size + 1)]
    return (Piece(head, bounds[rank], bounds[rank + 1]),)

  def all_pieces(self) -> list[Piece]:
    return [p for r in range(self.num_replicas) for p in self.pieces(r)]

  def columns_per_replica(self) -> np.ndarray:
    """[R] sub-head columns each replica holds (its weights: columns x (D + 1))."""
    return np.array([sum(p.width for p in self.pieces(r)) for r in range(self.num_replicas)])


def local_replica_ids(strategy) -> list[int]:
  """Global replica ids of this worker's devices, in `worker_devices` order."""
  from dc_tf import distribute as dist
  n_local = dist.num_local_replicas(strategy)
  return [dist.worker_index(strategy) * n_local + i for i in range(n_local)]
