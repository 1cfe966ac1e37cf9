"""Rows held in host memory by every replica, and the collectives over them.

The reassignment (issue 25) keeps each replica's rows (fc7 features, image ids) in host
memory, in the replica's own list entry: nothing is gathered whole. Three tools serve it:

* `DevicePass`: one pass over every local replica's rows, the replicas running concurrently
  (one `strategy.run` per chunk step). Each chunk is sent to its replica's device once; the
  per-pass accumulators (k-means counts and sums, PCA moments) stay on that device in
  float64, and one cross-replica SUM per pass combines them. Bytes handed to and fetched from
  the devices are counted (`Traffic`), since logical CPU devices cannot show them on a clock.
* Sums and gathers of small host values over all replicas (`Replicas.sum`, `gather_int64`).
* Seeded row keys (a hash of image id and seed): samples and initial centroids chosen by
  key, not by a row's position, so the result does not depend on which replica holds a row
  (1 replica, 4 devices and 2 workers x 2 devices give the same table).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from dc_tf import distribute as dist

KEY_BITS = 62
_LOW_BITS = 2**31


def row_keys(ids: np.ndarray, seed: int) -> np.ndarray:
  """int64 keys in [0, 2^62), a seeded hash (splitmix64) of each int64 id: equal ids, equal
  keys, wherever the row lives."""
  mix = np.uint64((int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
  z = np.asarray(ids, np.int64).view(np.uint64) + mix
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(64 - KEY_BITS)).astype(np.int64)


def keyed_sample(keys: np.ndarray, fraction: float) -> np.ndarray:
  """Indices of the rows whose key falls below `fraction` of the key range (a seeded
  Bernoulli sample of that fraction, the same rows whatever the layout)."""
  if fraction >= 1:
    return np.arange(len(keys))
  return np.flatnonzero(keys < int(fraction * 2**KEY_BITS))


@dataclasses.dataclass
class Traffic:
  """Bytes one worker moved in a pass: host -> device (rows and constants), device -> host
  (reduced accumulators and per-row outputs), and the all-reduce payload per replica."""
  to_device: int = 0
  from_device: int = 0
  cross_replica: int = 0
  chunk_steps: int = 0

  def add(self, other: "Traffic") -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class Replicas:
  """This worker's local replicas of `strategy` and collectives over host values.

  `Replicas.of(strategy)` returns one object per strategy, so its traced functions are
  shared by every k-means and PCA run of the process (no retracing per run)."""

  _cache: dict[int, tuple] = {}

  @classmethod
  def of(cls, strategy: tf.distribute.Strategy) -> "Replicas":
    held = cls._cache.get(id(strategy))
    if held is None or held[0] is not strategy:
      held = cls._cache[id(strategy)] = (strategy, cls(strategy))
    return held[1]

  def __init__(self, strategy: tf.distribute.Strategy):
    self.strategy = strategy
    self.devices = dist.local_devices(strategy)
    self.n_local = len(self.devices)
    self.first = dist.worker_index(strategy) * self.n_local
    self.total = strategy.num_replicas_in_sync
    # DLPack aliasing of host chunks is safe only where the consuming device is the host.
    self.host_devices = all(d is None or "CPU" in d.upper() for d in self.devices)

    self._all_reduce: dict[int, object] = {}   # one traced all-reduce per list length
    self._steps: dict = {}

  def local_index(self) -> int:
    """Inside `strategy.run`: this replica's index among the worker's local replicas."""
    ctx = tf.distribute.get_replica_context()
    replica = tf.get_static_value(ctx.replica_id_in_sync_group)
    return 0 if replica is None else int(replica) - self.first

  def pass_functions(self, step, num_accumulators: int) -> "_PassFunctions":
    """The traced functions and device variables of `DevicePass(step)`, one set per step
    function and strategy, shared by every pass (no retracing per k-means run)."""
    if step not in self._steps:
      self._steps[step] = _PassFunctions(self, step, num_accumulators)
    return self._steps[step]

  def on_devices(self, value_of) -> tf.distribute.DistributedValues:
    """Per-replica values, `value_of(local index)`, placed on each replica's device."""
    def value_fn(ctx):
      i = ctx.replica_id_in_sync_group % self.n_local
      with tf.device(self.devices[i]):
        return tf.identity(value_of(i))
    return self.strategy.experimental_distribute_values_from_function(value_fn)

  def reduce(self, values) -> list[np.ndarray]:
    """SUM over all replicas of per-replica tensors (a list of DistributedValues)."""
    values = list(values)
    if self.total > 1:
      if len(values) not in self._all_reduce:
        strategy = self.strategy

        @tf.function(reduce_retracing=True)
        def all_reduce(dist_values):
          def fn(values):
            values = [tf.identity(v) for v in values]  # on the replica's device (MWMS)
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                                  values)
          return strategy.run(fn, args=(dist_values,))
        self._all_reduce[len(values)] = all_reduce
      values = self._all_reduce[len(values)](values)
    return [dist.first_local(self.strategy, v).numpy() for v in values]

  def sum(self, local_values: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Sums per-replica lists of float64 host arrays over all replicas: one all-reduce of
    one flat vector (one traced function for every call)."""
    if self.total == 1:
      return [np.asarray(v, np.float64) for v in local_values[0]]
    shapes = [np.shape(v) for v in local_values[0]]
    flat = [np.concatenate([np.asarray(v, np.float64).ravel() for v in values])
            for values in local_values]
    (total,) = self.reduce([dist.distribute_local(self.strategy, flat)])
    out, at = [], 0
    for shape in shapes:
      size = int(np.prod(shape))
      out.append(total[at:at + size].reshape(shape))
      at += size
    return out

  def sizes(self, local_counts: list[int]) -> np.ndarray:
    """Rows held by every replica, in replica order (identical on all workers)."""
    onehot = []
    for i, n in enumerate(local_counts):
      v = np.zeros(self.total)
      v[self.first + i] = n
      onehot.append([v])
    return self.sum(onehot)[0].astype(np.int64)

  def gather_int64(self, local_columns: list[np.ndarray]) -> np.ndarray:
    """Concatenates every replica's int64 rows [n_r, c] in replica order, on every worker.
    Values travel as float64 halves (v >> 31, v & (2^31 - 1)) in a SUM all-reduce of a zero
    buffer each replica writes at its offset (all_gather is rejected under MWMS here), so
    63-bit values stay exact."""
    sizes = self.sizes([len(c) for c in local_columns])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    split = [np.concatenate([np.asarray(c, np.int64) // _LOW_BITS,
                             np.asarray(c, np.int64) % _LOW_BITS], axis=1).astype(np.float64)
             for c in local_columns]
    total = int(sizes.sum())
    if self.total == 1:
      table = split[0]
    else:
      bufs = []
      for i, rows in enumerate(split):
        buf = np.zeros([total, rows.shape[1]])
        buf[offsets[self.first + i]:offsets[self.first + i] + len(rows)] = rows
        bufs.append([buf])
      table = self.sum(bufs)[0]
    c = table.shape[1] // 2
    return table[:, :c].astype(np.int64) * _LOW_BITS + table[:, c:].astype(np.int64)

  def smallest(self, local_keys: list[np.ndarray], g: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The g rows of smallest key over all replicas: per local replica, (its row indices,
    their ranks in [0, g)). Each replica offers its own g smallest; one gather picks."""
    offers = [np.sort(k if len(k) <= g else np.partition(k, g - 1)[:g]) for k in local_keys]
    ranked = np.sort(self.gather_int64([o[:, None] for o in offers])[:, 0])[:g]
    out = []
    for keys in local_keys:
      idx = np.flatnonzero(keys <= ranked[-1]) if len(ranked) else np.zeros([0], np.int64)
      out.append((idx, np.searchsorted(ranked, keys[idx])))
    return out

  def fetch(self, local_x, local_rows, picks, g: int) -> np.ndarray:
    """[g, d] float64 rows at the ranks `picks` gives (see `smallest`), on every worker."""
    d = local_x[0].shape[1]
    bufs = []
    for x, rows, (idx, pos) in zip(local_x, local_rows, picks):
      buf = np.zeros([g, d])
      buf[pos] = x[idx if rows is None else rows[idx]]
      bufs.append([buf])
    return self.sum(bufs)[0]


def aligned_empty(shape, dtype=np.float32, align: int = 64) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  offset = (-raw.ctypes.data) % align
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def host_tensor(a: np.ndarray, alias: bool = True) -> tf.Tensor:
  """A host float32 array as a tensor. Aligned C-contiguous arrays are shared through DLPack
  when `alias` (no copy: `tf.constant` copied each chunk into fresh memory, 0.25 s a pass over
  20k x 4096 floats here, issue 17); TensorFlow aborts the process on an unaligned buffer, so
  anything else is copied. An aliasing tensor must not outlive `a`'s next overwrite in use;
  for an accelerator the copy to the device may still be in flight when the call returns, so
  callers pass alias=False there."""
  if (alias and a.dtype == np.float32 and a.flags.c_contiguous and a.size
      and a.ctypes.data % 64 == 0):
    return tf.experimental.dlpack.from_dlpack(a.__dlpack__())
  return tf.constant(a)


def chunks(x: np.ndarray, rows: np.ndarray | None, chunk_size: int):
  """float32 chunks of x (or of x[rows]), each copied into one reused 64-byte-aligned buffer
  (float16 rows are cast on the way). A chunk is only valid until the next one is yielded:
  consumers finish with it first."""
  n = len(x) if rows is None else len(rows)
  if n == 0:
    return
  buf = aligned_empty([min(chunk_size, n), x.shape[1]], np.float32)
  for start in range(0, n, chunk_size):
    m = min(chunk_size, n - start)
    out = buf[:m]
    if rows is None:
      out[...] = x[start:start + m]
    elif x.dtype == np.float32 and x.flags.c_contiguous:
      np.take(x, rows[start:start + m], axis=0, out=out)
    else:
      out[...] = x[rows[start:start + m]]
    yield out


class _PassFunctions:
  """Accumulator variables on every local device (outside the strategy's scope, like the
  sub-heads: each lives where it is computed), the chunk step and the pass's all-reduce."""

  def __init__(self, replicas: Replicas, step, num_accumulators: int):
    strategy = replicas.strategy
    self.variables = []
    for device in replicas.devices:
      with tf.device(device):
        self.variables.append([tf.Variable(tf.zeros([0], tf.float64), shape=tf.TensorShape(None),
                                           trainable=False, dtype=tf.float64)
                               for _ in range(num_accumulators)])

    def replica_step(chunk, constants):
      mine = self.variables[replicas.local_index()]
      deltas, out = step(chunk, constants)
      for v, delta in zip(mine, deltas):
        if isinstance(delta, tf.IndexedSlices):   # rows added in place (duplicates sum)
          v.scatter_add(delta)
        else:
          v.assign_add(delta)
      return out

    @tf.function(reduce_retracing=True)
    def run_step(chunk, constants):
      return strategy.run(replica_step, args=(chunk, constants))
    self.step = run_step

    def replica_total():
      values = [v.read_value() for v in self.variables[replicas.local_index()]]
      if replicas.total == 1:
        return values
      return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)

    @tf.function
    def total():
      return strategy.run(replica_total)
    self.total = total


