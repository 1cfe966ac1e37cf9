"""NMI of a run's training assignments with the images' metadata, over training (Fig. 4).

Every kept table (MODEL_DIR/assignments/table-<epoch>.npy) is scored against user id, rarest
tag, 1-degree GPS cell, device and, with a supervised export, its confident ImageNet label,
with `evaluator.cluster_quality`'s definitions (`dc_tf.analysis.metadata`). The shards are
streamed: each chunk's (cluster, value) pairs are counted, never kept as rows, so memory is
O(#distinct (cluster, value) pairs) per table and field (at most min(N, k x #values)), plus
the tables themselves, memory-mapped. NMI is the arithmetic-mean normalisation, as
`metrics.cluster_scores` (sklearn's default): 2 I(C; V) / (H(C) + H(V)), over the images
that have the field.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import tensorflow as tf
from scipy import sparse
from sklearn import metrics as skm

from dc_tf.analysis import metadata

VALUE_BITS = 32       # a pair is cluster << 32 | value code: k and #values below 2^32


class Contingency:
  """Streaming counts of (cluster, value) pairs; `nmi()` from the counts alone."""

  def __init__(self):
    self.codes: dict = {}                        # value -> int code, O(#distinct values)
    self.keys = np.zeros([0], np.int64)          # sorted distinct pairs
    self.counts = np.zeros([0], np.int64)
    self._pending: list[tuple[np.ndarray, np.ndarray]] = []
    self._pending_rows = 0

  def add(self, clusters: np.ndarray, values: np.ndarray) -> None:
    if not len(values):
      return
    uniq, inverse = np.unique(values, return_inverse=True)
    lookup = np.array([self.codes.setdefault(v, len(self.codes)) for v in uniq.tolist()],
                      np.int64)
    pairs = (np.asarray(clusters, np.int64) << VALUE_BITS) | lookup[inverse.ravel()]
    keys, counts = np.unique(pairs, return_counts=True)
    self._pending.append((keys, counts))
    self._pending_rows += len(keys)
    if self._pending_rows > max(len(self.keys), 1 << 20):   # amortised merge
      self._merge()

  def _merge(self) -> None:
    if not self._pending:
      return
    keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
    counts = np.concatenate([self.counts] + [c for _, c in self._pending])
    self.keys, inverse = np.unique(keys, return_inverse=True)
    self.counts = np.bincount(inverse.ravel(), weights=counts).astype(np.int64)
    self._pending, self._pending_rows = [], 0

  def total(self) -> int:
    self._merge()
    return int(self.counts.sum())

  def table(self) -> sparse.csr_matrix:
    """clusters x values counts (cluster ids and value codes compacted)."""
    self._merge()
    _, rows = np.unique(self.keys >> VALUE_BITS, return_inverse=True)
    _, cols = np.unique(self.keys & ((1 << VALUE_BITS) - 1), return_inverse=True)
    return sparse.csr_matrix((self.counts, (rows.ravel(), cols.ravel())))

  def nmi(self) -> float:
    return nmi_from_counts(self.table())


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def nmi_from_counts(table) -> float:
  """Arithmetic-mean NMI from a clusters x values contingency table, as
  sklearn.metrics.normalized_mutual_info_score gives on the rows (1.0 when neither side is
  split, as sklearn)."""
  table = sparse.csr_matrix(table)
  if table.shape[0] <= 1 and table.shape[1] <= 1 or not table.sum():
    return 1.0
  mi = skm.mutual_info_score(None, None, contingency=table)
  h = (_entropy(np.asarray(table.sum(axis=1)).ravel())
       + _entropy(np.asarray(table.sum(axis=0)).ravel())) / 2
  return float(mi / max(h, np.finfo(np.float64).eps))


class Table:
  """One id -> cluster table: ids sorted (as the trainer keeps them), labels in their order."""

  def __init__(self, name, ids: np.ndarray, labels: np.ndarray):
    self.name, self.ids, self.labels = name, ids, labels

  def lookup(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `image_ids` the table holds, their clusters)."""
    pos = np.searchsorted(self.ids, image_ids)
    pos = np.minimum(pos, len(self.ids) - 1)
    hit = self.ids[pos] == image_ids
    return np.flatnonzero(hit), np.asarray(self.labels[pos[hit]])


