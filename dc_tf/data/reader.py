"""Reader: `tf.data` pipelines over TFRecord shards (decoder -> parser -> batches).

Two pipelines:
  * `build_train_dataset`: an epoch drawn by the sampler (each image repeated by its
    multiplicity), shuffled, decoded, augmented, rotated, with its targets
    (`rotation`, `super_class`, `sub_class`) as named fields; a fixed number of steps.
  * `build_extraction_dataset`: every image once, in shard order, center-cropped, with
    `image_id`, `label` and metadata kept in order.
Shards are split between workers by file (`tf.distribute.InputContext`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf

from dc_tf.config import UserError
from dc_tf.data import decoder, preprocess

AUTOTUNE = tf.data.AUTOTUNE


class DataError(UserError, ValueError):
  """Missing or unusable input; the message names the pattern or file."""


def list_shards(pattern: str) -> list[str]:
  """Sorted shard files for a glob pattern (local or gs://); a clear error if none."""
  if not pattern:
    raise DataError("no shard pattern given (--data_pattern is empty)")
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise DataError(f"no shard file matches {pattern!r}")
  empty = [f for f in files if tf.io.gfile.stat(f).length == 0]
  if len(empty) == len(files):
    raise DataError(f"every shard matching {pattern!r} is empty, e.g. {empty[0]}")
  for f in empty:
    logging.warning("empty shard file (no records): %s", f)
  return files


def corrupt_shards(files: list[str]) -> list[str]:
  """The shard files whose first record cannot be read: not a TFRecord file, or framing
  damaged from the start. (A file damaged later yields its readable records; tf.data logs
  the rest.)"""
  bad = []
  for f in files:
    try:
      for _ in tf.data.TFRecordDataset(f).take(1):
        pass
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError):
      bad.append(f)
  return bad


def _shard_files(files: list[str], ctx: tf.distribute.InputContext | None) -> tf.data.Dataset:
  ds = tf.data.Dataset.from_tensor_slices(files)
  if ctx is not None and ctx.num_input_pipelines > 1:
    if len(files) < ctx.num_input_pipelines:
      raise DataError(f"{len(files)} shard files cannot be split between "
                      f"{ctx.num_input_pipelines} workers: write at least one shard per worker")
    ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
  return ds


