r"""Writes sharded TFRecords (`<name>-00000-of-00064.tfrecord`, schema in `schema.py`) with one
Apache Beam pipeline, for every source, on any runner.

  source (sources.py) -> read + check each image -> group by content hash (duplicates,
  placeholders) -> rank by a seeded hash of the image id -> group by shard -> write -> manifest

- Checking reads and decodes every image once; zero-byte, non-image, truncated and corrupt
  files are dropped and counted (`checks.py`, which `embed` shares). Only metadata and a SHA-1
  travel through the shuffles; the writer reads each kept image again (and drops it, counted,
  if its bytes changed meanwhile).
- Byte-identical images keep the one with the smallest id; the rest are dropped as duplicates.
  A hash shared by `--placeholder_min_copies` images or more, or listed in `--placeholder_sha1`,
  is a placeholder ("photo no longer available"): all its copies are dropped.
- Image i's place in the output is a function of its id: its rank in the order of
  sha1(seed:id) (seed < 0: the order of the ids), cut into equal runs, so shards differ in size
  by at most one record and a rerun with the same inputs and options writes the same bytes.
- Each shard is written to a temporary name and renamed; a shard that exists is kept, so an
  interrupted run resumes, but only with the options that laid the shards out: they are
  recorded before anything is written (`<name>.layout.json`, then the manifest), and a rerun
  with others is refused (issue 29: another --seed would mix two orders in one set, another
  --shard_size leave two sets under one glob); `--overwrite` replaces the set. At the end
  `<name>.json` records the counts per reason, the shard sizes and the options; the same
  counts are Beam counters (namespace `make_shards`).

Runners: the default DirectRunner runs here (Beam's FnApiRunner: `--direct_num_workers=N
--direct_running_mode=multi_processing` for N processes); `--runner=DataflowRunner|FlinkRunner|
SparkRunner` with Beam's own options runs the same pipeline on a cluster (see docs/data.md).

Example (the embedded demo set, see docs/data.md):
  python -m dc_tf.data.make_shards --source=tiny_imagenet \
    --input=../shared/datasets/tiny-imagenet-200/train_250per_class.zip --split=train \
    --classes=$(cat data/classes.txt | paste -sd,) --output_dir=data --name=train --num_shards=4
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Sequence

import apache_beam as beam

from dc_tf.data import schema, sources
from dc_tf.data.checks import (Checked, check_image, keep_one_per_hash, pipeline_runner,
                               read_bytes)
from dc_tf.data.sources import DROPPED, Item, drop

BUCKET_BITS = 12  # ranks are computed in 4096 buckets of the order-hash range


@dataclasses.dataclass(frozen=True)
class ShardOptions:
  """One run's settings, built once from the flags (or by a caller)."""
  source: str
  input: str
  output_dir: str
  name: str = "train"
  image_dir: str = ""
  image_list: str = ""
  split: str = "train"
  classes: tuple[str, ...] = ()
  per_class: int = 0
  skip_per_class: int = 0
  drop_labels: bool = False
  num_shards: int = 0
  shard_size: int = 1024
  seed: int = 0
  dedupe: bool = True
  placeholder_min_copies: int = 50
  placeholder_sha1: tuple[str, ...] = ()
  long_tail_exponent: float = 0.0
  long_tail_size: int = 0
  near_duplicate_fraction: float = 0.5
  overwrite: bool = False
  beam_args: tuple[str, ...] = ()

  def validate(self) -> "ShardOptions":
    if self.source not in ("folder", "list", "yfcc", "tiny_imagenet"):
      raise ValueError(f"--source must be folder, list, yfcc or tiny_imagenet, got {self.source!r}")
    if self.per_class < 0 or self.skip_per_class < 0:
      raise ValueError("--per_class and --skip_per_class must be >= 0")
    if self.num_shards < 0 or self.shard_size < 1:
      raise ValueError("--num_shards must be >= 0 and --shard_size >= 1")
    if self.long_tail_exponent < 0 or (self.long_tail_exponent and self.long_tail_size < 1):
      raise ValueError("--long_tail_exponent must be >= 0 and needs --long_tail_size >= 1")
    if not 0 <= self.near_duplicate_fraction <= 1:
      raise ValueError("--near_duplicate_fraction must be in [0, 1]")
    return self


