"""PCA whitening fitted from cross-replica sums, then L2 normalisation.

As the original (faiss PCAMatrix with eigen_power=-0.5): mean and X^T X are summed over
replicas with all_reduce(SUM), the eigendecomposition is done once on the host, small
eigenvalues are floored at max * 1e-5, and features are projected and scaled by
eigenvalue^-0.5, optionally reduced to `pca_dim`, then L2-normalised.

Memory: moments are accumulated chunk by chunk from the host rows (float32 or float16),
on a seeded sample of them when asked (the original fits its PCA on a bounded number of
images), and `Whitening.apply_in_place` writes the whitened rows over the features they
came from, so clustering holds the features once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from dc_tf import distribute as dist

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


def _moments(x):
  x = tf.cast(x, tf.float64)
  return tf.cast(tf.shape(x)[0], tf.float64), tf.reduce_sum(x, axis=0), tf.matmul(x, x, transpose_a=True)


_chunk_moments = tf.function(_moments, reduce_retracing=True)


def sample_rows(n: int, sample: int, seed: int) -> np.ndarray | None:
  """Sorted indices of a seeded sample of `sample` of n rows (None: all of them)."""
  if not sample or n <= sample:
    return None
  return np.sort(np.random.default_rng([seed, 5]).choice(n, sample, replace=False))


def fit_whitening(strategy, local_x: list[np.ndarray], dim: int = 0, sample: int = 0,
                  chunk_size: int = 16384) -> Whitening:
  """Fits on all rows, or on about `sample` rows in all (a seeded sample of each replica's)."""
  from dc_tf.clustering import kmeans as km
  per = max(1, sample // max(strategy.num_replicas_in_sync, 1)) if sample else 0
  first = dist.worker_index(strategy) * dist.num_local_replicas(strategy)
  stats = []
  for i, (device, x) in enumerate(zip(dist.local_devices(strategy), local_x)):
    rows = sample_rows(len(x), per, first + i)
    d = x.shape[1]
    n, s, xtx = 0.0, np.zeros(d), np.zeros([d, d])
    with tf.device(device):
      for start in range(0, len(x) if rows is None else len(rows), chunk_size):
        part = x[start:start + chunk_size] if rows is None else x[rows[start:start + chunk_size]]
        cn, cs, cxtx = _chunk_moments(tf.constant(np.asarray(part, np.float32)))
        n, s, xtx = n + float(cn), s + cs.numpy(), xtx + cxtx.numpy()
    stats.append([np.array([n]), s, xtx])
  (n,), s, xtx = km.DistributedKMeans(strategy).sum_over_replicas(stats)
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
