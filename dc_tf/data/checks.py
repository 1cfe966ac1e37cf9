"""What the commands that read photos share: `make_shards` (the Beam shard writer), `embed`
(features of a folder, a list or shards) and `neighbours` (a query photo).

  read_bytes         an Item's bytes: a file, a zip member (one open ZipFile per zip and
                     thread), or a long-tail source's near duplicate made on the fly
  check_image        zero-byte, non-image, truncated and corrupt files, each with its reason
  Checked            an image that decoded, with its id, SHA-1, format and size
  keep_one_per_hash  byte-identical copies keep the smallest id ("duplicate"); a hash with
                     too many copies, or a known one, is a placeholder (all dropped)
  pipeline_runner    the Beam runner both pipelines run on (the FnApiRunner for the default)

The drop reasons are one vocabulary, so `embed.json` and make_shards' manifest count alike.
"""

from __future__ import annotations

import dataclasses
import threading
import zipfile

from dc_tf.data import schema
from dc_tf.data.sources import Item, drop


@dataclasses.dataclass(frozen=True)
class Checked:
  """An image that decoded: its item plus what the check learnt."""
  item: Item
  image_id: int
  sha1: str
  fmt: str
  height: int
  width: int


# ----------------------------------------------------------------------------- reading
_OPEN_ZIPS = threading.local()  # one ZipFile per zip and thread: its index takes ~0.1 s to read


def read_bytes(item: Item) -> bytes:
  import tensorflow as tf
  if item.zip_path:
    zips = _OPEN_ZIPS.__dict__.setdefault("zips", {})
    if item.zip_path not in zips:
      zips[item.zip_path] = zipfile.ZipFile(tf.io.gfile.GFile(item.zip_path, "rb"))
    data = zips[item.zip_path].read(item.path)
  else:
    with tf.io.gfile.GFile(item.path, "rb") as f:
      data = f.read()
  return near_duplicate(data, item.key) if item.variant == 2 else data


def near_duplicate(data: bytes, key: str) -> bytes:
  """The same photo, not the same bytes: an 80-95% crop off the top-left corner (the share
  set by `key`, so two copies of one photo differ too), resized back and re-encoded as JPEG at
  quality 85; deterministic. Bytes that do not decode stay as they are."""
  import tensorflow as tf
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
    return data
  keep = 0.80 + 0.15 * (schema.stable_id(key) % 1000) / 1000
  h, w = int(image.shape[0]), int(image.shape[1])
  crop = image[:max(1, int(h * keep)), :max(1, int(w * keep))]
  resized = tf.cast(tf.clip_by_value(tf.image.resize(crop, [h, w]), 0, 255), tf.uint8)
  return tf.io.encode_jpeg(resized, quality=85).numpy()


# ----------------------------------------------------------------------------- checking
def check_image(data: bytes) -> tuple[str, str, int, int]:
  """(reason it is dropped or '', format, height, width)."""
  import tensorflow as tf
  if not data:
    return "zero bytes", "", 0, 0
  fmt = schema.sniff_format(data)
  if fmt is None:
    return "not an image", "", 0, 0
  if fmt == "jpeg" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
    return "truncated jpeg", fmt, 0, 0
  try:
    image = tf.io.decode_image(data, channels=0, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
    return f"corrupt {fmt}", fmt, 0, 0
  return "", fmt, int(image.shape[0]), int(image.shape[1])


# ----------------------------------------------------------------------------- dedupe
def keep_one_per_hash(element, min_copies: int, known: frozenset, dedupe: bool):
  """All images with one SHA-1: a placeholder (all dropped), else the smallest id is kept and
  the others are duplicates (kept too with `dedupe=False`)."""
  sha1, copies = element
  copies = sorted(copies, key=lambda c: c.image_id)
  if sha1 in known or (min_copies and len(copies) >= min_copies):
    for _ in copies:
      yield drop("placeholder")
    return
  yield copies[0]
  for c in copies[1:]:
    if dedupe:
      yield drop("duplicate")
    else:
      yield c


# ----------------------------------------------------------------------------- runner
def pipeline_runner(options):
  """Beam's DirectRunner first tries Prism, a binary it downloads; we run its batch engine,
  the FnApiRunner, directly, so a machine without internet runs the default as it is."""
  from apache_beam.options.pipeline_options import StandardOptions
  runner = options.view_as(StandardOptions).runner
  if runner in (None, "DirectRunner", "direct", "FnApiRunner"):
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    return FnApiRunner()
  return runner