# ----------------------------------------------------------------------------- reading
class ReadAndCheck(beam.DoFn):
  """`checks.read_bytes` then `checks.check_image`, each drop counted by its reason."""

  def process(self, item: Item):
    import tensorflow as tf
    try:
      data = read_bytes(item)
    except (OSError, KeyError, tf.errors.OpError):
      yield drop("unreadable")
      return
    why, fmt, height, width = check_image(data)
    if why:
      yield drop(why)
      return
    sources.counter("decoded").inc()
    yield Checked(item, sources.id_of(item), hashlib.sha1(data).hexdigest(), fmt, height, width)


# ----------------------------------------------------------------------------- layout
def order_key(image_id: int, seed: int) -> int:
  """A 63-bit key that orders the images: a seeded hash of the id, or the id for seed < 0."""
  if seed < 0:
    return image_id
  return int.from_bytes(hashlib.sha1(f"{seed}:{image_id}".encode()).digest()[:8], "big") >> 1


def bucket_of(key: int) -> int:
  return key >> (63 - BUCKET_BITS)


def layout(bucket_counts: dict, num_shards: int, shard_size: int) -> tuple[int, int, dict]:
  """(images, shards, first rank of each bucket)."""
  total = sum(bucket_counts.values())
  shards = num_shards or -(-total // shard_size)
  shards = max(1, min(shards, total))
  offsets, at = {}, 0
  for b in sorted(bucket_counts):
    offsets[b] = at
    at += bucket_counts[b]
  return total, shards, offsets


def shard_name(output_dir: str, name: str, index: int, total: int) -> str:
  return os.path.join(output_dir, f"{name}-{index:05d}-of-{total:05d}.tfrecord")


class RankInBucket(beam.DoFn):
  """Each image's global rank: its bucket's first rank plus its rank inside the bucket."""

  def __init__(self, num_shards: int, shard_size: int, seed: int):
    super().__init__()
    self._args = (num_shards, shard_size)
    self._seed = seed
    self._layout = None

  def process(self, element, bucket_counts):
    if self._layout is None:  # the side input is the same for every bucket
      self._layout = layout(bucket_counts, *self._args)
    total, shards, offsets = self._layout
    bucket, members = element
    members = sorted(members, key=lambda c: (order_key(c.image_id, self._seed), c.image_id))
    for r, c in enumerate(members):
      position = offsets[bucket] + r
      yield position * shards // total, (position, c)


class WriteShard(beam.DoFn):
  """Writes one shard's records in rank order, to a temporary name then renamed."""

  def __init__(self, output_dir: str, name: str, num_shards: int, shard_size: int):
    super().__init__()
    self._args = (output_dir, name, num_shards, shard_size)

  def process(self, element, bucket_counts):
    import tensorflow as tf
    output_dir, name, num_shards, shard_size = self._args
    index, members = element
    _, shards, _ = layout(bucket_counts, num_shards, shard_size)
    path = shard_name(output_dir, name, index, shards)
    if tf.io.gfile.exists(path):
      records = sum(1 for _ in tf.data.TFRecordDataset(path))
      sources.counter("resumed shards").inc()
      yield {"shard": index, "file": os.path.basename(path), "records": records, "resumed": True}
      return
    tmp = f"{path}.tmp-{os.getpid()}"
    written = 0
    with tf.io.TFRecordWriter(tmp) as writer:
      for _, c in sorted(members, key=lambda m: m[0]):
        try:
          data = read_bytes(c.item)
        except (OSError, KeyError, tf.errors.OpError):
          data = b""
        if hashlib.sha1(data).hexdigest() != c.sha1:
          yield drop("changed while writing")
          continue
        it = c.item
        writer.write(schema.make_example(
            data, c.fmt, c.height, c.width, c.image_id, label=it.label, label_text=it.label_text,
            user_id=it.user_id, tags=it.tags, lat=it.lat, lon=it.lon, device=it.device,
            machine_tags=it.machine_tags, date_taken=it.date_taken, url=it.url)
            .SerializeToString(deterministic=True))
        written += 1
    tf.io.gfile.rename(tmp, path, overwrite=True)
    sources.counter("written").inc(written)
    logging.info("wrote %s (%d records)", path, written)
    yield {"shard": index, "file": os.path.basename(path), "records": written, "resumed": False}


# ----------------------------------------------------------------------------- reruns
# Options that change no shard's bytes: where the set goes, how Beam runs it, how to rerun.
NOT_LAYOUT = ("output_dir", "name", "overwrite", "beam_args")


def layout_options(options: dict) -> dict:
  """The options (a ShardOptions' fields, flag names) that decide what each shard holds:
  local input paths made absolute (a rerun from another folder reads the same input), and
  --shard_size only where --num_shards does not set the count."""
  defaults = {f.name: f.default for f in dataclasses.fields(ShardOptions)
              if f.default is not dataclasses.MISSING}
  out = {k: list(v) if isinstance(v, (tuple, list)) else v
         for k, v in {**defaults, **options}.items() if k not in NOT_LAYOUT}
  if out["num_shards"]:
    del out["shard_size"]
  for k in ("input", "image_dir", "image_list"):
    if out[k] and "://" not in out[k]:
      out[k] = os.path.abspath(out[k])
  return out


def _flags(options: dict, keys) -> str:
  def value(v):
    return ",".join(map(str, v)) if isinstance(v, list) else v
  return " ".join(f"--{k}={value(options[k])}" for k in keys if k in options)


def _layout_path(opts: ShardOptions) -> str:
  """Where a run records its layout options before writing: `<name>.json` is written only at
  the end, so that its presence still means a complete set."""
  return os.path.join(opts.output_dir, f"{opts.name}.layout.json")


def check_rerun(opts: ShardOptions) -> None:
  """Keeps the shards in `opts.output_dir` only for a rerun that would write the same ones:
  refuses other layout options (compared with `<name>.json`, or `<name>.layout.json` when an
  interrupted run wrote no manifest), or shards with neither, in one line naming the flags;
  with `opts.overwrite`, deletes the set and its manifest first. Where no shard is kept,
  records this run's layout before any shard is written."""
  import tensorflow as tf
  manifest_path = os.path.join(opts.output_dir, f"{opts.name}.json")
  shards = tf.io.gfile.glob(os.path.join(opts.output_dir, f"{opts.name}-?????-of-?????.tfrecord"))
  want = layout_options(dataclasses.asdict(opts))
  if opts.overwrite:
    old = tf.io.gfile.glob(os.path.join(opts.output_dir, f"{opts.name}-?????-of-?????.tfrecord*"))
    if tf.io.gfile.exists(manifest_path):
      old.append(manifest_path)
    for path in old:
      tf.io.gfile.remove(path)
  elif shards:
    record_path = next((p for p in (manifest_path, _layout_path(opts)) if tf.io.gfile.exists(p)),
                       None)
    if record_path is None:
      raise ValueError(
          f"{opts.output_dir} holds {len(shards)} {opts.name} shards but no {opts.name}.json "
          "recording the options they were written with: choose another --output_dir, or pass "
          "--overwrite to replace them")
    try:
      with tf.io.gfile.GFile(record_path) as f:
        record = json.load(f)
      have = layout_options(record.get("layout") or record["options"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{record_path} is not a make_shards manifest ({type(e).__name__}): "
                       "choose another --output_dir or --name, or pass --overwrite") from None
    differ = [k for k in want if want[k] != have.get(k)]
    if differ:
      raise ValueError(
          f"{opts.output_dir} holds {opts.name} shards written with {_flags(have, differ)} but "
          f"this run has {_flags(want, differ)}: rerun with those to resume, choose another "
          "--output_dir, or pass --overwrite to replace them")
    return
  with tf.io.gfile.GFile(_layout_path(opts), "w") as f:
    f.write(json.dumps({"name": opts.name, "layout": want}, indent=1))


def check_one_shard_set(opts: ShardOptions, manifest: dict) -> None:
  """Fails when the folder holds `name` shards the manifest does not list: the same options
  over an input that changed size give another shard count, and the glob would read both."""
  import tensorflow as tf
  listed = {s["file"] for s in manifest["shards"]}
  stale = sorted(os.path.basename(p) for p in tf.io.gfile.glob(
      os.path.join(opts.output_dir, f"{opts.name}-?????-of-?????.tfrecord"))
      if os.path.basename(p) not in listed)
  if stale:
    raise ValueError(
        f"{opts.output_dir} also holds {len(stale)} {opts.name} shards of another layout "
        f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}), as when the input "
        f"changed since they were written: rerun with --overwrite, or a {opts.name}-* glob "
        "reads both sets")


