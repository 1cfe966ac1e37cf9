"""The one TFRecord schema, shared by the shard writer and the reader.

Each record is a `tf.train.Example` with these features:

  image/encoded     bytes   the file's bytes, as published (never re-encoded)
  image/format      bytes   'jpeg' | 'png' | 'gif' | 'bmp' (sniffed from magic bytes)
  image/height      int64   pixels
  image/width       int64   pixels
  image/id          int64   stable id: the YFCC photo id, else a hash of the source key
  label             int64   optional, -1 when absent (evaluation only, never trained on)
  label/text        bytes   optional
  meta/user_id      bytes   optional (YFCC user NSID)
  meta/tags         bytes   optional, comma-separated
  meta/lat, meta/lon float  optional, NaN when absent
  meta/device       bytes   optional (camera make/model)
  meta/machine_tags bytes   optional, comma-separated (YFCC100M)
  meta/date_taken   bytes   optional, as the source gives it (YFCC100M: 'YYYY-MM-DD hh:mm:ss.0')
  meta/url          bytes   optional, the download URL (YFCC100M)

The last three are kept for provenance and later filtering; the training reader does not parse
them (`ARCHIVE_ONLY`).
"""

from __future__ import annotations

import hashlib
import math

import tensorflow as tf

ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
IMAGE_ID = "image/id"
LABEL = "label"
LABEL_TEXT = "label/text"
USER_ID = "meta/user_id"
TAGS = "meta/tags"
LAT = "meta/lat"
LON = "meta/lon"
DEVICE = "meta/device"
MACHINE_TAGS = "meta/machine_tags"
DATE_TAKEN = "meta/date_taken"
URL = "meta/url"
ARCHIVE_ONLY = (MACHINE_TAGS, DATE_TAKEN, URL)

REQUIRED = (ENCODED, FORMAT, HEIGHT, WIDTH, IMAGE_ID)
METADATA_FIELDS = (USER_ID, TAGS, DEVICE)  # string metadata usable for NMI
SUPPORTED_FORMATS = ("jpeg", "png", "gif", "bmp")

FEATURE_SPEC = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    FORMAT: tf.io.FixedLenFeature([], tf.string),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    IMAGE_ID: tf.io.FixedLenFeature([], tf.int64),
    LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    LABEL_TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
    USER_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
    TAGS: tf.io.FixedLenFeature([], tf.string, default_value=""),
    LAT: tf.io.FixedLenFeature([], tf.float32, default_value=math.nan),
    LON: tf.io.FixedLenFeature([], tf.float32, default_value=math.nan),
    DEVICE: tf.io.FixedLenFeature([], tf.string, default_value=""),
    MACHINE_TAGS: tf.io.FixedLenFeature([], tf.string, default_value=""),
    DATE_TAKEN: tf.io.FixedLenFeature([], tf.string, default_value=""),
    URL: tf.io.FixedLenFeature([], tf.string, default_value=""),
}

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


def sniff_format(data: bytes) -> str | None:
  """Returns the image format from magic bytes, or None for non-images."""
  for magic, name in _MAGIC:
    if data.startswith(magic):
      return name
  return None


def stable_id(key: str) -> int:
  """A 63-bit id that depends only on `key` (a path or name), so it is stable
  across runs, machines and shard layouts."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") >> 1


def _bytes(v):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _int(v):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))


def _float(v):
  return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v)]))


def make_example(encoded: bytes, fmt: str, height: int, width: int, image_id: int,
                 label: int = -1, label_text: str = "", user_id: str = "",
                 tags: str = "", lat: float = math.nan, lon: float = math.nan,
                 device: str = "", machine_tags: str = "", date_taken: str = "",
                 url: str = "") -> tf.train.Example:
  feature = {
      ENCODED: _bytes(encoded),
      FORMAT: _bytes(fmt.encode()),
      HEIGHT: _int(height),
      WIDTH: _int(width),
      IMAGE_ID: _int(image_id),
      LABEL: _int(label),
  }
  optional = {LABEL_TEXT: label_text, USER_ID: user_id, TAGS: tags, DEVICE: device,
              MACHINE_TAGS: machine_tags, DATE_TAKEN: date_taken, URL: url}
  for key, value in optional.items():
    if value:
      feature[key] = _bytes(value.encode("utf-8"))
  if not math.isnan(lat):
    feature[LAT] = _float(lat)
  if not math.isnan(lon):
    feature[LON] = _float(lon)
  return tf.train.Example(features=tf.train.Features(feature=feature))