class DevicePass:
  """One pass of `step` over every local replica's host rows, replicas concurrently.

  `step(chunk, constants) -> (deltas, output)` runs on a replica's device (inside
  `strategy.run`, one call per chunk step for all local replicas; a replica whose rows are
  done gets an empty chunk); the deltas (float64; dense, or `tf.IndexedSlices` of rows to
  scatter-add) are added to accumulator variables that live on that device for the whole
  pass. Constants are sent to each device once per pass;
  at the end one cross-replica SUM combines the accumulators and the worker fetches the
  result once. Per-chunk outputs (e.g. assignments) are fetched only when asked. So a pass's
  host <-> device traffic is the rows once, the constants once and the accumulators once,
  whatever the chunk count.
  """

  def __init__(self, replicas: Replicas, step, chunk_size: int, num_accumulators: int):
    self.replicas, self.chunk_size = replicas, chunk_size
    self._fns = replicas.pass_functions(step, num_accumulators)
    self.traffic = Traffic()   # the last pass

  def __call__(self, local_x, local_rows, constants: list[np.ndarray],
               shapes: list[list[int]], keep_outputs: bool = False, consume=None):
    """Returns (reduced accumulators as numpy, per-replica lists of outputs or None).
    `consume(replica, first_row, output)`, if given, takes each chunk's output as it comes
    (e.g. written over the rows it came from) instead of keeping it."""
    r = self.replicas
    traffic = Traffic()
    d = local_x[0].shape[1]
    for mine in self._fns.variables:          # zeros written on the device itself
      for v, shape in zip(mine, shapes):
        with tf.device(v.device):
          v.assign(tf.zeros(shape, tf.float64))
    consts = tuple(r.on_devices(lambda i, c=c: tf.constant(c)) for c in constants)
    traffic.to_device += sum(np.asarray(c).nbytes for c in constants) * r.n_local
    its = [chunks(x, rows, self.chunk_size) for x, rows in zip(local_x, local_rows)]
    outputs = [[] for _ in its]
    starts = [0] * len(its)
    empty = np.zeros([0, d], np.float32)
    while True:
      batch = [next(it, None) for it in its]
      if all(c is None for c in batch):
        break
      batch = [empty if c is None else c for c in batch]
      traffic.to_device += sum(c.nbytes for c in batch)
      traffic.chunk_steps += 1
      tensors = [host_tensor(c, alias=r.host_devices) for c in batch]
      out = self._fns.step(dist.distribute_local(r.strategy, tensors), consts)
      if keep_outputs or consume:
        for i, o in enumerate(r.strategy.experimental_local_results(out)):
          if not len(batch[i]):
            continue
          o = o.numpy()
          traffic.from_device += o.nbytes
          if consume:
            consume(i, starts[i], o)
          else:
            outputs[i].append(o)
          starts[i] += len(batch[i])
    payload = sum(int(np.prod(s)) * 8 for s in shapes)
    traffic.cross_replica += payload if r.total > 1 and shapes else 0
    traffic.from_device += payload
    totals = ([t.numpy() for t in dist.first_local(r.strategy, self._fns.total())]
              if shapes else [])
    self.traffic = traffic
    return totals, (outputs if keep_outputs else None)
