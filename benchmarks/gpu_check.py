r"""One prepared GPU check (issue 25, item 10): the figures `train.py --plan` assumes, measured
on one GPU in under 8 minutes, written to one JSON.

  python benchmarks/gpu_check.py                   # one GPU: benchmarks/results/gpu_check.json
  python benchmarks/gpu_check.py --tiny --out=/tmp/g.json   # the logic, tiny shapes, CPU, ~1.5 min

Sections, each under its own time budget (and all under --total_seconds); a section that
fails is recorded with its error and the others still run; the JSON is rewritten after each:
  * train_step: examples/s of the DeeperCluster train step at 224 px, width 1, batch 48, on
    one replica with m=4 x k=1,250 heads (the 20,000 sub-head columns one replica holds at
    64 replicas), in float32, with --mixed_precision and with --jit_compile
    (`train_step.throughput`);
  * kmeans: one Lloyd pass and the final assignment pass of `DistributedKMeans` at
    1M x 4096, k = 10,000, inside `kmeans.full_float32()` (TF32 off), and its inertia on a
    sample of rows against a float64 reference (the float64 argmin over the same
    centroids), with TF32 on beside it: why clustering turns it off;
  * extraction: trunk forward (inference, fc7 to the host) images/s at 224 px, batch 128
    (the trainer's extraction batch at batch 48);
  * input_pipeline: the training pipeline's images/s on 500 x 375 JPEGs at 224 px
    (`input_pipeline.write_photo_shards` and `tf_train_rate`), on this machine's cores.
The JSON also records the GPU (name, compute capability), the TensorFlow version and
whether TF32 was on by default and off inside the k-means block.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np

START = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import train_step  # noqa: E402  (before any TF op: it configures the logical CPUs)
import common  # noqa: E402
import input_pipeline  # noqa: E402
from dc_tf.clustering import kmeans as km  # noqa: E402
from dc_tf.config import ExperimentConfig  # noqa: E402
from dc_tf.models import vgg  # noqa: E402

# Shapes: the paper's, and the tiny ones that test the logic on a CPU.
FULL = dict(image_size=224, width=1.0, fc_dim=4096, batch=48, m=4, k=1250, steps=20,
            kmeans_rows=1_000_000, kmeans_dim=4096, kmeans_k=10_000, chunk_size=8192,
            reference_rows=10_000, extract_batch=128, extract_batches=20, photos=1500,
            budgets=dict(train_step=150, kmeans=150, extraction=40, input_pipeline=60))
TINY = dict(image_size=32, width=0.125, fc_dim=32, batch=4, m=2, k=5, steps=2,
            kmeans_rows=4096, kmeans_dim=32, kmeans_k=16, chunk_size=512,
            reference_rows=512, extract_batch=8, extract_batches=3, photos=16,
            budgets=dict(train_step=200, kmeans=60, extraction=30, input_pipeline=60))


def devices() -> dict:
  gpus = tf.config.list_physical_devices("GPU")
  return {"gpus": [{"name": g.name, **{k: (list(v) if isinstance(v, tuple) else v)
                                        for k, v in tf.config.experimental.get_device_details(
                                            g).items()}} for g in gpus],
          "tf32_enabled_by_default": tf.config.experimental.tensor_float_32_execution_enabled()}


def section_train_step(s, budget, tmp):
  """examples/s per replica, one replica, three variants; a later variant is skipped when
  the section's budget is spent (its trace and XLA compile take most of the time)."""
  base = ExperimentConfig().replace(
      data={"image_size": s["image_size"]},
      model={"image_size": s["image_size"], "width": s["width"], "fc_dim": s["fc_dim"]},
      clustering={"m": s["m"], "k": s["k"]},
      train={"mode": "deepercluster", "batch_per_replica": s["batch"], "knn_monitor": False,
             "all_rotations": False}).validate()
  out = {"image_size": s["image_size"], "width": s["width"], "batch": s["batch"],
         "m": s["m"], "k": s["k"], "steps": s["steps"],
         "sub_head_columns": base.num_super_classes * s["k"],
         "tf32_enabled": tf.config.experimental.tensor_float_32_execution_enabled()}
  t0, longest = time.perf_counter(), 0.0
  for name, flags in (("float32", {}), ("mixed_precision", {"mixed_precision": True}),
                      ("jit_compile", {"jit_compile": True})):
    # A variant is mostly its trace (and XLA compile): skip it when one as long as the
    # longest so far, and half again, would overrun the budget.
    if time.perf_counter() - t0 + 1.5 * longest > budget:
      out[f"{name}_examples_per_s"] = None
      out[f"{name}_skipped"] = f"the section's {budget:.0f} s budget would be overrun"
      continue
    cfg = base.replace(train={**flags, "model_dir": os.path.join(tmp, name)})
    t = time.perf_counter()
    try:
      out[f"{name}_examples_per_s"] = train_step.throughput(cfg, s["steps"])
    except Exception as e:  # one variant failing (an XLA op, bfloat16) leaves the others
      out[f"{name}_examples_per_s"] = None
      out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:1000]}"
    out[f"{name}_seconds"] = time.perf_counter() - t
    longest = max(longest, out[f"{name}_seconds"])
  return out


