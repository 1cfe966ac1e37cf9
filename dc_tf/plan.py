"""The memory plan: what each replica and each worker holds, counted without allocating.

  python train.py --flagfile=flags/deepercluster_yfcc100m.cfg --plan \
      --num_replicas=64 --replicas_per_worker=8 --num_images=96000000

Per replica (accelerator memory): the trunk and V (mirrored), this replica's sub-head pieces
(`dc_tf.placement`, the same placement the trainer uses), momentum for all of them, their
gradients, and the activations a training step keeps for the backward pass at the batch.
Per worker (host memory): the fc7 features of the worker's share of the images, held once
for clustering (whitened in place; float16 with --feature_dtype), and the clustering's
bookkeeping (`clustering_host_bytes`, checked by benchmarks/kmeans.py). Trunk shapes are derived from the VGG-16 layout
(`dc_tf.models.vgg`); a test checks the counts against the variables the trainer creates.
"""

from __future__ import annotations

import dataclasses

from dc_tf.config import ExperimentConfig
from dc_tf.models.vgg import VGG16_LAYOUT, channels
from dc_tf.placement import HeadPlacement

GB = 1e9


@dataclasses.dataclass(frozen=True)
class TrunkShape:
  parameters: int           # trainable + batch-norm moving statistics + frozen Sobel
  trainable: int
  activations: int          # elements kept per example for the backward pass


def trunk_shape(image_size: int, width: float, fc_dim: int, sobel: bool) -> TrunkShape:
  """Counts of `vgg.build_trunk`'s variables and saved activations, from its layout."""
  size = image_size + 2 if sobel else image_size    # the Sobel front pads 2, convolves 3x3
  c_in = 2 if sobel else 3
  frozen = 3 + 9 * 2 if sobel else 0
  act = 3 * image_size ** 2 + (3 * size ** 2 if sobel else 0)   # input, gray, padded, Sobel
  trainable = stats = 0
  for spec in VGG16_LAYOUT:
    if spec == "M":
      size //= 2
      act += c_in * size * size                   # pooled map
      continue
    c = channels(spec, width)
    trainable += 9 * c_in * c + c + 2 * c         # kernel, bias, BN gamma and beta
    stats += 2 * c                                # BN moving mean and variance
    act += 3 * c * size * size                    # conv, BN and ReLU outputs
    c_in = c
  trainable += (c_in * size * size + 1) * fc_dim + (fc_dim + 1) * fc_dim
  act += 4 * fc_dim                               # fc6, its ReLU and dropout, fc7
  return TrunkShape(trainable + stats + frozen, trainable, act)


# Host bytes beside the features, in the two phases of a reassignment (dc_tf/clustering):
# while whitening and k-means read the rows chunk by chunk, the super and sub assignments
# (int32 each) and one super-cluster's member indices (int64) per row, plus float32 chunk
# copies; while the table is gathered, the (id, super, sub) rows (int64 x 3) and their
# float64 x 6 halves per local row, and per row of the whole pool the scattered buffer and
# its all-reduced copy (float64 x 6 each).
PASS_BYTES_PER_LOCAL_ROW = 4 + 4 + 8
GATHER_BYTES_PER_LOCAL_ROW = 24 + 48
GATHER_BYTES_PER_GLOBAL_ROW = 2 * 48


def clustering_host_bytes(rows_per_worker: int, total_rows: int, dim: int,
                          feature_bytes: int = 4, chunk_size: int = 16384) -> dict:
  """Peak host memory of one worker's reassignment: the fc7 features held once (whitened in
  place) and the larger of the two phases' working memory above. `benchmarks/kmeans.py`
  measures the real peak at 1M x 256 beside this estimate."""
  features = rows_per_worker * dim * feature_bytes
  # a chunk in float32 and float64 (PCA moments) and the whitening's copies of it
  passes = rows_per_worker * PASS_BYTES_PER_LOCAL_ROW + 3 * chunk_size * dim * 8
  gather = (rows_per_worker * GATHER_BYTES_PER_LOCAL_ROW
            + total_rows * GATHER_BYTES_PER_GLOBAL_ROW)
  extra = max(passes, gather)
  return {"features": features, "working": extra, "total": features + extra}


