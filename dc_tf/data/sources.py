r"""Where images come from: each source is a Beam transform that yields `Item`s.

An `Item` is what the writer knows of one image before reading it: where its bytes are, its
stable key and id, and its metadata. Sources never read image bytes; `make_shards` does.

  folder         every image below a folder; one sub-folder per class names the label
  list           a text file of `path[<TAB>label]` lines
  tiny_imagenet  Tiny ImageNet read in place from its zip (train/<wnid>/images, val/images)
  yfcc           the official YFCC100M metadata file (bzip2 or plain, tab-separated, no header)
                 joined on photo id with a photo-id -> file mapping (a folder tree or a list file)

Bad input is dropped and counted, never raised deep inside a worker: each transform emits
`(reason, 1)` pairs on its `DROPPED` output and bumps the Beam counter of the same name.

`LongTail` resamples a labelled source into a long-tailed pool (Zipf over classes, with exact
and near duplicates), to test the paper's claim that the method suits uncurated data.
"""

from __future__ import annotations

import dataclasses
import math
import os
import urllib.parse
import zipfile
from typing import Iterable, Sequence

import apache_beam as beam

from dc_tf.data import schema

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
DROPPED = "dropped"
COUNTER_NAMESPACE = "make_shards"

# The YFCC100M dataset file, one photo or video a line, tab-separated, no header. The 2016
# single-file release (yfcc100m_dataset.bz2) has 25 fields; the 2014 Webscope release lacks the
# first two of them (line number, photo hash) and has 23. Field names from the dataset's README.
YFCC_FIELDS = (
    "line_number", "photo_id", "photo_hash", "user_nsid", "user_nickname", "date_taken",
    "date_uploaded", "capture_device", "title", "description", "user_tags", "machine_tags",
    "longitude", "latitude", "accuracy", "page_url", "download_url", "license_name",
    "license_url", "server_id", "farm_id", "secret", "secret_original", "extension_original",
    "marker")