def clustered_rows(n, d, seed=0, chunk=65536) -> np.ndarray:
  """n x d float32 rows around 256 centres, drawn on the device chunk by chunk into one
  host array (no second n x d copy)."""
  x = np.empty([n, d], np.float32)
  centers = tf.random.stateless_normal([256, d], [seed, 1]) * 3.0
  for i, start in enumerate(range(0, n, chunk)):
    m = min(chunk, n - start)
    idx = tf.random.stateless_uniform([m], [seed, 2 + i], 0, 256, tf.int32)
    x[start:start + m] = (tf.gather(centers, idx)
                          + tf.random.stateless_normal([m, d], [seed, 100003 + i])).numpy()
  return x


def squared_distances(x, c) -> np.ndarray:
  """float64 [n, k] squared distances, chunked over rows."""
  x, c = x.astype(np.float64), c.astype(np.float64)
  c_sq = (c ** 2).sum(1)
  return np.concatenate([np.maximum((x[i:i + 1024] ** 2).sum(1)[:, None]
                                    - 2 * x[i:i + 1024] @ c.T + c_sq[None], 0)
                         for i in range(0, len(x), 1024)])


def section_kmeans(s, budget, tmp):
  """One `fit(iters=1)`: a Lloyd pass and the final assignment pass over every row."""
  del tmp
  t0 = time.perf_counter()
  n, d, k, chunk = s["kmeans_rows"], s["kmeans_dim"], s["kmeans_k"], s["chunk_size"]
  x = clustered_rows(n, d)
  rng = np.random.default_rng(0)
  c0 = x[np.sort(rng.choice(n, k, replace=False))].copy()
  model = km.DistributedKMeans(tf.distribute.get_strategy(), chunk_size=chunk)
  out = {"rows": n, "dim": d, "k": k, "chunk_size": chunk, "passes": 2,
         "data_seconds": time.perf_counter() - t0}
  with km.full_float32():
    out["tf32_enabled_in_kmeans"] = tf.config.experimental.tensor_float_32_execution_enabled()
    warm = min(n, max(8 * chunk, k))
    model.fit([x[:warm]], k, iters=1, centroids=c0)              # trace
    t_warm, _ = common.timed(lambda: model.fit([x[:warm]], k, iters=1, centroids=c0))
    # What is left of the budget after the reference (a few seconds), for the full fit:
    # fewer rows when it would not fit, and the JSON says so.
    left = budget - (time.perf_counter() - t0) - 0.1 * budget
    used = n if t_warm * n / warm <= left else max(warm, int(n * left / (t_warm * n / warm)))
    out.update(rows_used=used, reduced_for_budget=used < n)
    t, res = common.timed(lambda: model.fit([x[:used]], k, iters=1, centroids=c0))
  out["seconds_per_pass"] = t / 2
  out["tflops"] = 2 * 2.0 * used * k * d / t / 1e12
  out["inertia"] = res.inertia
  # The reference: for a sample of rows, the float64 argmin over the final centroids; the
  # TF pass's assignment can only be as good or worse, so the relative error is >= 0.
  sample = np.sort(rng.choice(used, min(used, max(s["reference_rows"], k)), replace=False))
  xs, c = x[sample], res.centroids
  dist = squared_distances(xs, c)
  best = dist.min(1)

  def error(assignments):
    got = dist[np.arange(len(sample)), assignments]
    return float((got.sum() - best.sum()) / best.sum()), float(np.mean(got <= best))

  out["reference_rows"] = len(sample)
  out["sample_inertia_relative_error"], out["sample_assignment_optimal_share"] = error(
      res.assignments[0][sample])
  out["inertia_per_row"] = res.inertia / used
  out["reference_inertia_per_row_sample"] = float(best.mean())
  before = tf.config.experimental.tensor_float_32_execution_enabled()
  tf.config.experimental.enable_tensor_float_32_execution(True)
  try:   # the same centroids, assignment only, TF32 on (no effect on a CPU)
    on = model.fit([xs], k, iters=0, centroids=c)
  finally:
    tf.config.experimental.enable_tensor_float_32_execution(before)
  out["sample_inertia_relative_error_tf32_on"], _ = error(on.assignments[0])
  return out


