"""The memory plan counts what the trainer really creates (the partitioned-heads issue, 4)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cpu_strategy
from dc_tf import plan
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
  mirrored = sum(size(v) for v in run.trunk.weights + run.super_head.weights)
  mirrored += sum(size(s) for s in run.optimizer.slots)
  for r in range(4):
    mine = [v for _, k, b in run.sub_heads.of_replica(r) for v in (k, b)]
    held = mirrored + sum(size(v) + size(run.local_optimizer.slot(v)) for v in mine)
    assert abs(held - want) <= 0.05 * want, (r, held, want)
  assert p["sub_head_columns_per_replica"] == 2 * 12      # S = 8 heads over 4 replicas


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
