"""k-means as tf.functions with cross-replica sums (no faiss, no shared disk).

Each replica keeps its own rows in host memory (float32 or float16), read chunk by chunk:
an iteration assigns them (||c||^2 - 2 x c^T and argmin; never an N x k matrix, never a
device copy of the whole shard), accumulates per-cluster counts and sums, and all-reduces
those: only k*(d+1) numbers cross the network, as in the original's distributed k-means. The centroid update and the re-split of empty clusters
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
  # scores = ||c||^2 - 2 x c^T as one matmul with a bias add (fused into the MatMul by TF's
  # CPU remapper): the chunk x k score matrix is written once and read once by the argmin,
  # not passed over three more times by a scale and a subtraction (issue 17).
  neg2c = -2.0 * centroids
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
    sums += tf.cast(tf.math.unsorted_segment_sum(chunk, a, k), tf.float64)
    return i + 1, assign_ta.write(i, a), dist_ta.write(i, tf.maximum(best, 0.0)), counts, sums

  _, assign_ta, dist_ta, counts, sums = tf.while_loop(
      lambda i, *_: i < num_chunks, body, [0, assign_ta, dist_ta, counts, sums])
  if_empty = lambda dt: tf.zeros([0], dt)  # noqa: E731
  assignments = tf.cond(num_chunks > 0, lambda: assign_ta.concat(), lambda: if_empty(tf.int32))
  dists = tf.cond(num_chunks > 0, lambda: dist_ta.concat(), lambda: if_empty(x.dtype))
  return assignments, dists, counts, sums


class DistributedKMeans:
  """k-means over rows held, in host memory, by `strategy`'s replicas.

  Nothing is copied whole: each replica's rows (float32 or float16, or a subset given as
  row indices) are fed to the device chunk by chunk, and only per-cluster counts, sums and
  the inertia cross replicas, once per iteration. With `sample` rows per replica the
  centroids are fitted on a seeded sample (the original fits on at most 3,150,000 images
  per process) and every row is assigned in a last pass.

  Args:
    strategy: a tf.distribute strategy (the default one for a single device).
    chunk_size: rows per assignment matmul.
    progress: called after each iteration (a watchdog's heartbeat), or None.
  """

  def __init__(self, strategy: tf.distribute.Strategy, chunk_size: int = 8192, progress=None):
    self.strategy = strategy
    self.chunk_size = chunk_size
    self.progress = progress
    self.devices = dist.local_devices(strategy)

    @tf.function(reduce_retracing=True)
    def assign(x, centroids):
      return assign_chunked(x, centroids, tf.shape(x)[0] + 1)
    self._assign = assign

    @tf.function(reduce_retracing=True)
    def all_reduce(dist_values):
      def fn(values):
        values = [tf.identity(v) for v in values]  # on the replica's device (MWMS)
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)
      return strategy.run(fn, args=(dist_values,))
    self._all_reduce = all_reduce

  # --- helpers -------------------------------------------------------------------------
  def sum_over_replicas(self, local_values: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Sums per-replica lists of float64 arrays over all replicas (one all-reduce)."""
    if self.strategy.num_replicas_in_sync == 1:
      return [np.asarray(v, np.float64) for v in local_values[0]]
    per_replica = [[np.asarray(v, np.float64) for v in values] for values in local_values]
    dist_values = [dist.distribute_local(self.strategy, [values[j] for values in per_replica])
                   for j in range(len(per_replica[0]))]
    out = self._all_reduce(dist_values)
    return [dist.first_local(self.strategy, v).numpy() for v in out]

  def _chunks(self, x: np.ndarray, rows: np.ndarray | None):
    """float32 chunks of x (or of x[rows]), each copied into one reused 64-byte-aligned
    buffer (float16 rows are cast on the way). A chunk is only valid until the next one is
    yielded: consumers finish with it first (`_run` fetches its results)."""
    n = len(x) if rows is None else len(rows)
    if n == 0:
      return
    buf = aligned_empty([min(self.chunk_size, n), x.shape[1]], np.float32)
    for start in range(0, n, self.chunk_size):
      m = min(self.chunk_size, n - start)
      out = buf[:m]
      if rows is None:
        out[...] = x[start:start + m]
      elif x.dtype == np.float32 and x.flags.c_contiguous:
        np.take(x, rows[start:start + m], axis=0, out=out)
      else:
        out[...] = x[rows[start:start + m]]
      yield out

  def replica_sizes(self, local_x: list[np.ndarray], local_rows=None) -> np.ndarray:
    """Rows held by every replica, in replica order (identical on all workers)."""
    local_rows = local_rows or [None] * len(local_x)
    r, first = self.strategy.num_replicas_in_sync, self._first_replica()
    onehot = []
    for i, (x, rows) in enumerate(zip(local_x, local_rows)):
      v = np.zeros(r)
      v[first + i] = len(x) if rows is None else len(rows)
      onehot.append([v])
    return self.sum_over_replicas(onehot)[0].astype(np.int64)

  def _first_replica(self) -> int:
    return dist.worker_index(self.strategy) * dist.num_local_replicas(self.strategy)

  def check_features(self, local_x, local_rows=None) -> tuple[int, float]:
    """(total rows, total variance); raises ClusteringError on NaN/Inf."""
    local_rows = local_rows or [None] * len(local_x)
    stats = []
    for x, rows in zip(local_x, local_rows):
      d = x.shape[1]
      n, bad, s, sq = 0.0, 0.0, np.zeros(d), np.zeros(d)
      for chunk in self._chunks(x, rows):
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

  def rows(self, local_x, global_rows: np.ndarray, local_rows=None) -> np.ndarray:
    """Rows at global indices (replica order), fetched with one all-reduce."""
    local_rows = local_rows or [None] * len(local_x)
    sizes = self.replica_sizes(local_x, local_rows)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    out = []
    for i, (x, rows) in enumerate(zip(local_x, local_rows)):
      r = self._first_replica() + i
      buf = np.zeros([len(global_rows), x.shape[1]])
      mine = (global_rows >= offsets[r]) & (global_rows < offsets[r + 1])
      local = global_rows[mine] - offsets[r]
      buf[mine] = x[local if rows is None else rows[local]]
      out.append([buf])
    return self.sum_over_replicas(out)[0]

  # --- the algorithm -------------------------------------------------------------------
  def init_centroids(self, local_x, k: int, seed: int, method: str = "random",
                     sample_size: int = 20000, local_rows=None) -> np.ndarray:
    n = int(self.replica_sizes(local_x, local_rows).sum())
    rng = np.random.default_rng(seed)
    if method == "random":
      return self.rows(local_x, np.sort(rng.choice(n, k, replace=False)), local_rows)
    sample = self.rows(local_x, np.sort(rng.choice(n, min(n, max(sample_size, k)), replace=False)),
                       local_rows)
    return kmeans_plus_plus(sample, k, rng)

  def fit(self, local_x: list[np.ndarray], k: int, iters: int, seed: int = 0,
          init: str = "random", centroids: np.ndarray | None = None,
          log_prefix: str = "kmeans", local_rows: list[np.ndarray] | None = None,
          sample: int = 0) -> KMeansResult:
    """Lloyd's k-means over each replica's rows (or `local_rows` of them); `sample` > 0 fits
    on at most that many rows per replica, then assigns them all; `centroids` overrides the
    initialisation (tests, benchmarks)."""
    local_rows = local_rows or [None] * len(local_x)
    n, variance = self.check_features(local_x, local_rows)
    if k > n:
      raise ClusteringError(f"{log_prefix}: k={k} clusters but only {n} points")
    if n > 1 and variance <= 1e-12:
      raise ClusteringError(f"{log_prefix}: all {n} feature vectors are identical; "
                            "k-means has nothing to separate (collapsed features)")
    fit_rows = [self._sample(x, rows, sample, seed, i)
                for i, (x, rows) in enumerate(zip(local_x, local_rows))]
    if centroids is None:
      centroids = self.init_centroids(local_x, k, seed, init, local_rows=fit_rows)
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

  def _sample(self, x, rows, sample, seed, i):
    n = len(x) if rows is None else len(rows)
    if not sample or n <= sample:
      return rows
    rng = np.random.default_rng([seed, self._first_replica() + i, 11])
    picked = np.sort(rng.choice(n, sample, replace=False))
    return picked if rows is None else rows[picked]

  def _run(self, local_x, local_rows, centroids, keep=False):
    """One pass: assigns each replica's rows chunk by chunk on its device, then sums counts,
    sums and inertia over replicas. Returns (counts, sums, inertia, assignments or None)."""
    c = tf.constant(centroids, tf.float32)
    k, d = centroids.shape
    stats, assignments = [], []
    for device, x, rows in zip(self.devices, local_x, local_rows):
      counts, sums, inertia, parts = np.zeros(k), np.zeros([k, d]), 0.0, []
      with tf.device(device):
        for chunk in self._chunks(x, rows):
          a, dists, cnt, sm = self._assign(host_tensor(chunk), c)
          counts, sums = counts + cnt.numpy(), sums + sm.numpy()
          inertia += float(np.sum(dists.numpy(), dtype=np.float64))
          if keep:
            parts.append(a.numpy())
      stats.append([counts, sums, np.array([inertia])])
      assignments.append(np.concatenate(parts) if parts else np.zeros([0], np.int32))
    counts, sums, inertia = self.sum_over_replicas(stats)
    if self.progress:
      self.progress()
    return counts, sums, float(inertia[0]), assignments if keep else None


def aligned_empty(shape, dtype=np.float32, align: int = 64) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  offset = (-raw.ctypes.data) % align
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def host_tensor(a: np.ndarray) -> tf.Tensor:
  """A host float32 array as a tensor. Aligned C-contiguous arrays are shared through DLPack
  (no copy: `tf.constant` copied each chunk into fresh memory, 0.25 s a pass over 20k x 4096
  floats here, issue 17); TensorFlow aborts the process on an unaligned buffer, so anything
  else is copied. The tensor aliases `a`: it must not outlive `a`'s next overwrite in use."""
  if (a.dtype == np.float32 and a.flags.c_contiguous and a.size
      and a.ctypes.data % 64 == 0):
    return tf.experimental.dlpack.from_dlpack(a.__dlpack__())
  return tf.constant(a)


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
