"""Features of every row, through the serving SavedModel, in `.npy` shards plus a CSV index.

Output folder (readable with numpy and pandas alone, no dc_tf):

  embed.json                   the manifest: layers and their dims, shards, rows, drop counts
                               by reason, the model (absolute, and relative to the output when
                               inside it: `model_path_of`) and its sha256, the input options
  index.csv                    one line per row, in row order: row, shard, image_id, key, path,
                               sha1, format, height, width, label, label_text, user_id, tags,
                               url, record_file, record_index (TFRecord input: where it is)
  <layer>-<shard:05d>.npy      float32 [rows of the shard, dims], one file per layer and shard
  shard-<shard:05d>.json       written last: the shard is finished. It records the model's
                               sha256, the layers, the input options and a digest of its rows

    import glob, numpy as np, pandas as pd
    index = pd.read_csv("out/index.csv")
    fc7 = np.concatenate([np.load(f, mmap_mode="r") for f in sorted(glob.glob("out/probe_fc7-*.npy"))])

.npy rather than Parquet: no new dependency, and a vector index (faiss, ScaNN) memory-maps the
shards as they are. Resuming: a shard whose `shard-*.json` exists is kept when it matches this
run, and the run stops naming the difference when it does not (`check_finished`). --input is
resolved once (`inputs.resolve`) and a shard's rows digest hashes the paths relative to it, so a
resume may spell the same folder another way (`photos` then `/abs/photos`). A shard json
written before that (no "digest_paths") is checked as then: against the paths as this run
spells --input, so it resumes when spelled as when it was written, and is refused otherwise.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import time

import numpy as np
import tensorflow as tf

from dc_tf import export
from dc_tf.config import UserError
from dc_tf.embed import inputs

MANIFEST = "embed.json"
INDEX = "index.csv"
EXPORT_SUBDIR = "export"   # where a run dir's model is exported once, inside --output


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
  input: str
  model: str
  output: str
  layers: tuple[str, ...] = ()     # () = every probe_<layer> output of the export
  shard_size: int = 1024
  batch_size: int = 32
  dedupe: bool = True
  input_format: str = "auto"       # inputs.INPUT_FORMATS
  input_as_given: str = ""         # --input as typed (set by validate): old shards' digests
  trust_model: bool = False        # --trust_model: load a model export.check_model refuses

  def validate(self) -> "EmbedOptions":
    """These options with --input resolved (`inputs.resolve`): call it once, at the edge."""
    if self.shard_size < 1 or self.batch_size < 1:
      raise UserError("--shard_size and --batch_size must be >= 1")
    return dataclasses.replace(self, input=inputs.resolve(self.input),
                               input_as_given=self.input_as_given or self.input)

  def input_options(self) -> dict:
    """What decides the rows: a finished shard is kept only when these are unchanged."""
    return {"input": inputs.resolve(self.input), "input_format": self.input_format,
            "dedupe": self.dedupe, "shard_size": self.shard_size}


def serving_dir(model: str, output: str) -> str:
  """The serving SavedModel of `model`: an export dir, its serving/, or a run dir (exported
  once into OUTPUT/export, as `python -m dc_tf.export` would)."""
  for d in (os.path.join(model, "serving"), model):
    if os.path.exists(os.path.join(d, "saved_model.pb")):
      return d
  if os.path.exists(os.path.join(model, "config.json")):
    from dc_tf.training import checkpointing
    target = os.path.join(output, EXPORT_SUBDIR)
    prefix = checkpointing.latest_checkpoint(model)
    source = {"run_dir": os.path.abspath(model), "checkpoint": os.path.basename(prefix),
              "index_sha256": export._file_sha256(prefix + ".index")}  # noqa: SLF001
    source_path = os.path.join(target, "exported_from.json")
    if os.path.exists(source_path):
      with open(source_path) as f:
        have = json.load(f)
      if have != source:   # a newer checkpoint must not be embedded with the old export
        raise UserError(f"{target} was exported from {have}, --model is now {source}: use "
                        "another --output")
    else:
      export.export_run(model, target)
      with open(source_path, "w") as f:
        json.dump(source, f)
    return os.path.join(target, "serving")
  raise UserError(f"--model is neither an export (serving/saved_model.pb) nor a run dir "
                  f"(config.json): {model}")


class Model:
  """The export's `serving_default` (JPEG bytes -> features), as the export serves it;
  `export.load` refuses an unscanned or unvouched model unless `trust` (issue 37)."""

  def __init__(self, path: str, trust: bool = False):
    self.path = path
    self.trust = trust
    self.sha256 = export._dir_sha256(path)  # noqa: SLF001 - the card's own checksum
    self._fn = export.load(path, trust=trust).signatures["serving_default"]
    self.outputs = sorted(self._fn.structured_outputs)

  def layers(self, wanted) -> tuple[str, ...]:
    wanted = tuple(wanted) or tuple(f"probe_{n}" for n in export.PROBE_LAYERS
                                    if f"probe_{n}" in self.outputs)
    unknown = [w for w in wanted if w not in self.outputs]
    if unknown:
      raise UserError(f"--layers {unknown} not returned by the export; it has "
                      f"{', '.join(self.outputs)}")
    return wanted

  def __call__(self, images: list[bytes], layers) -> dict[str, np.ndarray]:
    out = self._fn(image_bytes=tf.constant(images, tf.string))
    return {name: out[name].numpy().astype(np.float32) for name in layers}


def shard_rows(rows: list, shard_size: int) -> list[list]:
  return [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]


def _relative_to(root: str):
  """path -> the path relative to `root` when below it, else as it is (a URL, an absolute
  path from a list file)."""
  prefix = root.rstrip("/") + "/"
  return lambda path: path[len(prefix):] if path.startswith(prefix) else path


def rows_digest(rows, spell=lambda path: path) -> str:
  h = hashlib.sha1()
  for r in rows:
    h.update(f"{r.image_id}\t{r.sha1}\t{spell(r.path)}\n".encode())
  return h.hexdigest()


def _as_given(opts: EmbedOptions):
  """path -> the path as dc_tf spelled it before --input was resolved: below the input as
  typed (a list's folder made absolute), for the digests of shard jsons written then."""
  kind = inputs.input_kind(opts.input, opts.input_format)
  given = opts.input_as_given or opts.input
  old_root = (given.rstrip("/") if kind == "folder" else
              os.path.dirname(os.path.abspath(given)) if kind in ("list", "yfcc_list") else
              os.path.dirname(given))
  relative = _relative_to(inputs.input_root(opts.input, kind))
  return lambda path: (path if relative(path) == path
                       else os.path.join(old_root, relative(path)))


def shard_meta(index: int, rows, model_sha256: str, layers, opts: EmbedOptions) -> dict:
  kind = inputs.input_kind(opts.input, opts.input_format)
  return {"shard": index, "model_sha256": model_sha256, "layers": list(layers),
          "input_options": opts.input_options(), "rows": len(rows),
          "rows_digest": rows_digest(rows, _relative_to(inputs.input_root(opts.input, kind))),
          "digest_paths": "relative to the input"}


def meta_path(output: str, index: int) -> str:
  return os.path.join(output, f"shard-{index:05d}.json")


def check_finished(output: str, index: int, want: dict, legacy_digest=None) -> bool:
  """True when shard `index` is finished and matches `want`; False when it is not finished;
  a UserError naming the first difference when it was finished by another run.
  `legacy_digest()`: the rows digest as dc_tf computed it before "digest_paths"."""
  path = meta_path(output, index)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    have = json.load(f)
  if "digest_paths" not in have and legacy_digest is not None:   # written before --input
    want = {**want, "rows_digest": legacy_digest()}                # was resolved: as then
  names = {"model_sha256": "model sha256", "layers": "layers",
           "input_options": "input options", "rows": "rows", "rows_digest": "rows (the input changed)"}
  for key, name in names.items():
    if have.get(key) != want[key]:
      raise UserError(f"{path} was written with {name} {have.get(key)!r}, this run has "
                      f"{want[key]!r}: use another --output, or delete that folder's shards")
  return True


_SHARD_JSON = re.compile(r"^shard-(\d+)\.json$")


def check_no_stale_shards(output: str, num_shards: int) -> None:
  """Refuses a finished shard numbered at or beyond this run's `num_shards` (the input
  shrank, or a gap left by an older run): a reader globbing the shards would read stale rows."""
  stale = sorted((int(m.group(1)), name) for name in os.listdir(output)
                 if (m := _SHARD_JSON.match(name)) and int(m.group(1)) >= num_shards)
  if stale:
    raise UserError(f"{os.path.join(output, stale[0][1])} is beyond this run's {num_shards} "
                    "shards (the input has fewer rows than when it was written): use another "
                    "--output, or delete that folder's shards")


def write_shard(output: str, index: int, feats: dict[str, np.ndarray], meta: dict) -> None:
  """Each layer's array to a temporary name, renamed; the shard json last (finished)."""
  for name, array in feats.items():
    final = os.path.join(output, f"{name}-{index:05d}.npy")
    tmp = f"{final}.tmp-{os.getpid()}.npy"
    np.save(tmp, np.ascontiguousarray(array, np.float32))
    os.replace(tmp, final)
  tmp = f"{meta_path(output, index)}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, meta_path(output, index))


def embed_rows(model: Model, rows, layers, batch_size: int, progress=None) -> dict:
  out = {name: [] for name in layers}
  for i in range(0, len(rows), batch_size):
    batch = rows[i:i + batch_size]
    for name, array in model([inputs.read_bytes(r) for r in batch], layers).items():
      out[name].append(array)
    if progress is not None:
      progress.update(len(batch))
  return {name: np.concatenate(a) for name, a in out.items()}


def write_index(output: str, shards) -> None:
  tmp = os.path.join(output, f"{INDEX}.tmp-{os.getpid()}")
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("row", "shard") + inputs.INDEX_COLUMNS)
    row = 0
    for s, rows in enumerate(shards):
      for r in rows:
        w.writerow((row, s) + tuple(getattr(r, c) for c in inputs.INDEX_COLUMNS))
        row += 1
  os.replace(tmp, os.path.join(output, INDEX))


