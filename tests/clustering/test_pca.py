"""PCA whitening (dc_tf.clustering.pca) against NumPy's eigendecomposition: the top components
kept, unit variance after whitening, and the eigenvalue floor on rank-deficient features."""

import numpy as np
import tensorflow as tf

from dc_tf.clustering import pca


def spectrum_data(n=4000, seed=0):
  """Rows whose covariance has the clear spectrum 100, 25, 9, 1, 0.25, ... in a random basis."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  scales = np.array([10.0, 5.0, 3.0, 1.0, 0.5, 0.3, 0.2, 0.1])
  x = (rng.normal(size=(n, 8)) * scales) @ basis.T + rng.normal(0, 3, 8)
  return x.astype(np.float32)


def test_pca_keeps_the_top_components_and_whitens_them():
  x = spectrum_data()
  w = pca.fit_whitening(tf.distribute.get_strategy(), [x], dim=3)
  cov = np.cov(x.astype(np.float64).T, bias=True)
  values, vectors = np.linalg.eigh(cov)
  top = vectors[:, ::-1][:, :3]
  np.testing.assert_allclose(w.eigenvalues, values[::-1][:3], rtol=1e-4)
  np.testing.assert_allclose(w.mean, x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
  # The projection spans NumPy's top-3 eigenvectors: equal orthogonal projectors.
  q, _ = np.linalg.qr(w.projection)
  np.testing.assert_allclose(q @ q.T, top @ top.T, atol=1e-4)
  # Each column is its eigenvector scaled by eigenvalue^-1/2 (whitening, faiss eigen_power -0.5).
  np.testing.assert_allclose(np.linalg.norm(w.projection, axis=0), values[::-1][:3] ** -0.5,
                             rtol=1e-4)
  y = (x - w.mean) @ w.projection
  np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(3), atol=1e-3)


def test_eigenvalue_floor_on_rank_deficient_features():
  """Rank 2 in 6 dimensions: 4 eigenvalues are 0 up to rounding (some negative). As
  documented, they are floored at max * EIGEN_FLOOR, so the whitening stays finite: those
  directions are scaled by (max * 1e-5)^-1/2, and the data (which has no variance there)
  still whitens to unit variance in its own 2 directions and to unit L2 norm."""
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(500, 2)) * [10.0, 2.0]) @ rng.normal(size=(2, 6)) + 5.0
  x = x.astype(np.float32)
  w = pca.fit_whitening(tf.distribute.get_strategy(), [x])
  assert np.isfinite(w.projection).all() and w.projection.shape == (6, 6)
  top = w.eigenvalues[0]
  assert top > 10 and (np.abs(w.eigenvalues[2:]) < top * 1e-6).all()
  norms = np.linalg.norm(w.projection, axis=0)
  np.testing.assert_allclose(norms[:2], w.eigenvalues[:2] ** -0.5, rtol=1e-4)
  np.testing.assert_allclose(norms[2:], (top * pca.EIGEN_FLOOR) ** -0.5, rtol=1e-6)
  y = (x.astype(np.float64) - w.mean) @ w.projection
  np.testing.assert_allclose(np.cov(y[:, :2].T, bias=True), np.eye(2), atol=1e-3)
  z = w.apply(x)
  assert np.isfinite(z).all()
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, rtol=1e-5)
