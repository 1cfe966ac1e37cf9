"""What `dc_tf.embed` reads: a folder, a list file or make_shards' TFRecord shards, checked
and de-duplicated as make_shards does it (`dc_tf/data/checks.py`, which both import), in one
deterministic row order.

  folder     every image below it (`sources._walk_images`; a sub-folder names the label)
  list       `path[<TAB>label]` lines (`sources.parse_list_line`)
  yfcc_list  YFCC100M's `photo_id<TAB>path` image list (`sources.parse_image_list_line`); the
             photo id is the image id. For the metadata too, make shards with
             `make_shards --source=yfcc` and embed those
  tfrecord   a glob of shards in `schema.py`'s layout (already checked by make_shards; checked
             again, since a shard may come from elsewhere)

Each image is read once here: zero-byte, non-image, truncated and corrupt files are dropped
with make_shards' reasons (`checks.check_image`), byte-identical copies keep the smallest
image id (`checks.keep_one_per_hash`, "duplicate"); a yfcc_list photo id with several files
keeps the first path in sorted order and counts the others as "second image file", as
make_shards' yfcc join does (one id, one row: the clusters' id table needs it). Only metadata
and a SHA-1 are kept; the embedder reads the bytes again (and refuses a file whose bytes
changed meanwhile), a TFRecord shard whole (`record_images`). The rows are sorted by their
key (the path relative to the folder, the list's path, or `<shard file>#<record>`), so a
rerun over the same input gives the same rows in the same order.

`resolve` spells --input once, at the edge (the real absolute path), so that `photos`,
`./photos/` and `/abs/photos` give the same rows and paths.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import os
import threading

import apache_beam as beam
import tensorflow as tf

from dc_tf.config import UserError
from dc_tf.data import checks, schema, sources


@dataclasses.dataclass(frozen=True)
class Row:
  """One image that will be embedded, with what the index records of it."""
  image_id: int
  key: str
  path: str            # the file, or for a shard record its URL if it has one else `file#i`
  sha1: str
  format: str
  height: int
  width: int
  label: int = -1
  label_text: str = ""
  user_id: str = ""
  tags: str = ""
  url: str = ""
  record_file: str = ""   # tfrecord input: the shard and the record's position in it
  record_index: int = -1


INDEX_COLUMNS = ("image_id", "key", "path", "sha1", "format", "height", "width", "label",
                 "label_text", "user_id", "tags", "url", "record_file", "record_index")
_INT_COLUMNS = ("image_id", "height", "width", "label", "record_index")


def row_from_index(line: dict) -> Row:
  """A Row back from one line of index.csv (csv.DictReader)."""
  return Row(**{c: int(line[c]) if c in _INT_COLUMNS else line[c] for c in INDEX_COLUMNS})


INPUT_FORMATS = ("auto", "folder", "list", "yfcc_list", "tfrecord")


def resolve(path: str) -> str:
  """--input as one spelling: the real absolute path of a local folder, list or glob (a glob's
  pattern part is kept as it is); a URL (gs://...) as given."""
  return path if "://" in path else os.path.realpath(path)


def input_root(path: str, kind: str) -> str:
  """The folder the rows' paths are relative to: the folder itself, else the folder of the
  list file or of the shards' glob."""
  return path.rstrip("/") if kind == "folder" else os.path.dirname(path)


def input_kind(path: str, input_format: str = "auto") -> str:
  if input_format not in INPUT_FORMATS:
    raise UserError(f"--input_format must be one of {', '.join(INPUT_FORMATS)}, "
                    f"got {input_format!r}")
  if input_format != "auto":
    if input_format != "tfrecord" and not os.path.exists(path):
      raise UserError(f"--input not found: {path}")
    return input_format
  if os.path.isdir(path):
    return "folder"
  if any(c in path for c in "*?[") or path.endswith(".tfrecord"):
    return "tfrecord"
  if os.path.isfile(path):
    return "list"
  raise UserError(f"--input not found: {path} (a folder, a list file of path[<TAB>label] "
                  "lines, or a glob of .tfrecord shards)")


def _folder_items(root: str):
  root = root.rstrip("/")
  for path in sources._walk_images(root):  # noqa: SLF001 - make_shards' own walk
    rel = os.path.relpath(path, root)
    cls = rel.split(os.sep)[0] if os.sep in rel else ""
    yield sources.Item(key=rel, path=path, label_text=cls), None


def _list_items(list_file: str):
  base = os.path.dirname(os.path.abspath(list_file))
  with open(list_file) as f:
    for line in f:
      for out in sources.parse_list_line(line, base):
        yield (None, out.value[0]) if isinstance(out, beam.pvalue.TaggedOutput) else (out, None)


def _yfcc_list_items(list_file: str):
  base = os.path.dirname(os.path.abspath(list_file))
  paths = collections.defaultdict(list)
  with open(list_file) as f:
    for line in f:
      for out in sources.parse_image_list_line(line, base):
        if isinstance(out, beam.pvalue.TaggedOutput):
          yield None, out.value[0]
        else:
          paths[out[0]].append(out[1])
  for photo_id, files in paths.items():   # as sources._join_photo: the first path sorted
    files = sorted(files)
    for _ in files[1:]:
      yield None, "second image file"
    yield sources.Item(key=str(photo_id), path=files[0], image_id=photo_id), None


def _records(path: str):
  for i, serialized in enumerate(tf.data.TFRecordDataset(path)):
    yield i, tf.io.parse_single_example(serialized, schema.FEATURE_SPEC)


def _tfrecord_items(pattern: str):
  files = sorted(glob.glob(pattern))
  if not files:
    raise UserError(f"--input matches no TFRecord shards: {pattern}")
  for path in files:
    for i, ex in _records(path):
      text = lambda k: ex[k].numpy().decode("utf-8", "replace")  # noqa: E731
      url = text(schema.URL)
      item = sources.Item(
          key=f"{os.path.basename(path)}#{i:09d}", path=url or f"{path}#{i}",
          image_id=int(ex[schema.IMAGE_ID]), label=int(ex[schema.LABEL]),
          label_text=text(schema.LABEL_TEXT), user_id=text(schema.USER_ID),
          tags=text(schema.TAGS), url=url)
      yield item, (path, i, ex[schema.ENCODED].numpy())


def plan(input_path: str, dedupe: bool = True, input_format: str = "auto"
         ) -> tuple[list[Row], dict, int]:
  """(rows in order, {drop reason: count}, images found) for `input_path`."""
  kind = input_kind(input_path, input_format)
  found = {"folder": _folder_items, "list": _list_items, "yfcc_list": _yfcc_list_items,
           "tfrecord": _tfrecord_items}[kind]
  dropped: collections.Counter = collections.Counter()
  by_hash: dict[str, list] = collections.defaultdict(list)
  seen = 0
  for item, extra in found(input_path):
    seen += 1
    if item is None:
      dropped[extra] += 1
      continue
    if kind == "tfrecord":
      record_file, record_index, data = extra
    else:
      record_file, record_index = "", -1
      try:
        data = checks.read_bytes(item)
      except (OSError, KeyError, tf.errors.OpError):
        dropped["unreadable"] += 1
        continue
    why, fmt, height, width = checks.check_image(data)
    if why:
      dropped[why] += 1
      continue
    sha1 = hashlib.sha1(data).hexdigest()
    checked = checks.Checked(item, sources.id_of(item), sha1, fmt, height, width)
    by_hash[sha1].append((checked, record_file, record_index))
  rows = []
  for sha1, copies in by_hash.items():
    where = {id(c): (f, i) for c, f, i in copies}
    for out in checks.keep_one_per_hash((sha1, [c for c, _, _ in copies]), 0, frozenset(),
                                        dedupe):
      if isinstance(out, beam.pvalue.TaggedOutput):
        dropped[out.value[0]] += 1
        continue
      it = out.item
      record_file, record_index = where[id(out)]
      rows.append(Row(out.image_id, it.key, it.path, sha1, out.fmt, out.height, out.width,
                      it.label, it.label_text, it.user_id, it.tags, it.url, record_file,
                      record_index))
  rows.sort(key=lambda r: (r.key, r.image_id))
  return rows, dict(sorted(dropped.items())), seen


def record_images(path: str) -> list[bytes]:
  """The encoded images of one TFRecord shard, in record order: the shard read whole."""
  return [ex[schema.ENCODED].numpy() for _, ex in _records(path)]


_RECORDS = threading.local()  # the last shard file read, whole (rows come in shard order)


def _checked(row: Row, data: bytes) -> bytes:
  if hashlib.sha1(data).hexdigest() != row.sha1:
    raise UserError(f"{row.path} changed while it was embedded (its SHA-1 is no longer the "
                    "one checked): rerun to plan again")
  return data


def read_bytes(row: Row) -> bytes:
  """The image's bytes again; a UserError if they are no longer those that were checked.
  Rows of one shard file in a row are read with one read of the file (per thread)."""
  if row.record_file:
    if getattr(_RECORDS, "file", None) != row.record_file:
      _RECORDS.file = row.record_file
      _RECORDS.data = record_images(row.record_file)
    return _checked(row, _RECORDS.data[row.record_index])
  with tf.io.gfile.GFile(row.path, "rb") as f:
    return _checked(row, f.read())


def read_file_rows(rows) -> list[bytes]:
  """The bytes of rows that all come from one file: a TFRecord shard is read once for all of
  them, whatever order they come in (the Beam path groups its rows by file)."""
  files = {r.record_file or r.path for r in rows}
  if len(files) != 1:
    raise ValueError(f"rows of {len(files)} files, not one: {sorted(files)[:2]}")
  if not rows[0].record_file:
    return [read_bytes(r) for r in rows]
  data = record_images(rows[0].record_file)
  return [_checked(r, data[r.record_index]) for r in rows]