def write_manifest(output: str, opts: EmbedOptions, model: Model, layers, dims: dict,
                   shards, dropped: dict, images_in: int, resumed: int, runner: str,
                   seconds: float) -> dict:
  rows = sum(len(s) for s in shards)
  model_path = _absolute(model.path)
  in_output = _relative_to(_absolute(output))(model_path)   # a run dir's export, say
  manifest = {
      "format": "npy shards <layer>-<shard>.npy (float32 [rows, dims]) + index.csv",
      "model": model_path, "model_in_output": None if in_output == model_path else in_output,
      "model_sha256": model.sha256, "layers": list(layers),
      "dims": dims, "images_in": images_in, "rows": rows, "dropped": dropped,
      "dropped_total": sum(dropped.values()),
      "shards": [{"shard": i, "rows": len(s)} for i, s in enumerate(shards)],
      "resumed_shards": resumed, "options": opts.input_options(), "runner": runner,
      "seconds": round(seconds, 3), "images_per_s": round(rows / max(seconds, 1e-9), 2)}
  with open(os.path.join(output, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def model_path_of(features_dir: str, manifest: dict) -> str:
  """The serving export `features_dir` was embedded with, from wherever this runs: inside the
  features folder when it is there (a run dir exported into OUTPUT/export, or the folder moved
  with it), else the absolute path embed.json records. An embed.json of an older dc_tf holds
  the path as it was given, relative to the folder embed ran in: tried from here, then as
  OUTPUT/export/serving. A UserError naming the path when none exists."""
  model = manifest["model"]
  tries = [os.path.join(features_dir, manifest["model_in_output"])] \
      if manifest.get("model_in_output") else []
  tries.append(model)
  if not os.path.isabs(model) and model.endswith(os.path.join(EXPORT_SUBDIR, "serving")):
    tries.append(os.path.join(features_dir, EXPORT_SUBDIR, "serving"))
  for path in tries:
    if "://" in path or os.path.exists(os.path.join(path, "saved_model.pb")):
      return path
  raise UserError(f"the export {os.path.join(features_dir, MANIFEST)} was embedded with is "
                  f"not found: {model}" + ("" if os.path.isabs(model) else
                                            " (relative to the folder embed ran in)"))


def prepare(opts: EmbedOptions):
  """(model, layers, shards of rows, dropped, images in, finished shard indices, metas)."""
  opts = opts.validate()
  os.makedirs(opts.output, exist_ok=True)
  model = Model(_absolute(serving_dir(opts.model, opts.output)), trust=opts.trust_model)
  layers = model.layers(opts.layers)
  rows, dropped, images_in = inputs.plan(opts.input, opts.dedupe, opts.input_format)
  if not rows:
    raise UserError(f"no images to embed in --input={opts.input}: dropped "
                    f"{dropped or 'nothing (no images found)'}")
  shards = shard_rows(rows, opts.shard_size)
  metas = [shard_meta(i, s, model.sha256, layers, opts) for i, s in enumerate(shards)]
  as_given = _as_given(opts)
  finished = {i for i, (s, m) in enumerate(zip(shards, metas))
              if check_finished(opts.output, i, m, lambda s=s: rows_digest(s, as_given))}
  check_no_stale_shards(opts.output, len(shards))
  if dropped:
    logging.warning("skipped %d of %d files: %s", sum(dropped.values()), images_in, dropped)
  return model, layers, shards, dropped, images_in, finished, metas


def dims_of(output: str, layers) -> dict:
  return {name: int(np.load(os.path.join(output, f"{name}-00000.npy"), mmap_mode="r").shape[1])
          for name in layers}


def run(opts: EmbedOptions) -> dict:
  """The one-box path: every unfinished shard, in order, with a tqdm bar in images/s."""
  from tqdm import tqdm
  start = time.perf_counter()
  opts = opts.validate()
  model, layers, shards, dropped, images_in, finished, metas = prepare(opts)
  todo = [i for i in range(len(shards)) if i not in finished]
  with tqdm(total=sum(len(shards[i]) for i in todo), unit="img", desc="embed") as bar:
    for i in todo:
      write_shard(opts.output, i, embed_rows(model, shards[i], layers, opts.batch_size, bar),
                  metas[i])
  write_index(opts.output, shards)
  return write_manifest(opts.output, opts, model, layers, dims_of(opts.output, layers), shards,
                        dropped, images_in, len(finished), "one-box",
                        time.perf_counter() - start)
