"""Reader: `tf.data` pipelines over TFRecord shards (decoder -> parser -> batches).

Two pipelines:
  * `build_train_dataset`: an epoch drawn by the sampler (each image repeated by its
    multiplicity, the copies spread over the epoch), shuffled, decoded, augmented, rotated,
    with its targets (`rotation`, `super_class`, `sub_class`) as named fields; a fixed
    number of steps.
  * `build_extraction_dataset`: every image once, in shard order, center-cropped, with
    `image_id`, `label` and metadata kept in order.
Shards are split between workers by file (`tf.distribute.InputContext`).

A shard cut short (issue 25): where make_shards' manifest gives a shard's record count, the
reader counts the records it reads from that shard; one that yields fewer is named once
(logging.warning: file, manifest count, records read), and each missing record goes down the
pipeline as a placeholder of status TRUNCATED, so the `skipped` count every pipeline carries
(and the run logs as `skipped_records`) includes the loss. The check costs nothing extra: it
is made at the end of the pass the pipeline reads anyway.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf

from dc_tf.config import UserError
from dc_tf.data import decoder, manifest, preprocess

AUTOTUNE = tf.data.AUTOTUNE
MAX_PASSES = 8  # passes over the shards per epoch at most (build_train_dataset: the cost)


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


_REPORTED: set = set()  # (file, expected, read) already named: each cut-short shard once


def _report_short(filename, expected, read) -> bool:
  key = (filename.decode(), int(expected), int(read))
  if key not in _REPORTED:
    _REPORTED.add(key)
    logging.warning("shard %s is cut short: its manifest says %d records, %d were read; the %d "
                    "missing are counted as skipped records", key[0], key[1], key[2],
                    key[1] - key[2])
  return True


def _expected_table(files: list[str]) -> tf.lookup.StaticHashTable | None:
  """file -> records its manifest says, -1 for a file no manifest lists; None if none does."""
  counts = manifest.manifest_counts(files)
  if not counts:
    return None
  init = tf.lookup.KeyValueTensorInitializer(tf.constant(list(counts), tf.string),
                                             tf.constant(list(counts.values()), tf.int64))
  return tf.lookup.StaticHashTable(init, default_value=-1)


def _records(files: tf.data.Dataset, deterministic: bool,
             expected: tf.lookup.StaticHashTable | None = None) -> tf.data.Dataset:
  """(record, filename, lost) triples. A shard whose framing is damaged (cut-off file) yields
  its readable records, and the error is logged by tf.data with the file's name.

  With `expected` (file -> manifest count), a file's records are counted as they are read,
  and each record short of the count at its end becomes an empty record with `lost` True.
  These go just before the file's last block of records, not after it: `skipped` is a running
  count carried by the records kept, and nothing would carry it past the end of the stream.
  """
  block = 16  # records of one file in a row

  def read(f):
    recs = tf.data.TFRecordDataset(f).ignore_errors(log_warning=True).batch(block)
    if expected is None:
      return recs.map(lambda r: (r, tf.fill(tf.shape(r), f), tf.zeros(tf.shape(r), tf.bool)))
    want = expected.lookup(f)
    none = tf.zeros([0], tf.string)
    marked = recs.map(lambda r: (r, False)).concatenate(
        tf.data.Dataset.from_tensors((none, True)))

    def count(state, x):  # holds one block back, to put the missing records before it
      n, held = state
      records, end = x
      missing = tf.maximum(want - n, 0) * tf.cast(end, tf.int64)
      reported = tf.cond(missing > 0, lambda: tf.numpy_function(
          _report_short, [f, want, n], tf.bool, stateful=True), lambda: True)
      with tf.control_dependencies([reported]):
        out = tf.concat([tf.fill([missing], ""), held], 0)
      lost = tf.range(tf.size(out, tf.int64)) < missing
      state = (n + tf.size(records, tf.int64), tf.cond(end, lambda: none, lambda: records))
      return state, (out, tf.fill(tf.shape(out), f), lost)
    return marked.scan((tf.constant(0, tf.int64), none), count)
  blocks = files.interleave(read, cycle_length=4, num_parallel_calls=AUTOTUNE,
                            deterministic=deterministic)
  return blocks.unbatch()


def _parsed(files: tf.data.Dataset, deterministic: bool,
            expected: tf.lookup.StaticHashTable | None = None,
            per_batch=None) -> tf.data.Dataset:
  """Parsed records with their `status` (`decoder.parse_records` on batches of 256); a
  record lost from a shard cut short has status TRUNCATED (dropped and counted downstream).
  `per_batch(examples) -> examples` runs on each parsed batch before it is unbatched."""
  def parse(records, filenames, lost):
    ex = decoder.parse_records(records, filenames)
    ex["status"] = tf.where(lost, decoder.TRUNCATED, ex["status"])
    return per_batch(ex) if per_batch else ex
  records = _records(files, deterministic, expected).batch(256)
  return records.map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic).unbatch()


def _decoded(examples: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
  """Decodes images in parallel; bad ones are dropped and counted in `skipped`."""
  # Bytes that pass the byte checks but do not decode raise inside the map and are dropped by
  # ignore_errors; the records are numbered first, so the gaps in the numbers count them.
  ds = examples.enumerate().map(lambda i, ex: (i, decoder.decode_example(ex)),
                                num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  ds = ds.ignore_errors(log_warning=True)

  def count_gaps(prev, item):
    index, ex = item
    ex = dict(ex, undecoded=tf.maximum(index - prev - 1, 0))
    return tf.maximum(index, prev), ex
  ds = ds.scan(tf.constant(-1, tf.int64), count_gaps).map(decoder.check_required)
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


def draws_in_pass(m: tf.Tensor, r: tf.Tensor, p, passes: int) -> tf.Tensor:
  """How many of an image's `m` copies pass `p` of `passes` emits (int64, element-wise).

  The copies sit at r, r + P, ..., r + (m-1)P on a circle of m·P places (r in [0, m·P), the
  image's seeded offset) and pass p holds the places [p·m, (p+1)·m): copies are spread evenly
  over the passes, one pass each when m <= P, and the counts over the passes sum to m exactly
  (integer arithmetic).
  """
  def ceil_div(a):
    return -tf.math.floordiv(-a, passes)
  return ceil_div((p + 1) * m - r) - ceil_div(p * m - r)


def build_train_dataset(pattern: str, *, image_size: int, batch_size: int, steps: int,
                        plan: EpochPlan | None, num_rotations: int, all_rotations: bool,
                        seed: int, epoch: int, skip_steps: int = 0,
                        crop_scale_min: float = 0.08, shuffle_buffer: int = 4096,
                        max_passes: int = MAX_PASSES,
                        input_context: tf.distribute.InputContext | None = None
                        ) -> tf.data.Dataset:
  """One training epoch of `steps` batches of `batch_size` rotated examples.

  Each example: image [S,S,3] uint8 (the train step normalises it on the device), rotation,
  super_class = super_cluster * R + rotation, sub_class, image_id, skipped (bad records seen
  so far in this pass over the worker's shards, so a record is counted once however many
  passes read it). With `all_rotations`, an image comes with its R rotations side by side
  (batch_size // R images per batch), as in RotNet. `skip_steps` drops the first batches of
  the same stream (exact resume).

  Spreading an image's copies over the epoch (issue 25): the sampler draws an image of a
  small cluster many times, and emitting its copies side by side put them in one shuffle
  buffer, so often in one batch. The epoch is read in P = min(largest multiplicity,
  `max_passes`) passes over the worker's shards instead, pass p emitting the copies
  `draws_in_pass` gives it (seeded by seed, epoch and image id), the passes one after another
  through the shuffle buffer. With m <= P an image's copies are in distinct passes, about
  (epoch / m) draws apart, as a whole-epoch shuffle spaces them; with m > P, ceil(m/P) copies
  share a pass and only the buffer mixes them. Memory: the shuffle buffer, as before. Reads:
  P passes over the worker's records per epoch.

  At the paper's scale (96M images, 8 workers: 12M images each, k = 320k clusters, epoch =
  pool) every cluster gets 96M // 320k + 1 = 301 draws, so a cluster of s < 301 images gives
  its images about 301 / s draws each: the largest multiplicity is 301 when a cluster is a
  singleton, 32 (116) with Zipf-law cluster sizes of exponent 1 (1.2). P = 8 then: 8 reads of
  the 12M records (~8 x 1.25 TB at ~104 KB a photo) per worker per epoch; memory is one
  4,096-record buffer (~430 MB of such records). Images drawn more than 8 times hold 0.4%
  (Zipf 0.7), 41% (Zipf 1) or 83% (Zipf 1.2) of the epoch's draws: ceil(m/8) of their
  copies share each pass. A larger `max_passes` spreads those too at P reads per epoch.
  """
  files = list_shards(pattern)
  shards = _shard_files(files, input_context)
  expected = _expected_table(files)
  passes = 1
  if plan is not None:
    passes = int(max(1, min(max_passes, plan.multiplicity.max(initial=1))))
    counts = _lookup(plan.image_ids, plan.multiplicity, 0)
    supers = _lookup(plan.image_ids, plan.super_cluster, 0)
    subs = _lookup(plan.image_ids, plan.sub_cluster, -1)
  salt = f"/{seed}/{epoch}"

  def one_pass(p: tf.Tensor) -> tf.data.Dataset:
    per_batch = None
    if plan is not None:
      def per_batch(ex):  # on parsed batches of 256: this pass's draws of each record
        ids = ex["image_id"]
        m = counts.lookup(ids)
        # The image's offset r in [0, m·P): the same in every pass, seeded by seed and epoch.
        h = tf.strings.to_hash_bucket_fast(tf.strings.join([tf.strings.as_string(ids), salt]),
                                           2**62)
        draws = draws_in_pass(m, tf.math.floormod(h, tf.maximum(m * passes, 1)), p, passes)
        # A bad record goes on once, for count_and_drop_bad to count and drop.
        bad = tf.not_equal(ex["status"], decoder.OK) & tf.not_equal(ex["status"],
                                                                    decoder.MISSING_FIELD)
        draws = tf.where(bad, tf.ones_like(draws), draws)
        ex = dict(ex, super_cluster=tf.cast(supers.lookup(ids), tf.int32),
                  sub_class=tf.cast(subs.lookup(ids), tf.int32))
        return {k: tf.repeat(v, draws, axis=0) for k, v in ex.items()}
    examples = _parsed(shards, True, expected, per_batch)
    if plan is None:
      def no_clusters(ex):
        ex = dict(ex)
        ex["super_cluster"] = tf.constant(0, tf.int32)
        ex["sub_class"] = tf.constant(-1, tf.int32)
        return ex
      examples = examples.map(no_clusters)
    # Byte checks only: an image is decoded in `transform`, and then only its crop window.
    # Counted per pass, so a record is counted once however many passes read it.
    return decoder.count_and_drop_bad(examples, keep_missing=True)

  # The P passes one after another, shuffled, then repeated: the first round is exactly the
  # sampler's epoch, and every worker still runs exactly `steps` steps whatever its shard
  # holds (collectives stay in step; a short shard is padded by its next round, a long one
  # truncated).
  examples = tf.data.Dataset.range(passes).flat_map(one_pass)
  per_image = batch_size // num_rotations if all_rotations else batch_size
  per_image = max(per_image, 1)
  # Rounds are bounded: over records that all pass the byte checks and none decodes, an
  # unbounded repeat would never fill `steps` (one decodable image a round fills them).
  examples = examples.shuffle(shuffle_buffer, seed=(seed * 1000003 + epoch) % 2**31,
                              reshuffle_each_iteration=True).repeat(steps * per_image)
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
      image = preprocess.rotations(image, num_rotations)
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
  examples = _parsed(_shard_files(files, input_context), deterministic=True,
                     expected=_expected_table(files))
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
  ds = ds.map(lambda r, f, _: decoder.parse_records(r, f)["image_id"],
              num_parallel_calls=AUTOTUNE, deterministic=True)
  ids = [b.numpy() for b in ds]
  return np.concatenate(ids) if ids else np.zeros([0], np.int64)


def pool_size(pattern: str, cache_dir: str | None = None) -> int:
  """Records in the shards matching `pattern`, without reading them (issue 25): the counts of
  make_shards' manifests next to the shards; files no manifest lists are counted in one pass,
  cached in `cache_dir` (the run's folder) by file size and mtime, and logged once."""
  files = list_shards(pattern)
  counts = manifest.manifest_counts(files)
  unlisted = [f for f in files if f not in counts]
  if unlisted:
    counts.update(manifest.counted_records(unlisted, cache_dir, pattern))
  return sum(counts[f] for f in files)
