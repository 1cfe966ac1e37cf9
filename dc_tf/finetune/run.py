"""The fine-tuning run: eval_pretrain.py's loop under tf.distribute, resumable.

Per epoch (eval_pretrain.py l.166-180): set the epoch's learning rate lr * 0.1 ** (epoch // 30)
(l.183-186), one pass over the labelled training images (the DistributedSampler's epoch,
l.196-204; here the global batch over all replicas, the remainder dropped), then top-1 and
top-5 on the validation images (the original logs top-1 and the loss, src/trainer.py
l.274-316). SGD with momentum and coupled weight decay on every trainable variable
(model_factory.py l.128-134), through `dc_tf.training.optim.SGD`.

Cross-replica semantics: each replica's cross-entropy is summed over its examples and divided
by the global batch, and the gradients are summed over replicas, so the update is the one of
the mean loss over the global batch (nn.CrossEntropyLoss's mean on one process of batch 256;
DDP's average of per-GPU means for 4 x 64, README.md l.183).

OUTPUT_DIR holds ckpt/ (tf.train.Checkpoint: classifier, optimizer, step), tb/ (TensorBoard),
log.jsonl (one line per epoch) and finetune.json (the config and the label counts, fixed at
the first start). Re-running the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dc_tf import distribute as dist
from dc_tf.config import UserError
from dc_tf.data import preprocess
from dc_tf.finetune import data, model as model_lib
from dc_tf.finetune.config import RANDOM, FinetuneConfig
from dc_tf.training import optim, stopping
from dc_tf.training.losses import cross_entropy_sum

STATE_FILE = "finetune.json"
# What a resumed run must have as it started: config field -> its flag.
_FIXED_AT_START = {"train_pattern": "--train_pattern", "val_pattern": "--val_pattern",
                   "source": "--from", "num_classes": "--num_classes"}
TRAIN_METRICS = ("loss", "correct")
VAL_METRICS = ("count", "loss", "correct1", "correct5")


class Finetuner:
  """Owns the classifier, its optimizer and checkpoints, and the label counts of one run.

  Args:
    config: a validated FinetuneConfig.
    strategy: from `dc_tf.distribute.make_strategy`.
  """

  def __init__(self, config: FinetuneConfig, strategy: tf.distribute.Strategy):
    self.config, self.strategy = config, strategy
    c, replicas = config, strategy.num_replicas_in_sync
    if c.jit_compile and replicas > 1:
      raise UserError(f"--jit_compile runs on one replica only; this run has {replicas} "
                      "(synchronised batch norm all-reduces inside the model): drop it")
    if c.global_batch % replicas:
      raise UserError(f"--global_batch={c.global_batch} does not split between {replicas} "
                      "replicas")
    self.per_replica = c.global_batch // replicas
    self.is_chief = dist.is_chief(strategy)
    self.model_config = model_lib.source_model_config(  # a bad --from first
        c.source, c.model, trust=c.trust_model)
    ckpt_dir = os.path.join(c.output_dir, "ckpt")
    latest = tf.train.latest_checkpoint(ckpt_dir) if tf.io.gfile.isdir(ckpt_dir) else None
    state = self._read_state() if latest else {}
    self._check_same_run(state)
    self.train_counts = self._counts("train", c.train_pattern, state)
    self.val_counts = self._counts("val", c.val_pattern, state)
    self.num_classes = c.num_classes or self.train_counts.max_label + 1
    if self.val_counts.max_label >= self.num_classes:
      raise UserError(f"{c.val_pattern} has label {self.val_counts.max_label}, the classifier "
                      f"has {self.num_classes} classes (labels of {c.train_pattern}, or "
                      "--num_classes)")
    self.steps_per_epoch = self.train_counts.total // c.global_batch
    if not self.steps_per_epoch:
      raise UserError(f"{c.train_pattern} has {self.train_counts.total} labelled images, fewer "
                      f"than one global batch (--global_batch={c.global_batch})")
    workers, n_local = max(dist.num_workers_in_tf_config(), 1), dist.num_local_replicas(strategy)
    shares = [self.train_counts.of_worker(w, workers) for w in range(workers)]
    if min(shares) == 0:
      raise UserError(f"a worker's share of {c.train_pattern} has no labelled image (files "
                      f"are split between {workers} workers): write more shards")
    val_most = max(self.val_counts.of_worker(w, workers) for w in range(workers))
    self.val_steps = max(1, math.ceil(val_most / (self.per_replica * n_local)))
    with strategy.scope():
      self.model, self.trunk = model_lib.build_network(
          self.model_config, dropout=c.dropout, sobel2rgb=c.sobel2rgb,
          num_classes=self.num_classes, seed=c.seed, mixed_precision=c.mixed_precision,
          source=None if latest or c.source == RANDOM else c.source, trust=c.trust_model)
      self.variables = self.model.trainable_variables
      self.optimizer = optim.SGD(self.variables, c.lr, c.momentum, c.weight_decay)
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
      self.saved_global_batch = tf.Variable(c.global_batch, dtype=tf.int64, trainable=False)
    self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                          step=self.step, global_batch=self.saved_global_batch)
    if not self.is_chief:  # only the chief writes the real checkpoint
      ckpt_dir = os.path.join(c.output_dir, "tmp", f"worker-{dist.worker_index(strategy)}")
    self.manager = tf.train.CheckpointManager(self.checkpoint, ckpt_dir, c.keep_checkpoints)
    self.writer = (tf.summary.create_file_writer(os.path.join(c.output_dir, "tb"))
                   if self.is_chief else tf.summary.create_noop_writer())
    self.stopping = stopping.StopAgreement(strategy, 0.0)
    self._forward = (tf.function(self._logits, jit_compile=True) if c.jit_compile
                     else self._logits)
    self._train_loop, self._val_loop = self._make_train_loop(), self._make_val_loop()
    self.resumed = self._restore(latest)
    if self.is_chief and not state:     # fixed at the first start (or a run without one)
      self._write_state()
    self.history: list[dict] = []

  # --- label counts and the state file -------------------------------------------------
  def _read_state(self) -> dict:
    path = os.path.join(self.config.output_dir, STATE_FILE)
    if not tf.io.gfile.exists(path):
      return {}
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)

  def _check_same_run(self, state: dict) -> None:
    """A resumed run keeps the data, source and classes it started with (finetune.json):
    other shards would silently change its epoch, labels and step count."""
    saved = state.get("config", {})
    for key, flag in _FIXED_AT_START.items():
      now, then = getattr(self.config, key), saved.get(key)
      if key == "source" and isinstance(then, str):   # runs/x and runs/x/ are one run
        now, then = now.rstrip("/") or now, then.rstrip("/") or then
      if key == "num_classes":          # 0 means the count the first start found
        now, then = now or state.get("num_classes"), then or state.get("num_classes")
      if key in saved and then != now:
        raise UserError(
            f"{os.path.join(self.config.output_dir, STATE_FILE)}: this run started with "
            f"{flag}={saved[key]!r}, not {getattr(self.config, key)!r}; resuming it with "
            f"another would change its epoch and labels: pass the same {flag}, or a new "
            "--output_dir")

  def _counts(self, which: str, pattern: str, state: dict) -> data.LabelCounts:
    """The label counts saved at the first start (the epoch stays what it was), else counted."""
    saved = state.get(which)
    if saved and saved.get("pattern") == pattern:
      return data.LabelCounts(tuple(saved["files"]), tuple(saved["per_file"]),
                              saved["max_label"])
    return data.count_labels(pattern)

  def _write_state(self) -> None:
    tf.io.gfile.makedirs(self.config.output_dir)
    counts = {which: {"pattern": pattern, "files": list(n.files), "per_file": list(n.per_file),
                      "max_label": n.max_label}
              for which, pattern, n in (("train", self.config.train_pattern, self.train_counts),
                                        ("val", self.config.val_pattern, self.val_counts))}
    state = {"config": self.config.to_dict(), "source_model": self.model_config.__dict__,
             "num_classes": self.num_classes, "steps_per_epoch": self.steps_per_epoch, **counts}
    with tf.io.gfile.GFile(os.path.join(self.config.output_dir, STATE_FILE), "w") as f:
      f.write(json.dumps(state, indent=2))

  def _restore(self, latest: str | None) -> bool:
    if not latest:
      logging.info("fine-tuning from %s: %d classes, %d labelled images, %d steps an epoch",
                   self.config.source, self.num_classes, self.train_counts.total,
                   self.steps_per_epoch)
      return False
    saved = tf.train.load_checkpoint(latest)
    batch = int(saved.get_tensor("global_batch/.ATTRIBUTES/VARIABLE_VALUE"))
    if batch != self.config.global_batch:
      raise UserError(f"{latest} was written with --global_batch={batch}, this run has "
                      f"{self.config.global_batch}: resuming would misalign the epoch")
    self.checkpoint.restore(latest).assert_existing_objects_matched()
    logging.info("resumed from %s at step %d", latest, int(self.step.numpy()))
    return True

  # --- steps ---------------------------------------------------------------------------
  def _logits(self, images):
    return tf.cast(self.model(preprocess.normalize(images), training=True), tf.float32)

  def _replica_step(self, batch):
    ctx = tf.distribute.get_replica_context()
    with tf.GradientTape() as tape:
      logits = self._forward(batch["image"])
      loss_sum = cross_entropy_sum(logits, batch["label"])
      loss = loss_sum / self.config.global_batch     # summed over replicas: the global mean
    grads = optim.sum_gradients(tape.gradient(loss, self.variables))
    ctx.merge_call(lambda _, g: self.optimizer.apply(g), args=(grads,))
    hits = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch["label"])
    return {"loss": loss_sum, "correct": tf.reduce_sum(tf.cast(hits, tf.float32))}

  def _make_train_loop(self):
    strategy = self.strategy

    def loop(iterator, steps):
      totals = {k: tf.constant(0.0) for k in TRAIN_METRICS}
      for _ in tf.range(steps):
        out = strategy.run(self._replica_step, args=(next(iterator),))
        totals = {k: totals[k] + strategy.reduce(tf.distribute.ReduceOp.SUM, out[k], axis=None)
                  for k in TRAIN_METRICS}
        self.step.assign_add(1)
      return totals
    return tf.function(loop)

  def _replica_eval(self, batch):
    logits = tf.cast(self.model(batch["image"], training=False), tf.float32)
    y = batch["label"]
    valid = y >= 0                                           # padding is label -1
    top = tf.math.top_k(logits, k=min(5, self.num_classes)).indices
    hit1 = valid & tf.equal(top[:, 0], y)
    hit5 = valid & tf.reduce_any(tf.equal(top, y[:, None]), axis=1)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(y, 0), logits=logits)
    f = lambda b: tf.reduce_sum(tf.cast(b, tf.float32))  # noqa: E731
    return {"count": f(valid), "loss": tf.reduce_sum(tf.where(valid, ce, 0.0)),
            "correct1": f(hit1), "correct5": f(hit5)}

  def _make_val_loop(self):
    strategy = self.strategy

    def loop(iterator, steps):
      totals = {k: tf.constant(0.0) for k in VAL_METRICS}
      for _ in tf.range(steps):
        out = strategy.run(self._replica_eval, args=(next(iterator),))
        totals = {k: totals[k] + strategy.reduce(tf.distribute.ReduceOp.SUM, out[k], axis=None)
                  for k in VAL_METRICS}
      return totals
    return tf.function(loop)

  # --- the run -------------------------------------------------------------------------
  def request_preemption(self) -> None:
    """SIGTERM: every worker saves at the next agreement and stops (safe in a handler)."""
    self.stopping.request_preemption()

  def evaluate(self) -> dict:
    """Top-1 / top-5 (%) and the mean cross-entropy over the validation images."""
    c, n_local = self.config, dist.num_local_replicas(self.strategy)

    def dataset_fn(ctx):
      return data.val_dataset(self.val_counts.files, image_size=self.model_config.image_size,
                              batch_size=ctx.get_per_replica_batch_size(c.global_batch),
                              steps=self.val_steps * n_local, input_context=ctx)
    iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
    out = {k: float(v) for k, v in self._val_loop(iterator, tf.constant(self.val_steps)).items()}
    n = max(out["count"], 1.0)
    return {"val_top1": 100.0 * out["correct1"] / n, "val_top5": 100.0 * out["correct5"] / n,
            "val_loss": out["loss"] / n, "val_images": int(out["count"])}

  def _train_epoch(self, epoch: int, done: int) -> dict:
    c, n_local, spe = self.config, dist.num_local_replicas(self.strategy), self.steps_per_epoch

    def dataset_fn(ctx):
      return data.train_dataset(
          self.train_counts.files, image_size=self.model_config.image_size,
          batch_size=ctx.get_per_replica_batch_size(c.global_batch), steps=spe * n_local,
          seed=c.seed, epoch=epoch, skip_steps=done * n_local, crop_scale_min=c.crop_scale_min,
          shuffle_buffer=c.shuffle_buffer, input_context=ctx)
    iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
    self.optimizer.learning_rate.assign(c.lr_at_epoch(epoch))
    totals, seen, t0 = {k: 0.0 for k in TRAIN_METRICS}, 0, time.time()
    end = spe if not c.max_steps else min(spe, c.max_steps - epoch * spe)
    bar = tqdm(total=spe, initial=done, unit="step", desc=f"epoch {epoch}",
               disable=not self.is_chief, leave=False)
    last_save = int(self.step.numpy())
    while done + seen < end and not self.stopping.should_stop():
      n = min(c.steps_per_loop, end - done - seen)
      out = {k: float(v) for k, v in self._train_loop(iterator, tf.constant(n)).items()}
      if not np.isfinite(out["loss"]):
        raise UserError(f"the loss is {out['loss']} at step {int(self.step.numpy())}; the last "
                        f"good checkpoint in {self.manager.directory} is kept: lower --lr")
      for k in TRAIN_METRICS:
        totals[k] += out[k]
      seen += n
      rate = seen * c.global_batch / max(time.time() - t0, 1e-9)
      bar.update(n)
      bar.set_postfix(loss=f"{totals['loss'] / (seen * c.global_batch):.3f}", img_s=f"{rate:.0f}")
      step = int(self.step.numpy())
      with self.writer.as_default(step=step):
        tf.summary.scalar("train/loss", out["loss"] / (n * c.global_batch))
        tf.summary.scalar("train/lr", self.optimizer.learning_rate)
        tf.summary.scalar("train/images_per_second", rate)
      if c.checkpoint_every and step - last_save >= c.checkpoint_every:
        self.manager.save(checkpoint_number=step)
        last_save = step
    bar.close()
    examples = max(seen * c.global_batch, 1)
    return {"event": "epoch", "epoch": epoch, "step": int(self.step.numpy()),
            "lr": c.lr_at_epoch(epoch), "steps": seen, "loss": totals["loss"] / examples,
            "top1": 100.0 * totals["correct"] / examples,
            "seconds": round(time.time() - t0, 2),
            "images_per_second": round(examples / max(time.time() - t0, 1e-9), 1)}

  def _log(self, record: dict) -> None:
    self.history.append(record)
    logging.info("%s", json.dumps(record))
    if self.is_chief:
      with tf.io.gfile.GFile(os.path.join(self.config.output_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    with self.writer.as_default(step=record["step"]):
      for k in ("val_top1", "val_top5", "val_loss", "top1"):
        if k in record:
          tf.summary.scalar(("val/" if k.startswith("val") else "train/") + k, record[k])

  def fit(self, max_seconds: float = 0.0) -> list[dict]:
    """Trains to the end (or --max_steps, a SIGTERM, `max_seconds`), evaluating and saving at
    every epoch end; returns this call's log records."""
    c, spe = self.config, self.steps_per_epoch
    total = spe * c.epochs if not c.max_steps else min(spe * c.epochs, c.max_steps)
    self.stopping.deadline = time.time() + max_seconds if max_seconds else float("inf")
    while int(self.step.numpy()) < total:
      epoch, done = divmod(int(self.step.numpy()), spe)
      record = self._train_epoch(epoch, done)
      if int(self.step.numpy()) == (epoch + 1) * spe:      # the epoch is complete
        record.update(self.evaluate())
        self._log(record)
      self.manager.save(checkpoint_number=int(self.step.numpy()))
      if self.stopping.preempted or self.stopping.out_of_time:
        logging.warning("stopped at step %d; the same command resumes", int(self.step.numpy()))
        break
    return self.history
