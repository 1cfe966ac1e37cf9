"""Near-duplicates and outliers among embedded photos (issue 36 item 3), in a `space.Space`.

  pairs      every pair of rows whose cosine in the space is >= a threshold: resized,
             re-encoded or slightly cropped copies (byte-identical copies never get here:
             dc_tf.embed drops them, "duplicate")
  isolation  each row's cosine to its nearest other row; the lowest are the outliers

Both go block by block: a [block, N] product of unit rows at a time, so memory is
block x N scores, never the N x N matrix (100k rows: 0.4 GB a 1,024-row block, not 40 GB).
The scan is O(N^2 p) time: 100k rows at p = 256 is 2.6 TFLOP, minutes on a CPU; beyond that
a vector index's range search (faiss) over the same unit rows.
"""

from __future__ import annotations

import numpy as np

from dc_tf.config import UserError

# The cosine above which two photos are listed as near-duplicates, in the default space
# (space.DEFAULT_LAYER, space.DEFAULT_SPACE). Set from the planted copies (every 10th image
# re-encoded, resized and cropped 90%) of the choosing half of benchmarks/photo_clusters.py
# (the demo export, probe_conv4, centred_l2, best F1): recall 0.980, precision 0.993 there;
# 0.976 and 0.976 on the reporting half (benchmarks/results/photo_clusters.json, 2026-12-06).
DEFAULT_THRESHOLD = 0.73
DEFAULT_OUTLIERS = 10


class TooManyPairs(UserError, ValueError):
  """The threshold lists a large share of all pairs: the space does not separate copies."""


def pairs(y: np.ndarray, threshold: float, block: int = 1024, max_pairs: int = 0
          ) -> list[tuple[int, int, float]]:
  """[(i, j, cosine)] for i < j with y_i . y_j >= threshold, best first (ties by i, j).
  `y`: unit rows [N, p]. More than `max_pairs` (> 0) is refused: in the raw space of ReLU
  features nearly every pair is above 0.9 (issue 36), and the list would be N^2 / 2 long."""
  if not -1.0 <= threshold <= 1.0:
    raise ValueError(f"a cosine threshold is in [-1, 1], got {threshold}")
  found = []
  for start in range(0, len(y), block):
    s = y[start:start + block] @ y[start:].T        # only j >= i: each pair once
    rows, cols = np.nonzero(s >= threshold)
    keep = cols > rows                              # j > i, self excluded
    if max_pairs and len(found) + int(keep.sum()) > max_pairs:
      raise TooManyPairs(f"more than {max_pairs} pairs of photos at cosine >= {threshold:g}: "
                         "raise --duplicate_threshold, or use --space=pca_l2")
    for r, c in zip(rows[keep], cols[keep]):
      found.append((start + int(r), start + int(c), float(s[r, c])))
  found.sort(key=lambda p: (-p[2], p[0], p[1]))
  return found


def isolation(y: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(nearest other row [N], its cosine [N]) for each of the unit rows `y` [N, p], N >= 2."""
  if len(y) < 2:
    raise ValueError("isolation needs at least 2 rows")
  nearest = np.zeros(len(y), np.int64)
  score = np.zeros(len(y), np.float32)
  for start in range(0, len(y), block):
    s = y[start:start + block] @ y.T
    s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf
    nearest[start:start + len(s)] = s.argmax(axis=1)
    score[start:start + len(s)] = s.max(axis=1)
  return nearest, score


def outliers(y: np.ndarray, n: int = DEFAULT_OUTLIERS, block: int = 1024
             ) -> list[tuple[int, int, float]]:
  """[(row, its nearest other row, cosine)] of the n rows farthest from any other, most
  isolated first (ties by row)."""
  nearest, score = isolation(y, block)
  order = np.lexsort((np.arange(len(y)), score))[:n]
  return [(int(i), int(nearest[i]), float(score[i])) for i in order]


COPIES = ("reencoded", "resized", "cropped")


def planted_copies(data: bytes) -> dict[str, bytes]:
  """The near-duplicates the threshold is measured on (benchmarks/photo_clusters.py, the
  tests): {kind: JPEG bytes} of an image re-encoded at quality 40, resized to 3/4, and
  centre-cropped to 90% then resized back."""
  import tensorflow as tf
  img = tf.io.decode_image(data, channels=3, expand_animations=False)
  h, w = int(img.shape[0]), int(img.shape[1])
  small = tf.image.resize(img, [h * 3 // 4, w * 3 // 4], antialias=True)
  crop = tf.image.resize(tf.image.central_crop(img, 0.9), [h, w], antialias=True)
  as_jpeg = lambda a: tf.io.encode_jpeg(tf.cast(tf.round(a), tf.uint8), quality=90).numpy()  # noqa: E731
  return {"reencoded": tf.io.encode_jpeg(img, quality=40).numpy(), "resized": as_jpeg(small),
          "cropped": as_jpeg(crop)}


def count_above(y: np.ndarray, thresholds, block: int = 1024) -> np.ndarray:
  """[len(thresholds)] number of pairs i < j with cosine >= each threshold, block by block,
  without listing them (the benchmark's precision denominators, at any threshold)."""
  t = np.asarray(thresholds, np.float64)
  counts = np.zeros(len(t), np.int64)
  for start in range(0, len(y), block):
    s = y[start:start + block] @ y[start:].T
    upper = s[np.triu_indices(len(s), 1, s.shape[1])]   # j > i only
    counts += len(upper) - np.searchsorted(np.sort(upper), t, side="left")
  return counts


def planted_scores(found, planted: set, threshold: float) -> dict:
  """Recall and precision of `found` pairs [(i, j, score)] at `threshold` against `planted`
  pairs {(i, j)} with i < j: what the benchmark and the tests measure."""
  got = {(i, j) for i, j, s in found if s >= threshold}
  hit = len(got & planted)
  return {"threshold": threshold, "pairs": len(got), "planted": len(planted), "found": hit,
          "recall": hit / len(planted) if planted else float("nan"),
          "precision": hit / len(got) if got else float("nan")}
