"""Edges of k-means and the hierarchy that no other test reaches (issue 29)."""

import numpy as np
import tensorflow as tf

from conftest import cpu_strategy
from dc_tf.clustering import hierarchy
from dc_tf.clustering import kmeans as km


def test_an_empty_cluster_with_nothing_to_split_keeps_its_centroid():
  """Every non-empty cluster is a singleton, so no split can leave both halves non-empty:
  the empty cluster keeps its previous centroid (finite, not NaN), the others move to their
  means, and no centroid is perturbed by a split."""
  centroids = np.array([[0.0, 0.0], [5.0, 5.0], [9.0, -9.0]])
  counts = np.array([1.0, 1.0, 0.0])
  sums = np.array([[1.0, 2.0], [4.0, 6.0], [0.0, 0.0]])
  new, _ = km.update_centroids(centroids, counts, sums, seed=0, iteration=0)
  np.testing.assert_array_equal(new, [[1.0, 2.0], [4.0, 6.0], [9.0, -9.0]])
  # The guard is what matters: one cluster of two members does get split into the empty one.
  split, n_empty = km.update_centroids(centroids, np.array([2.0, 1.0, 0.0]),
                                       np.array([[2.0, 4.0], [4.0, 6.0], [0.0, 0.0]]), 0, 0)
  assert n_empty == 1
  np.testing.assert_allclose(split[[0, 2]], [[1.0, 2.0]] * 2, rtol=2 * km.EMPTY_SPLIT_EPS)
  assert not np.array_equal(split[0], split[2])


def test_a_replica_with_no_member_of_a_super_cluster_gives_the_one_replica_table():
  """Two far-apart groups (the super-clusters), two blobs each (the sub-clusters); replica 1
  holds rows of group A only, so it has nothing to give the sub-clustering of group B."""
  rng = np.random.default_rng(0)
  centers = np.array([[20.0, 0, 0, 0], [20.0, 6, 0, 0], [-20.0, 0, 0, 0], [-20.0, 0, 6, 0]])
  blob = np.repeat(np.arange(4), 20)
  x = (centers[blob] + rng.normal(0, 0.5, (80, 4))).astype(np.float32)
  ids = rng.permutation(1000)[:80].astype(np.int64)
  group_a = np.flatnonzero(blob < 2)
  on_1 = group_a[::2]                                   # half of A, nothing of B
  on_0 = np.setdiff1d(np.arange(80), on_1)
  kw = dict(m=2, k=2, iters=8, pca_dim=0, seed=0)
  one = hierarchy.cluster(tf.distribute.get_strategy(), [x.copy()], [ids], **kw)
  two = hierarchy.cluster(cpu_strategy(2), [x[on_0], x[on_1]], [ids[on_0], ids[on_1]], **kw)
  np.testing.assert_array_equal(two.image_ids, one.image_ids)
  np.testing.assert_array_equal(two.super_cluster, one.super_cluster)
  np.testing.assert_array_equal(two.sub_cluster, one.sub_cluster)
  # The premise: the table is the 4 blobs, and one super-cluster has no row of replica 1.
  table = dict(zip(two.image_ids, two.flat_labels))
  assert sorted(len({table[i] for i in ids[blob == b]}) for b in range(4)) == [1, 1, 1, 1]
  assert len({table[i] for i in ids}) == 4
  super_of = dict(zip(two.image_ids, two.super_cluster))
  b_super = super_of[ids[np.flatnonzero(blob == 2)[0]]]
  assert not any(super_of[i] == b_super for i in ids[on_1])
