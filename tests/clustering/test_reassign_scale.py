"""The reassignment at scale (issue 25): every replica extracts its share, k-means and PCA
passes keep their sums on the device (float64, one cross-replica sum a pass, traffic counted
and independent of the chunk count), TF32 off while clustering."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import cpu_strategy
from dc_tf.clustering import extract, hierarchy, pca
from dc_tf.clustering import kmeans as km
from dc_tf.models import vgg


def trunk_on(strategy, weights=None):
  with strategy.scope():
    trunk = vgg.build_trunk(32, 0.125, 16)
  if weights is not None:
    trunk.set_weights(weights)
  return trunk


def test_every_replica_extracts_its_share_and_the_table_equals_one_replicas(tiny_shards):
  one = trunk_on(tf.distribute.get_strategy())
  single = extract.extract(one, tiny_shards, image_size=32, batch_size=4, progress=False)
  four = cpu_strategy(4)
  per = extract.extract_per_replica(four, trunk_on(four, one.get_weights()), tiny_shards,
                                    image_size=32, batch_size=4, progress=False)
  assert [len(p["image_id"]) for p in per] == [12, 12, 12, 12]   # 48 images, 12 batches of 4
  assert [p["computed_on"].rsplit(":", 1)[1] for p in per] == ["0", "1", "2", "3"]
  ids = np.concatenate([p["image_id"] for p in per])
  assert sorted(ids) == sorted(single["image_id"])
  by_id = dict(zip(single["image_id"], single["fc7"]))
  np.testing.assert_allclose(np.concatenate([p["fc7"] for p in per]),
                             np.stack([by_id[i] for i in ids]), rtol=1e-5, atol=1e-5)
  want = hierarchy.cluster(tf.distribute.get_strategy(), [single["fc7"]], [single["image_id"]],
                           m=2, k=3, iters=5, pca_dim=8, seed=0)
  got = hierarchy.cluster(four, [p["fc7"] for p in per], [p["image_id"] for p in per],
                          m=2, k=3, iters=5, pca_dim=8, seed=0)
  np.testing.assert_array_equal(got.image_ids, want.image_ids)
  np.testing.assert_array_equal(got.super_cluster, want.super_cluster)
  np.testing.assert_array_equal(got.sub_cluster, want.sub_cluster)


def test_a_replica_left_without_a_batch_in_the_last_round(tiny_shards):
  """48 images in batches of 5 are 10 batches: the last round has 2 for 4 replicas. The two
  without one used to run an empty batch, which TF's CPU conv of the Sobel front refused."""
  four = cpu_strategy(4)
  per = extract.extract_per_replica(four, trunk_on(four), tiny_shards, image_size=32,
                                    batch_size=5, progress=False)
  assert [len(p["image_id"]) for p in per] == [15, 13, 10, 10]   # batches 0,4,8 | 1,5,9(3) | ...
  assert len(set(np.concatenate([p["image_id"] for p in per]))) == 48


def hard_sums_set(n=200_000, d=4, seed=0):
  """Two tight clusters far from the origin: a float32 running sum of one cluster's rows
  drifts by more than 1e-6 relative."""
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 1, (n, d)) + np.where(rng.random(n) < 0.7, 1000.0, -1000.0)[:, None]
  return x.astype(np.float32)


def test_pass_sums_on_device_are_float64_exact_and_traffic_is_one_pass_worth():
  x = hard_sums_set()
  c = np.array([[1000.0] * 4, [-1000.0] * 4])
  a = (x[:, 0] < 0).astype(int)
  want = np.stack([x[a == j].astype(np.float64).sum(0) for j in range(2)])
  naive = np.stack([np.cumsum(x[a == j], axis=0, dtype=np.float32)[-1] for j in range(2)])
  assert np.abs(naive - want).max() / np.abs(want).max() > 1e-6   # the set is hard enough
  traffic = {}
  for strategy, parts in ((tf.distribute.get_strategy(), [x]),
                          (cpu_strategy(4), np.array_split(x, 4))):
    for chunk in (2048, 16384):
      kmeans = km.DistributedKMeans(strategy, chunk_size=chunk)
      counts, sums, inertia, _ = kmeans._run(list(parts), [None] * len(parts), c)
      np.testing.assert_array_equal(counts, np.bincount(a))
      np.testing.assert_allclose(sums, want, rtol=1e-6 / 10)
      # (the inertia's float32 distances ||c||^2 - 2x.c + ||x||^2 cancel at 1e6 from the
      # origin; its accuracy is checked against sklearn on centred data in test_kmeans.py)
      traffic[strategy.num_replicas_in_sync, chunk] = kmeans.pass_traffic[-1]
  payload = (2 + 2 * 4 + 1) * 8            # counts, sums, inertia in float64
  consts = 2 * 4 * 4 + 2 * 4               # -2c and ||c||^2 in float32
  for (replicas, chunk), t in traffic.items():
    assert t.to_device == x.nbytes + consts * replicas      # the rows once, whatever the chunk
    assert t.from_device == payload                           # fetched once per pass
    assert t.cross_replica == (payload if replicas > 1 else 0)
  assert traffic[1, 2048].chunk_steps == 98 and traffic[1, 16384].chunk_steps == 13


