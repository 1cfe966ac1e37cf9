"""Records per shard without reading the records (issue 25).

At 96M photos, counting the pool by reading it is a ~10 TB scan on every worker. make_shards
already knows the count: its manifest `<output_dir>/<name>.json` lists each shard file with its
`records`. A shard set with no manifest is counted once, and the counts are cached in the run's
folder, keyed by each file's size and mtime, so a changed shard is counted again.

The manifest's counts are also what a reader checks a shard against: a shard cut short yields
fewer records than its manifest says (`reader._records`). The cached counts cannot serve for
that, since they are what was readable when counted.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import tensorflow as tf

CACHE_NAME = "record_counts.json"


def manifest_counts(files: list[str]) -> dict[str, int]:
  """{file: records} for the `files` that a manifest next to them lists.

  Any `*.json` in a shard folder that holds a "shards" list of {"file", "records"} is a
  manifest; a file none lists is absent from the result.
  """
  wanted, out = set(files), {}
  for folder in sorted({os.path.dirname(f) for f in files}):
    for path in sorted(tf.io.gfile.glob(os.path.join(folder, "*.json"))):
      try:
        with tf.io.gfile.GFile(path) as f:
          shards = json.load(f).get("shards")
        entries = {os.path.join(folder, s["file"]): int(s["records"]) for s in shards}
      except (ValueError, TypeError, KeyError, AttributeError, tf.errors.OpError):
        continue  # not a manifest
      out.update({f: n for f, n in entries.items() if f in wanted})
  return out


def _stamp(path: str) -> list[int]:
  st = tf.io.gfile.stat(path)
  return [int(st.length), int(st.mtime_nsec)]


def _count(files: list[str]) -> list[int]:
  """Readable records of each file, in one parallel pass (framing only, nothing parsed)."""
  ds = tf.data.Dataset.from_tensor_slices(files).enumerate().interleave(
      lambda i, f: tf.data.TFRecordDataset(f).ignore_errors().map(lambda _: i),
      cycle_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  index = [b.numpy() for b in ds.batch(1 << 16)]
  index = np.concatenate(index) if index else np.zeros([0], np.int64)
  return np.bincount(index, minlength=len(files)).tolist()


def counted_records(files: list[str], cache_dir: str | None, pattern: str) -> dict[str, int]:
  """{file: records} for `files` (that no manifest lists): from the cache in `cache_dir`
  where a file's size and mtime are unchanged, else counted now and cached."""
  cache_path = os.path.join(cache_dir, CACHE_NAME) if cache_dir else None
  cache = {}
  if cache_path and tf.io.gfile.exists(cache_path):
    try:
      with tf.io.gfile.GFile(cache_path) as f:
        cache = json.load(f)["files"]
    except (ValueError, KeyError, TypeError, tf.errors.OpError):
      cache = {}
  cache = cache if isinstance(cache, dict) else {}  # unreadable: counted again
  stamps = {f: _stamp(f) for f in files}
  out = {f: cache[f]["records"] for f in files
         if isinstance(cache.get(f), dict) and cache[f].get("stamp") == stamps[f]}
  todo = [f for f in files if f not in out]
  if not todo:
    logging.info("record counts of %d shard files read from %s", len(files), cache_path)
    return out
  out.update(zip(todo, _count(todo)))
  if cache_path:
    cache.update({f: {"stamp": stamps[f], "records": out[f]} for f in todo})
    tf.io.gfile.makedirs(cache_dir)
    tmp = f"{cache_path}.tmp-{os.getpid()}"  # workers sharing the folder each rename whole
    with tf.io.gfile.GFile(tmp, "w") as f:
      f.write(json.dumps({"files": cache}))
    tf.io.gfile.rename(tmp, cache_path, overwrite=True)
  logging.warning("no manifest for %s: counted %d records of %d shard files in one pass (%s)",
                  pattern, sum(out[f] for f in todo), len(todo),
                  f"cached in {cache_path}" if cache_path else "not cached: no run folder")
  return out
