"""`--clusters=K [--super=M]`: the embedded features clustered as training clusters them, and a
static page to look at the clusters.

`hierarchy.cluster` (Caron et al. 2019, Sec. 3.3: PCA-whitening, then M super-clusters and K
sub-clusters in each) on one layer's rows. Written to OUTPUT/clusters/:

  assignments.csv   row, image_id, path, super_cluster, sub_cluster, cluster (= super*K + sub)
  sizes.csv         cluster, super_cluster, sub_cluster, size (every cluster with members)
  grids/cluster-<c>.png      up to `per_grid` thumbnails of the cluster's members (row order)
  grids/query-<i>.png        a query image then its nearest neighbours (cosine on the layer)
  index.html        every cluster's grid and size, and each query with its neighbours' scores

How it scales: the page reads K x per_grid images and Q x (n + 1), never all N, and holds
thumbnails (64 px PNG grids, ~30 KB a cluster), so its size grows with the clusters, not the
photos; 5,000 images at K=100 is a 100-grid page of ~3 MB. At paper scale (K = 320,000) it
would be one page per cluster; this writes one page (not built: issue 27's note).
"""

from __future__ import annotations

import csv
import html
import json
import os

import numpy as np
import tensorflow as tf

from dc_tf.clustering import hierarchy
from dc_tf.config import UserError
from dc_tf.embed import features, inputs
from dc_tf.evaluation import pictures

SUBDIR = "clusters"


def load_features(output: str, layer: str = ""):
  """(rows, [N, D] float32 features of `layer`, manifest) from an embed output folder."""
  path = os.path.join(output, features.MANIFEST)
  if not os.path.exists(path):
    raise UserError(f"no {features.MANIFEST} in {output}: run python -m dc_tf.embed first")
  with open(path) as f:
    manifest = json.load(f)
  layers = manifest["layers"]
  layer = layer or ("probe_fc7" if "probe_fc7" in layers else layers[0])
  if layer not in layers:
    raise UserError(f"layer {layer!r} was not embedded in {output}; it has {layers}")
  x = np.concatenate([np.load(os.path.join(output, f"{layer}-{s['shard']:05d}.npy"))
                      for s in manifest["shards"]])
  with open(os.path.join(output, features.INDEX)) as f:
    rows = [inputs.row_from_index(line) for line in csv.DictReader(f)]
  if len(rows) != len(x):
    raise UserError(f"{output}: index.csv has {len(rows)} rows, {layer} has {len(x)}")
  return rows, x, manifest, layer


def nearest(x: np.ndarray, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices [Q, n], cosine scores [Q, n]) of each query's n nearest rows, best first."""
  unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
  scores = q @ unit.T
  top = np.argsort(-scores, axis=1, kind="stable")[:, :n]
  return top, np.take_along_axis(scores, top, axis=1)


def _thumbs(rows, size):
  return [pictures.thumbnail(inputs.read_bytes(r), size) for r in rows]


