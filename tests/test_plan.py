"""The memory plan counts what the trainer really creates (the partitioned-heads issue, 4), and
the reassignment plan counts what the design moves and computes (issue 25, item 8)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cpu_strategy
from dc_tf import placement, plan
from dc_tf.config import ExperimentConfig
from dc_tf.models import vgg
from dc_tf.training import trainer


@pytest.mark.parametrize("size,width,fc,sobel", [(32, 0.125, 32, True), (64, 0.25, 48, False)])
def test_trunk_counts_equal_the_built_model(size, width, fc, sobel):
  model = vgg.build_trunk(size, width, fc, sobel)
  shape = plan.trunk_shape(size, width, fc, sobel)
  assert shape.parameters == model.count_params()
  assert shape.trainable == sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_plan_matches_the_variables_each_of_four_replicas_holds(tmp_path):
  cfg = ExperimentConfig().replace(
      data={"image_size": 32}, model={"image_size": 32, "width": 0.25, "fc_dim": 64},
      clustering={"m": 2, "k": 12},
      train={"model_dir": str(tmp_path), "batch_per_replica": 4}).validate()
  run = trainer.Trainer(cfg, cpu_strategy(4))
  p = plan.memory_plan(cfg, num_replicas=4, replicas_per_worker=4, num_images=1000)
  want = sum(p["per_replica_bytes"][k] for k in ("trunk", "super_head_V", "sub_head_pieces",
                                                 "optimizer_momentum"))
  size = lambda v: 4 * int(np.prod(v.shape))  # noqa: E731  (all float32)
  r_bytes = p["per_replica_bytes"]
  # Exact, piece by piece: a slack would hide a missing sub-head piece or momentum slot.
  assert r_bytes["trunk"] == sum(size(v) for v in run.trunk.weights)
  assert r_bytes["super_head_V"] == sum(size(v) for v in run.super_head.weights)
  mirrored = sum(size(v) for v in run.trunk.weights + run.super_head.weights)
  mirrored += sum(size(s) for s in run.optimizer.slots)
  for r in range(4):
    mine = [v for _, k, b in run.sub_heads.of_replica(r) for v in (k, b)]
    assert r_bytes["sub_head_pieces"] == sum(size(v) for v in mine), r
    assert r_bytes["optimizer_momentum"] == (sum(size(s) for s in run.optimizer.slots)
                                             + sum(size(run.local_optimizer.slot(v))
                                                   for v in mine)), r
    held = mirrored + sum(size(v) + size(run.local_optimizer.slot(v)) for v in mine)
    assert held == want, (r, held, want)
  assert p["sub_head_columns_per_replica"] == 2 * 12      # S = 8 heads over 4 replicas
  # The same, counted by hand rather than read off the trainer (which shares the placement
  # with the plan): 2 whole heads of k = 12 columns x (D = 64 + 1 bias) a replica.
  trunk_trainable = sum(int(np.prod(v.shape)) for v in run.trunk.trainable_weights)
  v_head = 64 * 8 + 8
  assert r_bytes["sub_head_pieces"] == 4 * 2 * 12 * (64 + 1)
  assert r_bytes["optimizer_momentum"] == r_bytes["gradients"] == 4 * (
      trunk_trainable + v_head + 2 * 12 * 65)
  assert p["all_heads_on_every_replica_bytes"] == 3 * 4 * 8 * 12 * 65


@pytest.mark.parametrize("replicas,m,k,heads_held,columns", [
    (8, 1, 13, 1, 7),     # S = 4 heads over 8 replicas: each head cut in 2 shards, 6 + 7
    (3, 2, 12, 3, 36),    # S = 8 whole heads over 3 replicas: 3, 3 and 2 heads
    (1, 2, 12, 8, 96),    # every head on the one replica
])
def test_plan_counts_each_replicas_own_pieces_by_hand(replicas, m, k, heads_held, columns):
  """The largest replica's pieces, counted from the layout rule by hand (placement's
  docstring): whole heads s mod R when R <= S, else a column shard of head r mod S. A plan
  that left the pieces out, or gave every replica every head, is off by exactly those bytes."""
  d = 64
  cfg = ExperimentConfig().replace(
      data={"image_size": 32}, model={"image_size": 32, "width": 0.25, "fc_dim": d},
      clustering={"m": m, "k": k}, train={"batch_per_replica": 4}).validate()
  p = plan.memory_plan(cfg, num_replicas=replicas, replicas_per_worker=1, num_images=1000)
  r_bytes, s = p["per_replica_bytes"], 4 * m
  trunk = plan.trunk_shape(32, 0.25, d, True)
  assert p["sub_head_columns_per_replica"] == columns
  assert r_bytes["sub_head_pieces"] == 4 * columns * (d + 1)          # float32 kernel + bias
  assert r_bytes["super_head_V"] == 4 * (d * s + s)
  for kind in ("optimizer_momentum", "gradients"):
    assert r_bytes[kind] == 4 * (trunk.trainable + d * s + s + columns * (d + 1)), kind
  assert r_bytes["total"] == sum(v for name, v in r_bytes.items() if name != "total")
  assert p["sub_head_columns_total"] == s * k
  assert p["all_heads_on_every_replica_bytes"] == 3 * 4 * s * k * (d + 1)
  assert max(len(placement.HeadPlacement(s, k, replicas).pieces(r))
             for r in range(replicas)) == heads_held


def test_paper_preset_fits_an_80_gb_gpu_at_64_replicas():
  cfg = ExperimentConfig().replace(
      data={"image_size": 224}, model={"image_size": 224, "width": 1.0, "fc_dim": 4096},
      clustering={"m": 4, "k": 80000}, train={"batch_per_replica": 48}).validate()
  p = plan.memory_plan(cfg, 64, 8, 96_000_000)
  assert p["per_replica_bytes"]["total"] < 80e9
  assert p["all_heads_on_every_replica_bytes"] > 5 * p["per_replica_bytes"]["total"]
  assert p["sub_head_columns_per_replica"] == 20_000
  text = plan.format_plan(p)
  assert "fits a 80 GB accelerator: yes" in text


def test_plan_command_prints_and_allocates_nothing():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"),
       f"--flagfile={REPO}/flags/deepercluster_yfcc100m.cfg", "--plan", "--num_replicas=64",
       "--replicas_per_worker=8", "--num_images=96000000"],
      capture_output=True, text=True, timeout=120, check=True).stdout
  assert "| sub head pieces | 0.33 |" in out and "8 workers x 8" in out
  assert "x 34 reassignments a run" in out and "| sub clusters | 44 |" in out
  assert "recommendation" not in out                      # 0.21 TB a worker fits


def model_macs(model):
  """Multiply-adds of the built model's convolutions and dense layers, read off its layers
  (independent of the plan's walk over the layout)."""
  total = 0
  for layer in model.layers:
    if layer.__class__.__name__ == "Conv2D":
      kh, kw, cin, cout = layer.kernel.shape
      total += int(np.prod(layer.output.shape[1:3])) * kh * kw * cin * cout
    elif layer.__class__.__name__ == "Dense":
      total += int(np.prod(layer.kernel.shape))
  return total


@pytest.mark.parametrize("size,width,fc,sobel", [(32, 0.125, 32, True), (64, 0.25, 48, False)])
def test_trunk_macs_equal_the_built_models_layers(size, width, fc, sobel):
  model = vgg.build_trunk(size, width, fc, sobel)
  macs, largest = plan.trunk_macs(size, width, fc, sobel)
  assert macs == model_macs(model)
  conv_maps = [int(np.prod(l.output.shape[1:])) for l in model.layers
               if l.__class__.__name__ == "Conv2D"]
  assert largest == max(conv_maps + [3 * size * size])


def test_paper_trunk_is_about_15_5_gmacs():
  """VGG-16 at 224 px is ~15.5 GMACs; the Sobel front's 226 px map adds ~2% on conv1-2."""
  macs, _ = plan.trunk_macs(224, 1.0, 4096, True)
  assert 15.3e9 < macs < 16.0e9


def tiny_clustering_config(**clustering):
  return ExperimentConfig().replace(
      data={"image_size": 32}, model={"image_size": 32, "width": 0.125, "fc_dim": 32},
      clustering={"m": 2, "k": 5, "pca_dim": 8, "kmeans_iters": 3, "chunk_size": 16,
                  "reassign_every": 3, "fit_sample": 20, **clustering},
      train={"epochs": 7, "rotnet_warmup_epochs": 1}).validate()


def test_reassignment_counts_are_the_designs_formulas():
  """4 replicas = 2 workers x 2, 250 images: 125 a worker, 63 a replica; --fit_sample=20 a
  replica; super-clusters of ceil(63 / 2) = 32 members a replica."""
  cfg = tiny_clustering_config()
  p = plan.reassignment_plan(cfg, num_replicas=4, replicas_per_worker=2, num_images=250)
  n, fit, members, d, q, m, k, it, ch, R = 63, 20, 32, 32, 8, 2, 5, 3, 16, 4
  assert (p["rows_per_worker"], p["rows_per_replica"], p["fit_rows_per_replica"],
          p["pca_rows_per_replica"]) == (125, n, fit, fit)
  model = vgg.build_trunk(32, 0.125, 32, True)
  largest = max(int(np.prod(l.output.shape[1:])) for l in model.layers
                if l.__class__.__name__ == "Conv2D")
  ring = lambda b: 2 * (R - 1) * b // R  # noqa: E731  (what each replica sends)
  moments = (d * d + d + 1) * 8
  want = {
      "extraction": dict(passes=1, flops=2 * model_macs(model) * n,
                         host_to_device=n * 32 * 32 * 3 * 4, device_to_host=n * d * 4,
                         across_replicas=0,
                         peak_device=4 * model.count_params() + 128 * 2 * largest * 4),
      "pca_moments": dict(passes=1, flops=2 * fit * d * d, host_to_device=fit * d * 4,
                          device_to_host=moments, across_replicas=ring(moments),
                          peak_device=ch * d * 12 + 2 * d * d * 8),
      "pca_eigh_host": dict(passes=1, flops=0, host_flops=9 * d ** 3, host_to_device=0,
                            device_to_host=0, across_replicas=0, peak_device=0),
      "whitening": dict(passes=1, flops=2 * n * d * q, host_to_device=n * d * 4 + d * q * 4,
                        device_to_host=n * q * 4, across_replicas=0,
                        peak_device=ch * d * 4 + ch * q * 4 + d * q * 4),
      # 3 Lloyd passes over the 20 fitting rows, then one assignment pass over all 63
      "super_clusters": dict(passes=it + 1, flops=2 * (it * fit + n) * m * q,
                             host_to_device=(it * fit + n) * q * 4 + (it + 1) * m * q * 4,
                             device_to_host=(it + 1) * m * (q + 1) * 8 + n * 4,
                             across_replicas=(it + 1) * ring(m * (q + 1) * 8),
                             peak_device=ch * m * 4 + ch * q * 12 + m * q * 4 + m * (q + 1) * 8),
      # m sub-cluster fits, each over a super-cluster's 32 members (fitted on 20 of them)
      "sub_clusters": dict(passes=m * (it + 1), flops=m * 2 * (it * fit + members) * k * q,
                           host_to_device=m * ((it * fit + members) * q * 4
                                               + (it + 1) * k * q * 4),
                           device_to_host=m * ((it + 1) * k * (q + 1) * 8 + members * 4),
                           across_replicas=m * (it + 1) * ring(k * (q + 1) * 8),
                           peak_device=ch * k * 4 + ch * q * 12 + k * q * 4 + k * (q + 1) * 8),
  }
  got = {name: {key: v for key, v in phase.items() if key != "seconds"}
         for name, phase in p["phases"].items()}
  assert got == want
  for name, phase in want.items():
    seconds = (phase["host_flops"] / plan.HOST_FLOPS if "host_flops" in phase else
               max(phase["flops"] / plan.DEVICE_FP32_FLOPS,
                   (phase["host_to_device"] + phase["device_to_host"]) / plan.DEVICE_HOST_LINK,
                   phase["across_replicas"] / plan.DEVICE_INTER_NODE))   # 2 workers
    assert p["phases"][name]["seconds"] == pytest.approx(seconds, rel=1e-12), name
  assert p["reassignments"] == 2                           # epochs 1 and 4 of 7 (warm-up 1, T=3)
  assert p["run_seconds"] == pytest.approx(2 * sum(seconds_of(p)), rel=1e-12)
  assert p["recommendations"] == []
  # float16 features halve only what is written back to the host; no sample: every row fitted
  half = plan.reassignment_plan(tiny_clustering_config(feature_dtype="float16", fit_sample=0),
                                4, 2, 250)
  assert half["phases"]["whitening"]["device_to_host"] == n * q * 2
  assert half["fit_rows_per_replica"] == n
  assert half["phases"]["super_clusters"]["flops"] == 2 * (it + 1) * n * m * q


def test_the_plan_counts_the_assignment_history():
  """One int32 a pool image per kept table plus the int64 ids once: epochs 1 and 4 of 7 are
  the 2 reassignments; --keep_assignments=1 keeps the newest only, 0 all."""
  for keep, kept in ((0, 2), (1, 1), (5, 2)):
    cfg = tiny_clustering_config().replace(train={"keep_assignments": keep})
    p = plan.reassignment_plan(cfg, 4, 2, 250)
    assert (p["assignment_table_bytes"], p["assignment_tables_kept"],
            p["assignment_history_bytes"]) == (250 * 4, kept, kept * 250 * 4 + 250 * 8)
  text = plan.format_reassignment(plan.reassignment_plan(paper_config(), 64, 8, 96_000_000))
  n, kept = 96_000_000, 34                                  # epochs 0, 3, ..., 99
  assert (f"{4 * n / 1e9:,.2f} GB a table, {kept} kept (--keep_assignments) = "
          f"{(kept * 4 * n + 8 * n) / 1e9:,.2f} GB with the ids") in text


def seconds_of(p):
  return [phase["seconds"] for phase in p["phases"].values()]


def paper_config(**clustering):
  return ExperimentConfig().replace(
      data={"image_size": 224}, model={"image_size": 224, "width": 1.0, "fc_dim": 4096},
      clustering={"m": 4, "k": 80000, "pca_dim": 4096, "kmeans_iters": 10, **clustering},
      train={"batch_per_replica": 48, "epochs": 100}).validate()


def test_paper_reassignment_at_8x8_and_the_1x8_recommendation():
  p = plan.reassignment_plan(paper_config(), 64, 8, 96_000_000)
  sub = p["phases"]["sub_clusters"]
  # 1.5M rows a replica, 375k a super-cluster (under the 393,750-row fit sample: all fitted)
  assert sub["flops"] == 4 * 2 * 11 * 375_000 * 80_000 * 4096
  assert sub["across_replicas"] == 44 * (2 * 63 * 80_000 * 4097 * 8 // 64)
  assert sub["peak_device"] == (8192 * 80_000 * 4 + 8192 * 4096 * 12 + 80_000 * 4096 * 12
                                + 80_000 * 8)
  assert p["reassignments"] == 34 and p["recommendations"] == []
  one = plan.reassignment_plan(paper_config(), 8, 8, 96_000_000)
  assert one["host_bytes_per_worker"] > 1.5e12             # 96M x 4096 x 4 B = 1.57 TB
  text = plan.format_reassignment(one)
  assert "recommendation: a worker would hold 1.59 TB" in text
  assert "--feature_dtype=float16): 0.80 TB per worker" in text
  assert "--num_replicas=16 (2 workers x 8)" in text and "--fit_sample=3,150,000 (on)" in text
  assert "NVLink 900 GB/s" in text                         # one worker: collectives in-node
  assert plan.reassignment_plan(paper_config(feature_dtype="float16"), 8, 8, 96_000_000,
                                host_gb=1000)["recommendations"] == []


@pytest.mark.parametrize("mode,all_rotations,fraction,steps", [
    ("rotnet", False, 1.0, 96_000_000 // 3072),             # one rotation per drawn image
    ("rotnet", True, 1.0, 4 * 96_000_000 // 3072),          # 4x the original's steps
    ("deepcluster", False, 0.25, 24_000_000 // 3072),       # a quarter of the pool
])
def test_the_plans_epoch_is_the_trainers(mode, all_rotations, fraction, steps):
  cfg = paper_config().replace(train={"mode": mode, "batch_per_replica": 48,
                                      "all_rotations": all_rotations,
                                      "epoch_fraction": fraction})
  assert plan.memory_plan(cfg, 64, 8, 96_000_000)["steps_per_epoch"] == steps
