"""Pictures of training clusters with their dominant metadata (the paper's Fig. 5): for
clusters sampled from one kept table, a grid of random members (9 by default) and, per
metadata field (user, rarest tag, 1-degree GPS cell, device), the cluster's most common value
and its purity: the share of the cluster's images with that value (images without the field
count against it). A static page, OUTPUT/index.html, with one PNG a cluster beside it.
"""

from __future__ import annotations

import collections
import html
import os

import numpy as np
import tensorflow as tf

from dc_tf.analysis import metadata
from dc_tf.analysis.colour import sample_clusters
from dc_tf.analysis.nmi import Table
from dc_tf.evaluation import pictures


def dominant(table: Table, clusters: np.ndarray, chunks, counts: dict) -> dict:
  """{cluster: {field: (value, purity, size)}} for the given clusters, streamed."""
  wanted = set(clusters.tolist())
  tallies = {c: collections.defaultdict(collections.Counter) for c in wanted}
  sizes = collections.Counter()
  for chunk in chunks:
    rows, labels = table.lookup(chunk["image_id"])
    keep = np.isin(labels, clusters)
    if not keep.any():
      continue
    rows, labels = rows[keep], labels[keep]
    sizes.update(labels.tolist())
    sub = {k: v[rows] for k, v in chunk.items()}
    for field, values in metadata.targets(sub, counts).items():
      ok = metadata.present(values)
      for c, v in zip(labels[ok].tolist(), values[ok].tolist()):
        tallies[c][field][v] += 1
  out = {}
  for c in wanted:
    out[c] = {}
    for field, tally in tallies[c].items():
      value, n = min(tally.items(), key=lambda x: (-x[1], x[0]))
      out[c][field] = (value.decode("utf-8", "replace") if isinstance(value, bytes) else value,
                       n / sizes[c], sizes[c])
  return out


def write_page(table: Table, pattern: str, output_dir: str, *, clusters: int = 12,
               members: int = 9, seed: int = 0, chunk: int = 8192) -> list[dict]:
  """OUTPUT/index.html and OUTPUT/cluster-<c>.png; returns one row a cluster shown."""
  tf.io.gfile.makedirs(output_dir)
  picked = sample_clusters(table, clusters, seed, min_size=1)
  counts = collections.Counter()
  for ch in metadata.raw_chunks(pattern, chunk):
    metadata.tag_counts(ch["tags"], counts)
  facts = dominant(table, picked, metadata.raw_chunks(pattern, chunk), counts)
  rng = np.random.default_rng(seed)
  labels, ids = np.asarray(table.labels), np.asarray(table.ids)
  shown = {c: rng.permutation(ids[labels == c])[:members] for c in picked.tolist()}
  thumbs = {i: pictures.thumbnail(enc) for i, _, enc in metadata.decoded_of(
      pattern, np.concatenate(list(shown.values())), lambda x: tf.zeros([]))}
  rows, sections = [], []
  for c in picked.tolist():
    grid = [thumbs[i] for i in shown[c] if i in thumbs]
    name = f"cluster-{c}.png"
    if grid:
      pictures.write_png(pictures.tile(grid, per_row=3), os.path.join(output_dir, name))
    row = {"cluster": c, "size": int((labels == c).sum()), "shown": len(grid)}
    items = []
    for field in metadata.FIELDS:
      value, purity, _ = facts[c].get(field, ("", 0.0, 0))
      row[field], row[f"{field}_purity"] = value, round(purity, 4)
      items.append(f'<dt>{field}</dt><dd class="{field}" data-purity="{purity:.4f}">'
                   f'{html.escape(str(value)) or "–"} <small>{100 * purity:.0f}%</small></dd>')
    rows.append(row)
    attrs = " ".join(f'data-{f}="{html.escape(str(row[f]), quote=True)}"' for f in metadata.FIELDS)
    image = f'<img src="{name}" alt="cluster {c}">' if grid else ""
    sections.append(f'<section class="cluster" data-cluster="{c}" data-size="{row["size"]}" '
                    f'{attrs}><h2>cluster {c} ({row["size"]} images)</h2>{image}'
                    f'<dl>{"".join(items)}</dl></section>')
  page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>training clusters"
          "</title><style>section{display:inline-block;margin:8px;vertical-align:top}"
          "dl{font:12px sans-serif;display:grid;grid-template-columns:auto 1fr;gap:2px 8px}"
          "dd{margin:0}</style></head><body><h1>training clusters and their "
          "dominant metadata</h1>" + "".join(sections) + "</body></html>")
  with tf.io.gfile.GFile(os.path.join(output_dir, "index.html"), "w") as f:
    f.write(page)
  return rows
