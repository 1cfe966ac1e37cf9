"""k-means as tf.functions with cross-replica sums (no faiss, no shared disk).

Each replica keeps its own rows in host memory (float32 or float16). A pass (one Lloyd
iteration) sends each replica's rows to its device chunk by chunk, all local replicas at
once; a chunk is assigned there (||c||^2 - 2 x c^T and argmin; never an N x k matrix), and
its per-cluster counts and float64 sums are added to accumulators that stay on the device.
At the end of the pass one all-reduce combines them: only k*(d+1) numbers cross replicas
and the host, once a pass, as in the original's distributed k-means
(`dc_tf.clustering.replicas.DevicePass`; issue 25). The centroid update and the re-split of
empty clusters run on the host from the reduced (hence identical) sums with a seeded
generator, so every worker makes the same choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np
import tensorflow as tf

from dc_tf.clustering import replicas as replicas_lib
from dc_tf.config import UserError

EMPTY_SPLIT_EPS = 1.0 / 1024  # relative perturbation of a split centroid (as faiss)


@contextlib.contextmanager
def full_float32():
  """TF32 off inside the block, the previous setting restored after it.

  On Ampere and later GPUs TensorFlow runs float32 matmuls in TF32 by default (inputs rounded
  to 10 mantissa bits): right for the train step, wrong for k-means and PCA, whose scores
  ||c||^2 - 2 x.c subtract nearly equal numbers. Clustering runs inside this block (issue 25).
  The setting is process-wide, so the train step must not run concurrently with it.
  """
  before = tf.config.experimental.tensor_float_32_execution_enabled()
  tf.config.experimental.enable_tensor_float_32_execution(False)
  try:
    yield
  finally:
    tf.config.experimental.enable_tensor_float_32_execution(before)


class ClusteringError(UserError, ValueError):
  """k-means cannot give a meaningful answer for this input; the message says why (a
  UserError: a command prints it as one `error:` line, issue 36)."""


@dataclasses.dataclass
class KMeansResult:
  centroids: np.ndarray            # [k, d]
  assignments: list[np.ndarray]    # per local replica, int32 [n_r]
  inertia: float                   # sum of squared distances, final pass
  resplit: int                     # empty clusters re-split, all iterations
  counts: np.ndarray               # [k] final cluster sizes (global)


def assign_chunked(x: tf.Tensor, centroids: tf.Tensor, chunk_size: int):
  """(assignments int32 [n], min squared distance [n], counts f64 [k], sums f64 [k, d]),
  computed chunk by chunk: temporaries are chunk-sized, never N x k or a copy of x."""
  c_sq = tf.reduce_sum(tf.square(centroids), axis=1)
  return assign_scored(x, -2.0 * centroids, c_sq, chunk_size)


def assign_scored(x: tf.Tensor, neg2c: tf.Tensor, c_sq: tf.Tensor, chunk_size: int):
  """`assign_chunked` from the pass's constants -2c and ||c||^2 (computed once a pass).

  Scores = ||c||^2 - 2 x c^T as one matmul with a bias add (fused into the MatMul by TF's CPU
  remapper): the chunk x k score matrix is written once and read once by the argmin (issue
  17). Sums are taken in float64 from the float64 rows (the cast is chunk x d; casting a
  float32 [k, d] sum per chunk cost k x d per chunk): a running float32 sum of 10^5 rows of
  one cluster loses ~1e-4 relative, float64 keeps 1e-6 (issue 25)."""
  k = tf.shape(neg2c)[0]
  n = tf.shape(x)[0]
  num_chunks = (n + chunk_size - 1) // chunk_size
  assign_ta = tf.TensorArray(tf.int32, size=num_chunks, infer_shape=False)
  dist_ta = tf.TensorArray(x.dtype, size=num_chunks, infer_shape=False)
  counts = tf.zeros([k], tf.float64)
  sums = tf.zeros(tf.stack([k, tf.shape(x)[1]]), tf.float64)

  def body(i, assign_ta, dist_ta, counts, sums):
    chunk = x[i * chunk_size:(i + 1) * chunk_size]
    scores = tf.nn.bias_add(tf.matmul(chunk, neg2c, transpose_b=True), c_sq)
    a = tf.argmin(scores, axis=1, output_type=tf.int32)
    best = tf.gather(scores, a, batch_dims=1) + tf.reduce_sum(tf.square(chunk), axis=1)
    counts += tf.cast(tf.math.bincount(a, minlength=k, maxlength=k), tf.float64)
    sums += tf.math.unsorted_segment_sum(tf.cast(chunk, tf.float64), a, k)
    return i + 1, assign_ta.write(i, a), dist_ta.write(i, tf.maximum(best, 0.0)), counts, sums

  _, assign_ta, dist_ta, counts, sums = tf.while_loop(
      lambda i, *_: i < num_chunks, body, [0, assign_ta, dist_ta, counts, sums])
  if_empty = lambda dt: tf.zeros([0], dt)  # noqa: E731
  assignments = tf.cond(num_chunks > 0, lambda: assign_ta.concat(), lambda: if_empty(tf.int32))
  dists = tf.cond(num_chunks > 0, lambda: dist_ta.concat(), lambda: if_empty(x.dtype))
  return assignments, dists, counts, sums


def _lloyd_step(chunk, constants):
  """A replica's share of one pass (dc_tf.clustering.replicas.DevicePass): assigns the chunk;
  its counts and float64 sums are added to the accumulators on this device as sparse rows
  (a scatter-add of chunk x d, not a dense k x d delta per chunk: the pass's time grows with
  rows x k x d, not with chunks x k x d), its inertia as a number."""
  neg2c, c_sq = constants
  scores = tf.nn.bias_add(tf.matmul(chunk, neg2c, transpose_b=True), c_sq)
  a = tf.argmin(scores, axis=1, output_type=tf.int32)
  best = tf.gather(scores, a, batch_dims=1) + tf.reduce_sum(tf.square(chunk), axis=1)
  n = tf.shape(chunk)[0]
  counts = tf.IndexedSlices(tf.ones([n], tf.float64), a)
  sums = tf.IndexedSlices(tf.cast(chunk, tf.float64), a)
  inertia = tf.reduce_sum(tf.cast(tf.maximum(best, 0.0), tf.float64))[None]
  return (counts, sums, inertia), a


class DistributedKMeans:
  """k-means over rows held, in host memory, by `strategy`'s replicas.

  Nothing is copied whole: each replica's rows (float32 or float16, or a subset given as
  row indices) are fed to its device chunk by chunk, all local replicas at once; the
  per-cluster counts, sums and inertia stay on the device in float64 through the pass and
  cross replicas once per iteration (`replicas.DevicePass`). With `sample` the centroids are
  fitted on a seeded sample (the original fits on at most 3,150,000 images per process) and
  every row is assigned in a last pass. Samples and initial centroids are chosen by a seeded
  hash of each row's key (the image id; by default its global position), so the result does
  not depend on which replica holds which row.

  Args:
    strategy: a tf.distribute strategy (the default one for a single device).
    chunk_size: rows per assignment matmul.
    progress: called after each iteration (a watchdog's heartbeat), or None.
  """

  def __init__(self, strategy: tf.distribute.Strategy, chunk_size: int = 8192, progress=None):
    self.strategy = strategy
    self.chunk_size = chunk_size
    self.progress = progress
    self.replicas = replicas_lib.Replicas.of(strategy)
    self._pass = replicas_lib.DevicePass(self.replicas, _lloyd_step, chunk_size, 3)
    self.traffic = replicas_lib.Traffic()      # all passes of this object
    self.pass_traffic: list[replicas_lib.Traffic] = []

  # --- helpers -------------------------------------------------------------------------
  def sum_over_replicas(self, local_values: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Sums per-replica lists of float64 arrays over all replicas (one all-reduce)."""
    return self.replicas.sum(local_values)

  def replica_sizes(self, local_x: list[np.ndarray], local_rows=None) -> np.ndarray:
    """Rows held by every replica, in replica order (identical on all workers)."""
    local_rows = local_rows or [None] * len(local_x)
    return self.replicas.sizes([len(x) if rows is None else len(rows)
                                for x, rows in zip(local_x, local_rows)])

  def check_features(self, local_x, local_rows=None) -> tuple[int, float]:
    """(total rows, total variance); raises ClusteringError on NaN/Inf."""
    local_rows = local_rows or [None] * len(local_x)
    stats = []
    for x, rows in zip(local_x, local_rows):
      d = x.shape[1]
      n, bad, s, sq = 0.0, 0.0, np.zeros(d), np.zeros(d)
      for chunk in replicas_lib.chunks(x, rows, self.chunk_size):
        finite = np.isfinite(chunk).all(axis=1)
        clean = np.where(finite[:, None], chunk, 0.0).astype(np.float64)
        n, bad = n + len(chunk), bad + float((~finite).sum())
        s, sq = s + clean.sum(0), sq + np.square(clean).sum(0)
      stats.append([np.array([n, bad]), s, sq])
    (n, bad), s, sq = self.sum_over_replicas(stats)
    if bad:
      raise ClusteringError(f"features contain {int(bad)} rows with NaN/Inf values "
                            "(diverged training? check the loss and the learning rate)")
    n = int(n)
    variance = float(np.sum(sq / max(n, 1) - (s / max(n, 1)) ** 2)) if n else 0.0
    return n, variance

  def default_keys(self, local_x, local_rows=None) -> list[np.ndarray]:
    """Each row's global position in replica order (the key when no image id is given)."""
    sizes = self.replica_sizes(local_x, local_rows)
    first = self.replicas.first
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return [np.arange(offsets[first + i], offsets[first + i + 1], dtype=np.int64)
            for i in range(len(local_x))]

  # --- the algorithm -------------------------------------------------------------------
  def init_centroids(self, local_x, k: int, seed: int, method: str = "random",
                     sample_size: int = 20000, local_rows=None, local_keys=None) -> np.ndarray:
    """k rows of smallest seeded key ("random"), or k-means++ on the sample_size rows of
    smallest key; `local_keys` as `fit`'s."""
    local_rows = local_rows or [None] * len(local_x)
    if local_keys is None:
      local_keys = self.default_keys(local_x, local_rows)
    keys = [replicas_lib.row_keys(kk, seed) for kk in local_keys]
    n = int(self.replica_sizes(local_x, local_rows).sum())
    g = k if method == "random" else min(n, max(sample_size, k))
    sample = self.replicas.fetch(local_x, local_rows, self.replicas.smallest(keys, g), g)
    if method == "random":
      return sample
    return kmeans_plus_plus(sample, k, np.random.default_rng(seed))

  def fit(self, local_x: list[np.ndarray], k: int, iters: int, seed: int = 0,
          init: str = "random", centroids: np.ndarray | None = None,
          log_prefix: str = "kmeans", local_rows: list[np.ndarray] | None = None,
          sample: int = 0, local_keys: list[np.ndarray] | None = None) -> KMeansResult:
    """Lloyd's k-means over each replica's rows (or `local_rows` of them). `local_keys`: an
    int64 key per row (per row of `local_rows` when given; the image ids), which seeds the
    choice of samples and initial centroids. `sample` > 0 fits on about that many rows per
    replica (a keyed sample of sample x replicas rows in all), then assigns them all;
    `centroids` overrides the initialisation (tests, benchmarks)."""
    local_rows = local_rows or [None] * len(local_x)
    n, variance = self.check_features(local_x, local_rows)
    if k > n:
      raise ClusteringError(f"{log_prefix}: k={k} clusters but only {n} points")
    if n > 1 and variance <= 1e-12:
      raise ClusteringError(f"{log_prefix}: all {n} feature vectors are identical; "
                            "k-means has nothing to separate (collapsed features)")
    if local_keys is None:
      local_keys = self.default_keys(local_x, local_rows)
    fit_rows, fit_keys = local_rows, local_keys
    if sample and sample * self.replicas.total < n:
      fraction = sample * self.replicas.total / n
      picked = [replicas_lib.keyed_sample(replicas_lib.row_keys(kk, seed + 11), fraction)
                for kk in local_keys]
      fit_rows = [p if rows is None else rows[p] for p, rows in zip(picked, local_rows)]
      fit_keys = [kk[p] for p, kk in zip(picked, local_keys)]
      if int(self.replica_sizes(local_x, fit_rows).sum()) < k:   # a tiny sample
        fit_rows, fit_keys = local_rows, local_keys
    if centroids is None:
      centroids = self.init_centroids(local_x, k, seed, init, local_rows=fit_rows,
                                      local_keys=fit_keys)
    centroids = np.asarray(centroids, np.float64)
    resplit = 0
    for it in range(iters):
      counts, sums, inertia, _ = self._run(local_x, fit_rows, centroids)
      centroids, n_empty = update_centroids(centroids, counts, sums, seed, it)
      resplit += n_empty
      logging.debug("%s iter %d inertia %.6g empty %d", log_prefix, it, inertia, n_empty)
    counts, _, inertia, assign = self._run(local_x, local_rows, centroids, keep=True)
    if resplit:
      logging.info("%s: re-split %d empty clusters", log_prefix, resplit)
    return KMeansResult(centroids.astype(np.float32), assign, float(inertia), resplit,
                        counts.astype(np.int64))

  def _run(self, local_x, local_rows, centroids, keep=False):
    """One pass (`replicas.DevicePass`): every local replica assigns its rows on its device,
    accumulating counts, sums and inertia there; one cross-replica sum at the end. Returns
    (counts, sums, inertia, per-replica assignments or None)."""
    c = np.asarray(centroids, np.float32)
    k, d = c.shape
    constants = [-2.0 * c, np.sum(np.square(c, dtype=np.float64), axis=1).astype(np.float32)]
    (counts, sums, inertia), parts = self._pass(
        local_x, local_rows, constants, [[k], [k, d], [1]], keep_outputs=keep)
    self.pass_traffic.append(self._pass.traffic)
    self.traffic.add(self._pass.traffic)
    if self.progress:
      self.progress()
    assignments = None
    if keep:
      assignments = [np.concatenate(p) if p else np.zeros([0], np.int32) for p in parts]
    return counts, sums, float(inertia[0]), assignments


def update_centroids(centroids: np.ndarray, counts: np.ndarray, sums: np.ndarray,
                     seed: int, iteration: int) -> tuple[np.ndarray, int]:
  """Means of the assigned rows; each empty cluster takes a split of a non-empty one,
  chosen with probability proportional to its size (seeded by (seed, iteration), so all
  workers agree), both halves pushed apart by +-EMPTY_SPLIT_EPS."""
  new = centroids.copy()
  nonempty = counts > 0
  new[nonempty] = sums[nonempty] / counts[nonempty, None]
  counts = counts.astype(np.float64).copy()
  empty = np.flatnonzero(~nonempty)
  rng = np.random.default_rng([seed, iteration, 7])
  for j in empty:
    p = np.maximum(counts - 1, 0)
    if p.sum() == 0:
      break
    i = rng.choice(len(counts), p=p / p.sum())
    new[j] = new[i] * (1 + EMPTY_SPLIT_EPS)
    new[i] = new[i] * (1 - EMPTY_SPLIT_EPS)
    counts[j] = counts[i] / 2
    counts[i] -= counts[j]
  return new, len(empty)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding (Arthur & Vassilvitskii, 2007) on a sample."""
  centers = [x[rng.integers(len(x))]]
  d2 = np.sum((x - centers[0]) ** 2, axis=1)
  for _ in range(1, k):
    p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1.0 / len(x))
    centers.append(x[rng.choice(len(x), p=p)])
    d2 = np.minimum(d2, np.sum((x - centers[-1]) ** 2, axis=1))
  return np.stack(centers)
