"""Decoder: serialized TFRecord -> dict of tensors, and safe image decoding.

Bad input never crashes the pipeline: every record gets a status (see STATUS_NAMES),
records that are not decodable images are dropped and counted, and a record that lacks
a required field is a hard error that names its shard file.
"""

from __future__ import annotations

import tensorflow as tf

from dc_tf.data import schema

OK, ZERO_BYTES, NOT_IMAGE, UNSUPPORTED, TRUNCATED, CORRUPT = range(6)
STATUS_NAMES = ("ok", "zero_bytes", "not_image", "unsupported_format", "truncated", "corrupt")

_PARSE_SPEC = dict(schema.FEATURE_SPEC)
# Parse required fields with sentinels so that a missing one can be reported with the file.
_PARSE_SPEC[schema.ENCODED] = tf.io.FixedLenFeature([], tf.string, default_value="\0missing")
_PARSE_SPEC[schema.FORMAT] = tf.io.FixedLenFeature([], tf.string, default_value="\0missing")
for _key in (schema.HEIGHT, schema.WIDTH, schema.IMAGE_ID):
  _PARSE_SPEC[_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-(2**62))


def parse_record(record: tf.Tensor, filename: tf.Tensor) -> dict:
  """Parses one serialized `tf.train.Example`; fails naming `filename` when a required
  field is absent."""
  f = tf.io.parse_single_example(record, _PARSE_SPEC)
  present = tf.stack([
      tf.not_equal(f[schema.ENCODED], "\0missing"),
      tf.not_equal(f[schema.FORMAT], "\0missing"),
      tf.not_equal(f[schema.HEIGHT], -(2**62)),
      tf.not_equal(f[schema.WIDTH], -(2**62)),
      tf.not_equal(f[schema.IMAGE_ID], -(2**62)),
  ])
  check = tf.debugging.Assert(
      tf.reduce_all(present),
      ["record missing a required field (", list(schema.REQUIRED), ") in shard", filename,
       "present:", present], summarize=8)
  with tf.control_dependencies([check]):
    out = {
        "encoded": tf.identity(f[schema.ENCODED]),
        "format": f[schema.FORMAT],
        "image_id": f[schema.IMAGE_ID],
        "label": f[schema.LABEL],
        "user_id": f[schema.USER_ID],
        "tags": f[schema.TAGS],
        "device": f[schema.DEVICE],
        "lat": f[schema.LAT],
        "lon": f[schema.LON],
    }
  out["status"] = byte_status(out["encoded"], out["format"])
  return out


def byte_status(encoded: tf.Tensor, fmt: tf.Tensor) -> tf.Tensor:
  """Cheap checks on the bytes, before any decoding: zero-byte, magic, format, JPEG EOI."""
  length = tf.strings.length(encoded)
  def starts_with(magic: bytes):
    return tf.equal(tf.strings.substr(encoded, 0, len(magic)), tf.constant(magic))
  is_jpeg = starts_with(b"\xff\xd8\xff")
  is_png = starts_with(b"\x89PNG\r\n\x1a\n")
  is_gif = starts_with(b"GIF87a") | starts_with(b"GIF89a")
  is_bmp = starts_with(b"BM")
  is_image = is_jpeg | is_png | is_gif | is_bmp
  supported = tf.reduce_any(tf.equal(fmt, list(schema.SUPPORTED_FORMATS)))
  tail = tf.strings.substr(encoded, tf.maximum(length - 2, 0), 2)
  truncated = is_jpeg & tf.not_equal(tail, tf.constant(b"\xff\xd9"))
  return tf.case([
      (tf.equal(length, 0), lambda: tf.constant(ZERO_BYTES)),
      (tf.logical_not(is_image), lambda: tf.constant(NOT_IMAGE)),
      (tf.logical_not(supported), lambda: tf.constant(UNSUPPORTED)),
      (truncated, lambda: tf.constant(TRUNCATED)),
  ], default=lambda: tf.constant(OK))


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Any supported format to uint8 RGB; grayscale becomes 3 channels."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def safe_decode_dataset(example: dict) -> tf.data.Dataset:
  """A one-element dataset: the example with `image` decoded, or on any decode error the
  example with a 1x1 placeholder and status CORRUPT. Used inside `interleave`, so that
  `ignore_errors` covers this one decode only, never upstream errors."""
  def decode(ex):
    ex = dict(ex)
    ex["image"] = decode_rgb(ex["encoded"])
    return ex

  def placeholder(ex):
    ex = dict(ex)
    ex["image"] = tf.zeros([1, 1, 3], tf.uint8)
    ex["status"] = tf.where(tf.equal(ex["status"], OK), CORRUPT, ex["status"])
    return ex

  one = tf.data.Dataset.from_tensors(example)
  decoded = one.filter(lambda ex: tf.equal(ex["status"], OK)).map(decode).ignore_errors()
  return decoded.concatenate(one.map(placeholder)).take(1)


def count_and_drop_bad(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Adds `skipped`, the running count of bad records seen so far, and drops them."""
  def step(count, ex):
    count = count + tf.cast(tf.not_equal(ex["status"], OK), tf.int64)
    ex = dict(ex)
    ex["skipped"] = count
    return count, ex

  ds = ds.scan(tf.constant(0, tf.int64), step)
  return ds.filter(lambda ex: tf.equal(ex["status"], OK))
