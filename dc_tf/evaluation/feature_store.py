"""Pooled features of a labelled set on disk, written in one extraction pass (issue 35).

evaluate.py used to hold every probed layer of the whole train and test sets in memory:
pooled conv1..conv13 of ImageNet are 1.28M x ~114k floats, ~580 GB a trunk. Here each batch
is pooled (`metrics.pool_until`, the paper's under-10k rule) and appended to one float32
file per layer, `<directory>/<layer>.f32` (row-major [n, dims], in shard order: the rows of
`extract.extract`). What stays in memory is O(n) only for 16 bytes an image (ids and
labels); the rest is a batch, or the bounded cluster sample.

Rows are read back with positioned reads (`os.preadv` into the caller's array), never an
np.memmap: the touched pages of a mapping count in the process's RSS (RssFile) for as long
as it is mapped, and a 60-epoch probe touches them all. The page cache the reads go through
belongs to the kernel, not to us.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np

from dc_tf.clustering import extract
from dc_tf.config import UserError
from dc_tf.evaluation import metrics

META = ("image_id", "label", "user_id", "tags", "device", "lat", "lon")


class FeatureDirError(UserError):
  """--feature_dir cannot hold the features (not a local folder, not writable)."""


class LayerRows:
  """One layer's rows on disk, indexed like an [n, dims] float32 array: x[a:b] and x[rows]
  (any order, repeats allowed) read just those rows; len(x) and x.shape as an array's."""

  def __init__(self, path: str, n: int, dims: int):
    self.path, self.shape = path, (n, dims)
    self.dtype = np.dtype(np.float32)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    n, d = self.shape
    row_bytes = 4 * d
    fd = os.open(self.path, os.O_RDONLY)
    try:
      if isinstance(index, slice):
        start, stop, step = index.indices(n)
        if step != 1:
          raise IndexError("LayerRows slices take no step")
        out = np.empty((max(0, stop - start), d), np.float32)
        _read_into(fd, out, start * row_bytes)
        return out
      rows = np.asarray(index, np.int64)
      if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= n)):
        raise IndexError(f"rows out of [0, {n}) in {self.path}")
      out = np.empty((len(rows), d), np.float32)
      # A run of consecutive rows is one read (minibatches of sorted ids often hold runs).
      order = np.argsort(rows, kind="stable")
      i = 0
      while i < len(order):
        j = i + 1
        while j < len(order) and rows[order[j]] == rows[order[j - 1]] + 1:
          j += 1
        if np.all(np.diff(order[i:j]) == 1):
          _read_into(fd, out[order[i]:order[i] + j - i], int(rows[order[i]]) * row_bytes)
        else:
          for k in order[i:j]:
            _read_into(fd, out[k:k + 1], int(rows[k]) * row_bytes)
        i = j
      return out
    finally:
      os.close(fd)

  def blocks(self, rows_per_block: int):
    """(start, float32 [<= rows_per_block, dims]) over the whole layer, in order."""
    for start in range(0, len(self), rows_per_block):
      yield start, self[start:start + rows_per_block]


def _read_into(fd: int, out: np.ndarray, offset: int) -> None:
  view, done = memoryview(out).cast("B"), 0
  while done < len(view):
    got = os.preadv(fd, [view[done:]], offset + done)
    if got <= 0:
      raise OSError(f"short read at byte {offset + done} (file truncated?)")
    done += got


@dataclasses.dataclass
class FeatureStore:
  """What `write` leaves: per-layer files plus the per-image ids and labels (shard order).

  sample_rows: the rows of the cluster sample (increasing); sample_meta: their
  image_id/label/user_id/tags/device/lat/lon, for `evaluator.cluster_quality`."""
  directory: str
  dims: dict
  pool_sizes: dict
  image_id: np.ndarray
  label: np.ndarray
  sample_rows: np.ndarray
  sample_meta: dict
  computed_on: list = dataclasses.field(default_factory=list)   # devices the trunk ran on
  skipped: int = 0

  def __len__(self) -> int:
    return len(self.image_id)

  def __getitem__(self, layer: str) -> LayerRows:
    return LayerRows(os.path.join(self.directory, f"{layer}.f32"), len(self), self.dims[layer])

  def remove(self) -> None:
    shutil.rmtree(self.directory, ignore_errors=True)


