"""Feature extraction for reassignment: pre-ReLU fc7 of non-rotated, center-cropped images.

Each worker reads its own shards (file-level split by `InputContext`), every local replica
extracts its share on its own device (`extract_per_replica`), and the features and image
ids stay in host memory, one array per replica; nothing is written to disk or exchanged.
`stream` yields the same batches one by one for a caller that writes them away (the
evaluation's feature files, issue 35).
"""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dc_tf import distribute as dist
from dc_tf.data import reader


def _stack(parts: list[np.ndarray], dtype=None) -> np.ndarray:
  """np.concatenate without holding the input and the output whole at once: each part is
  copied into the preallocated result and released (peak: the result plus one part)."""
  out = np.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype or parts[0].dtype)
  at = 0
  for i in range(len(parts)):
    part, parts[i] = parts[i], None
    out[at:at + len(part)] = part
    at += len(part)
  return out


KEYS = ("image_id", "label", "user_id", "tags", "device", "lat", "lon")


def extract(trunk, pattern: str, *, image_size: int, batch_size: int = 256,
            endpoints=("fc7",), input_context=None, progress: bool = True,
            max_images: int = 0, postprocess=None, dtype=np.float32) -> dict:
  """Runs the trunk (inference mode) over every image once, in shard order, on one device.

  Returns {endpoint: float32 [n, ...] for each endpoint, 'image_id': int64 [n],
  'label': int64 [n], 'user_id'/'tags'/'device': bytes [n], 'lat'/'lon': [n],
  'skipped': bad records dropped, 'computed_on': the device the features came from}.
  `postprocess(endpoint, array)` is applied per batch (e.g. pooling conv maps, so that full
  maps of the whole set never sit in memory). Endpoint arrays are kept in `dtype` (float16 halves clustering's host memory) and held
  once: batches are moved into the result one by one.
  """
  ds = reader.build_extraction_dataset(pattern, image_size=image_size, batch_size=batch_size,
                                       input_context=input_context)
  run = _inference_function(trunk, tuple(endpoints), ds.element_spec["image"])
  forward = lambda images: [run(images[0])]
  return _run(ds, forward, 1, pattern, endpoints, progress, max_images, postprocess, dtype)[0]


_INFERENCE: dict[int, dict] = {}   # id(trunk) -> traced functions, dropped with the trunk


def _inference_function(trunk, endpoints: tuple, image_spec: tf.TensorSpec):
  """One traced inference function per (trunk, endpoints, image size), reused by every
  `extract` call: a tf.function made afresh per call traced again each time (evaluate.py
  extracts a dozen times from two trunks; TF warned of retracing). The batch dimension is
  left open, so a short last batch does not trace a second graph."""
  spec = tf.TensorSpec([None, *image_spec.shape[1:]], image_spec.dtype)
  held = _INFERENCE.get(id(trunk))
  if held is None:   # by id: a trunk may be unhashable (a dataclass); freed with the trunk
    held = _INFERENCE[id(trunk)] = {}
    weakref.finalize(trunk, _INFERENCE.pop, id(trunk), None)
  key = (endpoints, tuple(spec.shape), spec.dtype)
  if key not in held:
    ref = weakref.ref(trunk)   # the cache must not keep the trunk alive

    @tf.function(input_signature=[spec])
    def run(images):
      out = ref()(images, training=False)
      return {e: tf.cast(out[e], tf.float32) for e in endpoints}
    held[key] = run
  return held[key]


