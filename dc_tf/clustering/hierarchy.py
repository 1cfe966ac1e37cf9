"""Hierarchical clustering for DeeperCluster (Caron et al., ICCV 2019, Sec. 3.3-3.4).

m super-clusters by k-means on all (whitened) features; then, for each super-cluster in
turn, k sub-clusters of its members, all replicas taking part. The result is a global
table image id -> (super-cluster, sub-cluster) that every worker ends up holding,
gathered with collectives (no files, no shared disk). Clustering runs with TF32 off
(`kmeans.full_float32`): the caller's setting is restored after it.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from dc_tf.clustering import kmeans as km
from dc_tf.clustering import pca


@dataclasses.dataclass
class Assignment:
  """The global pseudo-label table, sorted by image id."""
  image_ids: np.ndarray       # int64 [N]
  super_cluster: np.ndarray   # int32 [N] in [0, m)
  sub_cluster: np.ndarray     # int32 [N] in [0, k)
  resplit: int = 0            # empty clusters re-split, all k-means runs
  inertia: float = 0.0        # sum over the sub-cluster runs

  @property
  def flat_labels(self) -> np.ndarray:
    """One label per (super, sub) pair, for the sampler and NMI."""
    k = int(self.sub_cluster.max()) + 1 if len(self.sub_cluster) else 1
    return self.super_cluster.astype(np.int64) * k + self.sub_cluster


def cluster(strategy, local_features: list[np.ndarray], local_ids: list[np.ndarray], *,
            m: int, k: int, iters: int = 20, pca_dim: int = 0, pca_sample: int = 0,
            seed: int = 0, init: str = "random", chunk_size: int = 8192,
            progress=None, fit_sample: int = 0, in_place: bool = False,
            traffic=None) -> Assignment:
  """Whitens, clusters into m super-clusters then k sub-clusters each; returns the table.

  Memory: with `in_place` the features are whitened over themselves (`local_features` is
  overwritten; otherwise a whitened copy is made), and each super-cluster's members are
  row indices, not copies, so the features are held once.
  `fit_sample` > 0 fits the centroids on at most that many rows per replica (and PCA on as
  many per replica, unless `pca_sample` says otherwise), then assigns every row.

  A super-cluster with fewer than k members gets as many sub-clusters as members, one
  whose members all have identical features gets a single sub-cluster (a warning is
  logged in both cases); an empty one gets none. All-identical features overall raise
  ClusteringError. `progress()`, if given, is called after each k-means iteration.
  Samples and initial centroids are chosen by seeded hashes of the image ids, so the table
  does not depend on which replica holds which image. The bytes of every pass are added to
  `traffic` (a `replicas.Traffic`), if given.
  """
  with km.full_float32():
    return _cluster(strategy, local_features, local_ids, m=m, k=k, iters=iters,
                    pca_dim=pca_dim, pca_sample=pca_sample, seed=seed, init=init,
                    chunk_size=chunk_size, progress=progress, fit_sample=fit_sample,
                    in_place=in_place, traffic=traffic)


def _cluster(strategy, local_features, local_ids, *, m, k, iters, pca_dim, pca_sample, seed,
             init, chunk_size, progress, fit_sample, in_place, traffic) -> Assignment:
  pca_sample = pca_sample or fit_sample * strategy.num_replicas_in_sync
  local_ids = [np.asarray(ids, np.int64) for ids in local_ids]
  whitening = pca.fit_whitening(strategy, local_features, pca_dim, pca_sample,
                                local_keys=local_ids, seed=seed, traffic=traffic)
  local_w = (pca.whiten_in_place(strategy, whitening, local_features, traffic=traffic)
             if in_place else [whitening.apply(x) for x in local_features])
  kmeans = km.DistributedKMeans(strategy, chunk_size, progress)
  resplit, inertia = 0, 0.0
  if m > 1:
    top = kmeans.fit(local_w, m, iters, seed=seed, init=init, log_prefix="super-clusters",
                     sample=fit_sample, local_keys=local_ids)
    local_super = top.assignments
    resplit += top.resplit
  else:
    local_super = [np.zeros(len(x), np.int32) for x in local_w]
  local_sub = [np.zeros(len(x), np.int32) for x in local_w]
  for s in range(m):
    members = [np.flatnonzero(sup == s) for sup in local_super]
    n_s = int(kmeans.replica_sizes(local_w, members).sum())
    if n_s == 0:
      logging.warning("super-cluster %d is empty: no sub-clusters", s)
      continue
    if n_s > 1 and kmeans.check_features(local_w, members)[1] <= 1e-12:
      logging.warning("super-cluster %d: all %d members have identical features (collapse): "
                      "one sub-cluster", s, n_s)
      continue  # every member keeps sub-cluster 0
    k_s = min(k, n_s)
    if k_s < k:
      logging.warning("super-cluster %d has %d members < k=%d: using %d sub-clusters",
                      s, n_s, k, k_s)
    res = kmeans.fit(local_w, k_s, iters, seed=seed + 1 + s, init=init,
                     log_prefix=f"sub-clusters of {s}", local_rows=members, sample=fit_sample,
                     local_keys=[ids[rows] for ids, rows in zip(local_ids, members)])
    resplit += res.resplit
    inertia += res.inertia
    for sub, rows, a in zip(local_sub, members, res.assignments):
      sub[rows] = a
  columns = [np.stack([ids, sup, sub], axis=1)
             for ids, sup, sub in zip(local_ids, local_super, local_sub)]
  table = kmeans.replicas.gather_int64(columns)
  if traffic is not None:
    traffic.add(kmeans.traffic)
  order = np.argsort(table[:, 0], kind="stable")
  table = table[order]
  if len(np.unique(table[:, 0])) != len(table):
    raise km.ClusteringError("duplicate image ids across shards: the id -> cluster table "
                             "would be ambiguous (were shards written twice?)")
  return Assignment(table[:, 0], table[:, 1].astype(np.int32), table[:, 2].astype(np.int32),
                    resplit, inertia)