# ----------------------------------------------------------------------------- manifest
def write_manifest(_, opts: ShardOptions, layout_record: dict, pipeline_options: dict,
                   read: int, dropped: dict, shards: list, labels: list) -> None:
  import tensorflow as tf
  shards = sorted(shards, key=lambda s: s["shard"])
  sizes = [s["records"] for s in shards]
  mean = sum(sizes) / max(1, len(sizes))
  manifest = {
      "name": opts.name, "num_shards": len(shards), "images_in": read,
      "records": sum(sizes), "dropped": dict(sorted(dropped.items())),
      "dropped_total": sum(dropped.values()),
      "shard_sizes": {"min": min(sizes, default=0), "max": max(sizes, default=0), "mean": mean,
                      "max_deviation_pct": 100 * max((abs(s - mean) for s in sizes), default=0)
                      / max(mean, 1)},
      "shards": [{"file": s["file"], "records": s["records"], "resumed": s["resumed"]}
                 for s in shards],
      "resumed_shards": sum(s["resumed"] for s in shards),
      "labels": sorted(labels),
      "options": {k: list(v) if isinstance(v, tuple) else v
                  for k, v in dataclasses.asdict(opts).items()},
      "layout": layout_record,
      "pipeline_options": pipeline_options,
  }
  with tf.io.gfile.GFile(os.path.join(opts.output_dir, f"{opts.name}.json"), "w") as f:
    f.write(json.dumps(manifest, indent=1))


