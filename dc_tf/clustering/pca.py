"""PCA whitening fitted from cross-replica sums, then L2 normalisation.

As the original (faiss PCAMatrix with eigen_power=-0.5): mean and X^T X are summed over
replicas with all_reduce(SUM), the eigendecomposition is done once on the host, small
eigenvalues are floored at max * 1e-5, and features are projected and scaled by
eigenvalue^-0.5, optionally reduced to `pca_dim`, then L2-normalised.
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
    """Whitened and L2-normalised float32 features."""
    y = (np.asarray(x, np.float32) - self.mean.astype(np.float32)) @ self.projection.astype(np.float32)
    norm = np.linalg.norm(y, axis=1, keepdims=True)
    return y / np.maximum(norm, 1e-12)


def _moments(x):
  x = tf.cast(x, tf.float64)
  stats = [tf.cast(tf.shape(x)[0], tf.float64), tf.reduce_sum(x, axis=0),
           tf.matmul(x, x, transpose_a=True)]
  return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, stats)


def fit_whitening(strategy, local_x: list[np.ndarray], dim: int = 0, sample: int = 0) -> Whitening:
  """Fits on all rows (or about `sample` rows, an equal prefix of every replica's)."""
  if sample:
    per = max(1, sample // max(strategy.num_replicas_in_sync, 1))
    local_x = [x[:per] for x in local_x]
  dist_x = dist.distribute_local(strategy, [np.asarray(x, np.float32) for x in local_x])
  n, s, xtx = (v.numpy() for v in dist.first_local(
      strategy, tf.function(lambda d: strategy.run(_moments, args=(d,)))(dist_x)))
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
