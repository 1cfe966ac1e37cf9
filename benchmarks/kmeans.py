r"""k-means: dc_tf (tf.function, cross-replica sums) vs faiss-cpu vs scikit-learn (lloyd).

Side by side in one run, on the same whitened, L2-normalised data and the same initial
centroids, 10 iterations each, for (N=200k, d=128, k=1000) and (N=20k, d=4096, k=500).
Reports s/iteration, ratios, final inertia, the assignment step's GFLOP/s against this
machine's float32 matmul peak (measured here, numpy and TF), and peak extra memory over
the feature matrix. Writes benchmarks/results/kmeans.json.

  pip install -r benchmarks/requirements.txt   # faiss-cpu, pillow
  python benchmarks/kmeans.py [--quick]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import common  # noqa: E402
from dc_tf.clustering import kmeans as km  # noqa: E402
from dc_tf.clustering import pca  # noqa: E402

ITERS = 10


def matmul_peak(n=2048):
  a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
  t_np, _ = common.timed(lambda: a @ a, repeat=5)
  ta = tf.constant(a)
  f = tf.function(lambda: tf.matmul(ta, ta))
  f()
  t_tf, _ = common.timed(lambda: f().numpy(), repeat=5)
  flops = 2 * n ** 3
  return flops / t_np / 1e9, flops / t_tf / 1e9


def make_data(n, d, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(max(50, d // 8), d)).astype(np.float32)
  x = centers[rng.integers(len(centers), size=n)] + rng.normal(size=(n, d)).astype(np.float32)
  w = pca.fit_whitening(tf.distribute.get_strategy(), [x])
  return w.apply(x)


def inertia(x, c):
  total = 0.0
  for s in range(0, len(x), 8192):
    chunk = x[s:s + 8192]
    d = (chunk ** 2).sum(1)[:, None] - 2 * chunk @ c.T + (c ** 2).sum(1)[None]
    total += float(np.maximum(d.min(1), 0).sum())
  return total


def run_ours(x, c0):
  model = km.DistributedKMeans(tf.distribute.get_strategy(), chunk_size=8192)
  model.fit([x], c0.shape[0], iters=1, centroids=c0)  # trace
  with common.PeakRSS() as mem:
    t, res = common.timed(lambda: model.fit([x], c0.shape[0], iters=ITERS, centroids=c0))
  # Assignment step alone (the matmul + argmin), for GFLOP/s.
  xt, ct = tf.constant(x), tf.constant(c0)
  f = tf.function(lambda: km.assign_chunked(xt, ct, 8192)[0])
  f()
  ta, _ = common.timed(lambda: f().numpy(), repeat=3)
  return {"seconds_per_iter": t / (ITERS + 1), "inertia": inertia(x, res.centroids),
          "assign_seconds": ta, "peak_extra_bytes": mem.peak - mem.start}


def run_faiss(x, c0):
  import faiss
  k, d = c0.shape[0], x.shape[1]
  km_f = faiss.Kmeans(d, k, niter=ITERS, verbose=False, seed=0, max_points_per_centroid=10**9)
  t, _ = common.timed(lambda: km_f.train(x, init_centroids=c0))
  return {"seconds_per_iter": t / ITERS, "inertia": inertia(x, km_f.centroids)}


def run_sklearn(x, c0):
  from sklearn.cluster import KMeans
  model = KMeans(c0.shape[0], init=c0, n_init=1, max_iter=ITERS, tol=0, algorithm="lloyd")
  t, model = common.timed(lambda: model.fit(x))
  return {"seconds_per_iter": t / ITERS, "inertia": inertia(x, model.cluster_centers_)}


def clustering_memory(n=1_000_000, d=256, dtype=np.float32):
  """Peak extra host memory of one reassignment's clustering (PCA, super- and sub-clusters,
  table) over the feature matrix it is given, as the trainer runs it (whitened in place),
  beside the plan's estimate (dc_tf.plan.clustering_host_bytes)."""
  from dc_tf import plan
  from dc_tf.clustering import hierarchy
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(64, d)).astype(np.float32)
  x = np.empty([n, d], dtype)
  for s in range(0, n, 65536):   # filled in chunks: no float32 copy of a float16 matrix
    m = min(65536, n - s)
    x[s:s + m] = centers[rng.integers(64, size=m)] + rng.normal(size=(m, d)).astype(np.float32)
  ids = np.arange(n, dtype=np.int64)
  # Warm-up on 20k rows: TensorFlow's start-up and tracing are not the clustering's memory.
  hierarchy.cluster(tf.distribute.get_strategy(), [x[:20000].copy()], [ids[:20000]], m=4,
                    k=100, iters=1, pca_dim=d, in_place=True)
  with common.PeakRSS() as mem:
    t, _ = common.timed(lambda: hierarchy.cluster(
        tf.distribute.get_strategy(), [x], [ids], m=4, k=100, iters=3, pca_dim=d,
        fit_sample=300_000, in_place=True))
  est = plan.clustering_host_bytes(n, n, d, np.dtype(dtype).itemsize)
  return {"N": n, "d": d, "dtype": np.dtype(dtype).name, "feature_bytes": x.nbytes,
          "seconds": t, "peak_extra_bytes": mem.peak - mem.start,
          "peak_over_features": (mem.peak - mem.start + x.nbytes) / x.nbytes,
          "plan_estimate_over_features": est["total"] / x.nbytes}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="10x smaller N (smoke test)")
  p.add_argument("--memory_only", action="store_true",
                 help="rerun only the clustering-memory case; other entries of the JSON are kept")
  args = p.parse_args()
  if args.memory_only:
    import json
    path = os.path.join(common.RESULTS, "kmeans.json")
    previous = json.load(open(path)) if os.path.exists(path) else {}
    previous.pop("machine", None)
    previous["clustering_memory"] = [clustering_memory(1_000_000, 256, dtype)
                                     for dtype in (np.float32, np.float16)]
    print(previous["clustering_memory"])
    print(common.write("kmeans", previous))
    return
  peak_np, peak_tf = matmul_peak()
  print(f"float32 matmul peak: numpy {peak_np:.0f} GFLOP/s, TF {peak_tf:.0f} GFLOP/s")
  cases = [(200_000, 128, 1000), (20_000, 4096, 500)]
  rows = []
  for n, d, k in cases:
    n = n // 10 if args.quick else n
    x = make_data(n, d)
    c0 = x[np.random.default_rng(1).choice(n, k, replace=False)].copy()
    row = {"N": n, "d": d, "k": k, "iterations": ITERS, "ours": run_ours(x, c0)}
    for name, fn in (("faiss", run_faiss), ("sklearn", run_sklearn)):
      try:
        row[name] = fn(x, c0)
      except ImportError as e:
        row[name] = {"error": str(e)}
    ours = row["ours"]
    flops = 2.0 * n * d * k
    ours["assign_gflops"] = flops / ours["assign_seconds"] / 1e9
    ours["assign_share_of_numpy_peak"] = ours["assign_gflops"] / peak_np
    ours["peak_extra_over_features"] = ours["peak_extra_bytes"] / x.nbytes
    for peer in ("faiss", "sklearn"):
      if "seconds_per_iter" in row[peer]:
        row[f"time_ratio_vs_{peer}"] = ours["seconds_per_iter"] / row[peer]["seconds_per_iter"]
        row[f"inertia_ratio_vs_{peer}"] = ours["inertia"] / row[peer]["inertia"]
    rows.append(row)
    print({k2: v for k2, v in row.items() if k2 not in ("ours", "faiss", "sklearn")})
    print("  ours", ours, "\n  faiss", row["faiss"], "\n  sklearn", row["sklearn"])
  memory = [clustering_memory(100_000 if args.quick else 1_000_000, 256, dtype)
            for dtype in (np.float32, np.float16)]
  for m in memory:
    print("clustering memory", m)
  print(common.write("kmeans", {"matmul_peak_gflops": {"numpy": peak_np, "tensorflow": peak_tf},
                                "quick": args.quick, "cases": rows,
                                "clustering_memory": memory}))


if __name__ == "__main__":
  main()