# ----------------------------------------------------------------------------- pipeline
def source_items(p, opts: ShardOptions):
  """(items, dropped-by-source PCollections) for `opts.source`."""
  if opts.source == "folder":
    return p | "Folder" >> sources.FolderSource(opts.input), []
  if opts.source == "list":
    out = p | "List" >> sources.ListSource(opts.input, opts.image_dir)
    return out["items"], [out[DROPPED]]
  if opts.source == "yfcc":
    out = p | "YFCC100M" >> sources.YfccSource(opts.input, opts.image_dir, opts.image_list)
    return out["items"], [out[DROPPED]]
  items = sources.tiny_imagenet_items(opts.input, opts.split, opts.classes, opts.per_class,
                                       opts.skip_per_class)
  return p | "Tiny ImageNet" >> beam.Create(items, reshuffle=True), []


def build(p, opts: ShardOptions, pipeline_options: dict) -> None:
  items, dropped = source_items(p, opts)
  if opts.long_tail_exponent:
    items = items | "Long tail" >> sources.LongTail(
        opts.long_tail_size, opts.long_tail_exponent, opts.near_duplicate_fraction, opts.seed)
  if opts.drop_labels:
    items = items | "Drop labels" >> beam.Map(
        lambda it: dataclasses.replace(it, label=-1, label_text=""))
  checked = items | "Read and check" >> beam.ParDo(ReadAndCheck()).with_outputs(DROPPED, main="ok")
  kept = (checked.ok | "By content" >> beam.Map(lambda c: (c.sha1, c))
          | "Group copies" >> beam.GroupByKey()
          | "Duplicates, placeholders" >> beam.FlatMap(
              keep_one_per_hash, opts.placeholder_min_copies,
              frozenset(opts.placeholder_sha1), opts.dedupe).with_outputs(DROPPED, main="kept"))
  keyed = kept.kept | "By bucket" >> beam.Map(
      lambda c: (bucket_of(order_key(c.image_id, opts.seed)), c))
  counts = beam.pvalue.AsDict(keyed | "Bucket sizes" >> beam.combiners.Count.PerKey())
  written = (keyed | "Group buckets" >> beam.GroupByKey()
             | "Rank" >> beam.ParDo(RankInBucket(opts.num_shards, opts.shard_size, opts.seed),
                                    counts)
             | "Group shards" >> beam.GroupByKey()
             | "Write" >> beam.ParDo(WriteShard(opts.output_dir, opts.name, opts.num_shards,
                                                opts.shard_size), counts)
             .with_outputs(DROPPED, main="shards"))
  all_dropped = ((*dropped, checked[DROPPED], kept[DROPPED], written[DROPPED])
                 | "All dropped" >> beam.Flatten() | "Per reason" >> beam.CombinePerKey(sum))
  labels = (items | "Labels" >> beam.Map(lambda it: (it.label, it.label_text))
            | beam.Filter(lambda lt: lt[0] >= 0) | beam.Distinct())
  read = items | "Count read" >> beam.combiners.Count.Globally()
  _ = (p | "Manifest" >> beam.Create([None])
       | beam.Map(write_manifest, opts, layout_options(dataclasses.asdict(opts)),
                  pipeline_options, beam.pvalue.AsSingleton(read),
                  beam.pvalue.AsDict(all_dropped), beam.pvalue.AsList(written.shards),
                  beam.pvalue.AsList(labels)))