def test_pca_moments_accumulate_in_float64_on_the_device():
  x = hard_sums_set(100_000)
  ref_mean = x.astype(np.float64).mean(0)
  xc = x.astype(np.float64) - ref_mean
  ref_cov = xc.T @ xc / len(x)
  traffic = km.replicas_lib.Traffic()
  w = pca.fit_whitening(cpu_strategy(4), np.array_split(x, 4), chunk_size=4096, traffic=traffic)
  np.testing.assert_allclose(w.mean, ref_mean, rtol=1e-9)
  eig = np.sort(np.linalg.eigvalsh(ref_cov))[::-1]
  np.testing.assert_allclose(w.eigenvalues, eig, rtol=1e-6)
  assert traffic.to_device == x.nbytes and traffic.from_device == (1 + 4 + 16) * 8


def test_tf32_is_off_while_clustering_and_restored_after():
  seen = []
  previous = tf.config.experimental.tensor_float_32_execution_enabled()
  tf.config.experimental.enable_tensor_float_32_execution(True)
  try:
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    hierarchy.cluster(tf.distribute.get_strategy(), [x], [np.arange(60)], m=2, k=2, iters=2,
                      progress=lambda: seen.append(
                          tf.config.experimental.tensor_float_32_execution_enabled()))
    assert seen and not any(seen)
    assert tf.config.experimental.tensor_float_32_execution_enabled()
    with pytest.raises(km.ClusteringError):   # restored on an error too
      hierarchy.cluster(tf.distribute.get_strategy(), [np.ones([5, 4], np.float32)],
                        [np.arange(5)], m=2, k=2, iters=1)
    assert tf.config.experimental.tensor_float_32_execution_enabled()
  finally:
    tf.config.experimental.enable_tensor_float_32_execution(previous)


def test_samples_and_init_follow_image_ids_not_replica_layout():
  """The same rows, held by replicas in another order, give the same table."""
  rng = np.random.default_rng(3)
  x = (rng.normal(0, 4, (6, 8))[rng.integers(6, size=600)] + rng.normal(size=(600, 8)))
  x, ids = x.astype(np.float32), rng.permutation(10_000)[:600].astype(np.int64)
  perm = rng.permutation(600)
  kw = dict(m=2, k=3, iters=6, pca_dim=8, seed=1, fit_sample=100, init="kmeans++")
  one = hierarchy.cluster(tf.distribute.get_strategy(), [x.copy()], [ids], **kw)
  parts = np.array_split(perm, 4)
  four = hierarchy.cluster(cpu_strategy(4), [x[p] for p in parts], [ids[p] for p in parts],
                           **{**kw, "fit_sample": 25})
  np.testing.assert_array_equal(four.flat_labels, one.flat_labels)


def test_whitening_in_place_on_every_replica_equals_the_host_projection():
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))).astype(np.float32)
  w = pca.fit_whitening(tf.distribute.get_strategy(), [x], dim=5)
  want = w.apply(x)
  parts = [p.copy() for p in np.array_split(x, 4)]
  traffic = km.replicas_lib.Traffic()
  views = pca.whiten_in_place(cpu_strategy(4), w, parts, chunk_size=64, traffic=traffic)
  assert all(np.shares_memory(v, p) and v.shape[1] == 5 for v, p in zip(views, parts))
  np.testing.assert_allclose(np.concatenate(views), want, rtol=1e-5, atol=1e-5)
  assert traffic.from_device == 500 * 5 * 4   # the whitened rows, once
