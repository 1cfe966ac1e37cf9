"""evaluate.py's flags for the paper's other evaluations reach the library: --voc_split and
--voc_conv13_epochs (Table 3's VOC column), --retrieval* (Table 6), --cpu_replicas (the
extraction on two replicas), each checked against the library called directly."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from dc_tf.config import ExperimentConfig
from dc_tf.evaluation import evaluator, linear_original, retrieval
from dc_tf.models import vgg
from dc_tf.training import checkpointing
from test_retrieval import _classic
from test_voc import _stripes_voc


def _tiny_run(run):
  cfg = ExperimentConfig().replace(data={"image_size": 32},
                                   model={"image_size": 32, "width": 0.125, "fc_dim": 16})
  checkpointing.write_config(str(run), cfg)
  trunk = vgg.trunk_from_config(cfg.model)
  tf.train.CheckpointManager(tf.train.Checkpoint(trunk=trunk, step=tf.Variable(3, dtype=tf.int64)),
                             str(run / "ckpt"), 1).save()


def _evaluate(*args):
  return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow
def test_paper_flags_reach_the_library(tiny_shards, tmp_path):
  run, out = tmp_path / "run", tmp_path / "eval"
  _tiny_run(run)
  voc_dir = _stripes_voc(tmp_path / "voc", splits=("train", "val"), per_split=8)
  _classic(tmp_path / "ret", "oxford5k", "oxford", 0)
  _classic(tmp_path / "ret", "paris6k", "paris", 1)
  done = _evaluate(f"--checkpoint={run}", f"--train_data={tiny_shards}",
                   f"--test_data={tiny_shards}", f"--output_dir={out}", "--layers=conv4,fc7",
                   "--probe_epochs=1", "--baseline=none", "--cpu_replicas=2",
                   "--batch_size=16",
                   f"--voc_dir={voc_dir}", "--voc_split=train/val", "--voc_conv13_epochs=2",
                   "--retrieval=oxford5k", f"--retrieval_dir={tmp_path / 'ret'}",
                   "--retrieval_size=96", "--retrieval_pca=8")
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.load(open(out / "report.json"))
  # The extraction ran on both logical CPUs (48 images in batches of 16: 3 batches).
  assert {d[-5:] for d in report["results"]["trained"]["computed_on"]} == {"CPU:0", "CPU:1"}
  # The same numbers as the library called on the same checkpoint (all seeded, CPU).
  loaded = evaluator.load(str(run))
  conv13 = linear_original.voc_probe(loaded, voc_dir, linear_original.VocProbeConfig(epochs=2),
                                     splits="train/val")
  assert report["voc07_conv13"]["trained"] == pytest.approx(conv13["map"], abs=1e-6)
  assert report["voc07_split"] == "train/val"
  found = retrieval.evaluate_retrieval(loaded, ("oxford5k",), str(tmp_path / "ret"),
                                       max_side=96, pca_dim=8)["oxford5k"]
  assert report["retrieval"]["trained"]["oxford5k"]["map"] == pytest.approx(found["map"])
  assert report["retrieval"]["trained"]["oxford5k"]["whitened_on"] == "paris6k"
  md = open(out / "report.md").read()
  assert f"| VOC07 conv13 (Table 3) mAP | {conv13['map']:.1f} |" in md
  assert f"| oxford5k mAP | {found['map']:.1f} |" in md


@pytest.mark.parametrize("args, message", [
    (["--voc_split=test/train"], "--voc_split must be one of"),
    (["--retrieval=oxford5k"], "--retrieval needs --retrieval_dir"),
])
def test_bad_paper_flags_are_one_line_errors(args, message, tmp_path):
  done = _evaluate(f"--checkpoint={tmp_path}", *args)
  assert done.returncode == 2
  lines = [l for l in done.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("error:") and message in lines[-1], done.stderr[-2000:]
  assert "Traceback" not in done.stderr
