"""The space embedded features are compared in: what the clusters page, its neighbours and
near-duplicates, and `python -m dc_tf.neighbours` all go through (issue 36 item 2).

  raw         the layer's features as embedded, compared by cosine (what the page did before:
              on ReLU features every cosine is 0.99-1.00, issue 36)
  centred_l2  minus the mean of the embedded rows, then L2-normalised: cosine of the centred
              features
  pca_l2      PCA-whitened (to `dim`, default min(256, dims, rows // 4)) then L2-normalised,
              as training treats features before k-means (Caron et al. 2019, Sec. 3.3) and as
              instance retrieval whitens descriptors

Every space gives unit rows, so a score is always a cosine in [-1, 1] and the duplicate
threshold means the same thing in each. The fit (the mean, the whitening) is made on the
embedded rows and saved next to embed.json, as OUTPUT/space-<layer>.npz with a line in
OUTPUT/spaces.json (the embedded rows' digest and the export's sha256): a later query
through `python -m dc_tf.neighbours` is projected by the same fit, and a fit whose rows or
export changed is made again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from dc_tf.config import UserError

SPACES = ("raw", "centred_l2", "pca_l2")
# Defaults chosen on the choosing half of benchmarks/photo_clusters.py (Tiny ImageNet val,
# the 100 classes at even positions by wnid, 50 photos each; the demo export), the best
# precision@10 of 7 layers x 3 spaces: probe_conv4 centred_l2, 0.034 (probe_fc7 raw, the old
# default: 0.015; chance 0.010). On the reporting half (the other 100 classes) it is the best
# precision@5 (0.041) and its clusters' NMI 0.242 is 0.011 under the best (probe_conv10 raw);
# benchmarks/results/photo_clusters.json, 2026-12-06.
DEFAULT_LAYER = "probe_conv4"
DEFAULT_SPACE = "centred_l2"
DEFAULT_DIM = 256
EIGEN_FLOOR = 1e-5    # as dc_tf.clustering.pca: eigenvalues floored at max * 1e-5
FILE = "space-{layer}.npz"
INDEX = "spaces.json"


class SpaceError(UserError, ValueError):
  """A bad --space or an unusable fit; the message names the flag or the file."""


def check_name(name: str) -> str:
  if name not in SPACES:
    raise SpaceError(f"--space must be one of {', '.join(SPACES)}, got {name!r}")
  return name


def unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclasses.dataclass
class Space:
  """A fitted transform: `apply(x)` maps [N, D] features of `layer` to unit rows [N, p]."""
  name: str
  layer: str
  mean: np.ndarray          # [D]; zeros for raw
  projection: np.ndarray    # [D, p]; pca_l2 only (eigenvectors * eigenvalue^-0.5), else [D, 0]
  eigenvalues: np.ndarray   # [p]

  @property
  def dims(self) -> int:
    return self.projection.shape[1] if self.name == "pca_l2" else len(self.mean)

  def apply(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != len(self.mean):
      raise SpaceError(f"{self.layer} rows have shape {x.shape}, the {self.name} fit "
                       f"expects [N, {len(self.mean)}]")
    if self.name == "raw":
      return unit(x)
    y = x - self.mean.astype(np.float32)
    if self.name == "pca_l2":
      y = y @ self.projection.astype(np.float32)
    return unit(y)


def fit_dim(shape, dim: int = 0) -> int:
  """pca_l2's dims for [N, D] rows: `dim` (at most D and N - 1), default min(256, D, N // 4)."""
  n, d = shape
  return min(dim, d, n - 1) if dim else min(DEFAULT_DIM, d, max(1, n // 4))


def principal_axes(x: np.ndarray, dim: int):
  """(mean [D] float64, the top `dim` principal directions [D, dim], their variances [dim])
  of rows x [N, D], in float64, only the top `dim` eigenpairs computed (scipy's subset
  eigh): from the N x N Gram matrix of the centred rows when N <= D (at most N - 1
  directions carry variance; an 8,192-dim layer of 1,500 photos needs no 8k x 8k
  eigendecomposition), else from the D x D covariance."""
  from scipy import linalg
  n, d = x.shape
  mean = x.mean(axis=0, dtype=np.float64)
  centred = x.astype(np.float64) - mean
  small = n <= d
  m = centred @ centred.T if small else centred.T @ centred
  values, vectors = linalg.eigh(m, subset_by_index=[len(m) - dim, len(m) - 1])
  values, vectors = np.maximum(values[::-1], 0.0), vectors[:, ::-1]
  if small:   # u_i of the Gram matrix -> v_i = X^T u_i / sqrt(lambda_i), unit length
    vectors = centred.T @ vectors / np.sqrt(np.maximum(values, 1e-30))
  return mean, vectors, values / n


def fit(name: str, layer: str, x: np.ndarray, dim: int = 0) -> Space:
  """The `name` space of `layer` fitted on its rows `x` [N, D] (pca_l2: `principal_axes`,
  each scaled by its variance^-0.5, floored as dc_tf.clustering.pca floors). The default
  dim is at most a quarter of the rows: N rows whitened to N - 1 dims are a regular simplex,
  every cosine -1/(N - 1), and near-duplicates are no nearer than strangers."""
  check_name(name)
  x = np.asarray(x, np.float32)
  n, d = x.shape
  if name == "raw":
    return Space(name, layer, np.zeros(d, np.float32), np.zeros((d, 0), np.float32),
                 np.zeros(0, np.float32))
  mean = x.mean(axis=0, dtype=np.float64)
  if name == "centred_l2":
    return Space(name, layer, mean.astype(np.float32), np.zeros((d, 0), np.float32),
                 np.zeros(0, np.float32))
  if n < 2:
    raise SpaceError(f"pca_l2 needs at least 2 rows of {layer}, got {n}: use --space=raw")
  _, vectors, eigenvalues = principal_axes(x, fit_dim(x.shape, dim))
  floored = np.maximum(eigenvalues, max(eigenvalues.max(), 0.0) * EIGEN_FLOOR + 1e-30)
  return Space(name, layer, mean.astype(np.float32), (vectors * floored ** -0.5).astype(np.float32),
               eigenvalues.astype(np.float32))


def _read_index(output: str) -> dict:
  path = os.path.join(output, INDEX)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def save(output: str, space: Space, digest: str, model_sha256: str) -> str:
  """Writes OUTPUT/space-<layer>.npz (renamed into place) and its line in spaces.json."""
  path = os.path.join(output, FILE.format(layer=space.layer))
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, name=space.name, layer=space.layer, mean=space.mean,
           projection=space.projection, eigenvalues=space.eigenvalues)
  os.replace(tmp, path)
  index = _read_index(output)
  index[space.layer] = {"space": space.name, "file": os.path.basename(path), "dims": space.dims,
                        "rows_digest": digest, "model_sha256": model_sha256}
  tmp = os.path.join(output, f"{INDEX}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(index, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(output, INDEX))
  return path


def load(output: str, layer: str) -> tuple[Space, dict] | None:
  """(the saved fit of `layer`, its spaces.json line), or None when none was saved."""
  entry = _read_index(output).get(layer)
  if entry is None:
    return None
  path = os.path.join(output, entry["file"])
  try:
    with np.load(path, allow_pickle=False) as z:
      space = Space(str(z["name"]), str(z["layer"]), z["mean"], z["projection"], z["eigenvalues"])
  except (OSError, KeyError, ValueError) as e:
    raise SpaceError(f"{path} is not a readable space fit ({e}): delete it to fit again") from None
  return space, entry


def load_or_fit(output: str, rows, x: np.ndarray, manifest: dict, layer: str, name: str,
                dim: int = 0) -> Space:
  """The saved `name` fit of `layer` when it was made on these rows by this export (and,
  for pca_l2, to this dim), else a new fit, saved."""
  from dc_tf.embed import features
  check_name(name)
  digest = features.rows_digest(rows)   # what the fit was made on: ids, hashes, paths
  saved = load(output, layer)
  if saved is not None:
    space, entry = saved
    same = (space.name == name and entry["rows_digest"] == digest
            and entry["model_sha256"] == manifest.get("model_sha256")
            and (name != "pca_l2" or space.dims == fit_dim(x.shape, dim)))
    if same:
      return space
    logging.info("refitting the %s space of %s: the saved fit is %s of other rows or export",
                 name, layer, space.name)
  space = fit(name, layer, x, dim)
  save(output, space, digest, manifest.get("model_sha256", ""))
  return space


def top_k(y: np.ndarray, k: int, queries: np.ndarray | None = None, exclude_self: bool = True,
          block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(indices [Q, k], scores [Q, k]) of each query's k best rows of unit rows `y` by inner
  product, best first (ties by row). `queries` are row numbers of y (default all rows),
  excluded from their own lists when `exclude_self`. Block by block: [block, N] scores at a
  time, never [N, N]."""
  qs = np.arange(len(y)) if queries is None else np.asarray(queries, np.int64)
  k = min(k, len(y) - (1 if exclude_self else 0))
  idx = np.zeros((len(qs), k), np.int64)
  scores = np.zeros((len(qs), k), np.float32)
  for start in range(0, len(qs), block):
    q = qs[start:start + block]
    s = y[q] @ y.T
    if exclude_self:
      s[np.arange(len(q)), q] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    idx[start:start + len(q)] = top
    scores[start:start + len(q)] = np.take_along_axis(s, top, axis=1)
  return idx, scores


def precision_at(y: np.ndarray, labels: np.ndarray, ks=(5, 10)) -> dict:
  """Leave-one-out precision@k: the share of each row's k nearest other rows with its label,
  averaged over rows."""
  labels = np.asarray(labels)
  idx, _ = top_k(y, max(ks))
  same = labels[idx] == labels[:, None]
  return {k: float(same[:, :k].mean()) for k in ks}
