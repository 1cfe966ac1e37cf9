"""Checkpoint layout: what a run directory holds, and loading a trunk back from it.

  MODEL_DIR/config.json      the frozen ExperimentConfig
  MODEL_DIR/ckpt/ckpt-N      tf.train.Checkpoint: trunk, V, optimizer, step, and the
                             cluster state (id -> (super, sub) table, assignment epoch)
  MODEL_DIR/subheads/worker-W/ckpt-N
                             the sub-head pieces of worker W's replicas and their momentum,
                             written by that worker (no replica holds all heads, so no
                             single file does); names carry the head and columns, so a run
                             on another replica count re-cuts them (`restore_pieces`)
  MODEL_DIR/assignments/ids.npy
                             int64 image ids, in the order of every table's rows (written
                             once; a table whose ids differ has its own ids-<epoch>.npy)
  MODEL_DIR/assignments/table-<epoch>.npy
                             int32 cluster per row (super * k + sub) of the reassignment at
                             that epoch; the newest --keep_assignments kept (0 = all). Written
                             by the chief, atomically; read by `python -m dc_tf.analysis`
  MODEL_DIR/tb/              TensorBoard summaries
  MODEL_DIR/log.jsonl        one JSON line per epoch / reassignment
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow as tf

from dc_tf.config import ExperimentConfig, UserError
from dc_tf.models import vgg
from dc_tf.placement import Piece

SUBHEADS = "subheads"
ASSIGNMENTS = "assignments"
PIECE_FIELDS = ("kernel", "bias", "kernel_momentum", "bias_momentum")


class CheckpointError(UserError, FileNotFoundError):
  """No usable checkpoint; the message names the directory."""


def read_config(model_dir: str) -> ExperimentConfig:
  path = os.path.join(model_dir, "config.json")
  if not tf.io.gfile.exists(path):
    raise CheckpointError(f"no config.json in {model_dir}: not a dc_tf training run directory")
  with tf.io.gfile.GFile(path) as f:
    return ExperimentConfig.from_json(f.read())


def write_config(model_dir: str, config: ExperimentConfig) -> None:
  tf.io.gfile.makedirs(model_dir)
  with tf.io.gfile.GFile(os.path.join(model_dir, "config.json"), "w") as f:
    f.write(config.to_json())


def latest_checkpoint(path: str) -> str:
  """The newest checkpoint under a run dir, its ckpt/ folder, or a checkpoint prefix."""
  for candidate in (os.path.join(path, "ckpt"), path):
    if tf.io.gfile.isdir(candidate):
      found = tf.train.latest_checkpoint(candidate)
      if found:
        return found
  if tf.io.gfile.exists(path + ".index"):
    return path
  raise CheckpointError(f"no checkpoint found at {path}")


def _run_config_of(path: str, prefix: str) -> ExperimentConfig | None:
  """The config.json of the run that `path` (a run dir, its ckpt/ folder or a checkpoint
  prefix) belongs to; None when there is none (a bare checkpoint)."""
  for folder in (path, os.path.dirname(path.rstrip("/")), os.path.dirname(os.path.dirname(prefix))):
    if folder and tf.io.gfile.exists(os.path.join(folder, "config.json")):
      return read_config(folder)
  return None


def check_front(model_config, path: str, prefix: str) -> None:
  """Refuses a trunk trained on another front (Sobel or RGB, input pad): a pad differs in no
  variable's shape, so the restore alone would load it silently (issue 26)."""
  saved = _run_config_of(path, prefix)
  if saved is None or (saved.model.sobel, saved.model.pad) == (model_config.sobel,
                                                               model_config.pad):
    return
  raise CheckpointError(
      f"{path} holds a trunk of front {saved.model.front}, this run's is {model_config.front}: "
      f"conv1 would see other pixels than it was trained on. Pass {saved.model.front} to "
      "follow the checkpoint")


