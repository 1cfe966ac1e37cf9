"""Metrics on features and clusters: kNN, NMI / ARI / purity, pooling for probes."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _weighted_votes(sims: np.ndarray, neighbour_labels: np.ndarray, num_classes: int,
                    temperature: float) -> np.ndarray:
  weights = np.exp(sims / temperature)
  votes = np.zeros([len(sims), num_classes], np.float64)
  np.add.at(votes, (np.repeat(np.arange(len(sims)), sims.shape[1]), neighbour_labels.ravel()),
            weights.ravel())
  return votes.argmax(axis=1)


def knn_predict(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07,
                chunk: int = 1024, exclude_self: bool = False) -> np.ndarray:
  """Cosine kNN with temperature-weighted votes (Wu et al., 2018, as used by DINO).

  train_x / test_x: [n, d] arrays or `feature_store.LayerRows` (features on disk). A block
  of `chunk` test rows keeps a running top-k while the train rows go by in blocks of
  `chunk`: memory is chunk x (d + chunk + k), not the train set (issue 35), and the train
  rows are read once per test block."""
  train_y = np.asarray(train_y)
  num_classes = int(train_y.max()) + 1
  k = min(k, len(train_x) - int(exclude_self))
  preds = []
  for start in range(0, len(test_x), chunk):
    query = l2_normalize(test_x[start:start + chunk])
    rows = np.arange(len(query))
    best_s = np.zeros([len(query), 0], np.float32)
    best_i = np.zeros([len(query), 0], np.int64)
    for t0 in range(0, len(train_x), chunk):
      sims = query @ l2_normalize(train_x[t0:t0 + chunk]).T
      if exclude_self:   # query row start + r is train row start + r
        hit = (start + rows >= t0) & (start + rows < t0 + sims.shape[1])
        sims[rows[hit], start + rows[hit] - t0] = -np.inf
      cand_s = np.concatenate([best_s, sims], axis=1)
      cand_i = np.concatenate([best_i, np.broadcast_to(
          np.arange(t0, t0 + sims.shape[1]), sims.shape)], axis=1)
      if cand_s.shape[1] > k:
        keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        cand_s, cand_i = (np.take_along_axis(c, keep, axis=1) for c in (cand_s, cand_i))
      best_s, best_i = cand_s, cand_i
    preds.append(_weighted_votes(best_s, train_y[best_i], num_classes, temperature))
  return np.concatenate(preds)


def knn_top1(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07) -> float:
  return float(np.mean(knn_predict(train_x, train_y, test_x, k, temperature) == np.asarray(test_y)))


def knn_leave_one_out(x, y, k: int = 20, temperature: float = 0.07) -> float:
  """Top-1 of each point's k nearest others (a quick probe on one labelled set)."""
  return float(np.mean(knn_predict(x, y, x, k, temperature, exclude_self=True) == np.asarray(y)))


def purity(labels_true, labels_pred) -> float:
  """Share of points whose cluster's majority label is their own."""
  table = skm.cluster.contingency_matrix(labels_true, labels_pred)
  return float(table.max(axis=0).sum() / table.sum())


def cluster_scores(labels_true, labels_pred) -> dict:
  """NMI / ARI / purity. Labels of any sortable kind (the shards' user ids, tags, GPS cells
  and devices are bytes, which scikit-learn 1.9 refuses) are scored by their integer codes."""
  labels_true = np.unique(np.asarray(labels_true), return_inverse=True)[1].ravel()
  labels_pred = np.unique(np.asarray(labels_pred), return_inverse=True)[1].ravel()
  return {"nmi": float(skm.normalized_mutual_info_score(labels_true, labels_pred)),
          "ari": float(skm.adjusted_rand_score(labels_true, labels_pred)),
          "purity": purity(labels_true, labels_pred)}


def pool_stride(h: int, w: int, c: int, max_dim: int = 10000) -> int:
  """The smallest stride-s window whose average pooling brings an [h, w, c] map under
  `max_dim` values (the serving export pools with the same s)."""
  s = 1
  while (h // s) * (w // s) * c >= max_dim and s < max(h, w):
    s += 1
  return s


def pool_until(feature_map: np.ndarray, max_dim: int = 10000) -> tuple[np.ndarray, int]:
  """Average-pools an [N, H, W, C] map with the smallest stride-s window that brings
  H' * W' * C under max_dim (the paper's probe protocol); returns (flat features, s)."""
  if feature_map.ndim == 2:
    return feature_map, 1
  n, h, w, c = feature_map.shape
  s = pool_stride(h, w, c, max_dim)
  hh, ww = h // s, w // s
  cropped = feature_map[:, :hh * s, :ww * s, :]
  pooled = cropped.reshape(n, hh, s, ww, s, c).mean(axis=(2, 4))
  return pooled.reshape(n, -1), s