YFCC_FIELDS_2014 = tuple(f for f in YFCC_FIELDS if f not in ("line_number", "photo_hash"))


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to write. `variant` > 0 marks a copy made by `LongTail` (1 = the same bytes,
  2 = a near duplicate: re-encoded after a small crop)."""
  key: str                      # stable name; its hash is the image id unless image_id is set
  path: str                     # file path (local or gs://), or member name inside `zip_path`
  zip_path: str = ""
  image_id: int = -1
  label: int = -1
  label_text: str = ""
  user_id: str = ""
  tags: str = ""
  machine_tags: str = ""
  date_taken: str = ""
  device: str = ""
  url: str = ""
  lat: float = float("nan")
  lon: float = float("nan")
  variant: int = 0


def id_of(item: Item) -> int:
  """The YFCC photo id, else a hash of the source key (`schema.stable_id`)."""
  return item.image_id if item.image_id >= 0 else schema.stable_id(item.key)


def is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def counter(reason: str):
  return beam.metrics.Metrics.counter(COUNTER_NAMESPACE, reason.replace(" ", "_"))


def drop(reason: str):
  """The tagged output that counts one dropped input (and bumps its Beam counter)."""
  counter(reason).inc()
  return beam.pvalue.TaggedOutput(DROPPED, (reason, 1))


def _gfile():
  import tensorflow as tf
  return tf.io.gfile


# ----------------------------------------------------------------------------- folder
def _walk_images(top: str) -> Iterable[str]:
  """Every image file below `top` (or `top` itself), in sorted order."""
  gfile = _gfile()
  if not gfile.isdir(top):
    if is_image_name(top):
      yield top
    return
  for dirpath, _, files in gfile.walk(top):
    for f in sorted(files):
      if is_image_name(f):
        yield os.path.join(dirpath, f)


class FolderSource(beam.PTransform):
  """Images below `root`; with one sub-folder per class the sorted sub-folder names are the
  labels 0..C-1. Only the top level is listed here; each sub-folder is walked by a worker."""

  def __init__(self, root: str):
    super().__init__()
    gfile = _gfile()
    if not gfile.isdir(root):
      raise FileNotFoundError(f"--input folder not found: {root}")
    self._root = root.rstrip("/")
    entries = sorted(e.rstrip("/") for e in gfile.listdir(root))
    self._tops = [os.path.join(self._root, e) for e in entries]
    self._classes = [e for e in entries if gfile.isdir(os.path.join(self._root, e))]

  def expand(self, pcoll):
    index = {c: i for i, c in enumerate(self._classes)}
    root = self._root

    def items(top):
      for path in _walk_images(top):
        rel = os.path.relpath(path, root)
        cls = rel.split(os.sep)[0] if os.sep in rel else ""
        yield Item(key=rel, path=path, label=index.get(cls, -1), label_text=cls)

    return (pcoll.pipeline | "Tops" >> beam.Create(self._tops) | beam.Reshuffle()
            | "Walk" >> beam.FlatMap(items))


# ----------------------------------------------------------------------------- list
def parse_list_line(line: str, list_dir: str):
  """`path[<TAB>label]`; blank lines and `#` comments are skipped, a bad label is dropped."""
  if not line.strip() or line.startswith("#"):
    return
  parts = line.rstrip("\r\n").split("\t")
  try:
    label = int(parts[1]) if len(parts) > 1 and parts[1] else -1
  except ValueError:
    yield drop("bad list line")
    return
  path = parts[0] if parts[0].startswith(("/", "gs://")) else os.path.join(list_dir, parts[0])
  yield Item(key=parts[0], path=path, label=label)


class ListSource(beam.PTransform):
  def __init__(self, list_file: str, image_dir: str = ""):
    super().__init__()
    if not _gfile().exists(list_file):
      raise FileNotFoundError(f"--input list file not found: {list_file}")
    self._list_file = list_file
    self._base = image_dir or os.path.dirname(os.path.abspath(list_file))

  def expand(self, pcoll):
    return (pcoll.pipeline | "Read list" >> beam.io.ReadFromText(self._list_file)
            | "Parse" >> beam.FlatMap(parse_list_line, self._base).with_outputs(DROPPED, main="items"))


# ----------------------------------------------------------------------------- tiny imagenet
def tiny_imagenet_items(zip_path: str, split: str, classes: Sequence[str] = (),
                        per_class: int = 0, skip_per_class: int = 0) -> list[Item]:
  """Tiny ImageNet from its zip, in place. The member list is small (≤ 110k names), so it is
  read here; the images themselves are read by the workers. Per class, the images are taken in
  member-name order: `skip_per_class` are passed over, then `per_class` kept (0 = the rest), so
  two calls with adjacent windows give disjoint sets (a held-back split)."""
  if not _gfile().exists(zip_path):
    raise FileNotFoundError(f"--input zip not found: {zip_path}")
  with _gfile().GFile(zip_path, "rb") as raw, zipfile.ZipFile(raw) as z:
    names = z.namelist()
    words = dict(line.split("\t", 1) for line in
                 z.read("tiny-imagenet-200/words.txt").decode().splitlines() if "\t" in line)
    if split == "train":
      pairs = [(n, n.split("/")[2]) for n in names if "/train/" in n and is_image_name(n)]
    elif split == "val":
      ann = z.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()
      wnid_of = dict(line.split("\t")[:2] for line in ann if line)
      pairs = [(n, wnid_of[os.path.basename(n)]) for n in names
               if "/val/images/" in n and is_image_name(n)]
    else:
      raise ValueError(f"--split must be train or val, got {split!r}")
  wanted = sorted(classes) if classes else sorted({w for _, w in pairs})
  unknown = set(wanted) - {w for _, w in pairs}
  if unknown:
    raise ValueError(f"--classes not in {zip_path}: {sorted(unknown)}")
  index = {w: i for i, w in enumerate(wanted)}
  per: dict[str, list[str]] = {w: [] for w in wanted}
  for name, wnid in sorted(pairs):
    if wnid in per:
      per[wnid].append(name)
  items = []
  for wnid in wanted:
    names_w = per[wnid][skip_per_class:]
    for name in (names_w[:per_class] if per_class else names_w):
      items.append(Item(key=name, path=name, zip_path=zip_path, label=index[wnid],
                        label_text=words.get(wnid, wnid).split(",")[0]))
  return items


# ----------------------------------------------------------------------------- yfcc
def _float_or_nan(s: str) -> float:
  try:
    value = float(s)
  except ValueError:
    return float("nan")
  return value if math.isfinite(value) else float("nan")


def _text(s: str) -> str:
  """YFCC text fields are URL-encoded ('+' for a space)."""
  return urllib.parse.unquote_plus(s)


def parse_yfcc_line(line: str):
  """One line of the dataset file -> (photo id, Item without a path); videos, headers and
  malformed lines are dropped and counted."""
  cols = line.rstrip("\r\n").split("\t")
  if len(cols) == len(YFCC_FIELDS):
    row = dict(zip(YFCC_FIELDS, cols))
  elif len(cols) == len(YFCC_FIELDS_2014):
    row = dict(zip(YFCC_FIELDS_2014, cols))
  else:
    yield drop("bad metadata line")
    return
  if not row["photo_id"].isdigit():
    looks_like_header = any("identifier" in c.lower() or c.lower() == "photo_id" for c in cols)
    yield drop("metadata header" if looks_like_header else "bad metadata line")
    return
  if row["marker"] == "1":
    yield drop("video")
    return
  if row["marker"] != "0":
    yield drop("bad metadata line")
    return
  photo_id = int(row["photo_id"])
  tags = ",".join(_text(t) for t in row["user_tags"].split(",") if t)
  machine_tags = ",".join(_text(t) for t in row["machine_tags"].split(",") if t)
  yield photo_id, Item(
      key=row["photo_id"], path="", image_id=photo_id, user_id=_text(row["user_nsid"]),
      tags=tags, machine_tags=machine_tags, date_taken=row["date_taken"],
      device=_text(row["capture_device"]), url=row["download_url"],
      lat=_float_or_nan(row["latitude"]), lon=_float_or_nan(row["longitude"]))


def compression_of(path: str):
  """The dataset file ships as bzip2 without a telling extension in some mirrors: sniff it."""
  from apache_beam.io.filesystem import CompressionTypes
  with _gfile().GFile(path, "rb") as f:
    magic = f.read(3)
  if magic == b"BZh":
    return CompressionTypes.BZIP2
  if magic[:2] == b"\x1f\x8b":
    return CompressionTypes.GZIP
  return CompressionTypes.UNCOMPRESSED


def _files_by_photo_id(top: str):
  for path in _walk_images(top):
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.isdigit():
      yield int(stem), path


def parse_image_list_line(line: str, base: str):
  """`photo_id<TAB>path` (path relative to the list file's folder or absolute)."""
  parts = line.rstrip("\r\n").split("\t")
  if len(parts) < 2 or not parts[0].isdigit():
    if line.strip() and not line.startswith("#"):
      yield drop("bad image list line")
    return
  path = parts[1] if parts[1].startswith(("/", "gs://")) else os.path.join(base, parts[1])
  yield int(parts[0]), path


def _join_photo(element):
  """One photo id's metadata lines and files -> one item. Of several lines the same one is
  kept whatever order the shuffle delivers them in (the smallest by value), so a rerun writes
  the same bytes; of several files, the first path in sorted order. The others of either are
  dropped and counted."""
  photo_id, groups = element
  metas, paths = sorted(groups["meta"], key=repr), sorted(groups["path"])
  if not metas:
    counter("image without metadata").inc()
    return
  if not paths:
    yield drop("missing image")
    return
  for _ in metas[1:]:
    yield drop("repeated metadata line")
  for _ in paths[1:]:
    yield drop("second image file")
  yield dataclasses.replace(metas[0], path=paths[0])


class YfccSource(beam.PTransform):
  """The metadata file (or a glob of parts: one compressed file is read by one worker) joined on photo id with the image files, found through `image_list`
  (`photo_id<TAB>path` lines) or, without it, by walking `image_dir` (file stem = photo id,
  at any depth; each top-level entry is walked by a worker)."""

  def __init__(self, metadata: str, image_dir: str = "", image_list: str = ""):
    super().__init__()
    gfile = _gfile()
    matches = gfile.glob(metadata)
    if not matches:
      raise FileNotFoundError(f"--input YFCC100M metadata file not found: {metadata}")
    if image_list and not gfile.exists(image_list):
      raise FileNotFoundError(f"--image_list not found: {image_list}")
    if not image_list and not gfile.isdir(image_dir or "/nonexistent"):
      raise FileNotFoundError(f"--image_dir not found: {image_dir!r} (or give --image_list)")
    self._metadata, self._image_dir, self._image_list = metadata, image_dir, image_list
    self._compression = compression_of(sorted(matches)[0])
    if not image_list:
      self._tops = [os.path.join(image_dir, e.rstrip("/")) for e in sorted(gfile.listdir(image_dir))]

  def expand(self, pcoll):
    p = pcoll.pipeline
    meta = (p | "Read metadata" >> beam.io.ReadFromText(self._metadata,
                                                        compression_type=self._compression)
            | "Parse metadata" >> beam.FlatMap(parse_yfcc_line).with_outputs(DROPPED, main="rows"))
    if self._image_list:
      base = os.path.dirname(os.path.abspath(self._image_list))
      files = (p | "Read image list" >> beam.io.ReadFromText(self._image_list)
               | "Parse image list" >> beam.FlatMap(parse_image_list_line, base)
               .with_outputs(DROPPED, main="paths"))
      paths, list_dropped = files.paths, [files[DROPPED]]
    else:
      paths = (p | "Image tops" >> beam.Create(self._tops) | "Spread tops" >> beam.Reshuffle()
               | "Walk images" >> beam.FlatMap(_files_by_photo_id))
      list_dropped = []
    joined = ({"meta": meta.rows, "path": paths} | "Join on photo id" >> beam.CoGroupByKey()
              | "Match" >> beam.FlatMap(_join_photo).with_outputs(DROPPED, main="items"))
    dropped = ((meta[DROPPED], joined[DROPPED], *list_dropped)
               | "Dropped by source" >> beam.Flatten())
    return {"items": joined.items, DROPPED: dropped}


# ----------------------------------------------------------------------------- long tail
def zipf_counts(num_classes: int, total: int, exponent: float) -> list[int]:
  """Images per class rank (0 = head) for a pool of `total` images: n_r ∝ (r + 1)^-exponent,
  rounded so the counts add up to `total` exactly (largest remainders)."""
  weights = [(r + 1) ** -exponent for r in range(num_classes)]
  scale = total / sum(weights)
  raw = [w * scale for w in weights]
  counts = [int(x) for x in raw]
  for r in sorted(range(num_classes), key=lambda r: counts[r] - raw[r])[:total - sum(counts)]:
    counts[r] += 1
  return counts


def long_tail(items: Sequence[Item], total: int, exponent: float, near_fraction: float,
              seed: int) -> list[Item]:
  """Resamples labelled items into `total` images whose class sizes follow Zipf(`exponent`)
  over a seeded class order. A class that needs more images than it has is filled with copies:
  exact duplicates (same bytes) and, `near_fraction` of them, near duplicates (re-encoded
  crops). Copies get their own keys, so their own ids."""
  import numpy as np
  by_class: dict[int, list[Item]] = {}
  for it in sorted(items, key=lambda it: it.key):
    if it.label < 0:
      raise ValueError(f"--long_tail_exponent needs a labelled source; {it.key} has no label")
    by_class.setdefault(it.label, []).append(it)
  rng = np.random.RandomState(seed)
  order = [sorted(by_class)[i] for i in rng.permutation(len(by_class))]
  out = []
  for label, n in zip(order, zipf_counts(len(order), total, exponent)):
    members = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
    out += members[:n]
    for j in range(max(0, n - len(members))):
      source = members[j % len(members)]
      variant = 2 if rng.random_sample() < near_fraction else 1
      out.append(dataclasses.replace(source, key=f"{source.key}#copy{j}.v{variant}",
                                     image_id=-1, variant=variant))
  return out


class LongTail(beam.PTransform):
  """`long_tail` over a whole (labelled, hence at most ImageNet-sized) source: the items are
  gathered into one list of metadata (no image bytes), resampled, and spread out again."""

  def __init__(self, total: int, exponent: float, near_fraction: float, seed: int):
    super().__init__()
    self._args = (total, exponent, near_fraction, seed)

  def expand(self, items):
    return (items | "Gather" >> beam.combiners.ToList()
            | "Resample" >> beam.FlatMap(lambda xs: long_tail(xs, *self._args))
            | "Spread" >> beam.Reshuffle())