def memory_plan(config: ExperimentConfig, num_replicas: int, replicas_per_worker: int,
                num_images: int) -> dict:
  """Bytes per replica (largest replica) and per worker; see the module docstring."""
  if num_replicas % replicas_per_worker:
    raise ValueError(f"--num_replicas={num_replicas} is not a multiple of "
                     f"--replicas_per_worker={replicas_per_worker}")
  m, t, c = config.model, config.train, config.clustering
  d, s, k = m.fc_units, config.num_super_classes, config.num_sub_classes
  trunk = trunk_shape(m.image_size, m.width, d, m.sobel)
  placement = HeadPlacement(s, k, num_replicas)
  columns = int(placement.columns_per_replica().max()) if k else 0
  b, n = t.batch_per_replica, t.batch_per_replica * num_replicas
  act_bytes = 2 if t.mixed_precision else 4
  v = d * s + s
  sub = columns * (d + 1)
  # Rows a replica scores: the examples of its heads (about N/S each) against its columns.
  held_heads = max((len(placement.pieces(r)) for r in range(num_replicas)), default=0)
  head_rows = (n // max(s, 1) + 1) * held_heads
  per_replica = {
      "trunk": 4 * trunk.parameters,
      "super_head_V": 4 * v,
      "sub_head_pieces": 4 * sub,
      "optimizer_momentum": 4 * (trunk.trainable + v + sub),
      "gradients": 4 * (trunk.trainable + v + sub),
      "activations": act_bytes * b * trunk.activations
                     + (4 * 2 * n * d + 4 * 3 * head_rows * columns if k else 0),
  }
  per_replica["total"] = sum(per_replica.values())
  workers = num_replicas // replicas_per_worker
  images = -(-num_images // workers)
  host = clustering_host_bytes(images, num_images, d, 2 if c.feature_dtype == "float16" else 4)
  per_worker = {f"fc7_features_{c.feature_dtype}": host["features"],
                "clustering_working_memory": host["working"]}
  per_worker["total"] = sum(per_worker.values())
  # The design this replaces: every replica held all S heads, their momentum and gradient.
  all_heads = 3 * 4 * s * k * (d + 1)
  return {"num_replicas": num_replicas, "replicas_per_worker": replicas_per_worker,
          "workers": workers, "num_images": num_images, "global_batch": n,
          "sub_head_columns_per_replica": columns, "sub_head_columns_total": s * k,
          "per_replica_bytes": per_replica, "per_worker_bytes": per_worker,
          "all_heads_on_every_replica_bytes": all_heads}


def format_plan(plan: dict, device_gb: float = 80.0) -> str:
  r, w = plan["per_replica_bytes"], plan["per_worker_bytes"]
  lines = [f"memory plan: {plan['num_replicas']} replicas = {plan['workers']} workers x "
           f"{plan['replicas_per_worker']}, global batch {plan['global_batch']}, "
           f"{plan['num_images']:,} images",
           f"sub-head columns: {plan['sub_head_columns_per_replica']:,} of "
           f"{plan['sub_head_columns_total']:,} per replica", "",
           "| per replica (accelerator) | GB |", "|---|---:|"]
  lines += [f"| {name.replace('_', ' ')} | {value / GB:.2f} |" for name, value in r.items()]
  lines += ["", "| per worker (host) | GB |", "|---|---:|"]
  lines += [f"| {name.replace('_', ' ')} | {value / GB:.2f} |" for name, value in w.items()]
  fits = r["total"] <= device_gb * GB
  lines += ["", f"fits a {device_gb:.0f} GB accelerator: {'yes' if fits else 'NO'} "
            f"({r['total'] / GB:.1f} GB per replica). With every sub-head on every replica, the "
            f"heads alone (weights, momentum, gradient) would take "
            f"{plan['all_heads_on_every_replica_bytes'] / GB:.1f} GB, a third of it all-reduced "
            "every step"]
  return "\n".join(lines)