def restore_trunk(trunk, path: str, model_config=None) -> int:
  """Restores every trunk variable from a run's checkpoint (the rest of it, heads and
  optimizer, is ignored); returns its step. A checkpoint of another architecture, or one
  without some trunk variable, is refused with the variables named; with `model_config`,
  so is one of another front (`check_front`)."""
  prefix = latest_checkpoint(path)
  if model_config is not None:
    check_front(model_config, path, prefix)
  step = tf.Variable(0, dtype=tf.int64)
  try:
    status = tf.train.Checkpoint(trunk=trunk, step=step).restore(prefix)
  except ValueError as e:   # shapes differ: another width, fc_dim, image size or Sobel
    raise CheckpointError(f"{prefix} does not fit this trunk ({trunk.name}, "
                          f"{trunk.count_params():,} parameters): {str(e).splitlines()[0]}") from e
  status.expect_partial()
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    found = re.search(r"Found (\d+) Python objects", str(e))
    names = re.findall(r"path=([^,\s]+)", str(e))
    raise CheckpointError(
        f"{prefix} has no value for {found.group(1) if found else 'some'} of the trunk's "
        f"{len(trunk.weights)} variables (e.g. {', '.join(names[:5]) or 'see the log'}): it is "
        "not a checkpoint of this architecture") from e
  return int(step.numpy())


def epoch_of(step: int, steps_per_epoch: int) -> int:
  """Epochs done at global step `step`, the trainer's step -> epoch mapping; -1 where
  `steps_per_epoch` is unknown (0 or less: a checkpoint that does not record it)."""
  return step // steps_per_epoch if steps_per_epoch > 0 else -1


def read_progress(path: str) -> tuple[int, int]:
  """(step, epoch) of the newest checkpoint at `path` (a run dir, its ckpt/ folder or a
  prefix), from the `step` and `steps_per_epoch` the trainer saves; -1 for what it lacks."""
  reader = tf.train.load_checkpoint(latest_checkpoint(path))

  def value(name):
    key = f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else -1
  step = value("step")
  return step, epoch_of(step, value("steps_per_epoch"))


def load_trunk(model_dir: str):
  """(trunk, config, step) from a run directory; `read_progress` gives the epoch."""
  config = read_config(model_dir)
  trunk = vgg.trunk_from_config(config.model)
  step = restore_trunk(trunk, model_dir)
  return trunk, config, step


def _pieces_dir(model_dir: str, worker: int) -> str:
  return os.path.join(model_dir, SUBHEADS, f"worker-{worker}")


def save_pieces(model_dir: str, worker: int, step: int, pieces: dict[str, dict],
                num_replicas: int, keep: int) -> str:
  """Writes this worker's pieces ({piece name: {field: variable}}) as ckpt-<step>; keeps the
  newest keep + 1 (one more than the run's checkpoints, so the pieces of the newest complete
  run checkpoint survive a crash between the two writes)."""
  folder = _pieces_dir(model_dir, worker)
  prefix = tf.train.Checkpoint(
      pieces=pieces, num_replicas=tf.Variable(num_replicas, dtype=tf.int64)).write(
          os.path.join(folder, f"ckpt-{step}"))
  steps = sorted({int(m.group(1)) for f in tf.io.gfile.listdir(folder)
                  if (m := re.match(r"ckpt-(\d+)\.index$", f))})
  for old in steps[:-(keep + 1)]:
    for f in tf.io.gfile.glob(os.path.join(folder, f"ckpt-{old}.*")):
      tf.io.gfile.remove(f)
  return prefix


def restore_pieces(model_dir: str, step: int, pieces: dict[str, dict], num_replicas: int) -> None:
  """Fills this worker's pieces from the piece files of step `step` of every worker that can
  be read here. A piece is assembled from the saved columns it covers, so the saved layout
  may differ from this one; columns that no readable file holds are an error naming both
  replica counts."""
  saved, saved_replicas = [], set()
  for index in tf.io.gfile.glob(os.path.join(model_dir, SUBHEADS, "*", f"ckpt-{step}.index")):
    reader = tf.train.load_checkpoint(index[:-len(".index")])
    saved_replicas.add(int(reader.get_tensor("num_replicas/.ATTRIBUTES/VARIABLE_VALUE")))
    names = {n.split("/")[1] for n, _ in tf.train.list_variables(index[:-len(".index")])
             if n.startswith("pieces/")}
    saved += [(Piece.from_name(name), name, reader) for name in names]
  for name, fields in pieces.items():
    want = Piece.from_name(name)
    parts = sorted(((p, n, r) for p, n, r in saved
                    if p.head == want.head and p.start < want.stop and p.stop > want.start),
                   key=lambda part: part[0])
    covered = want.start
    for p, _, _ in parts:
      covered = max(covered, p.stop) if p.start <= covered else covered
    if covered < want.stop:
      was = ", ".join(str(r) for r in sorted(saved_replicas)) or "an unknown number of"
      raise CheckpointError(
          f"step {step}: columns {covered}..{want.stop - 1} of sub-head {want.head} are in no "
          f"readable file under {os.path.join(model_dir, SUBHEADS)}. The checkpoint was written "
          f"by {was} replicas, this run has {num_replicas}: make every worker's "
          f"{SUBHEADS}/worker-* folder readable here (shared or copied), or resume with "
          f"{was} replicas.")
    for field, var in fields.items():
      columns, at = [], want.start
      for p, n, r in parts:
        if p.stop <= at:
          continue
        value = r.get_tensor(f"pieces/{n}/{field}/.ATTRIBUTES/VARIABLE_VALUE")
        columns.append(value[..., at - p.start:min(p.stop, want.stop) - p.start])
        at = min(p.stop, want.stop)
      var.assign(np.concatenate(columns, axis=-1))


