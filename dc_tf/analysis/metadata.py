"""The metadata a cluster is judged against (Sec. 5.3): user, rarest tag, 1-degree GPS cell,
device, and a supervised classifier's confident label; streamed from the shards by image id.

`least_frequent_tag` and `gps_cells` are the definitions `evaluator.cluster_quality` scores
with (moved here from dc_tf/evaluation/evaluator.py, which imports them back); the rarest
tag is counted over the whole set scored, so a streamed pool counts its tags in a first pass
(`tag_counts`, O(#distinct tags) memory) and picks each image's tag in the second.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from dc_tf.config import UserError
from dc_tf.data import decoder, reader

FIELDS = ("user", "tag", "gps", "device")     # the paper's Fig. 4 metadata
MISSING = b""


class LabelsError(UserError, ValueError):
  """The supervised export gives no 'logits' output (--labels_from)."""


def tag_counts(tags: np.ndarray, counts: collections.Counter | None = None) -> collections.Counter:
  """Images per tag (comma-separated tags a record), added to `counts` if given."""
  counts = collections.Counter() if counts is None else counts
  for t in tags:
    if t:
      counts.update(t.decode("utf-8").split(","))
  return counts


def least_frequent_tag(tags: np.ndarray, counts: dict | None = None) -> np.ndarray:
  """Each image's rarest tag across the set (the paper's choice for tag NMI); ties go to the
  smallest tag. `counts`: the set's tag counts (`tag_counts`) when `tags` is one chunk of it."""
  split = [t.decode("utf-8").split(",") if t else [] for t in tags]
  if counts is None:
    counts = tag_counts(tags)
  return np.array([min(ts, key=lambda t: (counts[t], t)).encode() if ts else MISSING
                   for ts in split])


def gps_cells(lat: np.ndarray, lon: np.ndarray, degrees: float = 1.0) -> np.ndarray:
  ok = np.isfinite(lat) & np.isfinite(lon)
  cells = [f"{int(np.floor(a / degrees))}:{int(np.floor(o / degrees))}".encode() if g
           else MISSING for a, o, g in zip(lat, lon, ok)]
  return np.array(cells)


def raw_chunks(pattern: str, chunk: int = 8192) -> Iterator[dict]:
  """{image_id, user_id, tags, device, lat, lon} numpy chunks of every record, images not
  decoded (the record's metadata only)."""
  files = reader.list_shards(pattern)
  ds = tf.data.TFRecordDataset(files).batch(chunk)
  for records in ds:
    f = decoder.parse_records(records, tf.fill(tf.shape(records), ""))
    yield {k: f[k].numpy() for k in ("image_id", "user_id", "tags", "device", "lat", "lon")}


def labelled_chunks(pattern: str, classifier: Callable, image_size: int, threshold: float,
                    chunk: int = 256) -> Iterator[dict]:
  """`raw_chunks`' fields plus `imagenet`: the classifier's top class where its softmax
  confidence exceeds `threshold` (the paper keeps > 75%), else -1; decodable images only."""
  for batch in reader.build_extraction_dataset(pattern, image_size=image_size,
                                               batch_size=chunk):
    out = classifier(batch["image"])
    if not isinstance(out, dict) or "logits" not in out:
      raise LabelsError("--labels_from: the model gives no 'logits' output (a supervised "
                        "classifier's export is needed)")
    probs = tf.nn.softmax(tf.cast(out["logits"], tf.float32)).numpy()
    label = np.where(probs.max(axis=1) > threshold, probs.argmax(axis=1), -1)
    fields = {k: batch[k].numpy() for k in ("image_id", "user_id", "tags", "device", "lat",
                                             "lon")}
    yield {**fields, "imagenet": label.astype(np.int64)}


def targets(chunk: dict, counts: dict) -> dict:
  """{field: values} of one chunk; a missing value is b"" (bytes) or -1 (labels)."""
  out = {"user": chunk["user_id"], "tag": least_frequent_tag(chunk["tags"], counts),
         "gps": gps_cells(chunk["lat"], chunk["lon"]), "device": chunk["device"]}
  if "imagenet" in chunk:
    out["imagenet"] = chunk["imagenet"]
  return out


def present(values: np.ndarray) -> np.ndarray:
  return values != -1 if values.dtype.kind in "iu" else values != MISSING


def _wanted_table(ids: np.ndarray) -> tf.lookup.StaticHashTable:
  ids = np.asarray(ids, np.int64)
  return tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(ids, tf.range(len(ids), dtype=tf.int64)), -1)


def decoded_of(pattern: str, ids: np.ndarray, per_image: Callable) -> Iterator[tuple]:
  """(image id, per_image(uint8 RGB [H, W, 3]), encoded bytes) of the decodable records whose
  id is in `ids`; the other records are parsed for their id only, never decoded."""
  table = _wanted_table(np.unique(ids))
  files = reader.list_shards(pattern)
  ds = tf.data.TFRecordDataset(files).batch(1024).map(
      lambda r: decoder.parse_records(r, tf.fill(tf.shape(r), "")))
  ds = ds.unbatch().filter(lambda ex: (table.lookup(ex["image_id"]) >= 0)
                           & tf.equal(ex["status"], decoder.OK))
  ds = ds.map(lambda ex: (ex["image_id"], per_image(decoder.decode_rgb(ex["encoded"])),
                          ex["encoded"]))
  for image_id, value, encoded in ds:
    yield int(image_id), value.numpy(), encoded.numpy()
