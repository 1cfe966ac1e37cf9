"""Feature extraction for reassignment: pre-ReLU fc7 of non-rotated, center-cropped images.

Each worker reads its own shards (file-level split by `InputContext`) and keeps its
features and image ids in memory; nothing is written to disk or exchanged here.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dc_tf.data import reader


def _stack(parts: list[np.ndarray], dtype=None) -> np.ndarray:
  """np.concatenate without holding the input and the output whole at once: each part is
  copied into the preallocated result and released (peak: the result plus one part)."""
  out = np.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype or parts[0].dtype)
  at = 0
  for i in range(len(parts)):
    part, parts[i] = parts[i], None
    out[at:at + len(part)] = part
    at += len(part)
  return out


def extract(trunk, pattern: str, *, image_size: int, batch_size: int = 256,
            endpoints=("fc7",), input_context=None, progress: bool = True,
            max_images: int = 0, postprocess=None, dtype=np.float32) -> dict:
  """Runs the trunk (inference mode) over every image once, in shard order.

  Returns {endpoint: float32 [n, ...] for each endpoint, 'image_id': int64 [n],
  'label': int64 [n], 'user_id'/'tags'/'device': bytes [n], 'lat'/'lon': [n],
  'skipped': bad records dropped}. `postprocess(endpoint, array)` is applied per batch
  (e.g. pooling conv maps, so that full maps of the whole set never sit in memory).
  Endpoint arrays are kept in `dtype` (float16 halves clustering's host memory) and held
  once: batches are moved into the result one by one.
  """
  ds = reader.build_extraction_dataset(pattern, image_size=image_size, batch_size=batch_size,
                                       input_context=input_context)

  @tf.function(reduce_retracing=True)
  def forward(images):
    out = trunk(images, training=False)
    return {e: tf.cast(out[e], tf.float32) for e in endpoints}

  keys = ("image_id", "label", "user_id", "tags", "device", "lat", "lon")
  cols: dict[str, list] = {k: [] for k in (*endpoints, *keys)}
  skipped, seen = 0, 0
  bar = tqdm(unit="img", desc="extracting features", disable=not progress, leave=False)
  for batch in ds:
    feats = forward(batch["image"])
    for e in endpoints:
      value = feats[e].numpy()
      cols[e].append((postprocess(e, value) if postprocess else value).astype(dtype, copy=False))
    for k in keys:
      cols[k].append(batch[k].numpy())
    skipped = max(skipped, int(batch["skipped"].numpy().max()))
    n = int(batch["image_id"].shape[0])
    seen += n
    bar.update(n)
    if max_images and seen >= max_images:
      break
  bar.close()
  if not cols["image_id"]:
    corrupt = reader.corrupt_shards(reader.list_shards(pattern))
    detail = (f"; {len(corrupt)} corrupt shard file(s), not TFRecord or damaged: "
              f"{', '.join(corrupt[:5])}{' ...' if len(corrupt) > 5 else ''}" if corrupt else "")
    raise reader.DataError(f"no decodable image in {pattern!r} ({skipped} bad records "
                           f"skipped{detail})")
  out = {k: _stack(v) for k, v in cols.items()}
  if max_images:
    out = {k: v[:max_images] for k, v in out.items()}
  out["skipped"] = skipped
  return out
