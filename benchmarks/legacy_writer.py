"""The shard writer as it was before the Beam pipeline (dc_tf 810ae77), kept only as the
baseline of `make_shards.py`: items listed in one process, shuffled with a seed, cut into
contiguous runs, each shard decoded-checked and written by one process of a pool."""

import multiprocessing
import os
import zipfile

import numpy as np


def _encode(item, zip_file):
  from dc_tf.data import checks, schema, sources
  data = zip_file.read(item.path) if item.zip_path else open(item.path, "rb").read()
  why, fmt, height, width = checks.check_image(data)
  if why:
    return None
  return schema.make_example(data, fmt, height, width, sources.id_of(item), label=item.label,
                             label_text=item.label_text).SerializeToString()


def _write_shard(task):
  import tensorflow as tf
  path, items = task
  written, zips = 0, {}
  with tf.io.TFRecordWriter(path) as writer:
    for item in items:
      if item.zip_path and item.zip_path not in zips:
        zips[item.zip_path] = zipfile.ZipFile(item.zip_path)
      record = _encode(item, zips.get(item.zip_path))
      if record is not None:
        writer.write(record)
        written += 1
  return written


def write(items, output_dir, name, num_shards, seed=0, num_workers=2) -> int:
  os.makedirs(output_dir, exist_ok=True)
  ordered = sorted(items, key=lambda it: it.key)
  ordered = [ordered[i] for i in np.random.RandomState(seed).permutation(len(ordered))]
  chunks = np.array_split(np.array(ordered, dtype=object), num_shards)
  tasks = [(os.path.join(output_dir, f"{name}-{i:05d}-of-{num_shards:05d}.tfrecord"), list(c))
           for i, c in enumerate(chunks)]
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    return sum(pool.imap(_write_shard, tasks))
