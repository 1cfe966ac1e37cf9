"""`--clusters=K [--super=M]`: the embedded features clustered as training clusters them, and a
static page that shows what each cluster is (issue 27; issue 36 items 1 and 3).

The layer's rows go through the page's space (`space.py`: --space, default pca_l2, fitted on
these rows and saved beside embed.json), then `hierarchy.cluster` (Caron et al. 2019,
Sec. 3.3: PCA-whitening, then M super-clusters and K sub-clusters in each) clusters them.
Written to OUTPUT/clusters/:

  assignments.csv   row, image_id, path, super_cluster, sub_cluster, cluster (= super*K + sub)
  sizes.csv         cluster, super_cluster, sub_cluster, size, label, label_count, purity
                    (label: the cluster's most common label; empty when the rows have none)
  shown.csv         cluster, grid (nearest | sample), position, row, path, distance: what each
                    grid shows, in tile order
  grids/cluster-<c>-nearest.png  the members nearest the cluster's centroid, nearest first, in
                    the space k-means ran in (the whitened rows hierarchy.cluster clustered),
                    as the paper's Fig. 5
  grids/cluster-<c>-sample.png   a seeded random sample of the other members
  grids/query-<i>.png            a query image then its nearest neighbours (itself excluded)
  duplicates.csv, outliers.csv   with `duplicates`: near-duplicate pairs above the threshold,
                    and the rows farthest from any other (duplicates.py)
  index.html        all of the above as thumbnails, labels, purities and scores

Labels: a row's `label_text`, else its `label` (>= 0), else its file's folder; the page shows
them when the rows have at least two different ones (a folder of class sub-folders, a
labelled list, labelled shards).

How it scales: the page reads K x 2 x per_grid images and Q x (n + 1), never all N, and holds
thumbnails (64 px PNG grids), so its size grows with the clusters, not the photos; 5,000
images at K = 100 is a 100-section page of a few MB. At paper scale (K = 320,000) it would be
one page per cluster; this writes one page (not built: issue 27's note).
"""

from __future__ import annotations

import collections
import csv
import html
import json
import os

import numpy as np
import tensorflow as tf

from dc_tf.clustering import hierarchy
from dc_tf.config import UserError
from dc_tf.embed import duplicates as dups
from dc_tf.embed import features, inputs, space as spaces
from dc_tf.evaluation import pictures

SUBDIR = "clusters"


def load_features(output: str, layer: str = ""):
  """(rows, [N, D] float32 features of `layer`, manifest, layer) from an embed output
  folder; the default layer is space.DEFAULT_LAYER, else probe_fc7, else the first."""
  path = os.path.join(output, features.MANIFEST)
  if not os.path.exists(path):
    raise UserError(f"no {features.MANIFEST} in {output}: run python -m dc_tf.embed first")
  with open(path) as f:
    manifest = json.load(f)
  layers = manifest["layers"]
  if not layer:
    layer = next((name for name in (spaces.DEFAULT_LAYER, "probe_fc7") if name in layers),
                 layers[0])
  if layer not in layers:
    raise UserError(f"layer {layer!r} was not embedded in {output}; it has {layers}")
  x = np.concatenate([np.load(os.path.join(output, f"{layer}-{s['shard']:05d}.npy"))
                      for s in manifest["shards"]])
  with open(os.path.join(output, features.INDEX)) as f:
    rows = [inputs.row_from_index(line) for line in csv.DictReader(f)]
  if len(rows) != len(x):
    raise UserError(f"{output}: index.csv has {len(rows)} rows, {layer} has {len(x)}")
  return rows, x, manifest, layer


def labels_of(rows) -> list[str] | None:
  """Each row's label (label_text, else label >= 0, else its folder), or None when the rows
  do not carry at least two different ones."""
  out = [r.label_text or (str(r.label) if r.label >= 0 else
                          os.path.basename(os.path.dirname(r.path))) for r in rows]
  return out if len(set(out)) >= 2 else None


def dominant(labels) -> tuple[str, int, float]:
  """(the most common label, its count, purity = count / len): ties go to the label first
  in sorted order."""
  counts = collections.Counter(labels)
  label, count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return label, count, count / len(labels)


