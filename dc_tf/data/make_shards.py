r"""Writes sharded TFRecords (`<name>-00000-of-00064.tfrecord`) in the schema of `schema.py`.

Sources (--source):
  folder        --input=DIR: every image below DIR; with one sub-folder per class the
                sub-folder name is the label (sorted names -> 0..C-1).
  list          --input=FILE: one `path[<TAB>label]` per line, paths relative to the file
                or to --image_dir.
  yfcc          --input=META.tsv --image_dir=DIR: YFCC100M-style metadata, one photo per line
                `photo_id  user_id  tags  lat  lon  device` (tab-separated, optional header);
                the image is DIR/<photo_id>.<ext>. The photo id becomes the image id.
  tiny_imagenet --input=ZIP (train_250per_class.zip or val.zip, read in place)
                with --split, --classes, --per_class.

Every image is decoded once while writing; corrupt, truncated, zero-byte and non-image
files are skipped and counted. Shards are written in parallel (one process per shard),
each to a temporary name then renamed, so an interrupted run resumes by skipping the
shards that exist. The order is deterministic given --seed.

Example (the embedded demo set, see README):
  python -m dc_tf.data.make_shards --source=tiny_imagenet \
    --input=../shared/datasets/tiny-imagenet-200/train_250per_class.zip --split=train \
    --classes=$(cat data/classes.txt | paste -sd,) --output_dir=data --name=train --num_shards=4
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import zipfile
from typing import Iterable, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to write: where its bytes are, and what we know about it."""
  key: str                      # stable name, hashed to the image id unless image_id is set
  path: str                     # file path, or member name inside `zip_path`
  zip_path: str = ""
  image_id: int = -1
  label: int = -1
  label_text: str = ""
  user_id: str = ""
  tags: str = ""
  lat: float = float("nan")
  lon: float = float("nan")
  device: str = ""

  def read(self, zip_file: zipfile.ZipFile | None = None) -> bytes:
    if self.zip_path:
      return zip_file.read(self.path)
    with open(self.path, "rb") as f:
      return f.read()


# ----------------------------------------------------------------------------- sources
def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def items_from_folder(root: str) -> list[Item]:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--input folder not found: {root}")
  paths = []
  for dirpath, _, files in os.walk(root):
    paths += [os.path.join(dirpath, f) for f in files if _is_image(f)]
  rel = sorted(os.path.relpath(p, root) for p in paths)
  classes = sorted({r.split(os.sep)[0] for r in rel if os.sep in r})
  index = {c: i for i, c in enumerate(classes)}
  items = []
  for r in rel:
    cls = r.split(os.sep)[0] if os.sep in r else ""
    items.append(Item(key=r, path=os.path.join(root, r), label=index.get(cls, -1), label_text=cls))
  return items


def items_from_list(list_file: str, image_dir: str = "") -> list[Item]:
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"--input list file not found: {list_file}")
  base = image_dir or os.path.dirname(os.path.abspath(list_file))
  items = []
  with open(list_file) as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip() or line.startswith("#"):
        continue
      parts = line.split("\t")
      try:
        label = int(parts[1]) if len(parts) > 1 and parts[1] else -1
      except ValueError as e:
        raise ValueError(f"{list_file}:{lineno}: label must be an integer: {parts[1]!r}") from e
      path = parts[0] if os.path.isabs(parts[0]) else os.path.join(base, parts[0])
      items.append(Item(key=parts[0], path=path, label=label))
  return items


def _float_or_nan(s: str) -> float:
  try:
    return float(s)
  except ValueError:
    return float("nan")


