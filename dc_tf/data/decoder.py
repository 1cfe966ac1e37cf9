"""Decoder: serialized TFRecord -> dict of tensors, and safe image decoding.

Bad input never crashes the pipeline: every record gets a status (see STATUS_NAMES),
records that are not decodable images are dropped and counted, and a record that lacks
a required field is a hard error that names its shard file.
"""

from __future__ import annotations

import tensorflow as tf

from dc_tf.data import schema

OK, ZERO_BYTES, NOT_IMAGE, UNSUPPORTED, TRUNCATED, CORRUPT, MISSING_FIELD = range(7)
STATUS_NAMES = ("ok", "zero_bytes", "not_image", "unsupported_format", "truncated", "corrupt",
                "missing_field")

_PARSE_SPEC = {k: v for k, v in schema.FEATURE_SPEC.items() if k not in schema.ARCHIVE_ONLY}
# Parse required fields with sentinels so that a missing one can be reported with the file.
_PARSE_SPEC[schema.ENCODED] = tf.io.FixedLenFeature([], tf.string, default_value="\0missing")
_PARSE_SPEC[schema.FORMAT] = tf.io.FixedLenFeature([], tf.string, default_value="\0missing")
for _key in (schema.HEIGHT, schema.WIDTH, schema.IMAGE_ID):
  _PARSE_SPEC[_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-(2**62))


def parse_record(record: tf.Tensor, filename: tf.Tensor) -> dict:
  """Parses one serialized `tf.train.Example` into named fields with a `status`; a missing
  required field gives status MISSING_FIELD (`check_required` then fails, naming
  `filename`)."""
  return _fields(tf.io.parse_single_example(record, _PARSE_SPEC), filename)


def parse_records(records: tf.Tensor, filenames: tf.Tensor) -> dict:
  """`parse_record` over a vector of records at once (one op per batch instead of per
  record: per-element parsing was the pipeline's largest cost on small JPEGs, issue 17)."""
  return _fields(tf.io.parse_example(records, _PARSE_SPEC), filenames)


def _fields(f: dict, filename: tf.Tensor) -> dict:
  present = tf.reduce_all(tf.stack([
      tf.not_equal(f[schema.ENCODED], "\0missing"),
      tf.not_equal(f[schema.FORMAT], "\0missing"),
      tf.not_equal(f[schema.HEIGHT], -(2**62)),
      tf.not_equal(f[schema.WIDTH], -(2**62)),
      tf.not_equal(f[schema.IMAGE_ID], -(2**62)),
  ], axis=-1), axis=-1)
  out = {
      "encoded": f[schema.ENCODED],
      "format": f[schema.FORMAT],
      "image_id": f[schema.IMAGE_ID],
      "label": f[schema.LABEL],
      "user_id": f[schema.USER_ID],
      "tags": f[schema.TAGS],
      "device": f[schema.DEVICE],
      "lat": f[schema.LAT],
      "lon": f[schema.LON],
      "filename": filename,
  }
  out["status"] = tf.where(present, byte_status(out["encoded"], out["format"]), MISSING_FIELD)
  return out


def check_required(example: dict) -> dict:
  """Fails, naming the shard file, on a record that lacks a required field. Applied after
  `ignore_errors` (which would otherwise swallow it)."""
  check = tf.debugging.Assert(
      tf.not_equal(example["status"], MISSING_FIELD),
      ["record missing a required field (", list(schema.REQUIRED), ") in shard",
       example["filename"]], summarize=8)
  with tf.control_dependencies([check]):
    example = dict(example)
    example["status"] = tf.identity(example["status"])
  return example


def byte_status(encoded: tf.Tensor, fmt: tf.Tensor) -> tf.Tensor:
  """Cheap checks on the bytes, before any decoding: zero-byte, magic, format, JPEG EOI.
  Element-wise: `encoded` and `fmt` may be scalars or vectors of the same shape."""
  length = tf.strings.length(encoded)
  def starts_with(magic: bytes):
    return tf.equal(tf.strings.substr(encoded, 0, len(magic)), tf.constant(magic))
  is_jpeg = starts_with(b"\xff\xd8\xff")
  is_png = starts_with(b"\x89PNG\r\n\x1a\n")
  is_gif = starts_with(b"GIF87a") | starts_with(b"GIF89a")
  is_bmp = starts_with(b"BM")
  is_image = is_jpeg | is_png | is_gif | is_bmp
  supported = tf.reduce_any(
      tf.equal(fmt[..., None], tf.constant(list(schema.SUPPORTED_FORMATS))), axis=-1)
  def ends_with(trailer: bytes):
    start = tf.maximum(length - len(trailer), 0)
    return tf.equal(tf.strings.substr(encoded, start, tf.fill(tf.shape(start), len(trailer))),
                    tf.constant(trailer))
  # Cut-off files lose their trailer: JPEG's EOI marker, PNG's IEND chunk, GIF's ';'.
  truncated = ((is_jpeg & ~ends_with(b"\xff\xd9")) | (is_png & ~ends_with(b"IEND\xaeB`\x82"))
               | (is_gif & ~ends_with(b";")))
  # The first failing check wins: applied from the last to the first.
  status = tf.fill(tf.shape(length), OK)
  for failed, code in ((truncated, TRUNCATED), (~supported, UNSUPPORTED),
                       (~is_image, NOT_IMAGE), (tf.equal(length, 0), ZERO_BYTES)):
    status = tf.where(failed, code, status)
  return status


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Any supported format to uint8 RGB; grayscale becomes 3 channels."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_example(example: dict) -> dict:
  """Adds `image`: decoded when the bytes passed the checks, else a 1x1 placeholder (the
  record is dropped and counted later). Bytes that pass the checks but still fail to decode
  raise here and are dropped by the reader's `ignore_errors` (logged by tf.data)."""
  example = dict(example)
  example["image"] = tf.cond(tf.equal(example["status"], OK),
                             lambda: decode_rgb(example["encoded"]),
                             lambda: tf.zeros([1, 1, 3], tf.uint8))
  return example


def count_and_drop_bad(ds: tf.data.Dataset, keep_missing: bool = False) -> tf.data.Dataset:
  """Adds `skipped`, the running count of bad records seen so far, and drops them. With
  `keep_missing`, records lacking a required field are kept (status MISSING_FIELD, not
  counted) for a `check_required` further down to fail on, naming the shard."""
  def bad(status):
    bad = tf.not_equal(status, OK)
    return bad & tf.not_equal(status, MISSING_FIELD) if keep_missing else bad

  def step(count, ex):
    count = count + tf.cast(bad(ex["status"]), tf.int64)
    ex = dict(ex)
    if "undecoded" in ex:   # records dropped before, where they failed to decode
      count = count + ex.pop("undecoded")
    ex["skipped"] = count
    return count, ex

  ds = ds.scan(tf.constant(0, tf.int64), step)
  return ds.filter(lambda ex: tf.logical_not(bad(ex["status"])))
