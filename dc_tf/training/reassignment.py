"""Re-clustering every T epochs (Caron et al. 2019, Sec. 3.3): fc7 of every image,
PCA-whitened, L2-normalised, clustered hierarchically into m super-clusters of k; the new
id -> (super, sub) table replaces the old one and the heads start afresh.

Every phase runs on every replica through the strategy (dc_tf.clustering); what is logged
is one record per reassignment, with the bytes it moved.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf
from sklearn.metrics import normalized_mutual_info_score

from dc_tf.clustering import extract, hierarchy
from dc_tf.clustering import replicas as replicas_lib
from dc_tf.data import reader
from dc_tf.training import checkpointing

if TYPE_CHECKING:   # the trainer imports this module: the type only, no import circle
  from dc_tf.training.trainer import Trainer

COLLAPSE_SHARE = 0.5     # one cluster holding more than this share of the images: alarm


def reassign(run: Trainer, epoch: int) -> dict:
  """Extracts fc7 of every image, whitens, clusters hierarchically, re-inits heads."""
  cfg, t0 = run.config, time.time()
  logging.info("reassignment at epoch %d: extracting features, then k-means", epoch)
  # Every local replica extracts its share on its device; the rows stay in host memory,
  # one array per replica, for the clustering's per-replica passes (issue 25).
  feats = extract.extract_per_replica(
      run.strategy, run.trunk, cfg.data.data_pattern, image_size=cfg.model.image_size,
      batch_size=max(run.config.train.batch_per_replica, 128), progress=run.is_chief,
      dtype=np.dtype(cfg.clustering.feature_dtype))
  local_f = [f.pop("fc7") for f in feats]
  local_ids = [f["image_id"] for f in feats]
  c = cfg.clustering
  traffic = replicas_lib.Traffic()
  with run.stopping.guard("clustering"):
    assignment = hierarchy.cluster(
        run.strategy, local_f, local_ids, m=cfg.num_super_clusters, k=c.k,
        iters=c.kmeans_iters, pca_dim=c.pca_dim, pca_sample=c.pca_sample,
        seed=c.seed + 1000 * epoch, init=c.kmeans_init, chunk_size=c.chunk_size,
        progress=run.stopping.watchdog.beat,
        fit_sample=c.fit_sample, in_place=True,
        traffic=traffic)
    # Each local replica's dict holds its worker's count: once a worker, summed over workers.
    skipped = replicas_lib.Replicas.of(run.strategy).sum(
        [[np.float64(f["skipped"] if i == 0 else 0)] for i, f in enumerate(feats)])[0]
  del local_f   # whitened in place by the clustering; not needed any more
  run.table_ids.assign(assignment.image_ids)
  run.table_super.assign(assignment.super_cluster)
  run.table_sub.assign(assignment.sub_cluster)
  run.assignment_epoch.assign(epoch)
  if cfg.train.reinit_heads:
    reinitialize_heads(run, epoch)
  labels = assignment.flat_labels
  sizes = np.bincount(labels)
  kept = keep_table(run, epoch)
  stats = {"event": "reassign", "epoch": epoch, "images": int(len(labels)),
           "seconds": round(time.time() - t0, 2), "empty_resplit": assignment.resplit,
           "nonempty_clusters": int((sizes > 0).sum()),
           "largest_cluster_share": float(sizes.max() / len(labels)),
           "skipped_records": int(skipped),
           "host_to_device_bytes": traffic.to_device,
           "device_to_host_bytes": traffic.from_device,
           "cross_replica_bytes": traffic.cross_replica}
  if kept is not None:
    stats["assignment_tables"] = kept
  if stats["largest_cluster_share"] > COLLAPSE_SHARE:
    logging.warning("collapse alarm: one cluster holds %.0f%% of the images (> %.0f%%): "
                    "features may be collapsing (lower --lr, check the data)",
                    100 * stats["largest_cluster_share"], 100 * COLLAPSE_SHARE)
    stats["collapse_alarm"] = True
  if run.previous_labels is not None and len(run.previous_labels) == len(labels):
    stats["nmi_previous"] = float(normalized_mutual_info_score(run.previous_labels, labels))
  run.previous_labels = labels
  if cfg.train.knn_monitor and cfg.data.eval_pattern:
    stats["knn_top1"] = _knn_monitor(run)
  with run.writer.as_default(step=int(run.step.numpy())):
    tf.summary.histogram("clusters/sizes", sizes)
    for key in ("nmi_previous", "knn_top1", "largest_cluster_share", "empty_resplit"):
      if key in stats:
        tf.summary.scalar(f"clusters/{key}", stats[key])
  return stats


def fit_rows(replica_ids: list[np.ndarray], fit_sample: int, seed: int) -> np.ndarray:
  """The image ids a k-means fit of `seed` is fitted on, as `kmeans.DistributedKMeans.fit`
  picks them: `replica_ids` holds every replica's ids (all workers' replicas, in any order),
  `fit_sample` is per replica (--fit_sample, as the original's 3,150,000-image cache per
  process, src/distributed_kmeans.py). An image is kept where a seeded hash of its id falls
  below fit_sample x replicas / pool of the hash range, so the rows depend on the number of
  replicas and the pool only: 2 workers x 2 replicas fit on the rows 1 worker x 4 does."""
  n = sum(len(ids) for ids in replica_ids)
  if not fit_sample or fit_sample * len(replica_ids) >= n:
    return np.sort(np.concatenate(replica_ids))
  fraction = fit_sample * len(replica_ids) / n
  picked = [ids[replicas_lib.keyed_sample(replicas_lib.row_keys(ids, seed + 11), fraction)]
            for ids in replica_ids]
  return np.sort(np.concatenate(picked))


def keep_table(run: Trainer, epoch: int) -> list[int] | None:
  """The chief keeps the run's current table as MODEL_DIR/assignments/table-<epoch>.npy
  (`checkpointing.save_assignments`); returns the epochs kept, None on other workers. The
  labels are super * k + sub with the configured k, so an epoch's labels mean the same
  cluster numbers whatever the table's largest sub-cluster."""
  if not run.is_chief:
    return None
  labels = (run.table_super.numpy().astype(np.int64) * run.config.clustering.k
            + run.table_sub.numpy())
  return checkpointing.save_assignments(
      run.config.train.model_dir, epoch, run.table_ids.numpy(), labels.astype(np.int32),
      run.config.train.keep_assignments)


def reinitialize_heads(run: Trainer, epoch: int) -> None:
  """Fresh sub-heads (and V when the super-clusters changed, m > 1) with zero momentum:
  the new pseudo-labels have no relation to the old ones."""
  seed = run.config.train.seed + 7919 * (epoch + 1)
  if run.sub_heads is not None:
    run.local_optimizer.reset_slots(run.sub_heads.reinitialize(seed))
  if run.config.num_super_clusters > 1:
    run.optimizer.reset_slots(run.super_head.reinitialize(seed))


def _knn_monitor(run: Trainer) -> float:
  """Leave-one-out 20-NN (cosine) top-1 on the labelled eval slice: are features forming?"""
  from dc_tf.evaluation import metrics
  try:
    feats = extract.extract(run.trunk, run.config.data.eval_pattern,
                            image_size=run.config.model.image_size, progress=False)
  except reader.DataError as e:
    logging.warning("kNN monitor off: %s", e)
    return float("nan")
  if (feats["label"] < 0).all():
    return float("nan")
  return metrics.knn_leave_one_out(feats["fc7"], feats["label"])