def kept_tables(run_dir: str) -> list[Table]:
  """The run's kept tables, memory-mapped where they are local files."""
  from dc_tf.training import checkpointing
  epochs = checkpointing.assignment_epochs(run_dir)
  if not epochs:
    raise checkpointing.CheckpointError(
        f"no assignment tables in {os.path.join(run_dir, checkpointing.ASSIGNMENTS)}: the run "
        "kept none (trained before --keep_assignments, or not a clustering run)")
  folder = os.path.join(run_dir, checkpointing.ASSIGNMENTS)
  tables = []
  for e in epochs:
    if "://" in run_dir:
      tables.append(Table(e, *checkpointing.load_assignments(run_dir, e)))
      continue
    own = os.path.join(folder, f"ids-{e}.npy")
    ids = np.load(own if os.path.exists(own) else os.path.join(folder, "ids.npy"), mmap_mode="r")
    path = os.path.join(folder, f"table-{e}.npy")
    labels = np.load(path, mmap_mode="r")
    if len(ids) != len(labels):      # as load_assignments refuses it
      raise checkpointing.CheckpointError(f"{path} has {len(labels)} rows, its ids {len(ids)}")
    tables.append(Table(e, ids, labels))
  return tables


def score(tables: list[Table], chunks, counts: dict) -> dict:
  """{table name: {field: {"nmi", "images"}}} over the streamed `chunks` (`metadata`'s),
  every table scored in the same pass."""
  acc = {t.name: {} for t in tables}
  for chunk in chunks:
    fields = metadata.targets(chunk, counts)
    for t in tables:
      rows, clusters = t.lookup(chunk["image_id"])
      for field, values in fields.items():
        values = values[rows]
        keep = metadata.present(values)
        acc[t.name].setdefault(field, Contingency()).add(clusters[keep], values[keep])
  out = {}
  for name, fields in acc.items():
    out[name] = {f: {"nmi": c.nmi(), "images": c.total()}
                 for f, c in fields.items() if c.total() > 1}
  return out


def write(scores: dict, reference: dict | None, output_dir: str) -> dict:
  """nmi.csv, nmi.md and nmi.png (Fig. 4: NMI per field over the reassignment epochs, the
  reference's as dashed lines). Returns the paths."""
  tf.io.gfile.makedirs(output_dir)
  fields = sorted({f for s in [*scores.values(), *(reference or {}).values()] for f in s},
                  key=lambda f: (metadata.FIELDS + (f,)).index(f))
  rows = [(str(e), s) for e, s in sorted(scores.items())]
  rows += [(f"reference {name}", s) for name, s in (reference or {}).items()]
  paths = {k: os.path.join(output_dir, f"nmi.{k}") for k in ("csv", "md", "png")}
  with tf.io.gfile.GFile(paths["csv"], "w") as f:
    w = csv.writer(f)
    w.writerow(["epoch", *fields, *(f"{x}_images" for x in fields)])
    for name, s in rows:
      w.writerow([name, *(f"{s[x]['nmi']:.6f}" if x in s else "" for x in fields),
                  *(s[x]["images"] if x in s else "" for x in fields)])
  lines = ["| epoch | " + " | ".join(fields) + " |", "|---|" + "---:|" * len(fields)]
  lines += [f"| {name} | " + " | ".join(f"{s[x]['nmi']:.3f}" if x in s else "–" for x in fields)
            + " |" for name, s in rows]
  with tf.io.gfile.GFile(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  _plot(scores, reference or {}, fields, paths["png"])
  return paths


def _plot(scores, reference, fields, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  epochs = sorted(scores)
  for i, field in enumerate(fields):
    colour = f"C{i}"
    ys = [scores[e][field]["nmi"] if field in scores[e] else np.nan for e in epochs]
    ax.plot(epochs, ys, "o-", color=colour, label=field)
    for name, s in reference.items():
      if field in s:
        ax.axhline(s[field]["nmi"], color=colour, ls="--", lw=1)
  ax.set_xlabel("epoch of the reassignment")
  ax.set_ylabel("NMI")
  ax.set_title("training clusters vs metadata (dashed: reference)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  with tf.io.gfile.GFile(path, "wb") as f:
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)
