"""Labelled inputs for fine-tuning: eval_pretrain.py's transforms on the project's shards.

  train: RandomResizedCrop (scale crop_scale_min..1, ratio 3/4..4/3) and a horizontal flip
         (src/data/loader.py l.53-58, `tr_dataug`), drawn afresh every epoch;
  val:   resize the shorter side to size / 0.875 and centre-crop (Resize(256) +
         CenterCrop(224), loader.py l.45-50), normalised.
Only records whose `label` is set (>= 0) are used. Shards are split between workers by file.

Determinism: an epoch's order and crops are a pure function of (seed, epoch, element index),
so a run resumed mid-epoch skips the records it has trained on and sees the same batches.
Every worker runs the same number of steps (collectives stay in step): its stream repeats
until it fills them. Validation pads each worker's share with masked examples (label -1) to
one count of batches for all.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from dc_tf.data import decoder, preprocess, reader, schema

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class LabelCounts:
  """files: the sorted shards; per_file: labelled records in each; max_label: -1 if none."""
  files: tuple
  per_file: tuple
  max_label: int

  @property
  def total(self) -> int:
    return int(sum(self.per_file))

  def of_worker(self, worker: int, workers: int) -> int:
    """Labelled records in `worker`'s files (tf.data's `shard`: files[worker::workers])."""
    return int(sum(self.per_file[worker::workers]))


def count_labels(pattern: str) -> LabelCounts:
  """One pass over the `label` field of every record (the image bytes are not decoded).
  Raises DataError naming `pattern` when no record has a label."""
  files = reader.list_shards(pattern)
  spec = {schema.LABEL: schema.FEATURE_SPEC[schema.LABEL]}
  per_file, top = [], -1
  for f in files:
    n = 0
    for labels in tf.data.TFRecordDataset(f).batch(4096).map(
        lambda r: tf.io.parse_example(r, spec)[schema.LABEL]):
      labels = labels.numpy()
      n += int(np.sum(labels >= 0))
      top = max(top, int(labels.max(initial=-1)))
    per_file.append(n)
  if not sum(per_file):
    raise reader.DataError(
        f"no record in {pattern!r} has a label (every `label` field is -1 or absent): "
        "fine-tuning needs labelled shards (make_shards --input_format=folder or a "
        "path<TAB>label list)")
  return LabelCounts(tuple(files), tuple(per_file), top)


def _labelled(files, input_context) -> tf.data.Dataset:
  shards = tf.data.Dataset.from_tensor_slices(list(files))
  if input_context is not None and input_context.num_input_pipelines > 1:
    if len(files) < input_context.num_input_pipelines:
      raise reader.DataError(f"{len(files)} shard file(s) ({files[0]}, ...) cannot be split "
                             f"between {input_context.num_input_pipelines} workers: write at "
                             "least one shard per worker")
    shards = shards.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  ds = shards.flat_map(lambda f: tf.data.TFRecordDataset(f).map(
      lambda r: decoder.parse_record(r, f)))
  return ds.filter(lambda ex: tf.equal(ex["status"], decoder.OK) & (ex["label"] >= 0))


def train_dataset(files, *, image_size: int, batch_size: int, steps: int, seed: int,
                  epoch: int, skip_steps: int = 0, crop_scale_min: float = 0.08,
                  shuffle_buffer: int = 10_000, input_context=None) -> tf.data.Dataset:
  """Batches `skip_steps`..`steps` of one epoch, {'image': uint8 [B, S, S, 3] (normalised on
  the device), 'label': int32 [B]}."""
  per_epoch_seed = (seed * 1_000_003 + epoch) % 2**31
  ds = (_labelled(files, input_context).map(lambda ex: (ex["encoded"], ex["label"]))
        .shuffle(shuffle_buffer, seed=per_epoch_seed, reshuffle_each_iteration=True)
        .repeat().enumerate())

  def transform(index, pair):
    elem_seed = tf.stack([tf.constant(seed * 100_003 + epoch, tf.int64), index])
    image = preprocess.train_transform_encoded(pair[0], image_size, elem_seed, crop_scale_min)
    return {"image": image, "label": tf.cast(pair[1], tf.int32)}

  # An image that passes the byte checks but fails to decode is dropped (logged by tf.data)
  # before the take, so the epoch still has `steps` batches; the skip comes after both, so a
  # resumed epoch continues the same stream (it decodes the skipped images once more).
  ds = ds.map(transform, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True).take(steps * batch_size).skip(skip_steps * batch_size)
  return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def val_dataset(files, *, image_size: int, batch_size: int, steps: int,
                input_context=None) -> tf.data.Dataset:
  """`steps` batches of centre crops {'image': float32 normalised, 'label'}: this worker's
  labelled images once, then padding of label -1 (masked out of the metrics)."""
  def center(ex):
    image = preprocess.eval_transform(decoder.decode_rgb(ex["encoded"]), image_size)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}
  pad = tf.data.Dataset.from_tensors(
      {"image": tf.zeros([image_size, image_size, 3]), "label": tf.constant(-1)}).repeat()
  ds = (_labelled(files, input_context).map(center, num_parallel_calls=AUTOTUNE,
                                            deterministic=True)
        .ignore_errors(log_warning=True).concatenate(pad).take(steps * batch_size))
  return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