def items_from_yfcc(meta_tsv: str, image_dir: str) -> list[Item]:
  if not os.path.isfile(meta_tsv):
    raise FileNotFoundError(f"--input metadata TSV not found: {meta_tsv}")
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"--image_dir not found: {image_dir}")
  by_stem = {os.path.splitext(f)[0]: f for f in os.listdir(image_dir) if _is_image(f)}
  items, missing = [], 0
  with open(meta_tsv, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      cols = line.rstrip("\n").split("\t")
      if lineno == 1 and not cols[0].isdigit():
        continue  # header
      if len(cols) < 6:
        raise ValueError(f"{meta_tsv}:{lineno}: expected 6 tab-separated columns "
                         "(photo_id user_id tags lat lon device), got {len(cols)}")
      photo_id, user_id, tags, lat, lon, device = cols[:6]
      if photo_id not in by_stem:
        missing += 1
        continue
      items.append(Item(key=photo_id, path=os.path.join(image_dir, by_stem[photo_id]),
                        image_id=int(photo_id), user_id=user_id, tags=tags,
                        lat=_float_or_nan(lat), lon=_float_or_nan(lon), device=device))
  if missing:
    print(f"yfcc: {missing} photos in {meta_tsv} have no image in {image_dir} (skipped)")
  return items


def items_from_tiny_imagenet(zip_path: str, split: str, classes: Sequence[str] = (),
                             per_class: int = 0, drop_labels: bool = False) -> list[Item]:
  """Tiny ImageNet read in place from its zip: train/<wnid>/images/*.JPEG or val/images."""
  if not os.path.isfile(zip_path):
    raise FileNotFoundError(f"--input zip not found: {zip_path}")
  with zipfile.ZipFile(zip_path) as z:
    names = z.namelist()
    words = dict(line.split("\t", 1) for line in
                 z.read("tiny-imagenet-200/words.txt").decode().splitlines() if "\t" in line)
    if split == "train":
      pairs = [(n, n.split("/")[2]) for n in names if "/train/" in n and _is_image(n)]
    elif split == "val":
      ann = z.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()
      wnid_of = dict(line.split("\t")[:2] for line in ann if line)
      pairs = [(n, wnid_of[os.path.basename(n)]) for n in names
               if "/val/images/" in n and _is_image(n)]
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
    members = per[wnid][:per_class] if per_class else per[wnid]
    for name in members:
      text = words.get(wnid, wnid).split(",")[0]
      items.append(Item(key=name, path=name, zip_path=zip_path,
                        label=-1 if drop_labels else index[wnid],
                        label_text="" if drop_labels else text))
  return items


# ----------------------------------------------------------------------------- writing
def shard_name(output_dir: str, name: str, index: int, total: int) -> str:
  return os.path.join(output_dir, f"{name}-{index:05d}-of-{total:05d}.tfrecord")


def plan_shards(items: Sequence[Item], num_shards: int, seed: int) -> list[list[Item]]:
  """Sorted by key, shuffled with `seed` (seed < 0 keeps sorted order), then cut into
  `num_shards` contiguous runs: the same inputs always give the same shards."""
  ordered = sorted(items, key=lambda it: it.key)
  if seed >= 0:
    perm = np.random.RandomState(seed).permutation(len(ordered))
    ordered = [ordered[i] for i in perm]
  return [list(chunk) for chunk in np.array_split(np.array(ordered, dtype=object), num_shards)]


def _encode_item(item: Item, zip_file) -> tuple[bytes | None, str]:
  """Returns (serialized example, '') or (None, reason it was skipped)."""
  import tensorflow as tf
  from dc_tf.data import schema
  try:
    data = item.read(zip_file)
  except (OSError, KeyError) as e:
    return None, f"unreadable ({e})"
  if not data:
    return None, "zero bytes"
  fmt = schema.sniff_format(data)
  if fmt is None:
    return None, "not an image"
  if fmt == "jpeg" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
    return None, "truncated jpeg"
  try:
    image = tf.io.decode_image(data, channels=0, expand_animations=False)
    height, width = int(image.shape[0]), int(image.shape[1])
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    return None, f"corrupt {fmt} ({str(e).splitlines()[0][:80]})"
  image_id = item.image_id if item.image_id >= 0 else schema.stable_id(item.key)
  example = schema.make_example(data, fmt, height, width, image_id, label=item.label,
                                label_text=item.label_text, user_id=item.user_id,
                                tags=item.tags, lat=item.lat, lon=item.lon, device=item.device)
  return example.SerializeToString(), ""


def write_shard(task: tuple[str, list[Item]]) -> dict:
  """Writes one shard; returns its counts. Skips the shard if it already exists."""
  import tensorflow as tf
  path, items = task
  if tf.io.gfile.exists(path):
    return {"path": path, "written": -1, "skipped": 0, "resumed": True, "reasons": {}}
  tmp = f"{path}.tmp-{os.getpid()}"
  zips: dict[str, zipfile.ZipFile] = {}
  written, reasons = 0, {}
  with tf.io.TFRecordWriter(tmp) as writer:
    for item in items:
      zf = None
      if item.zip_path:
        if item.zip_path not in zips:
          zips[item.zip_path] = zipfile.ZipFile(item.zip_path)
        zf = zips[item.zip_path]
      record, why = _encode_item(item, zf)
      if record is None:
        reasons[why.split(" (")[0]] = reasons.get(why.split(" (")[0], 0) + 1
        print(f"skipped {item.key}: {why}", flush=True)
        continue
      writer.write(record)
      written += 1
  for zf in zips.values():
    zf.close()
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return {"path": path, "written": written, "skipped": sum(reasons.values()),
          "resumed": False, "reasons": reasons}


def write_shards(items: Sequence[Item], output_dir: str, name: str, num_shards: int,
                 seed: int = 0, num_workers: int = 0, progress: bool = True) -> dict:
  """Writes all shards (in `num_workers` processes; 0 = in this process) and a
  `<name>.json` summary next to them. Returns the summary."""
  import tensorflow as tf
  from tqdm import tqdm
  if not items:
    raise ValueError("no images found for the given --input")
  num_shards = max(1, min(num_shards, len(items)))
  tf.io.gfile.makedirs(output_dir)
  plan = plan_shards(items, num_shards, seed)
  tasks = [(shard_name(output_dir, name, i, num_shards), chunk) for i, chunk in enumerate(plan)]
  bar = tqdm(total=len(items), unit="img", desc=f"writing {name}", disable=not progress)
  results = []
  if num_workers > 0:
    ctx = multiprocessing.get_context("spawn")  # TF is not fork-safe
    with ctx.Pool(num_workers) as pool:
      for (path, chunk), res in zip(tasks, pool.imap(write_shard, tasks)):
        results.append(res)
        bar.update(len(chunk))
  else:
    for task in tasks:
      results.append(write_shard(task))
      bar.update(len(task[1]))
  bar.close()
  reasons: dict[str, int] = {}
  for r in results:
    for why, n in r["reasons"].items():
      reasons[why] = reasons.get(why, 0) + n
  summary = {
      "name": name, "num_shards": num_shards, "images_in": len(items),
      "written": sum(r["written"] for r in results if not r["resumed"]),
      "skipped": sum(r["skipped"] for r in results), "skip_reasons": reasons,
      "resumed_shards": sum(r["resumed"] for r in results), "seed": seed,
      "labels": sorted({(it.label, it.label_text) for it in items if it.label >= 0}),
  }
  with tf.io.gfile.GFile(os.path.join(output_dir, f"{name}.json"), "w") as f:
    f.write(json.dumps(summary, indent=1))
  return summary


def collect_items(source: str, input_path: str, image_dir: str = "", split: str = "train",
                  classes: Iterable[str] = (), per_class: int = 0,
                  drop_labels: bool = False) -> list[Item]:
  if source == "folder":
    items = items_from_folder(input_path)
  elif source == "list":
    items = items_from_list(input_path, image_dir)
  elif source == "yfcc":
    items = items_from_yfcc(input_path, image_dir)
  elif source == "tiny_imagenet":
    return items_from_tiny_imagenet(input_path, split, list(classes), per_class, drop_labels)
  else:
    raise ValueError(f"--source must be folder, list, yfcc or tiny_imagenet, got {source!r}")
  if drop_labels:
    items = [dataclasses.replace(it, label=-1, label_text="") for it in items]
  return items


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  items = collect_items(f.source, f.input, f.image_dir, f.split,
                        [c for c in f.classes.split(",") if c], f.per_class, f.drop_labels)
  num_shards = f.num_shards or max(1, -(-len(items) // f.shard_size))
  summary = write_shards(items, f.output_dir, f.name, num_shards, f.seed, f.num_workers)
  print(json.dumps({k: v for k, v in summary.items() if k != "labels"}, indent=1))


def define_flags():
  from absl import flags
  flags.DEFINE_enum("source", "folder", ["folder", "list", "yfcc", "tiny_imagenet"], "Input kind.")
  flags.DEFINE_string("input", None, "Folder, list file, metadata TSV or zip.", required=True)
  flags.DEFINE_string("image_dir", "", "Image folder for --source=list/yfcc.")
  flags.DEFINE_string("output_dir", None, "Where shards go (local or gs://).", required=True)
  flags.DEFINE_string("name", "train", "Shard name prefix.")
  flags.DEFINE_integer("num_shards", 0, "Number of shards; 0 = from --shard_size.")
  flags.DEFINE_integer("shard_size", 1024, "Images per shard when --num_shards=0.")
  flags.DEFINE_integer("seed", 0, "Shuffle seed for the image order; < 0 keeps sorted order.")
  flags.DEFINE_integer("num_workers", min(8, os.cpu_count() or 1), "Writer processes; 0 = inline.")
  flags.DEFINE_string("split", "train", "tiny_imagenet: train or val.")
  flags.DEFINE_string("classes", "", "tiny_imagenet: comma-separated wnids (default all).")
  flags.DEFINE_integer("per_class", 0, "tiny_imagenet: images per class (0 = all).")
  flags.DEFINE_bool("drop_labels", False, "Write no labels (training pools are label-free).")


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