def counters(result) -> dict:
  """The pipeline's `make_shards` counters, by name (committed values where the runner has
  them)."""
  out = {}
  for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(
      sources.COUNTER_NAMESPACE))["counters"]:
    value = c.committed if c.committed is not None else c.attempted
    out[c.key.metric.name] = out.get(c.key.metric.name, 0) + value
  return out


def run(opts: ShardOptions) -> dict:
  """Runs the pipeline to the end; returns the manifest plus the Beam counters."""
  import tensorflow as tf
  from apache_beam.options.pipeline_options import PipelineOptions
  opts.validate()
  options = PipelineOptions(list(opts.beam_args))
  recorded = options.get_all_options(drop_default=True, retain_unknown_options=True)
  tf.io.gfile.makedirs(opts.output_dir)
  p = beam.Pipeline(runner=pipeline_runner(options), options=options)
  build(p, opts, {k: v for k, v in recorded.items() if isinstance(v, (str, int, float, bool))})
  check_rerun(opts)  # after build, which refuses a missing input first
  result = p.run()
  result.wait_until_finish()
  with tf.io.gfile.GFile(os.path.join(opts.output_dir, f"{opts.name}.json")) as f:
    manifest = json.load(f)
  manifest["beam_counters"] = counters(result)
  if tf.io.gfile.exists(_layout_path(opts)):   # the manifest records the layout now
    tf.io.gfile.remove(_layout_path(opts))
  check_one_shard_set(opts, manifest)
  if not manifest["records"]:
    raise ValueError(f"no images written from --input={opts.input}: "
                     f"dropped {manifest['dropped'] or 'nothing (no images found)'}")
  return manifest


def write_shards(source: str, input_path: str, output_dir: str, name: str = "train",
                 num_shards: int = 0, seed: int = 0, **kw) -> dict:
  """`run` for callers that have no flags (tests, benchmarks)."""
  return run(ShardOptions(source=source, input=input_path, output_dir=output_dir, name=name,
                          num_shards=num_shards, seed=seed, **kw))


