"""The colour spread of clusters (the paper's Figs. 6-7): do clusters group by colour?

Definition. Each image's colour is its mean RGB, mu_i in [0, 1]^3 (the decoded image, every
pixel). A cluster C's colour standard deviation is the root mean squared Euclidean distance of
its members' colours to the cluster's mean colour:

    sigma_C = sqrt( 1/|C| * sum_{i in C} || mu_i - mean_{j in C} mu_j ||^2 ),

accumulated per cluster from sums (sum mu_i, sum ||mu_i||^2, |C|), so only the sampled
clusters' members are decoded and memory is O(#sampled clusters). `--clusters` clusters of at
least 2 members are drawn at random (seeded; 3,000 in the paper) from the run's table and,
with `--reference`, as many from the reference's; each set's sigmas are sorted and plotted
(Fig. 6), and the members of the lowest-sigma clusters tiled (Fig. 7).
"""

from __future__ import annotations

import csv
import os

import numpy as np
import tensorflow as tf

from dc_tf.analysis import metadata
from dc_tf.analysis.nmi import Table
from dc_tf.evaluation import pictures


def sample_clusters(table: Table, count: int, seed: int, min_size: int = 2) -> np.ndarray:
  """`count` cluster ids of at least `min_size` members, drawn at random (all if fewer)."""
  ids, sizes = np.unique(np.asarray(table.labels), return_counts=True)
  eligible = ids[sizes >= min_size]
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(eligible, min(count, len(eligible)), replace=False))


def mean_rgb(image: tf.Tensor) -> tf.Tensor:
  return tf.reduce_mean(tf.cast(image, tf.float32), axis=[0, 1]) / 255.0


def colour_std(table: Table, clusters: np.ndarray, pattern: str) -> dict[int, float]:
  """{cluster: sigma} of the given clusters (module docstring), their members streamed."""
  members = np.isin(np.asarray(table.labels), clusters)
  ids, labels = np.asarray(table.ids)[members], np.asarray(table.labels)[members]
  of = dict(zip(ids.tolist(), labels.tolist()))
  index = {c: i for i, c in enumerate(clusters.tolist())}
  sums = np.zeros((len(clusters), 3))
  squares, counts = np.zeros(len(clusters)), np.zeros(len(clusters))
  for image_id, mu, _ in metadata.decoded_of(pattern, ids, mean_rgb):
    i = index[of[image_id]]
    sums[i] += mu
    squares[i] += float(mu @ mu)
    counts[i] += 1
  out = {}
  for c, i in index.items():
    if counts[i]:
      mean = sums[i] / counts[i]
      out[c] = float(np.sqrt(max(squares[i] / counts[i] - mean @ mean, 0.0)))
  return out


def lowest_grid(table: Table, stds: dict, pattern: str, path: str, clusters: int = 4,
                per_cluster: int = 9, seed: int = 0) -> list[int]:
  """Fig. 7: the members (up to `per_cluster`, seeded) of the `clusters` lowest-sigma
  clusters, a row each; returns the clusters shown."""
  low = sorted(stds, key=lambda c: (stds[c], c))[:clusters]
  rng = np.random.default_rng(seed)
  labels, ids = np.asarray(table.labels), np.asarray(table.ids)
  chosen = {c: rng.permutation(ids[labels == c])[:per_cluster] for c in low}
  thumbs = {i: pictures.thumbnail(enc) for i, _, enc in metadata.decoded_of(
      pattern, np.concatenate(list(chosen.values())), lambda x: tf.zeros([]))}
  rows = [pictures.tile([thumbs[i] for i in chosen[c] if i in thumbs], per_row=per_cluster)
          for c in low]
  width = max(r.shape[1] for r in rows)
  pad = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
  pictures.write_png(np.concatenate(pad), path)
  return low


def write(ours: dict, reference: dict | None, output_dir: str) -> dict:
  """colour_std.csv (cluster, sigma, which) and colour_std.png (Fig. 6: sorted sigmas)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tf.io.gfile.makedirs(output_dir)
  paths = {k: os.path.join(output_dir, f"colour_std.{k}") for k in ("csv", "png")}
  sets = {"ours": ours, **({"reference": reference} if reference else {})}
  with tf.io.gfile.GFile(paths["csv"], "w") as f:
    w = csv.writer(f)
    w.writerow(["run", "cluster", "colour_std"])
    for name, stds in sets.items():
      for c, s in sorted(stds.items(), key=lambda x: x[1]):
        w.writerow([name, c, f"{s:.6f}"])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, stds in sets.items():
    ax.plot(np.sort(list(stds.values())), label=f"{name} ({len(stds)} clusters)")
  ax.set_xlabel("clusters, sorted")
  ax.set_ylabel("colour standard deviation")
  ax.legend(fontsize=7)
  fig.tight_layout()
  with tf.io.gfile.GFile(paths["png"], "wb") as f:
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)
  return paths
