"""One epoch of training: its sampling plan, its input pipeline, its loop of steps.

An epoch samples images uniformly over the current clusters (Caron et al. 2019, Sec. 3.3;
dc_tf.data.sampler), reads them through one tf.data pipeline per worker and runs
`--steps_per_loop` steps per tf.function call, asking the workers between calls whether to
stop (dc_tf.training.stopping).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dc_tf import distribute as dist
from dc_tf.data import reader, sampler
from dc_tf.training.step import METRICS

if TYPE_CHECKING:   # the trainer imports this module: the type only, no import circle
  from dc_tf.training.trainer import Trainer


class TrainingDiverged(RuntimeError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


def epoch_plan(run: Trainer, epoch: int, epoch_images: int) -> reader.EpochPlan | None:
  """The epoch's draws: each image's multiplicity, sampled uniformly over clusters."""
  if not run.config.uses_clustering or not len(run.table_ids.numpy()):
    return None  # RotNet, or the rotation warm-up: every image once, no sub-class
  cfg = run.config
  labels = run.table_super.numpy().astype(np.int64) * cfg.clustering.k + run.table_sub.numpy()
  mult = sampler.epoch_multiplicity(labels, epoch_images, int(run.sampling_seed.numpy()), epoch,
                                    uniform=cfg.train.uniform_sampler)
  return reader.EpochPlan(run.table_ids.numpy(), mult, run.table_super.numpy(),
                          run.table_sub.numpy())


def train_epoch(run: Trainer, epoch: int, done: int, steps_per_epoch: int, lrs) -> dict:
  """Steps `done`..`steps_per_epoch` of one epoch, a checkpoint every --checkpoint_every
  steps, stopping early when the workers agree to; -> the epoch's log record."""
  cfg, t = run.config, run.config.train
  plan = epoch_plan(run, epoch, int(run.epoch_images.numpy()))

  # One dataset per worker, and each of its G local replicas takes one batch per step:
  # the worker's dataset holds G batches per step.
  n_local = dist.num_local_replicas(run.strategy)

  def dataset_fn(ctx):
    return reader.build_train_dataset(
        cfg.data.data_pattern, image_size=cfg.model.image_size,
        batch_size=ctx.get_per_replica_batch_size(run.global_batch),
        steps=steps_per_epoch * n_local, plan=plan, num_rotations=cfg.num_rotations,
        all_rotations=t.all_rotations, seed=int(run.sampling_seed.numpy()), epoch=epoch,
        skip_steps=done * n_local,
        crop_scale_min=cfg.data.crop_scale_min,
        shuffle_buffer=cfg.data.shuffle_buffer, input_context=ctx)

  iterator = iter(run.strategy.distribute_datasets_from_function(dataset_fn))
  totals = {k: 0.0 for k in (*METRICS, "skipped")}
  remaining, seen, t0 = steps_per_epoch - done, 0, time.time()
  bar = tqdm(total=steps_per_epoch, initial=done, unit="step", desc=f"epoch {epoch}",
             disable=not run.is_chief, leave=False)
  last_save = int(run.step.numpy())
  while remaining > 0:
    if run.should_stop():
      logging.warning("%s: saving a checkpoint at step %d", "preempted (SIGTERM) on a worker"
                      if run.preempted else "--max_minutes reached", int(run.step.numpy()))
      break
    n = min(t.steps_per_loop, remaining)
    run.optimizer.learning_rate.assign(float(lrs[min(int(run.step.numpy()), len(lrs) - 1)]))
    with run.stopping.guard("training steps"):
      out = {k: float(v) for k, v in run._train_loop(iterator, tf.constant(n)).items()}
    if not np.isfinite(out["loss"]):
      raise TrainingDiverged(
          f"loss is {out['loss']} at step {int(run.step.numpy())} (epoch {epoch}); the "
          f"last good checkpoint in {run.manager.directory} is kept. Lower --lr or check "
          "the data.")
    for k in METRICS:
      totals[k] += out[k]
    totals["skipped"] = max(totals["skipped"], out["skipped"])
    remaining -= n
    seen += n
    rate = seen * run.global_batch / max(time.time() - t0, 1e-9)
    bar.update(n)
    bar.set_postfix(loss=f"{totals['loss'] / seen:.3f}", img_s=f"{rate:.0f}")
    step = int(run.step.numpy())
    with run.writer.as_default(step=step):
      tf.summary.scalar("train/loss", out["loss"] / n)
      tf.summary.scalar("train/lr", run.optimizer.learning_rate)
      tf.summary.scalar("train/images_per_second", rate)
    if t.checkpoint_every and step - last_save >= t.checkpoint_every:
      run.save()
      last_save = step
  bar.close()
  # The epoch's iterator is released on a short-lived thread: destroyed on this thread, an
  # iterator sometimes blocked for ~19-47 s, idle (in 1 to 3 of the demo's 6 epochs; root
  # cause not found). The list is its only reference, so the thread's clear() is what
  # destroys it (handing the iterator itself over raced: whichever side dropped its
  # reference last destroyed it, sometimes this one). Not a daemon thread: Python joins it
  # before finalising, whereas a daemon thread still inside TF's destructor at exit is
  # forced to unwind through C++ and aborts the process ("exception not rethrown"; seen
  # on a worker that exits right after its last epoch).
  holder = [iterator]
  del iterator
  threading.Thread(target=holder.clear, name="release-epoch-iterator").start()
  examples = max(seen * run.global_batch, 1)
  record = {"event": "epoch", "epoch": epoch, "step": int(run.step.numpy()),
            # lr: the epoch's first step's (a warm-up epoch starts near 0); lr_last: its last
            # step's, the rate it ended at (issue 28).
            "lr": float(lrs[min(epoch * steps_per_epoch, len(lrs) - 1)]),
            "lr_last": float(lrs[min(max(int(run.step.numpy()) - 1, 0), len(lrs) - 1)]),
            "examples_seen": int(run.step.numpy()) * run.global_batch,
            "seconds": round(time.time() - t0, 2),
            "images_per_second": round(examples / max(time.time() - t0, 1e-9), 1),
            "loss": totals["loss"] / max(seen, 1),
            "super_loss": totals["super_loss"] / max(seen, 1),
            "sub_loss": totals["sub_loss"] / max(seen, 1),
            "super_accuracy": totals["super_correct"] / examples,
            "sub_accuracy": totals["sub_correct"] / examples,
            "skipped_records": int(totals["skipped"])}
  k_sub = cfg.num_sub_classes
  if k_sub and seen and abs(record["sub_loss"] - np.log(k_sub)) < 0.01 * np.log(k_sub):
    logging.warning("collapse alarm: sub-class loss %.3f sits at ln k = %.3f for the whole "
                    "epoch: the sub-heads learn nothing", record["sub_loss"], np.log(k_sub))
    record["collapse_alarm"] = True
  with run.writer.as_default(step=int(run.step.numpy())):
    for k in ("super_accuracy", "sub_accuracy", "super_loss", "sub_loss"):
      tf.summary.scalar(f"train/{k}", record[k])
  return record
