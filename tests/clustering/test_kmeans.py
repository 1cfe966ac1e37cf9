"""k-means and whitening against NumPy / scikit-learn, replicas, errors, hierarchy."""

import numpy as np
import pytest
import tensorflow as tf
from sklearn.cluster import KMeans

from dc_tf.clustering import hierarchy, pca
from dc_tf.clustering import kmeans as km


def blobs(n=2000, d=16, centers=8, seed=0):
  rng = np.random.default_rng(seed)
  c = rng.normal(0, 4, (centers, d))
  return (c[rng.integers(centers, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def default():
  return tf.distribute.get_strategy()


def two_cpus():
  from conftest import two_cpu_strategy
  return two_cpu_strategy()


def test_one_lloyd_step_equals_numpy():
  x = blobs()
  c0 = x[:10].astype(np.float64)
  res = km.DistributedKMeans(default(), chunk_size=300).fit([x], 10, iters=1, centroids=c0)
  d = ((x[:, None, :] - c0[None]) ** 2).sum(-1)
  a = d.argmin(1)
  want = np.stack([x[a == j].mean(0) for j in range(10)])
  np.testing.assert_allclose(res.centroids, want, rtol=1e-4, atol=1e-4)


def test_matches_sklearn_lloyd_from_same_init():
  x = blobs(4000, 32, 20, seed=1)
  c0 = x[np.random.default_rng(0).choice(len(x), 20, replace=False)]
  ours = km.DistributedKMeans(default(), chunk_size=1000).fit([x], 20, iters=20, centroids=c0)
  ref = KMeans(20, init=c0, n_init=1, algorithm="lloyd", max_iter=20, tol=0).fit(x)
  assert (ours.assignments[0] == ref.labels_).mean() >= 0.99
  assert abs(ours.inertia - ref.inertia_) / ref.inertia_ < 1e-3


def test_two_replicas_give_the_same_centroids_as_one():
  x = blobs(1501, 8, 6, seed=2)
  one = km.DistributedKMeans(default(), 256).fit([x], 6, iters=8, seed=3)
  two = km.DistributedKMeans(two_cpus(), 256).fit([x[:700], x[700:]], 6, iters=8, seed=3)
  np.testing.assert_allclose(one.centroids, two.centroids, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(one.assignments[0], np.concatenate(two.assignments))


def test_empty_clusters_are_resplit():
  x = blobs(500, 4, 3)
  c0 = np.repeat(x[:1], 5, axis=0).astype(np.float64)  # 5 identical centroids: 4 empty
  res = km.DistributedKMeans(default()).fit([x], 5, iters=5, centroids=c0)
  assert res.resplit >= 4
  assert (res.counts > 0).all()
  # Deterministic: the same seed re-splits the same way.
  again = km.DistributedKMeans(default()).fit([x], 5, iters=5, centroids=c0)
  np.testing.assert_array_equal(res.centroids, again.centroids)


def test_kmeans_plus_plus_and_errors():
  x = blobs(300, 4, 3)
  res = km.DistributedKMeans(default()).fit([x], 3, iters=5, seed=0, init="kmeans++")
  assert res.counts.sum() == 300
  with pytest.raises(km.ClusteringError, match="only 300 points"):
    km.DistributedKMeans(default()).fit([x], 301, iters=1)
  bad = x.copy()
  bad[5, 0] = np.nan
  with pytest.raises(km.ClusteringError, match="NaN"):
    km.DistributedKMeans(default()).fit([bad], 3, iters=1)
  with pytest.raises(km.ClusteringError, match="identical"):
    km.DistributedKMeans(default()).fit([np.ones([50, 4], np.float32)], 3, iters=1)


def kmeans_plus_plus_by_hand(x, ids, k, seed, sample_size):
  """DeeperCluster's seeding as `init_centroids` defines it, in NumPy: the sample_size rows of
  smallest seeded key (replicas.row_keys of the ids), in key order, then k-means++ (Arthur &
  Vassilvitskii 2007) with numpy's Generator(seed): the first centre uniform, each next one
  drawn with probability D(x)^2 / sum D^2, D the distance to the nearest centre so far."""
  from dc_tf.clustering.replicas import row_keys
  sample = x[np.argsort(row_keys(ids, seed))[:sample_size]].astype(np.float64)
  rng = np.random.default_rng(seed)
  centres = [sample[rng.integers(len(sample))]]
  for _ in range(1, k):
    d2 = np.min([((sample - c) ** 2).sum(1) for c in centres], axis=0)
    centres.append(sample[rng.choice(len(sample), p=d2 / d2.sum())])
  return np.stack(centres)


def test_kmeans_plus_plus_is_the_keyed_sample_then_d2_draws():
  """A seeded draw reproduced by hand, for one replica and for the rows split over two
  (image ids as keys: the same centres whichever replica holds a row); the centres are
  distinct rows of the data."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 3)).astype(np.float32)
  ids = rng.permutation(1000)[:40].astype(np.int64)
  for seed in (0, 1, 2):
    want = kmeans_plus_plus_by_hand(x, ids, 4, seed, 12)
    one = km.DistributedKMeans(default()).init_centroids([x], 4, seed, "kmeans++",
                                                         sample_size=12, local_keys=[ids])
    two = km.DistributedKMeans(two_cpus()).init_centroids(
        [x[:25], x[25:]], 4, seed, "kmeans++", sample_size=12, local_keys=[ids[:25], ids[25:]])
    np.testing.assert_array_equal(one, want)
    np.testing.assert_array_equal(two, want)
    rows = [np.flatnonzero((x == c).all(1)) for c in one]
    assert all(len(r) == 1 for r in rows) and len({int(r[0]) for r in rows}) == 4


def test_kmeans_plus_plus_draws_the_second_centre_by_squared_distance():
  """The D^2 law on five points of a line, over 6000 seeds through `init_centroids`: the first
  centre is uniform, and given it, the second lands on point j with probability
  D(j)^2 / sum D^2 (never on the first). A chi-square over all cells, 4 + 5 x 3 = 19 degrees
  of freedom; the seeds are fixed, so the outcome is too (p = 0.31 here; D or D^4 in place of
  D^2 gives p < 1e-190, a uniform draw lands on the first point again)."""
  from scipy import stats
  x = np.array([[0.0], [1.0], [2.0], [4.0], [7.0]], np.float32)
  fit = km.DistributedKMeans(default())
  n = 6000
  counts = np.zeros([5, 5])
  for seed in range(n):
    c = fit.init_centroids([x], 2, seed, "kmeans++")
    first, second = (int(np.flatnonzero(x[:, 0] == v)[0]) for v in c[:, 0])
    counts[first, second] += 1
  assert np.trace(counts) == 0                            # never the same point twice
  d2 = (x - x.T) ** 2
  law = d2 / d2.sum(1, keepdims=True)
  firsts = counts.sum(1)
  expected = firsts[:, None] * law
  cells = expected > 0
  chi2 = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()
  chi2 += ((firsts - n / 5) ** 2 / (n / 5)).sum()
  assert stats.chi2.sf(chi2, 4 + 5 * 3) > 1e-3, chi2


def test_whitening_gives_identity_covariance():
  x = blobs(3000, 8, 4) @ np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
  w = pca.fit_whitening(default(), [x])
  y = (x - w.mean) @ w.projection
  np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(8), atol=1e-3)
  z = w.apply(x)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, rtol=1e-5)
  assert pca.fit_whitening(default(), [x], dim=3).projection.shape == (8, 3)
  two = pca.fit_whitening(two_cpus(), [x[:1000], x[1000:]])
  np.testing.assert_allclose(np.abs(two.projection), np.abs(w.projection), rtol=1e-3, atol=1e-4)


def test_hierarchy_table():
  x = blobs(1200, 8, 12, seed=4)
  ids = np.arange(1200, dtype=np.int64)[::-1] * 3
  a = hierarchy.cluster(two_cpus(), [x[:600], x[600:]], [ids[:600], ids[600:]], m=3, k=4,
                        iters=10, pca_dim=0, seed=0)
  np.testing.assert_array_equal(a.image_ids, np.sort(ids))
  assert set(a.super_cluster) == {0, 1, 2} and a.sub_cluster.max() == 3
  assert len(np.unique(a.flat_labels)) == 12
  single = hierarchy.cluster(default(), [x], [ids], m=3, k=4, iters=10, seed=0)
  np.testing.assert_array_equal(single.flat_labels, a.flat_labels)


def test_small_super_cluster_uses_fewer_sub_clusters():
  # Documented fallback: a super-cluster with n_s < k members gets n_s sub-clusters.
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  a = hierarchy.cluster(default(), [x], [np.arange(3)], m=1, k=5, iters=5, seed=0)
  assert sorted(a.sub_cluster) == [0, 1, 2]


def test_fitted_on_a_sample_then_every_row_assigned():
  """fit_sample: PCA and centroids from at most 300 rows per replica, every row assigned, at
  an inertia within 5% of fitting on everything; a cap above the rows changes nothing."""
  # One level of k = 6 on 6 blobs with k-means++: both fits find the blobs (with m = 2 x k = 3
  # the split of 6 blobs into 2 groups has several local optima, whichever rows fit them).
  x = blobs(2400, 8, 6, seed=5)
  ids = np.arange(2400, dtype=np.int64)
  halves = lambda: ([x[:1200].copy(), x[1200:].copy()], [ids[:1200], ids[1200:]])  # noqa: E731
  full = hierarchy.cluster(two_cpus(), *halves(), m=1, k=6, iters=10, seed=0, init="kmeans++")
  capped = hierarchy.cluster(two_cpus(), *halves(), m=1, k=6, iters=10, seed=0,
                             fit_sample=300, in_place=True, init="kmeans++")
  assert len(capped.image_ids) == 2400 and capped.sub_cluster.min() >= 0
  assert capped.inertia < 1.05 * full.inertia
  same = hierarchy.cluster(two_cpus(), *halves(), m=1, k=6, iters=10, seed=0,
                           fit_sample=5000, in_place=True, init="kmeans++")
  np.testing.assert_array_equal(same.flat_labels, full.flat_labels)


def test_float16_features_cluster_like_float32_and_whiten_in_place():
  from sklearn.metrics import normalized_mutual_info_score
  x = blobs(1500, 16, 5, seed=6)
  ids = np.arange(1500, dtype=np.int64)
  ref = hierarchy.cluster(default(), [x], [ids], m=1, k=5, iters=10, seed=0, pca_dim=8)
  half = x.astype(np.float16)
  w = pca.fit_whitening(default(), [half], dim=8)
  view = w.apply_in_place(half)
  assert np.shares_memory(view, half) and view.dtype == np.float16 and view.shape == (1500, 8)
  np.testing.assert_allclose(np.linalg.norm(view.astype(np.float32), axis=1), 1, atol=2e-3)
  got = hierarchy.cluster(default(), [x.astype(np.float16)], [ids], m=1, k=5, iters=10, seed=0,
                          pca_dim=8, in_place=True)
  assert normalized_mutual_info_score(ref.flat_labels, got.flat_labels) > 0.95


def test_extraction_stacks_batches_without_holding_them_twice():
  from dc_tf.clustering.extract import _stack
  parts = [np.full([3, 2], i, np.float32) for i in range(4)]
  out = _stack(parts, np.float16)
  assert out.dtype == np.float16 and out.shape == (12, 2) and out[-1, 0] == 3
  assert parts == [None] * 4          # each batch released once copied
