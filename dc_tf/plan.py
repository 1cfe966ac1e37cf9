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

The reassignment (`reassignment_plan`, issue 25 item 8): per replica, the extraction, PCA,
whitening and k-means passes as the reassignment-at-scale design runs them (every replica
its own slice; per-pass sums kept on the device, all-reduced once per pass): FLOPs, bytes
host <-> device and across replicas, the peak device memory of one chunk, and a time at the
named device figures below (`DEVICE_*`), with a recommendation when a worker's host memory
would not hold its features.
"""

from __future__ import annotations

import dataclasses

from dc_tf.config import ConfigError, ExperimentConfig
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


def trunk_macs(image_size: int, width: float, fc_dim: int, sobel: bool) -> tuple[int, int]:
  """(multiply-adds of one image's forward pass to fc7, elements of its largest feature map).

  Convolutions (the Sobel front's included) and the two fc layers; batch norm, ReLU and
  pooling are a few operations per element and left out, as MAC counts usually do. The
  largest map sizes the extraction's activations: inference keeps a map and the next."""
  size = image_size + 2 if sobel else image_size
  c_in = 2 if sobel else 3
  # Sobel front: gray (1x1, 3 -> 1) at the input size, then 3x3 (1 -> 2) on the 2-padded map.
  macs = 3 * image_size ** 2 + 9 * 2 * size ** 2 if sobel else 0
  largest = 3 * image_size ** 2
  for spec in VGG16_LAYOUT:
    if spec == "M":
      size //= 2
      continue
    c = channels(spec, width)
    macs += 9 * c_in * c * size * size
    largest = max(largest, c * size * size)
    c_in = c
  macs += c_in * size * size * fc_dim + fc_dim * fc_dim
  return macs, largest


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


def _check_layout(num_replicas: int, replicas_per_worker: int) -> None:
  """The layout flags, refused in one line (a ConfigError: train.py prints it, no traceback)."""
  if num_replicas < 1 or replicas_per_worker < 1:
    raise ConfigError(f"--num_replicas ({num_replicas}) and --replicas_per_worker "
                      f"({replicas_per_worker}) must be >= 1")
  if num_replicas % replicas_per_worker:
    raise ConfigError(f"--num_replicas={num_replicas} is not a multiple of "
                      f"--replicas_per_worker={replicas_per_worker}")


def memory_plan(config: ExperimentConfig, num_replicas: int, replicas_per_worker: int,
                num_images: int) -> dict:
  """Bytes per replica (largest replica) and per worker; see the module docstring."""
  _check_layout(num_replicas, replicas_per_worker)
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
  # The epoch as the trainer computes it (`Trainer.fit`): with all_rotations a step takes
  # global_batch / R images, each with its R rotations; otherwise one rotation per image.
  epoch_images = t.epoch_size or max(1, int(t.epoch_fraction * num_images))
  per_step = n // config.num_rotations if t.all_rotations else n
  return {"num_replicas": num_replicas, "replicas_per_worker": replicas_per_worker,
          "workers": workers, "num_images": num_images, "global_batch": n,
          "epoch_images": epoch_images, "all_rotations": t.all_rotations,
          "steps_per_epoch": max(1, epoch_images // max(per_step, 1)),
          "sub_head_columns_per_replica": columns, "sub_head_columns_total": s * k,
          "per_replica_bytes": per_replica, "per_worker_bytes": per_worker,
          "all_heads_on_every_replica_bytes": all_heads}


def format_plan(plan: dict, device_gb: float = 80.0) -> str:
  r, w = plan["per_replica_bytes"], plan["per_worker_bytes"]
  lines = [f"memory plan: {plan['num_replicas']} replicas = {plan['workers']} workers x "
           f"{plan['replicas_per_worker']}, global batch {plan['global_batch']}, "
           f"{plan['num_images']:,} images",
           f"epoch: {plan['epoch_images']:,} images drawn, "
           f"{'each with its rotations' if plan['all_rotations'] else 'one rotation each'}: "
           f"{plan['steps_per_epoch']:,} steps",
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


# --- the reassignment ---------------------------------------------------------------------
# Device figures the time estimates use, from the vendor datasheets (H200 SXM has the H100
# SXM's compute and links; only its memory is larger). Clustering runs with TF32 off
# (`kmeans.full_float32`), so its matmuls run at the FP32 (non-tensor-core) rate; extraction is
# counted at the same rate, an upper bound on its time (TF32 tensor cores: 495 TFLOP/s dense).
DEVICE_FP32_FLOPS = 67e12   # H100 SXM5 / H200 SXM datasheet: FP32 67 TFLOPS
DEVICE_HOST_LINK = 50e9     # PCIe Gen5 x16: 64 GB/s per direction on paper, ~50 GB/s in practice
DEVICE_NVLINK = 900e9       # H100 / H200 SXM: NVLink 4, 900 GB/s per GPU (within a node)
DEVICE_INTER_NODE = 50e9    # one 400 Gb/s (NDR InfiniBand) NIC per GPU, as a DGX H100 has
HOST_FLOPS = 2e12           # assumed: BLAS-3 / LAPACK on a 2-socket, 112-core host (DGX H100's
                            # 2 x Xeon 8480C peak ~14 TFLOP/s FP32), about a seventh of peak
HOST_GB = 1000.0            # default host memory assumed free for clustering per worker
                            # (DGX H100 / H200: 2 TB in all; the rest for OS, input, caches)
EIGH_FLOPS = 9              # x d^3: symmetric eigendecomposition with vectors (Golub & Van Loan)
EXTRACT_MIN_BATCH = 128     # extraction batch: max(--batch_per_replica, this), as `reassign`
EXTRACT_IMAGE_BYTES = 4     # eval_transform hands over float32 normalised pixels
FIT_SAMPLE = 3_150_000      # the --fit_sample the recommendation offers (the original's cap)


def ring_bytes(size: int, replicas: int) -> int:
  """Bytes each replica sends (and receives) in a ring all-reduce of `size` bytes."""
  return 2 * (replicas - 1) * size // replicas if replicas > 1 else 0


def kmeans_fit(rows: int, fit_rows: int, k: int, p: int, iters: int, chunk: int,
               replicas: int) -> dict:
  """One replica's share of one k-means fit: `iters` Lloyd passes over its `fit_rows` rows,
  then one assignment pass over all its `rows` (dc_tf.clustering.kmeans, issue 25 design).

  Per pass: the rows go host -> device once (float32 chunks), the k x p float32 centroids
  once; the scores matmul is 2 * rows * k * p FLOPs; counts and sums stay on the device in
  float64 (k x (p + 1)) and cross replicas in one all-reduce, then come to the host once.
  The last pass also brings the assignments back (int32). Peak device memory of a chunk:
  its score matrix (chunk x k float32), the chunk in float32 and its float64 cast for the
  segment sum, the centroids (float32) and the resident sums and counts (float64)."""
  read = iters * fit_rows + rows
  stats = k * (p + 1) * 8
  return {"passes": iters + 1, "flops": 2 * read * k * p,
          "host_to_device": read * p * 4 + (iters + 1) * k * p * 4,
          "device_to_host": (iters + 1) * stats + rows * 4,
          "across_replicas": (iters + 1) * ring_bytes(stats, replicas),
          "peak_device": chunk * k * 4 + chunk * p * (4 + 8) + k * p * 4 + stats}


def _seconds(phase: dict, collective_link: float) -> float:
  """The phase's slowest resource: device FLOPs, the host link, or the collective link."""
  if phase.get("host_flops"):
    return phase["host_flops"] / HOST_FLOPS
  return max(phase["flops"] / DEVICE_FP32_FLOPS,
             (phase["host_to_device"] + phase["device_to_host"]) / DEVICE_HOST_LINK,
             phase["across_replicas"] / collective_link)


def reassignment_plan(config: ExperimentConfig, num_replicas: int, replicas_per_worker: int,
                      num_images: int, host_gb: float = HOST_GB) -> dict:
  """One reassignment, counted per replica (and per worker = replicas_per_worker of them).

  Rows are split evenly: ceil(N / workers) per worker, ceil of that / G per replica, and a
  super-cluster's members are ceil(rows / m) of a replica's (balanced clusters). The fitting
  passes read `--fit_sample` rows per replica (as the trainer passes it; the original's
  per-process cap), PCA as many unless `--pca_sample` is set (its rows over all replicas).
  """
  _check_layout(num_replicas, replicas_per_worker)
  mo, c, t = config.model, config.clustering, config.train
  r, g = num_replicas, replicas_per_worker
  workers = r // g
  rows_w = -(-num_images // workers)
  n = -(-rows_w // g)
  d = mo.fc_units
  p = c.pca_dim or d
  fb = 2 if c.feature_dtype == "float16" else 4
  m, k = config.num_super_clusters, config.num_sub_classes
  chunk, iters = c.chunk_size, c.kmeans_iters
  fit_per_replica = c.fit_sample
  fit = min(n, fit_per_replica) if fit_per_replica else n
  pca_per_replica = c.pca_sample // r if c.pca_sample else fit_per_replica
  pca_rows = min(n, max(1, pca_per_replica)) if pca_per_replica else n
  warmup = t.rotnet_warmup_epochs if t.mode == "deepercluster" else 0
  reassignments = len(range(warmup, t.epochs, c.reassign_every)) if config.uses_clustering else 0
  collective = DEVICE_NVLINK if workers == 1 else DEVICE_INTER_NODE
  macs, largest = trunk_macs(mo.image_size, mo.width, d, mo.sobel)
  extract_batch = max(t.batch_per_replica, EXTRACT_MIN_BATCH)
  trunk = trunk_shape(mo.image_size, mo.width, d, mo.sobel)
  moments = (d * d + d + 1) * 8
  phases = {
      "extraction": {"passes": 1, "flops": 2 * macs * n,
                     "host_to_device": n * mo.image_size ** 2 * 3 * EXTRACT_IMAGE_BYTES,
                     "device_to_host": n * d * 4, "across_replicas": 0,
                     "peak_device": 4 * trunk.parameters + extract_batch * 2 * largest * 4},
      # X^T X, sum and count in float64 on the device, one cross-replica sum, fetched once.
      "pca_moments": {"passes": 1, "flops": 2 * pca_rows * d * d,
                      "host_to_device": pca_rows * d * 4, "device_to_host": moments,
                      "across_replicas": ring_bytes(moments, r),
                      "peak_device": chunk * d * (4 + 8) + 2 * d * d * 8},
      # every worker decomposes the same summed matrix on its host
      "pca_eigh_host": {"passes": 1, "flops": 0, "host_flops": EIGH_FLOPS * d ** 3,
                        "host_to_device": 0, "device_to_host": 0, "across_replicas": 0,
                        "peak_device": 0},
      # projection on the device, written back over the features in their dtype
      "whitening": {"passes": 1, "flops": 2 * n * d * p, "host_to_device": n * d * 4 + d * p * 4,
                    "device_to_host": n * p * fb, "across_replicas": 0,
                    "peak_device": chunk * d * 4 + chunk * p * 4 + d * p * 4},
  }
  if m > 1:
    phases["super_clusters"] = kmeans_fit(n, fit, m, p, iters, chunk, r)
  if k:
    members = -(-n // m)
    one = kmeans_fit(members, min(members, fit), k, p, iters, chunk, r)
    phases["sub_clusters"] = {**{key: m * v for key, v in one.items() if key != "peak_device"},
                              "peak_device": one["peak_device"]}
  for phase in phases.values():
    phase["seconds"] = _seconds(phase, collective)
  total = sum(ph["seconds"] for ph in phases.values())
  host = clustering_host_bytes(rows_w, num_images, d, fb)   # as memory_plan counts it
  plan = {"num_replicas": r, "replicas_per_worker": g, "workers": workers,
          "rows_per_worker": rows_w, "rows_per_replica": n, "fit_rows_per_replica": fit,
          "pca_rows_per_replica": pca_rows, "m": m, "k": k, "d": d, "p": p,
          "chunk_size": chunk, "phases": phases if config.uses_clustering else {},
          "collective_link": collective, "seconds": total if config.uses_clustering else 0.0,
          "reassignments": reassignments, "host_bytes_per_worker": host["total"],
          "host_gb": host_gb, "whitening_on_host_seconds": phases["whitening"]["flops"] * g
                                                           / HOST_FLOPS}
  plan["run_seconds"] = plan["seconds"] * reassignments
  plan.update(assignment_history(num_images, reassignments, t.keep_assignments))
  plan["recommendations"] = (_recommend(config, plan, num_images)
                             if config.uses_clustering and host["total"] > host_gb * GB else [])
  return plan


def assignment_history(num_images: int, reassignments: int, keep: int) -> dict:
  """Disk the run's assignment history takes (`checkpointing.save_assignments`): int32 per
  image a table, the int64 ids once; the newest `keep` tables of the run's (0 = all)."""
  kept = min(keep, reassignments) if keep else reassignments
  table, ids = 4 * num_images, 8 * num_images
  return {"assignment_table_bytes": table, "assignment_tables_kept": kept,
          "assignment_history_bytes": kept * table + (ids if kept else 0)}


def _recommend(config: ExperimentConfig, plan: dict, num_images: int) -> list[str]:
  """What to change when a worker's host cannot hold its features, with the figures."""
  c, g, d = config.clustering, plan["replicas_per_worker"], plan["d"]
  limit = plan["host_gb"] * GB
  host = lambda workers, fb: clustering_host_bytes(  # noqa: E731
      -(-num_images // workers), num_images, d, fb)["total"]
  fb = 2 if c.feature_dtype == "float16" else 4
  out = [f"a worker would hold {plan['host_bytes_per_worker'] / 1e12:.2f} TB in host memory "
         f"for clustering, more than --host_gb={plan['host_gb']:.0f}:"]
  if fb == 4:
    out.append(f"  float16 features (--feature_dtype=float16): "
               f"{host(plan['workers'], 2) / 1e12:.2f} TB per worker")
  for bytes_ in sorted({fb, 2}, reverse=True):
    if host(plan["workers"], bytes_) <= limit:
      continue  # fits with the workers there are
    workers = next((w for w in range(plan["workers"] + 1, 4097) if host(w, bytes_) <= limit),
                   None)
    if workers:
      name = "float32" if bytes_ == 4 else "float16"
      out.append(f"  more workers, {name}: --num_replicas={workers * g} ({workers} workers x "
                 f"{g}): {host(workers, bytes_) / 1e12:.2f} TB per worker")
  # --fit_sample shortens the fitting passes; it saves no host memory (every row is held
  # to be assigned), so it is given with its time, against fitting on every row.
  fit_sample = c.fit_sample or FIT_SAMPLE
  rerun = lambda sample: reassignment_plan(  # noqa: E731
      config.replace(clustering={"fit_sample": sample, "pca_sample": c.pca_sample if sample
                                 else 0}), plan["num_replicas"], g, num_images, float("inf"))
  sampled, unsampled = rerun(fit_sample), rerun(0)
  if sampled["fit_rows_per_replica"] < sampled["rows_per_replica"]:
    out.append(f"  --fit_sample={fit_sample:,}{' (on)' if c.fit_sample else ''}: the fitting "
               f"passes read {sampled['fit_rows_per_replica']:,} of "
               f"{sampled['rows_per_replica']:,} rows per replica, "
               f"{unsampled['seconds']:,.0f} s -> {sampled['seconds']:,.0f} s a reassignment; "
               "it bounds time, not memory: every row is still held and assigned")
  return out


def format_reassignment(plan: dict) -> str:
  """The reassignment section of `train.py --plan`."""
  if not plan["phases"]:
    return "reassignment: none (rotnet mode: no clustering)"
  link = "NVLink" if plan["workers"] == 1 else "inter-node"
  lines = [f"reassignment, per replica ({plan['rows_per_replica']:,} images; "
           f"{plan['rows_per_worker']:,} per worker of {plan['replicas_per_worker']}): "
           f"d={plan['d']}, PCA to {plan['p']}, m={plan['m']}, k={plan['k']:,}, "
           f"chunk {plan['chunk_size']:,} rows; fitting on {plan['fit_rows_per_replica']:,} rows "
           f"per replica, PCA on {plan['pca_rows_per_replica']:,}",
           f"rates: FP32 {DEVICE_FP32_FLOPS / 1e12:.0f} TFLOP/s (H100/H200 SXM, TF32 off), host "
           f"link {DEVICE_HOST_LINK / GB:.0f} GB/s (PCIe Gen5 x16), {link} "
           f"{plan['collective_link'] / GB:.0f} GB/s per GPU, host {HOST_FLOPS / 1e12:.0f} "
           "TFLOP/s; a phase takes its slowest of the three (extraction at the FP32 rate is an "
           "upper bound: TF32 tensor cores give 495 TFLOP/s dense)", "",
           "| phase | passes | TFLOP | host->device GB | device->host GB | across replicas GB "
           "| peak device GB | s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, ph in plan["phases"].items():
    flops = ph.get("host_flops") or ph["flops"]
    lines.append(f"| {name.replace('_', ' ')} | {ph['passes']} | {flops / 1e12:,.1f} | "
                 f"{ph['host_to_device'] / GB:,.2f} | {ph['device_to_host'] / GB:,.2f} | "
                 f"{ph['across_replicas'] / GB:,.3f} | {ph['peak_device'] / GB:.2f} | "
                 f"{ph['seconds']:,.0f} |")
  h2d = sum(ph["host_to_device"] for ph in plan["phases"].values()) * plan["replicas_per_worker"]
  lines += ["", f"per worker: {h2d / 1e12:.2f} TB host -> device over its "
                f"{plan['replicas_per_worker']} links; "
                f"{plan['host_bytes_per_worker'] / 1e12:.2f} TB host memory for clustering",
            f"one reassignment: {plan['seconds']:,.0f} s ({plan['seconds'] / 60:.1f} min); "
            f"x {plan['reassignments']} reassignments a run = {plan['run_seconds'] / 3600:.1f} h",
            f"assignment history (MODEL_DIR/assignments, the chief's disk): "
            f"{plan['assignment_table_bytes'] / GB:,.2f} GB a table, "
            f"{plan['assignment_tables_kept']} kept (--keep_assignments) = "
            f"{plan['assignment_history_bytes'] / GB:,.2f} GB with the ids",
            f"whitening on the host instead of the device: "
            f"{plan['whitening_on_host_seconds'] / 3600:,.1f} h a reassignment at "
            f"{HOST_FLOPS / 1e12:.0f} TFLOP/s"]
  if plan["recommendations"]:
    lines += ["", "recommendation: " + plan["recommendations"][0], *plan["recommendations"][1:]]
  return "\n".join(lines)
