"""PCA whitening fitted from cross-replica sums, then L2 normalisation.

As the original (faiss PCAMatrix with eigen_power=-0.5): mean and X^T X are summed over
replicas with all_reduce(SUM), the eigendecomposition is done once on the host, small
eigenvalues are floored at max * 1e-5, and features are projected and scaled by
eigenvalue^-0.5, optionally reduced to `pca_dim`, then L2-normalised.

Memory and traffic: moments are accumulated chunk by chunk from the host rows (float32 or
float16) on each replica's device, in float64, and cross replicas once (issue 25), on a
seeded sample of the rows when asked (the original fits its PCA on a bounded number of
images); and `Whitening.apply_in_place` writes the whitened rows over the features they
came from, so clustering holds the features once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from dc_tf.clustering import replicas as replicas_lib

EIGEN_FLOOR = 1e-5


@dataclasses.dataclass
class Whitening:
  mean: np.ndarray        # [d]
  projection: np.ndarray  # [d, p], eigenvectors scaled by eigenvalue^-0.5
  eigenvalues: np.ndarray  # [p], descending

  def apply(self, x: np.ndarray) -> np.ndarray:
    """Whitened and L2-normalised float32 features (a new array)."""
    y = (np.asarray(x, np.float32) - self.mean.astype(np.float32)) @ self.projection.astype(np.float32)
    norm = np.linalg.norm(y, axis=1, keepdims=True)
    return y / np.maximum(norm, 1e-12)

  def apply_in_place(self, x: np.ndarray, chunk_size: int = 16384) -> np.ndarray:
    """Whitens x chunk by chunk into its own first p columns (p <= d) and returns that view:
    no second copy of the features. x keeps its dtype (float16 halves the memory)."""
    p = self.projection.shape[1]
    if p > x.shape[1]:
      raise ValueError(f"in-place whitening needs pca_dim <= {x.shape[1]}, got {p}")
    for start in range(0, len(x), chunk_size):
      x[start:start + chunk_size, :p] = self.apply(x[start:start + chunk_size])
    return x[:, :p]


def _whiten_step(chunk, constants):
  """A replica's share of the whitening pass: (x - mean) P, L2-normalised, on the device."""
  mean, projection = constants
  y = tf.matmul(chunk - mean, projection)
  return (), y / tf.maximum(tf.norm(y, axis=1, keepdims=True), 1e-12)


def whiten_in_place(strategy, whitening: "Whitening", local_x: list[np.ndarray],
                    chunk_size: int = 16384,
                    traffic: replicas_lib.Traffic | None = None) -> list[np.ndarray]:
  """`Whitening.apply_in_place` on every replica's device at once: each replica's rows go
  to its device chunk by chunk and come back whitened, written over the first p columns of
  the rows they came from (a chunk is copied out before it is overwritten). Returns the
  [n_r, p] views. The projection costs 2 n d p FLOPs, 0.4 PFLOP a worker at the paper's
  scale: minutes on the host, a second on 8 GPUs (issue 25)."""
  p = whitening.projection.shape[1]
  for x in local_x:
    if p > x.shape[1]:
      raise ValueError(f"in-place whitening needs pca_dim <= {x.shape[1]}, got {p}")

  def write(i, start, y):
    local_x[i][start:start + len(y), :p] = y
  passes = replicas_lib.DevicePass(replicas_lib.Replicas.of(strategy), _whiten_step,
                                   chunk_size, 0)
  passes(local_x, [None] * len(local_x),
         [whitening.mean.astype(np.float32), whitening.projection.astype(np.float32)], [],
         consume=write)
  if traffic is not None:
    traffic.add(passes.traffic)
  return [x[:, :p] for x in local_x]


def _moments_step(chunk, constants):
  """A replica's share of the moments pass (replicas.DevicePass): row count, sum and X^T X
  of the chunk in float64, added to the accumulators on this device (issue 25: a per-chunk
  d x d fetch was 67 MB a chunk at d = 4096)."""
  del constants
  x = tf.cast(chunk, tf.float64)
  n = tf.cast(tf.shape(x)[0], tf.float64)[None]
  return (n, tf.reduce_sum(x, axis=0), tf.matmul(x, x, transpose_a=True)), n


def fit_whitening(strategy, local_x: list[np.ndarray], dim: int = 0, sample: int = 0,
                  chunk_size: int = 16384, local_keys: list[np.ndarray] | None = None,
                  seed: int = 0, traffic: replicas_lib.Traffic | None = None) -> Whitening:
  """Fits on all rows, or on about `sample` rows in all: a seeded sample chosen by each
  row's key (`local_keys`, e.g. image ids; by default the row's global position), so any
  layout of the rows over replicas picks the same sample. Moments accumulate on each
  replica's device in float64 and cross replicas once; their bytes are added to `traffic`."""
  r = replicas_lib.Replicas.of(strategy)
  sizes = r.sizes([len(x) for x in local_x])
  n_all = int(sizes.sum())
  local_rows = [None] * len(local_x)
  if sample and sample < n_all:
    if local_keys is None:
      offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
      local_keys = [np.arange(offsets[r.first + i], offsets[r.first + i + 1])
                    for i in range(len(local_x))]
    local_rows = [replicas_lib.keyed_sample(replicas_lib.row_keys(k, seed + 5), sample / n_all)
                  for k in local_keys]
  d = local_x[0].shape[1]
  moments = replicas_lib.DevicePass(r, _moments_step, chunk_size, 3)
  ((n,), s, xtx), _ = moments(local_x, local_rows, [], [[1], [d], [d, d]])
  if traffic is not None:
    traffic.add(moments.traffic)
  if n < 2:
    raise ValueError(f"PCA needs at least 2 feature rows, got {int(n)}")
  mean = s / n
  cov = xtx / n - np.outer(mean, mean)
  eigenvalues, vectors = np.linalg.eigh(cov)
  order = np.argsort(eigenvalues)[::-1]
  eigenvalues, vectors = eigenvalues[order], vectors[:, order]
  if dim:
    eigenvalues, vectors = eigenvalues[:dim], vectors[:, :dim]
  floored = np.maximum(eigenvalues, max(eigenvalues.max(), 0.0) * EIGEN_FLOOR + 1e-30)
  return Whitening(mean, vectors * floored ** -0.5, eigenvalues)