def make_page(output: str, k: int, m: int = 1, layer: str = "", pca_dim: int = 0,
              queries: int = 4, neighbours: int = 5, per_grid: int = 16, thumb: int = 64,
              seed: int = 0) -> str:
  """Clusters OUTPUT's features, writes the tables, grids and index.html; returns its path."""
  if k < 1 or m < 1:
    raise UserError("--clusters and --super must be >= 1")
  rows, x, _, layer = load_features(output, layer)
  n, d = x.shape
  if n < m * k:
    raise UserError(f"{n} images cannot make {m} x {k} clusters: lower --clusters/--super")
  pca_dim = pca_dim or min(256, d, n - 1)
  ids = np.array([r.image_id for r in rows], np.int64)
  a = hierarchy.cluster(tf.distribute.get_strategy(), [x], [ids], m=m, k=k,
                        pca_dim=pca_dim, seed=seed)
  where = {int(i): j for j, i in enumerate(a.image_ids)}
  at = np.array([where[int(i)] for i in ids])
  sup, sub = a.super_cluster[at], a.sub_cluster[at]
  flat = sup.astype(np.int64) * k + sub
  out = os.path.join(output, SUBDIR)
  os.makedirs(os.path.join(out, "grids"), exist_ok=True)
  with open(os.path.join(out, "assignments.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("row", "image_id", "path", "super_cluster", "sub_cluster", "cluster"))
    for j, r in enumerate(rows):
      w.writerow((j, r.image_id, r.path, int(sup[j]), int(sub[j]), int(flat[j])))
  clusters = sorted(np.unique(flat).tolist())
  sizes = {c: int((flat == c).sum()) for c in clusters}
  with open(os.path.join(out, "sizes.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("cluster", "super_cluster", "sub_cluster", "size"))
    for c in clusters:
      w.writerow((c, c // k, c % k, sizes[c]))
  sections = []
  for c in sorted(clusters, key=lambda c: (-sizes[c], c)):
    members = [rows[j] for j in np.flatnonzero(flat == c)[:per_grid]]
    name = f"grids/cluster-{c:05d}.png"
    pictures.write_png(pictures.tile(_thumbs(members, thumb)), os.path.join(out, name))
    sections.append(
        f'<section class="cluster" id="cluster-{c}"><h2>Cluster {c} '
        f'<small>(super {c // k}, sub {c % k})</small> &middot; <span class="size">{sizes[c]}'
        f'</span> images</h2><img src="{name}" alt="cluster {c}"></section>')
  picks = np.unique(np.linspace(0, n - 1, min(queries, n)).astype(int))
  top, scores = nearest(x, x[picks], min(neighbours + 1, n))
  query_html = []
  for i, (q, idx, sc) in enumerate(zip(picks, top, scores)):
    idx_sc = [(j, s) for j, s in zip(idx, sc) if j != q][:neighbours]
    name = f"grids/query-{i}.png"
    pictures.write_png(pictures.tile(_thumbs([rows[q]] + [rows[j] for j, _ in idx_sc], thumb),
                                     per_row=neighbours + 1), os.path.join(out, name))
    items = "".join(f"<li>{html.escape(rows[j].path)} <b>{s:.3f}</b></li>" for j, s in idx_sc)
    query_html.append(f'<section class="query"><h3>{html.escape(rows[q].path)}</h3>'
                      f'<img src="{name}" alt="query {i}"><ol>{items}</ol></section>')
  page = os.path.join(out, "index.html")
  with open(page, "w") as f:
    f.write(PAGE.format(n=n, layer=html.escape(layer), count=len(clusters), m=m, k=k,
                        pca_dim=pca_dim, per_grid=per_grid, clusters="\n".join(sections),
                        queries="\n".join(query_html)))
  return page


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Clusters of {n} photos</title>
<link rel="icon" href="data:,">
<style>body{{font-family:sans-serif;margin:1em}} section{{display:inline-block;vertical-align:top;
margin:0 1em 1em 0}} h2{{font-size:1em}} h3{{font-size:.9em}} small{{color:#666}}
ol{{font-size:.8em}}</style></head>
<body data-clusters="{count}">
<h1>{count} clusters of {n} photos</h1>
<p>Layer {layer}, PCA-whitened to {pca_dim} dims, {m} super-cluster(s) x {k} sub-clusters
(python -m dc_tf.embed --clusters). Clusters by size; up to {per_grid} members each, in row order.</p>
<div id="clusters">
{clusters}
</div>
<h1>Nearest neighbours (cosine)</h1>
<div id="queries">
{queries}
</div>
<script>
window.addEventListener("load", function () {{
  var bad = Array.prototype.filter.call(document.images, function (im) {{
    return !im.complete || im.naturalWidth === 0; }});
  bad.forEach(function (im) {{ console.error("image did not load: " + im.src); }});
  document.body.setAttribute("data-loaded", String(document.images.length - bad.length));
}});
</script>
</body></html>
"""