# --- the assignment history (issue 38: what the clusters capture over training) -----------
def _save_npy(path: str, array: np.ndarray) -> None:
  """Writes then renames: a reader (or a crash) never sees half a table."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    np.save(f, array)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _load_npy(path: str) -> np.ndarray:
  with tf.io.gfile.GFile(path, "rb") as f:
    return np.load(f)


def assignment_epochs(model_dir: str) -> list[int]:
  """Epochs of the tables kept under MODEL_DIR/assignments, oldest first."""
  folder = os.path.join(model_dir, ASSIGNMENTS)
  if not tf.io.gfile.isdir(folder):
    return []
  return sorted(int(m.group(1)) for f in tf.io.gfile.listdir(folder)
                if (m := re.match(r"table-(\d+)\.npy$", f)))


def save_assignments(model_dir: str, epoch: int, image_ids: np.ndarray, labels: np.ndarray,
                     keep: int = 0) -> list[int]:
  """Keeps one reassignment's table (`labels[i]` the cluster of `image_ids[i]`, the flat
  super * k + sub) as table-<epoch>.npy; drops the oldest beyond `keep` (0 = keep all).
  Returns the epochs kept. The chief alone calls it."""
  folder = os.path.join(model_dir, ASSIGNMENTS)
  tf.io.gfile.makedirs(folder)
  image_ids = np.asarray(image_ids, np.int64)
  shared = os.path.join(folder, "ids.npy")
  own = os.path.join(folder, f"ids-{epoch}.npy")
  if not tf.io.gfile.exists(shared):
    _save_npy(shared, image_ids)
  if not np.array_equal(_load_npy(shared), image_ids):   # records dropped or added
    _save_npy(own, image_ids)
  elif tf.io.gfile.exists(own):   # left by an earlier try at this epoch, whose ids differed
    tf.io.gfile.remove(own)
  _save_npy(os.path.join(folder, f"table-{epoch}.npy"), np.asarray(labels, np.int32))
  epochs = assignment_epochs(model_dir)
  for old in epochs[:-keep] if keep else []:
    for name in (f"table-{old}.npy", f"ids-{old}.npy"):
      if tf.io.gfile.exists(os.path.join(folder, name)):
        tf.io.gfile.remove(os.path.join(folder, name))
  return assignment_epochs(model_dir)


def load_assignments(model_dir: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """(image ids int64, cluster int32) of the table kept at `epoch`."""
  folder = os.path.join(model_dir, ASSIGNMENTS)
  path = os.path.join(folder, f"table-{epoch}.npy")
  if not tf.io.gfile.exists(path):
    kept = assignment_epochs(model_dir)
    raise CheckpointError(f"no assignment table of epoch {epoch} in {folder} (kept: "
                          f"{kept or 'none; a run from before --keep_assignments keeps none'})")
  own = os.path.join(folder, f"ids-{epoch}.npy")
  ids = _load_npy(own if tf.io.gfile.exists(own) else os.path.join(folder, "ids.npy"))
  labels = _load_npy(path)
  if len(ids) != len(labels):
    raise CheckpointError(f"{path} has {len(labels)} rows, its ids {len(ids)}")
  return ids, labels
