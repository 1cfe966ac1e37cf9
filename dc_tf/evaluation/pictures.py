"""Cluster pictures (the paper's Figure 5): images from the largest, purest and random
clusters, each row titled with its dominant label and purity. `thumbnail`, `tile` and
`write_png` make the grids of dc_tf.embed's clusters page (issue 27)."""

from __future__ import annotations

import numpy as np

from dc_tf.data import preprocess, reader


def _images_by_id(pattern: str, image_size: int, wanted: set) -> dict:
  found = {}
  for batch in reader.build_extraction_dataset(pattern, image_size=image_size, batch_size=256):
    for i, img in zip(batch["image_id"].numpy(), batch["image"].numpy()):
      if i in wanted:
        found[i] = np.clip(img * preprocess.IMAGENET_STD + preprocess.IMAGENET_MEAN, 0, 1)
  return found


def cluster_grid(pattern: str, image_size: int, ids: np.ndarray, assign: np.ndarray,
                 labels: np.ndarray, path: str, rows_each: int = 2, per_row: int = 8,
                 seed: int = 0) -> list[dict]:
  """Writes the grid PNG; returns the rows shown (cluster, kind, size, label, purity)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rng = np.random.default_rng(seed)
  clusters = np.unique(assign)
  size = {c: int((assign == c).sum()) for c in clusters}
  def dominant(c):
    lab = labels[assign == c]
    values, counts = np.unique(lab, return_counts=True)
    return int(values[counts.argmax()]), float(counts.max() / len(lab))
  purity = {c: dominant(c) for c in clusters}
  chosen = []
  for kind, order in (("largest", sorted(clusters, key=lambda c: -size[c])),
                      ("purest", sorted([c for c in clusters if size[c] >= 3],
                                        key=lambda c: -purity[c][1])),
                      ("random", list(rng.permutation(clusters)))):
    for c in [c for c in order if c not in [x["cluster"] for x in chosen]][:rows_each]:
      chosen.append({"cluster": int(c), "kind": kind, "size": size[c],
                     "label": purity[c][0], "purity": round(purity[c][1], 3)})
  members = {r["cluster"]: rng.permutation(ids[assign == r["cluster"]])[:per_row] for r in chosen}
  images = _images_by_id(pattern, image_size, {i for m in members.values() for i in m})
  fig, axes = plt.subplots(len(chosen), per_row, figsize=(per_row * 1.1, len(chosen) * 1.3),
                           squeeze=False)
  for r, row in enumerate(chosen):
    for j in range(per_row):
      ax = axes[r, j]
      ax.axis("off")
      m = members[row["cluster"]]
      if j < len(m) and m[j] in images:
        ax.imshow(images[m[j]])
    axes[r, 0].set_title(f"{row['kind']} #{row['cluster']} n={row['size']} "
                         f"label {row['label']} purity {row['purity']:.2f}", fontsize=7, loc="left")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return chosen


def thumbnail(data: bytes, size: int = 64) -> np.ndarray:
  """uint8 [size, size, 3]: the image scaled to fit, centred on grey (the clusters page's
  grids hold thumbnails, never full images: issue 27)."""
  import tensorflow as tf
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  small = tf.image.resize(image, [size, size], preserve_aspect_ratio=True, antialias=True)
  small = np.asarray(tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8))
  out = np.full((size, size, 3), 128, np.uint8)
  top, left = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
  out[top:top + small.shape[0], left:left + small.shape[1]] = small
  return out


def tile(thumbs: list[np.ndarray], per_row: int = 8, gap: int = 2) -> np.ndarray:
  """Thumbnails side by side, `per_row` a row, on white; uint8 [H, W, 3]."""
  size = thumbs[0].shape[0]
  rows = -(-len(thumbs) // per_row)
  cols = min(per_row, len(thumbs))
  out = np.full((rows * (size + gap) - gap, cols * (size + gap) - gap, 3), 255, np.uint8)
  for i, t in enumerate(thumbs):
    r, c = divmod(i, per_row)
    out[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = t
  return out


def write_png(image: np.ndarray, path: str) -> None:
  import tensorflow as tf
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(tf.io.encode_png(image).numpy())
