"""The reference line of Figs. 4 and 6: another run's trunk (the paper's RotNet) clustered on
the same shards with the analysed run's k, as its own training would have (fc7, PCA-whitened,
k-means; `dc_tf.clustering.hierarchy`, one level of m x k clusters)."""

from __future__ import annotations

import logging

import tensorflow as tf

from dc_tf.analysis.nmi import Table
from dc_tf.clustering import extract, hierarchy
from dc_tf.config import ExperimentConfig
from dc_tf.training import checkpointing


def clusters_of(reference_dir: str, pattern: str, config: ExperimentConfig) -> Table:
  """`reference_dir`'s trunk, its fc7 on `pattern`, k-means into the analysed run's m x k
  clusters with its PCA and iterations; a Table named after the reference."""
  trunk, ref_config, step = checkpointing.load_trunk(reference_dir)
  c = config.clustering
  k = config.num_super_clusters * c.k
  logging.info("reference %s (step %d): fc7 on %s, k-means k=%d", reference_dir, step,
               pattern, k)
  feats = extract.extract(trunk, pattern, image_size=ref_config.model.image_size,
                          progress=False)
  a = hierarchy.cluster(tf.distribute.get_strategy(), [feats["fc7"]], [feats["image_id"]],
                        m=1, k=min(k, len(feats["image_id"])), iters=c.kmeans_iters,
                        pca_dim=min(c.pca_dim, feats["fc7"].shape[1]), seed=c.seed,
                        init=c.kmeans_init, in_place=True)
  return Table(ref_config.train.mode, a.image_ids, a.flat_labels)
