"""Checkpoint layout: what a run directory holds, and loading a trunk back from it.

  MODEL_DIR/config.json      the frozen ExperimentConfig
  MODEL_DIR/ckpt/ckpt-N      tf.train.Checkpoint: trunk, heads, optimizer, step, and the
                             cluster state (id -> (super, sub) table, assignment epoch)
  MODEL_DIR/tb/              TensorBoard summaries
  MODEL_DIR/log.jsonl        one JSON line per epoch / reassignment
"""

from __future__ import annotations

import os

import tensorflow as tf

from dc_tf.config import ExperimentConfig
from dc_tf.models import vgg


class CheckpointError(FileNotFoundError):
  """No usable checkpoint; the message names the directory."""


def read_config(model_dir: str) -> ExperimentConfig:
  path = os.path.join(model_dir, "config.json")
  if not tf.io.gfile.exists(path):
    raise CheckpointError(f"no config.json in {model_dir}: not a dc_tf training run directory")
  with tf.io.gfile.GFile(path) as f:
    return ExperimentConfig.from_json(f.read())


def write_config(model_dir: str, config: ExperimentConfig) -> None:
  tf.io.gfile.makedirs(model_dir)
  with tf.io.gfile.GFile(os.path.join(model_dir, "config.json"), "w") as f:
    f.write(config.to_json())


def latest_checkpoint(path: str) -> str:
  """The newest checkpoint under a run dir, its ckpt/ folder, or a checkpoint prefix."""
  for candidate in (os.path.join(path, "ckpt"), path):
    if tf.io.gfile.isdir(candidate):
      found = tf.train.latest_checkpoint(candidate)
      if found:
        return found
  if tf.io.gfile.exists(path + ".index"):
    return path
  raise CheckpointError(f"no checkpoint found at {path}")


def restore_trunk(trunk, path: str) -> int:
  """Restores only the trunk's weights from a run's checkpoint; returns its step."""
  step = tf.Variable(0, dtype=tf.int64)
  tf.train.Checkpoint(trunk=trunk, step=step).restore(latest_checkpoint(path)).expect_partial()
  return int(step.numpy())


def load_trunk(model_dir: str):
  """(trunk, config, epoch) from a run directory."""
  config = read_config(model_dir)
  trunk = vgg.trunk_from_config(config.model)
  step = restore_trunk(trunk, model_dir)
  return trunk, config, step