def _records(files: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
  """(record, filename) pairs. A shard whose framing is damaged (cut-off file) yields its
  readable records, and the error is logged by tf.data with the file's name."""
  def read(f):
    recs = tf.data.TFRecordDataset(f).ignore_errors(log_warning=True)
    return recs.map(lambda r: (r, f))
  return files.interleave(read, cycle_length=4, block_length=16, num_parallel_calls=AUTOTUNE,
                          deterministic=deterministic)


def _parsed(files: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
  """Parsed records with their `status` (`decoder.parse_records` on batches of 256)."""
  records = _records(files, deterministic).batch(256)
  return records.map(decoder.parse_records, num_parallel_calls=AUTOTUNE,
                     deterministic=deterministic).unbatch()


def _decoded(examples: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
  """Decodes images in parallel; bad ones are dropped and counted in `skipped`."""
  ds = examples.map(decoder.decode_example, num_parallel_calls=AUTOTUNE,
                    deterministic=deterministic)
  ds = ds.ignore_errors(log_warning=True)  # last resort for undecodable-but-plausible bytes
  ds = ds.map(decoder.check_required)
  return decoder.count_and_drop_bad(ds)


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """What one training epoch draws, for all workers alike.

  image_ids: int64 [N], every image of the pool (global, not per worker).
  multiplicity: int64 [N], how often each image is drawn this epoch (the sampler's output).
  super_cluster, sub_cluster: int32 [N] pseudo-labels (zeros/-1 when not clustering).
  """
  image_ids: np.ndarray
  multiplicity: np.ndarray
  super_cluster: np.ndarray
  sub_cluster: np.ndarray


def _lookup(keys: np.ndarray, values: np.ndarray, default: int) -> tf.lookup.StaticHashTable:
  init = tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.int64),
                                             tf.constant(values, tf.int64))
  return tf.lookup.StaticHashTable(init, default_value=default)


def build_train_dataset(pattern: str, *, image_size: int, batch_size: int, steps: int,
                        plan: EpochPlan | None, num_rotations: int, all_rotations: bool,
                        seed: int, epoch: int, skip_steps: int = 0,
                        crop_scale_min: float = 0.08, shuffle_buffer: int = 4096,
                        input_context: tf.distribute.InputContext | None = None
                        ) -> tf.data.Dataset:
  """One training epoch of `steps` batches of `batch_size` rotated examples.

  Each example: image [S,S,3] uint8 (the train step normalises it on the device), rotation,
  super_class = super_cluster * R + rotation, sub_class, image_id, skipped (bad records seen so far on this worker). With
  `all_rotations`, an image comes with its R rotations side by side (batch_size // R
  images per batch), as in RotNet. `skip_steps` drops the first batches (exact resume).
  """
  files = list_shards(pattern)
  examples = _parsed(_shard_files(files, input_context), deterministic=True)
  if plan is not None:
    counts = _lookup(plan.image_ids, plan.multiplicity, 0)
    supers = _lookup(plan.image_ids, plan.super_cluster, 0)
    subs = _lookup(plan.image_ids, plan.sub_cluster, -1)

    def repeat_by_count(ex):
      ex = dict(ex)
      ex["super_cluster"] = tf.cast(supers.lookup(ex["image_id"]), tf.int32)
      ex["sub_class"] = tf.cast(subs.lookup(ex["image_id"]), tf.int32)
      return tf.data.Dataset.from_tensors(ex).repeat(counts.lookup(ex["image_id"]))
    examples = examples.flat_map(repeat_by_count)
  else:
    def no_clusters(ex):
      ex = dict(ex)
      ex["super_cluster"] = tf.constant(0, tf.int32)
      ex["sub_class"] = tf.constant(-1, tf.int32)
      return ex
    examples = examples.map(no_clusters)
  # Shuffle each pass, then repeat: the first pass is exactly the sampler's epoch, and every
  # worker still runs exactly `steps` steps whatever its shard holds (collectives stay in
  # step; a short shard is padded by its next pass, a long one truncated).
  examples = examples.shuffle(shuffle_buffer, seed=(seed * 1000003 + epoch) % 2**31,
                              reshuffle_each_iteration=True).repeat()
  # Byte checks only: an image is decoded in `transform`, and then only its crop window.
  examples = decoder.count_and_drop_bad(examples, keep_missing=True)
  per_image = batch_size // num_rotations if all_rotations else batch_size
  per_image = max(per_image, 1)
  examples = examples.enumerate()

  def transform(index, ex):
    elem_seed = tf.stack([tf.cast(seed * 100003 + epoch, tf.int64), index])
    seeds = tf.random.experimental.stateless_split(elem_seed, 2)
    image = tf.cond(
        tf.equal(ex["status"], decoder.OK),
        lambda: preprocess.train_transform_encoded(ex["encoded"], image_size, seeds[0],
                                                   crop_scale_min),
        lambda: tf.zeros([image_size, image_size, 3], tf.uint8))  # MISSING_FIELD: fails below
    if all_rotations:
      rotation = tf.range(num_rotations, dtype=tf.int32)
      image = tf.stack([preprocess.rotate(image, r) for r in range(num_rotations)])
    else:
      rotation = tf.random.stateless_uniform([], seeds[1], 0, num_rotations, tf.int32)
      image = preprocess.rotate(image, rotation)
    out = {"image": image, "rotation": rotation,
           "super_class": ex["super_cluster"] * num_rotations + rotation,
           "sub_class": ex["sub_class"] + tf.zeros_like(rotation),
           "image_id": ex["image_id"] + tf.zeros_like(rotation, tf.int64),
           "skipped": ex["skipped"] + tf.zeros_like(rotation, tf.int64),
           "status": ex["status"], "filename": ex["filename"]}
    return out

  def require(ex):  # after ignore_errors, which would swallow this assertion
    ex = decoder.check_required(ex)
    return {k: v for k, v in ex.items() if k not in ("status", "filename")}

  ds = examples.map(transform, num_parallel_calls=AUTOTUNE, deterministic=True)
  # Bytes that pass the checks but fail to decode are dropped here (logged by tf.data); the
  # take after it still gives every worker exactly `steps` batches.
  ds = ds.ignore_errors(log_warning=True).map(require).take(steps * per_image)
  if all_rotations:
    ds = ds.unbatch()
  ds = ds.batch(batch_size, drop_remainder=True)
  if skip_steps:
    ds = ds.skip(skip_steps)
  return ds.prefetch(AUTOTUNE)


def build_extraction_dataset(pattern: str, *, image_size: int, batch_size: int,
                             input_context: tf.distribute.InputContext | None = None,
                             keep_encoded: bool = False) -> tf.data.Dataset:
  """Every image once, deterministic, in shard order: image, image_id, label, metadata."""
  files = list_shards(pattern)
  examples = _parsed(_shard_files(files, input_context), deterministic=True)
  examples = _decoded(examples, deterministic=True)

  def transform(ex):
    out = {k: ex[k] for k in ("image_id", "label", "user_id", "tags", "device", "lat", "lon",
                              "skipped")}
    out["image"] = preprocess.eval_transform(ex["image"], image_size)
    if keep_encoded:
      out["encoded"] = ex["encoded"]
    return out

  ds = examples.map(transform, num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.batch(batch_size).prefetch(AUTOTUNE)


def read_image_ids(pattern: str, input_context=None) -> np.ndarray:
  """All image ids (of this worker's shards), without decoding images."""
  files = list_shards(pattern)
  ds = _records(_shard_files(files, input_context), deterministic=True).batch(4096)
  ds = ds.map(lambda r, f: decoder.parse_records(r, f)["image_id"],
              num_parallel_calls=AUTOTUNE, deterministic=True)
  ids = [b.numpy() for b in ds]
  return np.concatenate(ids) if ids else np.zeros([0], np.int64)
