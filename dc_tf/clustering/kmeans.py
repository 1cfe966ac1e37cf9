"""k-means as tf.functions with cross-replica sums (no faiss, no shared disk).

Each replica keeps its own rows. An iteration assigns them in chunks (||c||^2 - 2 x c^T
and argmin; never an N x k matrix for the whole shard), accumulates per-cluster counts
and sums, and all-reduces those: only k*(d+1) numbers cross the network, as in the
original's distributed k-means. The centroid update and the re-split of empty clusters
run on the host from the reduced (hence identical) sums with a seeded generator, so
every worker makes the same choice.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf

from dc_tf import distribute as dist

EMPTY_SPLIT_EPS = 1.0 / 1024  # relative perturbation of a split centroid (as faiss)


class ClusteringError(ValueError):
  """k-means cannot give a meaningful answer for this input; the message says why."""


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
  k = tf.shape(centroids)[0]
  c_sq = tf.reduce_sum(tf.square(centroids), axis=1)
  n = tf.shape(x)[0]
  num_chunks = (n + chunk_size - 1) // chunk_size
  assign_ta = tf.TensorArray(tf.int32, size=num_chunks, infer_shape=False)
  dist_ta = tf.TensorArray(x.dtype, size=num_chunks, infer_shape=False)
  counts = tf.zeros([k], tf.float64)
  sums = tf.zeros(tf.stack([k, tf.shape(x)[1]]), tf.float64)

  def body(i, assign_ta, dist_ta, counts, sums):
    chunk = x[i * chunk_size:(i + 1) * chunk_size]
    scores = c_sq[None, :] - 2.0 * tf.matmul(chunk, centroids, transpose_b=True)
    a = tf.argmin(scores, axis=1, output_type=tf.int32)
    best = tf.gather(scores, a, batch_dims=1) + tf.reduce_sum(tf.square(chunk), axis=1)
    counts += tf.cast(tf.math.bincount(a, minlength=k, maxlength=k), tf.float64)
    sums += tf.cast(tf.math.unsorted_segment_sum(chunk, a, k), tf.float64)
    return i + 1, assign_ta.write(i, a), dist_ta.write(i, tf.maximum(best, 0.0)), counts, sums

  _, assign_ta, dist_ta, counts, sums = tf.while_loop(
      lambda i, *_: i < num_chunks, body, [0, assign_ta, dist_ta, counts, sums])
  if_empty = lambda dt: tf.zeros([0], dt)  # noqa: E731
  assignments = tf.cond(num_chunks > 0, lambda: assign_ta.concat(), lambda: if_empty(tf.int32))
  dists = tf.cond(num_chunks > 0, lambda: dist_ta.concat(), lambda: if_empty(x.dtype))
  return assignments, dists, counts, sums


def _replica_step(x, centroids, chunk_size):
  """Per replica: assign its rows, then all-reduce counts, sums and inertia."""
  a, d, counts, sums = assign_chunked(x, centroids, chunk_size)
  inertia = tf.reduce_sum(tf.cast(d, tf.float64))
  ctx = tf.distribute.get_replica_context()
  counts, sums, inertia = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [counts, sums, inertia])
  return counts, sums, inertia, a


def _chunked_stats(x, chunk_size):
  """(rows, non-finite rows, sum, sum of squares) in float64, chunk by chunk."""
  d = tf.shape(x)[1]
  n = tf.shape(x)[0]

  def body(i, bad, s, sq):
    chunk = x[i:i + chunk_size]
    finite = tf.reduce_all(tf.math.is_finite(chunk), axis=1)
    clean = tf.where(finite[:, None], chunk, 0.0)
    return (i + chunk_size, bad + tf.reduce_sum(tf.cast(~finite, tf.float64)),
            s + tf.cast(tf.reduce_sum(clean, 0), tf.float64),
            sq + tf.cast(tf.reduce_sum(tf.square(clean), 0), tf.float64))

  _, bad, s, sq = tf.while_loop(lambda i, *_: i < n, body,
                                [0, tf.constant(0.0, tf.float64), tf.zeros([d], tf.float64),
                                 tf.zeros([d], tf.float64)])
  return [tf.cast(n, tf.float64), bad, s, sq]


class DistributedKMeans:
  """k-means over per-replica rows held by `strategy`'s replicas.

  Args:
    strategy: a tf.distribute strategy (the default one for a single device).
    chunk_size: rows per assignment matmul.
    progress: called after each iteration (a watchdog's heartbeat), or None.
  """

  def __init__(self, strategy: tf.distribute.Strategy, chunk_size: int = 8192, progress=None):
    self.strategy = strategy
    self.chunk_size = chunk_size
    self.progress = progress

    @tf.function(reduce_retracing=True)
    def step(dist_x, centroids):
      return strategy.run(_replica_step, args=(dist_x, centroids, chunk_size))
    self._step = step

    @tf.function(reduce_retracing=True)
    def reduce_stats(dist_x):
      def fn(x):
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, _chunked_stats(x, chunk_size))
      return strategy.run(fn, args=(dist_x,))
    self._stats = reduce_stats

    @tf.function(reduce_retracing=True)
    def pick_rows(dist_x, dist_offset, global_rows):
      def fn(x, offset):
        local = global_rows - offset
        mine = (local >= 0) & (local < tf.cast(tf.shape(x)[0], tf.int64))
        rows = tf.gather(x, tf.where(mine, local, 0))
        rows = tf.where(mine[:, None], tf.cast(rows, tf.float64), 0.0)
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, rows)
      return strategy.run(fn, args=(dist_x, dist_offset))
    self._pick = pick_rows

    @tf.function(reduce_retracing=True)
    def gather_sizes(dist_n):
      # all_reduce of a one-hot vector rather than all_gather, which
      # MultiWorkerMirroredStrategy rejects here ("destinations can not be empty").
      def fn(n):
        ctx = tf.distribute.get_replica_context()
        onehot = tf.one_hot(ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync,
                            dtype=tf.float64) * tf.cast(n, tf.float64)
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, onehot)
      return strategy.run(fn, args=(dist_n,))
    self._sizes = gather_sizes

  # --- helpers -------------------------------------------------------------------------
  def _distribute(self, local_x: list[np.ndarray]):
    # float32 arrays are wrapped without a copy where numpy allows it.
    return dist.distribute_local(self.strategy, [np.ascontiguousarray(x, np.float32)
                                                 for x in local_x])

  def replica_sizes(self, local_x: list[np.ndarray]) -> np.ndarray:
    """Rows held by every replica, in replica order (identical on all workers)."""
    dist_n = dist.distribute_local(self.strategy, [np.int64(len(x)) for x in local_x])
    return dist.first_local(self.strategy, self._sizes(dist_n)).numpy().astype(np.int64)

  def check_features(self, local_x, dist_x=None) -> tuple[int, float]:
    """(total rows, total variance); raises ClusteringError on NaN/Inf."""
    dist_x = self._distribute(local_x) if dist_x is None else dist_x
    n, bad, s, sq = (v.numpy() for v in dist.first_local(self.strategy, self._stats(dist_x)))
    if bad:
      raise ClusteringError(f"features contain {int(bad)} rows with NaN/Inf values "
                            "(diverged training? check the loss and the learning rate)")
    n = int(n)
    variance = float(np.sum(sq / max(n, 1) - (s / max(n, 1)) ** 2)) if n else 0.0
    return n, variance

  def rows(self, local_x, global_rows: np.ndarray) -> np.ndarray:
    """Rows at global indices (replica order), fetched with one all-reduce."""
    sizes = self.replica_sizes(local_x)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    n_local = dist.num_local_replicas(self.strategy)
    first = dist.worker_index(self.strategy) * n_local
    dist_offset = dist.distribute_local(self.strategy,
                                        [offsets[first + i] for i in range(n_local)])
    out = self._pick(self._distribute(local_x), dist_offset, tf.constant(global_rows, tf.int64))
    return dist.first_local(self.strategy, out).numpy()

  # --- the algorithm -------------------------------------------------------------------
  def init_centroids(self, local_x, k: int, seed: int, method: str = "random",
                     sample_size: int = 20000) -> np.ndarray:
    n = int(self.replica_sizes(local_x).sum())
    rng = np.random.default_rng(seed)
    if method == "random":
      return self.rows(local_x, np.sort(rng.choice(n, k, replace=False)))
    sample = self.rows(local_x, np.sort(rng.choice(n, min(n, max(sample_size, k)), replace=False)))
    return kmeans_plus_plus(sample, k, rng)

  def fit(self, local_x: list[np.ndarray], k: int, iters: int, seed: int = 0,
          init: str = "random", centroids: np.ndarray | None = None,
          log_prefix: str = "kmeans") -> KMeansResult:
    """Lloyd's k-means; `centroids` overrides the initialisation (tests, benchmarks)."""
    dist_x = self._distribute(local_x)
    n, variance = self.check_features(local_x, dist_x)
    if k > n:
      raise ClusteringError(f"{log_prefix}: k={k} clusters but only {n} points")
    if n > 1 and variance <= 1e-12:
      raise ClusteringError(f"{log_prefix}: all {n} feature vectors are identical; "
                            "k-means has nothing to separate (collapsed features)")
    if centroids is None:
      centroids = self.init_centroids(local_x, k, seed, init)
    centroids = np.asarray(centroids, np.float64)
    resplit = 0
    for it in range(iters):
      counts, sums, inertia, _ = self._run(dist_x, centroids)
      centroids, n_empty = update_centroids(centroids, counts, sums, seed, it)
      resplit += n_empty
      logging.debug("%s iter %d inertia %.6g empty %d", log_prefix, it, inertia, n_empty)
    counts, _, inertia, assign = self._run(dist_x, centroids)
    if resplit:
      logging.info("%s: re-split %d empty clusters", log_prefix, resplit)
    return KMeansResult(centroids.astype(np.float32), assign, float(inertia), resplit,
                        counts.astype(np.int64))

  def _run(self, dist_x, centroids):
    counts, sums, inertia, assign = self._step(dist_x, tf.constant(centroids, tf.float32))
    if self.progress:
      self.progress()
    first = lambda v: dist.first_local(self.strategy, v).numpy()  # noqa: E731
    return first(counts), first(sums), first(inertia), dist.all_local(self.strategy, assign)


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