# ----------------------------------------------------------------------------- command line
def options_from_flags(f, beam_args: Sequence[str]) -> ShardOptions:
  sha1 = f.placeholder_sha1
  if sha1 and os.path.isfile(sha1):
    with open(sha1) as fh:
      sha1 = ",".join(line.split()[0] for line in fh if line.strip() and not line.startswith("#"))
  return ShardOptions(
      source=f.source, input=f.input, output_dir=f.output_dir, name=f.name,
      image_dir=f.image_dir, image_list=f.image_list, split=f.split,
      classes=tuple(c for c in f.classes.split(",") if c), per_class=f.per_class,
      skip_per_class=f.skip_per_class, drop_labels=f.drop_labels, num_shards=f.num_shards, shard_size=f.shard_size, seed=f.seed,
      dedupe=f.dedupe, placeholder_min_copies=f.placeholder_min_copies,
      placeholder_sha1=tuple(s for s in sha1.split(",") if s),
      long_tail_exponent=f.long_tail_exponent, long_tail_size=f.long_tail_size,
      near_duplicate_fraction=f.near_duplicate_fraction, overwrite=f.overwrite,
      beam_args=tuple(beam_args)).validate()


def main(argv):
  from absl import flags
  from dc_tf.config import UserError
  logging.getLogger().setLevel(logging.INFO)
  try:
    manifest = run(options_from_flags(flags.FLAGS, argv[1:]))
  except (FileNotFoundError, ValueError) as e:  # bad input: one line naming the file or flag
    raise UserError(str(e)) from None
  print(json.dumps({k: v for k, v in manifest.items()
                    if k not in ("labels", "shards", "options")}, indent=1))


def define_flags():
  from absl import flags
  flags.DEFINE_enum("source", "folder", ["folder", "list", "yfcc", "tiny_imagenet"], "Input kind.")
  flags.DEFINE_string("input", None, "Folder, list file, YFCC100M metadata file or zip.",
                      required=True)
  flags.DEFINE_string("image_dir", "", "list: base folder of the paths; yfcc: folder tree of "
                      "images named <photo_id>.<ext> at any depth.")
  flags.DEFINE_string("image_list", "", "yfcc: `photo_id<TAB>path` lines (instead of a walk).")
  flags.DEFINE_string("output_dir", None, "Where shards go (local or gs://).", required=True)
  flags.DEFINE_string("name", "train", "Shard name prefix.")
  flags.DEFINE_bool("overwrite", False, "Delete the <name> shards in --output_dir first; "
                    "without it, a rerun resumes only with the options they were written with.")
  flags.DEFINE_integer("num_shards", 0, "Number of shards; 0 = from --shard_size.")
  flags.DEFINE_integer("shard_size", 1024, "Images per shard when --num_shards=0.")
  flags.DEFINE_integer("seed", 0, "Seed of the image order; < 0 orders by image id.")
  flags.DEFINE_bool("dedupe", True, "Drop byte-identical copies (the smallest id is kept).")
  flags.DEFINE_integer("placeholder_min_copies", 50, "A hash with this many copies or more is "
                       "a placeholder image, all dropped (0 = never).")
  flags.DEFINE_string("placeholder_sha1", "", "Known placeholder SHA-1s: comma-separated, or a "
                      "file with one a line.")
  flags.DEFINE_string("split", "train", "tiny_imagenet: train or val.")
  flags.DEFINE_string("classes", "", "tiny_imagenet: comma-separated wnids (default all).")
  flags.DEFINE_integer("per_class", 0, "tiny_imagenet: images per class (0 = all).")
  flags.DEFINE_integer("skip_per_class", 0, "tiny_imagenet: images per class passed over first "
                       "(in member-name order), for a split held back from --per_class=N.")
  flags.DEFINE_bool("drop_labels", False, "Write no labels (training pools are label-free).")
  flags.DEFINE_float("long_tail_exponent", 0.0, "Resample a labelled source to Zipf class sizes "
                     "with this exponent (0 = off); needs --long_tail_size.")
  flags.DEFINE_integer("long_tail_size", 0, "Images in the long-tailed pool.")
  flags.DEFINE_float("near_duplicate_fraction", 0.5, "Long tail: share of the copies that are "
                     "near duplicates (re-encoded crops) rather than exact ones.")


if __name__ == "__main__":
  from dc_tf import cli
  # Run the imported module, not __main__: Beam pickles what __main__ defines by value, and
  # cluster workers import dc_tf.data.make_shards.
  from dc_tf.data import make_shards as _module
  _module.define_flags()
  # Flags this module does not define are Beam's pipeline options (--runner, --project, ...).
  cli.run(_module.main, known_only=True)