def section_extraction(s, budget, tmp):
  """Trunk forward in inference mode, fc7 brought to the host each batch, as extraction."""
  del tmp
  t0 = time.perf_counter()
  trunk = vgg.build_trunk(s["image_size"], s["width"], s["fc_dim"], sobel=True)
  images = tf.random.normal([s["extract_batch"], s["image_size"], s["image_size"], 3])
  forward = tf.function(lambda x: trunk(x, training=False)["fc7"])
  forward(images).numpy()   # trace
  n, t = 0, time.perf_counter()
  for _ in range(s["extract_batches"]):
    forward(images).numpy()
    n += s["extract_batch"]
    if time.perf_counter() - t0 > budget:
      break
  rate = n / (time.perf_counter() - t)
  return {"image_size": s["image_size"], "batch": s["extract_batch"], "images": n,
          "images_per_s": rate,
          "tf32_enabled": tf.config.experimental.tensor_float_32_execution_enabled()}


def section_input_pipeline(s, budget, tmp):
  """The training pipeline on YFCC-sized photos (the thumbnails re-encoded at 500 x 375).
  Writing 1,500 photos with PIL and reading them back takes ~40 s: fewer when less of the
  budget is left."""
  photos = max(16, min(s["photos"], int(s["photos"] * budget / s["budgets"]["input_pipeline"])))
  input_pipeline.PATTERN = os.path.join(REPO, "data", "train-*.tfrecord")
  data = input_pipeline.jpegs(photos)
  pattern, photos = input_pipeline.write_photo_shards(data, os.path.join(tmp, "photos"))
  rate = input_pipeline.tf_train_rate(s["image_size"], len(photos), all_rotations=False,
                                      pattern=pattern)
  return {"image_size": s["image_size"], "photos": len(photos), "cores": os.cpu_count(),
          "mean_jpeg_bytes": float(np.mean([len(b) for b in photos])),
          "images_per_s": rate, "images_per_s_per_core": rate / os.cpu_count()}


SECTIONS = (("train_step", section_train_step), ("kmeans", section_kmeans),
            ("extraction", section_extraction), ("input_pipeline", section_input_pipeline))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes: the logic on a CPU")
  p.add_argument("--out", default=os.path.join(common.RESULTS, "gpu_check.json"))
  p.add_argument("--total_seconds", type=float, default=420.0,
                 help="no section starts after this many seconds (the whole stays < 8 min)")
  p.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
  args = p.parse_args()
  shapes = TINY if args.tiny else FULL
  result = {"machine": common.machine(), "tiny": args.tiny, **devices(), "sections": {}}
  tmp = tempfile.mkdtemp(prefix="gpu_check_")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  wanted = set(filter(None, args.only.split(","))) or {name for name, _ in SECTIONS}
  for name, fn in SECTIONS:
    if name not in wanted:
      continue
    left = args.total_seconds - (time.perf_counter() - START)
    if left <= 0:
      result["sections"][name] = {"skipped": f"--total_seconds={args.total_seconds:.0f} spent"}
      continue
    t = time.perf_counter()
    try:
      result["sections"][name] = fn(shapes, min(shapes["budgets"][name], left), tmp)
    except Exception as e:  # recorded; the next section still runs
      result["sections"][name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}",
                                  "traceback": traceback.format_exc()[-4000:]}
    result["sections"][name]["section_seconds"] = time.perf_counter() - t
    result["total_seconds"] = time.perf_counter() - START
    with open(args.out, "w") as f:   # after each section: a killed run keeps what it measured
      json.dump(result, f, indent=1, default=float)
    print(name, json.dumps(result["sections"][name], default=float)[:600], flush=True)
  print(args.out)


if __name__ == "__main__":
  main()
