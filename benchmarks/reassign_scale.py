r"""The reassignment's passes before and after issue 25, side by side in one run.

On 4 logical CPU devices (one MirroredStrategy), at growing shapes (rows, k, d) up to
d = 4096 and k = 8,000, each at two chunk sizes:
  * before: the pass as dc_tf ran it at 8ebe791, reproduced here as the baseline: the local
    devices one after another, every chunk's float64 [k, d] sums and counts fetched to the
    host and added in numpy (and, on an accelerator, the host centroids copied per call);
  * after: `DistributedKMeans._run` (dc_tf.clustering.replicas.DevicePass): the local
    replicas concurrently, counts and sums accumulated in float64 on each device, one
    cross-replica sum a pass.
Reports seconds per pass, host <-> device bytes per pass (counted in code: logical CPU
devices cannot show them on a clock), the same for the PCA moments pass at the largest d,
a bare matmul of the pass's FLOPs on one device in chunks of the pass's rows per device (so
`pass / matmul` is the overhead; a smaller chunk is a less efficient matmul here), and
the projection of a paper-preset pass (12M rows per worker, 8 GPUs, k = 80,000, d = 4096) from
the measured overhead and `dc_tf.plan`'s stated device rates. Writes
benchmarks/results/reassign_scale.json.

  python benchmarks/reassign_scale.py [--quick]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

DEVICES = 4
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration() for _ in range(DEVICES)])

import common  # noqa: E402
from dc_tf.clustering import kmeans as km  # noqa: E402
from dc_tf.clustering import pca  # noqa: E402
from dc_tf.clustering import replicas as replicas_lib  # noqa: E402

SHAPES = [(16384, 1000, 256), (16384, 4000, 1024), (16384, 8000, 4096)]
QUICK = [(4096, 500, 64), (4096, 1000, 256), (4096, 2000, 512)]
CHUNKS = (1024, 4096)


def before_pass(strategy, local_x, centroids, chunk_size):
  """The pass at 8ebe791 (`DistributedKMeans._run`): devices one after another, each chunk's
  [k, d] float64 sums fetched and added on the host. Returns (counts, sums, bytes)."""
  assign = tf.function(lambda x, c: km.assign_chunked(x, c, tf.shape(x)[0] + 1),
                       reduce_retracing=True)
  c = tf.constant(centroids, tf.float32)
  k, d = centroids.shape
  moved = {"to_device": 0, "from_device": 0}
  stats = []
  for device, x in zip(replicas_lib.Replicas.of(strategy).devices, local_x):
    counts, sums = np.zeros(k), np.zeros([k, d])
    with tf.device(device):
      for chunk in replicas_lib.chunks(x, None, chunk_size):
        a, dists, cnt, sm = assign(replicas_lib.host_tensor(chunk), c)
        counts, sums = counts + cnt.numpy(), sums + sm.numpy()
        float(np.sum(dists.numpy(), dtype=np.float64))
        # per chunk: the rows, the host centroids (copied per call on an accelerator);
        # back: counts and sums in float64, the distances
        moved["to_device"] += chunk.nbytes + c.numpy().nbytes
        moved["from_device"] += cnt.numpy().nbytes + sm.numpy().nbytes + dists.numpy().nbytes
    stats.append([counts, sums])
  counts, sums = replicas_lib.Replicas.of(strategy).sum(stats)
  return counts, sums, moved


def bare_matmul_seconds(rows, k, d, chunk=4096):
  """The pass's score matmul alone (one device, the rows in chunks of `chunk`), best of 2."""
  x = tf.constant(np.random.default_rng(1).normal(size=(min(rows, chunk), d)).astype(np.float32))
  c = tf.constant(np.random.default_rng(2).normal(size=(k, d)).astype(np.float32))
  f = tf.function(lambda: tf.reduce_sum(tf.matmul(x, c, transpose_b=True)))
  f()
  seconds, _ = common.timed(lambda: f().numpy(), repeat=2)
  return seconds * rows / int(x.shape[0])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
  args = parser.parse_args()
  strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(DEVICES)])
  rows_out = []
  for rows, k, d in (QUICK if args.quick else SHAPES):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    local_x = np.array_split(x, DEVICES)
    c = x[rng.choice(rows, k, replace=False)].astype(np.float64)
    for chunk in CHUNKS:
      matmul = bare_matmul_seconds(rows, k, d, min(chunk, rows // DEVICES))
      t0 = time.perf_counter()
      counts_b, sums_b, moved = before_pass(strategy, local_x, c, chunk)
      t_before = time.perf_counter() - t0
      kmeans = km.DistributedKMeans(strategy, chunk_size=chunk)
      kmeans._run(local_x, [None] * DEVICES, c)   # trace once (the before path traced above)
      t0 = time.perf_counter()
      counts_a, sums_a, _, _ = kmeans._run(local_x, [None] * DEVICES, c)
      t_after = time.perf_counter() - t0
      after = kmeans.pass_traffic[-1]
      np.testing.assert_array_equal(counts_a, counts_b)
      row = {"rows": rows, "k": k, "d": d, "chunk_size": chunk,
             "chunks_per_pass": -(-rows // DEVICES // chunk) * DEVICES,
             "gflop_per_pass": 2 * rows * k * d / 1e9, "bare_matmul_s": round(matmul, 3),
             "before_s": round(t_before, 3), "after_s": round(t_after, 3),
             "speedup": round(t_before / t_after, 2),
             "before_to_device_bytes": moved["to_device"],
             "before_from_device_bytes": moved["from_device"],
             "after_to_device_bytes": after.to_device,
             "after_from_device_bytes": after.from_device,
             "after_cross_replica_bytes": after.cross_replica,
             "sums_max_rel_diff": float(np.abs(sums_a - sums_b).max() / np.abs(sums_b).max())}
      rows_out.append(row)
      print({key: row[key] for key in ("rows", "k", "d", "chunk_size", "before_s", "after_s",
                                       "before_from_device_bytes", "after_from_device_bytes")},
            flush=True)
  # The PCA moments pass at the largest d: before, a d x d float64 fetch per chunk.
  rows, _, d = (QUICK if args.quick else SHAPES)[-1]
  x = np.random.default_rng(3).normal(size=(rows, d)).astype(np.float32)
  traffic = replicas_lib.Traffic()
  pca.fit_whitening(strategy, np.array_split(x, DEVICES), chunk_size=4096)   # trace
  t0 = time.perf_counter()
  pca.fit_whitening(strategy, np.array_split(x, DEVICES), chunk_size=4096, traffic=traffic)
  pca_row = {"rows": rows, "d": d, "chunk_size": 4096, "after_s": round(time.perf_counter() - t0, 3),
             "after_to_device_bytes": traffic.to_device,
             "after_from_device_bytes": traffic.from_device,
             "before_from_device_bytes": -(-rows // DEVICES // 4096) * DEVICES * (d * d + d + 1) * 8}
  projection = project(rows_out[-1])
  path = common.write("reassign_scale", {"devices": DEVICES, "passes": rows_out,
                                         "pca_moments_pass": pca_row, "projection": projection})
  print(projection)
  print("wrote", path)


def project(largest: dict) -> dict:
  """A paper-preset sub-cluster pass per GPU from the measured overhead over a bare matmul
  (after / bare matmul at the largest shape here) and the plan's stated device rates."""
  from dc_tf import plan
  rows_per_gpu, k, d = 96_000_000 // 64, 80_000, 4096
  flops = 2 * rows_per_gpu * k * d
  # 4 logical devices share 2 cores and can beat one device's matmul: never below 1
  overhead = max(1.0, largest["after_s"] / largest["bare_matmul_s"])
  rate = plan.DEVICE_FP32_FLOPS
  link = plan.DEVICE_HOST_LINK
  matmul_s = flops / rate
  rows_s = rows_per_gpu * d * 4 / link
  return {"rows_per_gpu": rows_per_gpu, "k": k, "d": d, "tflop_per_gpu_pass": flops / 1e12,
          "measured_overhead_over_matmul": round(overhead, 3),
          "device_fp32_tflops": rate / 1e12, "host_link_gb_s": link / 1e9,
          "pass_s": round(matmul_s * overhead + rows_s, 1),
          "before_sums_fetched_per_gpu_pass_gb": -(-rows_per_gpu // 8192) * k * d * 8 / 1e9,
          "after_sums_fetched_per_gpu_pass_gb": k * (d + 2) * 8 / 1e9}


if __name__ == "__main__":
  main()