def purity(assign: np.ndarray, labels) -> float:
  """Share of rows whose label is their cluster's most common one (the benchmark's)."""
  labels = np.asarray(labels)
  return sum(dominant(labels[assign == c].tolist())[1] for c in np.unique(assign)) / len(labels)


def centroid_nearest(z: np.ndarray, members: np.ndarray, n: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(the n members nearest the members' mean in z, their distances), nearest first (ties by
  row): the members that look most like the cluster, in the space it was clustered in."""
  d = np.linalg.norm(z[members] - z[members].mean(axis=0), axis=1)
  order = np.lexsort((members, d))[:n]
  return members[order], d[order]


def random_sample(members: np.ndarray, shown: np.ndarray, n: int, seed: int, cluster: int
                  ) -> np.ndarray:
  """Up to n of the members not in `shown`, drawn by a generator seeded with (seed, cluster):
  the same seed gives the same sample, and each cluster its own."""
  pool = np.setdiff1d(members, shown)
  rng = np.random.default_rng([seed, cluster])
  return rng.choice(pool, size=min(n, len(pool)), replace=False) if len(pool) else pool


def cluster_rows(y: np.ndarray, ids: np.ndarray, m: int, k: int, pca_dim: int, seed: int):
  """(flat cluster = super*k + sub [N], super [N], sub [N], z) of the space's rows y:
  hierarchy.cluster whitens them over a copy (in_place), so z is exactly the [N, pca_dim]
  rows its k-means ran on. Rows of more than pca_dim dims are first given in their top
  pca_dim principal axes (space.principal_axes): the whitening to pca_dim keeps only those,
  so k-means sees the same rows, and hierarchy.cluster's D x D moments (8k x 8k for a raw
  probe_conv4) are never formed."""
  if y.shape[1] > pca_dim:
    mean, axes, _ = spaces.principal_axes(y, pca_dim)
    y = (y - mean) @ axes
  z = np.array(y, np.float32, copy=True)
  a = hierarchy.cluster(tf.distribute.get_strategy(), [z], [ids], m=m, k=k, pca_dim=pca_dim,
                        seed=seed, in_place=True)
  where = {int(i): j for j, i in enumerate(a.image_ids)}
  at = np.array([where[int(i)] for i in ids])
  sup, sub = a.super_cluster[at], a.sub_cluster[at]
  return sup.astype(np.int64) * k + sub, sup, sub, z[:, :pca_dim]


def _thumbs(rows, size):
  return [pictures.thumbnail(inputs.read_bytes(r), size) for r in rows]


def _grid(rows, path, thumb, per_row=8):
  pictures.write_png(pictures.tile(_thumbs(rows, thumb), per_row=per_row), path)


def _files(cls, rows, picks, scores=None, fmt="{:.3f}"):
  items = "".join(
      f'<li data-row="{j}">{html.escape(rows[j].path)}'
      + (f" <b>{fmt.format(s)}</b>" if scores is not None else "") + "</li>"
      for j, s in zip(picks, scores if scores is not None else [None] * len(picks)))
  return f'<ol class="{cls}">{items}</ol>'


def make_page(output: str, k: int, m: int = 1, layer: str = "", space: str = "",
              pca_dim: int = 0, queries: int = 4, neighbours: int = 5, per_grid: int = 8,
              thumb: int = 64, seed: int = 0, duplicates: bool = False,
              threshold: float = dups.DEFAULT_THRESHOLD,
              outliers: int = dups.DEFAULT_OUTLIERS) -> str:
  """Clusters OUTPUT's features, writes the tables, grids and index.html; returns its path."""
  if k < 1 or m < 1:
    raise UserError("--clusters and --super must be >= 1")
  space = spaces.check_name(space or spaces.DEFAULT_SPACE)
  if duplicates and not -1 <= threshold <= 1:
    raise UserError(f"--duplicate_threshold is a cosine in [-1, 1], got {threshold}")
  rows, x, manifest, layer = load_features(output, layer)
  n = len(x)
  if n < m * k:
    raise UserError(f"{n} images cannot make {m} x {k} clusters: lower --clusters/--super")
  fitted = spaces.load_or_fit(output, rows, x, manifest, layer, space, pca_dim)
  y = fitted.apply(x)
  pca_dim = spaces.fit_dim(y.shape, pca_dim)   # at most n // 4 by default: see space.fit
  ids = np.array([r.image_id for r in rows], np.int64)
  flat, sup, sub, z = cluster_rows(y, ids, m, k, pca_dim, seed)
  labels = labels_of(rows)
  out = os.path.join(output, SUBDIR)
  os.makedirs(os.path.join(out, "grids"), exist_ok=True)
  with open(os.path.join(out, "assignments.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("row", "image_id", "path", "super_cluster", "sub_cluster", "cluster"))
    for j, r in enumerate(rows):
      w.writerow((j, r.image_id, r.path, int(sup[j]), int(sub[j]), int(flat[j])))
  clusters = sorted(np.unique(flat).tolist())
  members = {c: np.flatnonzero(flat == c) for c in clusters}
  label = {c: dominant([labels[j] for j in members[c]]) if labels else ("", 0, float("nan"))
           for c in clusters}
  with open(os.path.join(out, "sizes.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("cluster", "super_cluster", "sub_cluster", "size", "label", "label_count",
                "purity"))
    for c in clusters:
      lab, count, pure = label[c]
      w.writerow((c, c // k, c % k, len(members[c]), lab, count if labels else "",
                  f"{pure:.4f}" if labels else ""))
  sections, shown = [], []
  for c in sorted(clusters, key=lambda c: (-len(members[c]), c)):
    near, dist = centroid_nearest(z, members[c], per_grid)
    sample = random_sample(members[c], near, per_grid, seed, c)
    shown += [(c, "nearest", i, j, d) for i, (j, d) in enumerate(zip(near, dist))]
    shown += [(c, "sample", i, j, "") for i, j in enumerate(sample)]
    figures = []
    for grid, picks, caption in (("nearest", near, "nearest the centroid"),
                                 ("sample", sample, f"random sample (seed {seed})")):
      if len(picks):
        name = f"grids/cluster-{c:05d}-{grid}.png"
        _grid([rows[j] for j in picks], os.path.join(out, name), thumb, per_row=4)
        figures.append(f'<figure class="{grid}"><img src="{name}" alt="cluster {c}, {caption}">'
                       f'<figcaption>{caption}</figcaption></figure>')
    lab, count, pure = label[c]
    title = (f' &middot; <span class="label">{html.escape(lab)}</span> '
             f'<span class="purity">{pure:.0%}</span> ({count} of {len(members[c])})'
             if labels else "")
    sections.append(
        f'<section class="cluster" id="cluster-{c}" data-cluster="{c}" '
        f'data-size="{len(members[c])}" data-label="{html.escape(lab)}" '
        f'data-purity="{"" if not labels else f"{pure:.4f}"}"><h2>Cluster {c} '
        f'<small>(super {c // k}, sub {c % k})</small> &middot; <span class="size">'
        f'{len(members[c])}</span> images{title}</h2>{"".join(figures)}'
        f'<details><summary>files shown</summary>{_files("nearest", rows, near)}'
        f'{_files("sample", rows, sample)}</details></section>')
  with open(os.path.join(out, "shown.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("cluster", "grid", "position", "row", "path", "distance"))
    for c, grid, i, j, d in shown:
      w.writerow((c, grid, i, int(j), rows[j].path, f"{d:.6f}" if d != "" else ""))
  picks = np.unique(np.linspace(0, n - 1, min(queries, n)).astype(int))
  top, scores = spaces.top_k(y, neighbours, queries=picks)   # a query is never its own
  query_html = []
  for i, (q, idx, sc) in enumerate(zip(picks, top, scores)):
    name = f"grids/query-{i}.png"
    _grid([rows[q]] + [rows[j] for j in idx], os.path.join(out, name), thumb,
          per_row=neighbours + 1)
    query_html.append(f'<section class="query" data-row="{q}"><h3>{html.escape(rows[q].path)}'
                      f'</h3><img src="{name}" alt="query {i}">'
                      f'{_files("neighbours", rows, idx, sc)}</section>')
  extra = ""
  if duplicates:
    extra = _duplicates_section(out, rows, y, threshold, outliers, thumb)
  page = os.path.join(out, "index.html")
  with open(page, "w") as f:
    f.write(PAGE.format(n=n, layer=html.escape(layer), space=space, count=len(clusters), m=m,
                        k=k, pca_dim=pca_dim, per_grid=per_grid, seed=seed,
                        labelled="" if labels else " The rows carry no labels.",
                        clusters="\n".join(sections), queries="\n".join(query_html),
                        extra=extra))
  return page


def _duplicates_section(out, rows, y, threshold, n_outliers, thumb, shown=20) -> str:
  """duplicates.csv and outliers.csv (every pair, the n most isolated rows) and the page's
  section: the first `shown` pairs and the outliers as thumbnail pairs."""
  found = dups.pairs(y, threshold, max_pairs=100 * len(y))   # a raw space lists every pair
  lonely = dups.outliers(y, n_outliers) if len(y) >= 2 else []
  for name, head, items in (("duplicates.csv", ("row_a", "row_b", "cosine"), found),
                            ("outliers.csv", ("row", "nearest_row", "cosine"), lonely)):
    with open(os.path.join(out, name), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(head[:2] + ("path_a" if name == "duplicates.csv" else "path",
                             "path_b" if name == "duplicates.csv" else "nearest_path", head[2]))
      for a, b, s in items:
        w.writerow((a, b, rows[a].path, rows[b].path, f"{s:.6f}"))
  parts = []
  for kind, items in (("duplicate", found[:shown]), ("outlier", lonely)):
    for i, (a, b, s) in enumerate(items):
      name = f"grids/{kind}-{i}.png"
      _grid([rows[a], rows[b]], os.path.join(out, name), thumb, per_row=2)
      parts.append(f'<figure class="{kind}" data-rows="{a} {b}"><img src="{name}" '
                   f'alt="{kind} {i}"><figcaption>{html.escape(rows[a].path)} &middot; '
                   f'{html.escape(rows[b].path)} <b>{s:.3f}</b></figcaption></figure>')
  dup_html = "".join(p for p in parts if 'class="duplicate"' in p)
  out_html = "".join(p for p in parts if 'class="outlier"' in p)
  return (f'<h1>Near-duplicates</h1><p id="duplicates" data-pairs="{len(found)}">{len(found)} '
          f'pair(s) at cosine &ge; {threshold:g} (the first {min(shown, len(found))} shown; '
          f'all in duplicates.csv).</p><div class="pairs">{dup_html}</div>'
          f'<h1>Outliers</h1><p id="outliers">The {len(lonely)} photos least like any other '
          f'(lowest cosine to their nearest neighbour), each beside that neighbour; '
          f'outliers.csv.</p><div class="pairs">{out_html}</div>')


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Clusters of {n} photos</title>
<link rel="icon" href="data:,">
<style>body{{font-family:sans-serif;margin:1em}} section{{display:inline-block;vertical-align:top;
margin:0 1em 1em 0}} h2{{font-size:1em}} h3{{font-size:.9em}} small{{color:#666}}
figure{{display:inline-block;margin:0 .5em 0 0}} figcaption{{font-size:.8em;color:#444}}
ol,details{{font-size:.8em}} li{{overflow-wrap:anywhere}} .query{{max-width:28em}}
.label{{font-weight:bold}}</style></head>
<body data-clusters="{count}">
<h1>{count} clusters of {n} photos</h1>
<p>Layer {layer} in the {space} space, PCA-whitened to {pca_dim} dims, {m} super-cluster(s) x
{k} sub-clusters (python -m dc_tf.embed --clusters). Clusters by size. Left: the {per_grid}
members nearest the cluster's centroid, nearest first; right: a random sample (seed {seed}) of
its other members. Beside each cluster: its most common label and the share of its members
that carry it (purity).{labelled}</p>
<div id="clusters">
{clusters}
</div>
<h1>Nearest neighbours (cosine in the {space} space)</h1>
<div id="queries">
{queries}
</div>
{extra}
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
