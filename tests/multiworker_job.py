"""Run by the multi-worker tests in separate processes (TF_CONFIG set by the test).

  python tests/multiworker_job.py kmeans OUT.npz   # hierarchical k-means on fixed data
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from dc_tf import distribute as dist  # noqa: E402


def fixed_data(n=900, d=8, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(0, 4, (9, d))
  x = (centers[rng.integers(9, size=n)] + rng.normal(size=(n, d))).astype(np.float32)
  return x, np.arange(n, dtype=np.int64) * 11 + 5


def kmeans_job(out_path):
  from dc_tf.clustering import hierarchy
  strategy = dist.make_strategy(collective_timeout=120)
  x, ids = fixed_data()
  w, n_workers = dist.worker_index(strategy), strategy.num_replicas_in_sync
  rows = np.array_split(np.arange(len(x)), n_workers)[w]
  a = hierarchy.cluster(strategy, [x[rows]], [ids[rows]], m=3, k=3, iters=8, seed=0)
  np.savez(out_path, ids=a.image_ids, sup=a.super_cluster, sub=a.sub_cluster)


if __name__ == "__main__":
  {"kmeans": kmeans_job}[sys.argv[1]](*sys.argv[2:])