def sample_keys(image_ids: np.ndarray, seed: int = 0) -> np.ndarray:
  """A uint64 hash per image id (splitmix64's finaliser of id ^ seed): the images with the
  smallest keys are a uniform sample that depends on the ids alone, not on shard order or
  on how many images were seen before them."""
  with np.errstate(over="ignore"):
    z = (np.asarray(image_ids).astype(np.uint64) ^ np.uint64(seed)) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _BottomSample:
  """The `size` rows with the smallest keys seen so far (a bottom-k sketch), with their
  metadata: memory O(size), one pass, and the same set whatever the order of the rows."""

  def __init__(self, size: int):
    self.size = size
    self.parts: list[dict] = []
    self.held = 0

  def add(self, rows: np.ndarray, keys: np.ndarray, meta: dict) -> None:
    if self.size <= 0:
      return
    self.parts.append({"row": rows, "key": keys, **meta})
    self.held += len(rows)
    if self.held > 2 * self.size:
      self._shrink()

  def _shrink(self) -> dict:
    both = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
    if len(both["key"]) > self.size:
      keep = np.lexsort((both["row"], both["key"]))[:self.size]
      both = {k: v[np.sort(keep)] for k, v in both.items()}
    self.parts, self.held = [both], len(both["key"])
    return both

  def result(self) -> dict:
    if not self.parts:
      return {}
    both = self._shrink()
    order = np.argsort(both["row"], kind="stable")   # shard order, as `extract` gives
    return {k: v[order] for k, v in both.items()}


def write(trunk, pattern: str, layers, directory: str, *, image_size: int,
          batch_size: int = 256, max_images: int = 0, sample: int = 0, seed: int = 0,
          strategy=None, progress: bool = True) -> FeatureStore:
  """Extracts `layers` of every image of `pattern` (the first `max_images` if set) once,
  pools each batch and appends it to `directory/<layer>.f32`; keeps the metadata of a
  `sample` of images (the smallest `sample_keys`) for the cluster scores.

  The trunk runs on the local replicas of `strategy` (one batch each a round, see
  `extract.stream`); pooling and the writes are on the host."""
  try:
    os.makedirs(directory, exist_ok=True)
    files = {l: open(os.path.join(directory, f"{l}.f32"), "wb") for l in layers}
  except OSError as e:
    raise FeatureDirError(f"--feature_dir: cannot write features in {directory}: {e}") from e
  ids, labels, dims, pool_sizes = [], [], {}, {}
  sampler = _BottomSample(sample)
  row, computed_on, skipped = 0, [], 0
  try:
    for batch, feats in extract.stream(trunk, pattern, image_size=image_size,
                                       batch_size=batch_size, endpoints=tuple(layers),
                                       strategy=strategy, progress=progress):
      take = len(batch["image_id"]) if not max_images else min(len(batch["image_id"]),
                                                                 max_images - row)
      for layer in layers:
        pooled, pool_sizes[layer] = metrics.pool_until(feats[layer][:take])
        dims[layer] = pooled.shape[1]
        np.ascontiguousarray(pooled, np.float32).tofile(files[layer])
      meta = {k: batch[k][:take] for k in META}
      ids.append(meta["image_id"])
      labels.append(meta["label"])
      sampler.add(np.arange(row, row + take), sample_keys(meta["image_id"], seed), meta)
      row += take
      skipped = batch["skipped"]
      if batch["computed_on"] not in computed_on:
        computed_on.append(batch["computed_on"])
      if max_images and row >= max_images:
        break
  finally:
    for f in files.values():
      f.close()
  picked = sampler.result()
  return FeatureStore(directory, dims, pool_sizes, np.concatenate(ids).astype(np.int64),
                      np.concatenate(labels).astype(np.int64),
                      picked.pop("row", np.zeros([0], np.int64)),
                      {k: v for k, v in picked.items() if k != "key"}, computed_on, skipped)
