"""--fit_sample per replica, chosen globally (issue 38 item 5): the rows k-means is fitted
on depend on the replica count and the pool, not on how replicas are spread over workers."""

import numpy as np
import tensorflow as tf

from dc_tf.clustering import kmeans as km
from dc_tf.training import reassignment


def shards(ids, parts, seed):
  """`ids` dealt at random to `parts` replicas, as shards land on workers."""
  owner = np.random.default_rng(seed).integers(parts, size=len(ids))
  return [ids[owner == p] for p in range(parts)]


def test_two_workers_of_two_fit_on_the_rows_of_one_worker_of_four():
  ids = np.random.default_rng(0).choice(10**9, size=4000, replace=False).astype(np.int64)
  fit_sample = 150                                  # per replica: 600 of 4000 rows in all
  one_by_four = reassignment.fit_rows(shards(ids, 4, seed=1), fit_sample, seed=3)
  two_workers = [r for worker in shards(ids, 2, seed=2) for r in shards(worker, 2, seed=4)]
  two_by_two = reassignment.fit_rows(two_workers, fit_sample, seed=3)
  np.testing.assert_array_equal(one_by_four, two_by_two)
  # about fit_sample x replicas rows (binomial: 600 +- 3 sd of ~23), not per worker's share
  assert abs(len(one_by_four) - 4 * fit_sample) < 3 * np.sqrt(4 * fit_sample)
  # the per-worker reading (fit_sample split over a worker's 2 replicas) fits on half as many
  per_worker = reassignment.fit_rows(two_workers, fit_sample // 2, seed=3)
  assert len(per_worker) < 0.7 * len(two_by_two)
  # another seed, other rows; a cap above the pool, every row
  assert not np.array_equal(reassignment.fit_rows(two_workers, fit_sample, seed=4), two_by_two)
  np.testing.assert_array_equal(reassignment.fit_rows(two_workers, 2000, seed=3), np.sort(ids))


def test_fit_rows_are_the_rows_kmeans_fits_on():
  """k-means with sample=s ends at the centroids of k-means on fit_rows' rows alone (same
  keys, so the same initial centroids and Lloyd passes)."""
  rng = np.random.default_rng(5)
  x = (rng.normal(0, 4, (5, 6))[rng.integers(5, size=1200)]
       + rng.normal(size=(1200, 6))).astype(np.float32)
  ids = rng.choice(10**9, size=1200, replace=False).astype(np.int64)
  kmeans = km.DistributedKMeans(tf.distribute.get_strategy(), chunk_size=256)
  sampled = kmeans.fit([x], 5, 4, seed=7, sample=200, local_keys=[ids])
  rows = np.flatnonzero(np.isin(ids, reassignment.fit_rows([ids], 200, seed=7)))
  alone = kmeans.fit([x[rows]], 5, 4, seed=7, local_keys=[ids[rows]])
  assert 100 < len(rows) < 300
  np.testing.assert_allclose(sampled.centroids, alone.centroids, rtol=1e-5, atol=1e-5)


def test_the_reassignment_passes_fit_sample_per_replica(monkeypatch):
  """What `reassign` hands the clustering is --fit_sample itself (per replica), not a worker's
  cap split over its local replicas (the rule before): checked on 2 local replicas."""
  import contextlib
  import types
  from conftest import cpu_strategy
  from dc_tf.config import ExperimentConfig
  from dc_tf.training import reassignment as ra
  cfg = ExperimentConfig().replace(clustering={"fit_sample": 123})
  feats = [{"fc7": np.zeros([4, 2], np.float32), "image_id": np.arange(4) + 4 * i,
            "skipped": 0} for i in range(2)]
  monkeypatch.setattr(ra.extract, "extract_per_replica", lambda *a, **k: feats)
  seen = {}

  class Stop(Exception):
    pass

  def cluster(strategy, local_f, local_ids, **kw):
    seen.update(kw, replicas=len(local_f))
    raise Stop
  monkeypatch.setattr(ra.hierarchy, "cluster", cluster)
  run = types.SimpleNamespace(
      config=cfg, strategy=cpu_strategy(2), trunk=None, is_chief=True,
      stopping=types.SimpleNamespace(guard=lambda what: contextlib.nullcontext(),
                                     watchdog=types.SimpleNamespace(beat=lambda: None)))
  try:
    ra.reassign(run, epoch=3)
  except Stop:
    pass
  assert seen["replicas"] == 2 and seen["fit_sample"] == 123