def extract_per_replica(strategy, trunk, pattern: str, *, image_size: int,
                        batch_size: int = 256, endpoints=("fc7",), progress: bool = True,
                        postprocess=None, dtype=np.float32) -> list[dict]:
  """`extract` on every replica of this worker at once, each replica its own share.

  The worker reads its shards (file-level split between workers, as training does); its
  batches are dealt to its G local replicas in turn, and one `strategy.run` per G batches
  runs the trunk on every replica's device concurrently (issue 25: one device extracting a
  worker's 12M images while 7 waited). Returns one `extract`-style dict per local replica,
  its rows held in host memory for the clustering; nothing crosses workers (no collective:
  workers with unequal shares do not wait on each other).
  """
  n_local = dist.num_local_replicas(strategy)
  ctx = tf.distribute.InputContext(
      num_input_pipelines=max(1, strategy.num_replicas_in_sync // n_local),
      input_pipeline_id=dist.worker_index(strategy))
  ds = reader.build_extraction_dataset(pattern, image_size=image_size, batch_size=batch_size,
                                       input_context=ctx)

  forward, placed = _replica_forward(strategy, trunk, tuple(endpoints))
  outs = _run(ds, forward, n_local, pattern, endpoints, progress, 0, postprocess, dtype)
  for out, device in zip(outs, placed):
    out["computed_on"] = device or out["computed_on"]
  return outs


def _replica_forward(strategy, trunk, endpoints: tuple):
  """(forward, placed): forward(one image batch per local replica) runs the trunk on every
  local replica at once (one `strategy.run`) and gives each replica's endpoints; `placed`
  lists the device each replica's ops were pinned to (filled at tracing)."""
  n_local = dist.num_local_replicas(strategy)
  placed = [None] * n_local

  @tf.function(reduce_retracing=True)
  def run(images):
    def fn(x):
      ctx = tf.distribute.get_replica_context()
      local = int(tf.get_static_value(ctx.replica_id_in_sync_group) or 0) % n_local
      out = trunk(x, training=False)
      placed[local] = out[endpoints[0]].device or None
      return {e: tf.cast(out[e], tf.float32) for e in endpoints}
    return strategy.run(fn, args=(images,))

  def forward(images):
    out = run(dist.distribute_local(strategy, images))
    return [{e: strategy.experimental_local_results(out[e])[i] for e in endpoints}
            for i in range(n_local)]
  return forward, placed


def stream(trunk, pattern: str, *, image_size: int, batch_size: int = 256,
           endpoints=("fc7",), strategy=None, progress: bool = True):
  """Yields (batch, {endpoint: float32 array}) for every batch of the whole set once, in
  shard order, holding nothing: what `extract` keeps in memory, for a caller that writes
  each batch away (evaluate.py on ImageNet: pooled conv1..conv13 are ~580 GB a set, issue 35).

  With a `strategy` of several local replicas, each round deals one batch to every local
  replica and runs them at once (as `extract_per_replica`); the batches still come out in
  shard order, so the rows are those of one device. No input split between workers: every
  worker that calls this reads the whole set. batch['computed_on'] is the device its
  features came from.
  """
  strategy = strategy or tf.distribute.get_strategy()
  n_local = dist.num_local_replicas(strategy)
  ds = reader.build_extraction_dataset(pattern, image_size=image_size, batch_size=batch_size)
  endpoints = tuple(endpoints)
  if n_local == 1:
    run = _inference_function(trunk, endpoints, ds.element_spec["image"])
    forward, placed = (lambda images: [run(images[0])]), [None]
  else:
    forward, placed = _replica_forward(strategy, trunk, endpoints)
  skipped, seen = 0, 0
  bar = tqdm(unit="img", desc="extracting features", disable=not progress, leave=False)
  it = iter(ds)
  try:
    while True:
      batches = [b for b in (next(it, None) for _ in range(n_local)) if b is not None]
      if not batches:
        break
      # A replica with no batch left this round runs one image of the first and its output
      # is dropped: an empty batch made TF 2.21's CPU conv of the Sobel front fail on it
      # ('output depth must be evenly divisible by number of groups: 2 vs 3'), in the
      # reassignment's extraction too, whenever a worker's batches did not divide evenly
      # between its replicas.
      filler = batches[0]["image"][:1]
      images = [b["image"] for b in batches] + [filler] * (n_local - len(batches))
      for i, (batch, feats) in enumerate(zip(batches, forward(images))):
        skipped = max(skipped, int(batch["skipped"].numpy().max()))
        out = {k: batch[k].numpy() for k in KEYS}
        out["skipped"] = skipped
        out["computed_on"] = placed[i] or feats[endpoints[0]].device
        seen += len(out["image_id"])
        bar.update(len(out["image_id"]))
        yield out, {e: feats[e].numpy() for e in endpoints}
  finally:   # also when the caller stops early (max_images)
    bar.close()
  if not seen:
    raise _no_images(pattern, skipped)


def _no_images(pattern: str, skipped: int) -> reader.DataError:
  corrupt = reader.corrupt_shards(reader.list_shards(pattern))
  detail = (f"; {len(corrupt)} corrupt shard file(s), not TFRecord or damaged: "
            f"{', '.join(corrupt[:5])}{' ...' if len(corrupt) > 5 else ''}" if corrupt else "")
  return reader.DataError(f"no decodable image in {pattern!r} ({skipped} bad records "
                          f"skipped{detail})")


def _run(ds, forward, n_local, pattern, endpoints, progress, max_images, postprocess,
         dtype) -> list[dict]:
  """Deals `ds`'s batches to n_local replicas in turn (a replica with none left this round
  runs a one-image filler whose output is dropped); `forward(list of image batches)` gives
  each one's endpoints."""
  cols = [{k: [] for k in (*endpoints, *KEYS)} for _ in range(n_local)]
  skipped, seen = 0, 0
  bar = tqdm(unit="img", desc="extracting features", disable=not progress, leave=False)
  it = iter(ds)
  while True:
    batches = [next(it, None) for _ in range(n_local)]
    if batches[0] is None:
      break
    filler = batches[0]["image"][:1]   # its output is dropped below (see `stream`)
    feats = forward([filler if b is None else b["image"] for b in batches])
    for i, batch in enumerate(batches):
      if batch is None:
        continue
      cols[i].setdefault("computed_on", feats[i][endpoints[0]].device)
      for e in endpoints:
        value = feats[i][e].numpy()
        cols[i][e].append((postprocess(e, value) if postprocess else value).astype(dtype, copy=False))
      for k in KEYS:
        cols[i][k].append(batch[k].numpy())
      skipped = max(skipped, int(batch["skipped"].numpy().max()))
      n = int(batch["image_id"].shape[0])
      seen += n
      bar.update(n)
    if max_images and seen >= max_images:
      break
  bar.close()
  if not cols[0]["image_id"]:
    raise _no_images(pattern, skipped)
  empty = {k: [cols[0][k][0][:0]] for k in (*endpoints, *KEYS)}  # a replica with no batch
  outs = []
  for c in cols:
    computed_on = c.pop("computed_on", None)
    c = c if c["image_id"] else {k: list(v) for k, v in empty.items()}
    out = {k: _stack(v) for k, v in c.items()}
    out["computed_on"] = computed_on   # the device its features came from
    if max_images:
      out = {k: v[:max_images] for k, v in out.items()}
    out["skipped"] = skipped
    outs.append(out)
  return outs
