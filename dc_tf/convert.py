r"""Converts the original's released PyTorch VGG-16-BN checkpoints into a dc_tf run directory.

  python -m dc_tf.convert --from_pytorch=downloaded_models/deepercluster/ours.pth \
      --model_dir=runs/ours

writes what a training run writes for its trunk (`checkpointing`): MODEL_DIR/config.json
(224 px, width 1, fc 4096 and the file's front), MODEL_DIR/ckpt/ckpt-<epoch>, plus
MODEL_DIR/converted_from.json (the file's sha256, layout, dropped keys). `evaluate.py
--checkpoint=DIR`, `python -m dc_tf.export --model_dir=DIR` and `train.py --init_checkpoint=DIR`
read it. Torch is not needed: `torch_pickle` reads both PyTorch containers and runs no
pickled code, and a file whose data would take more than --max_load_bytes (2 GiB) of memory
is refused before it does (issue 37).

The converter deletes nothing it did not write: a non-empty MODEL_DIR, or a
MODEL_DIR.converting folder it finds (its staging folder, left by another run), is an error
unless --overwrite, which replaces the run dir whole once the new one is written.

Layouts (issue 26):
  deepercluster  facebookresearch/DeeperCluster's `ours.pth`, `deepcluster_flickr.pth`,
                 `rotnet_*.pth`: `state_dict` keys `module.body.features.N.*`,
                 `module.body.classifier.{0,3}.*`, `module.sobel.{0,1}.*` and the super-class
                 layer `module.pred_layer.*` (dropped). Its `Net` pads the input by 2 before
                 the unpadded Sobel 3x3, or by 1 before an RGB conv1 (model_factory.py).
  deepcluster    facebookresearch/deepcluster's VGG-16 `checkpoint.pth.tar`: keys
                 `features.module.N.*`, `classifier.{0,3}.*`, `sobel.{0,1}.*`, `top_layer.*`
                 (dropped). Its Sobel 3x3 pads by 1 itself; an RGB conv1 is not padded.
  torchvision    torchvision's `vgg16_bn` (the supervised row of Fig. 2, issue 35): keys
                 `features.N.*`, `classifier.{0,3,6}.*` (told apart by `classifier.6`, its
                 1000-way head), no wrapper or a `module.` one. RGB, conv1 padding=1 like every
                 conv: our 'same' conv1, no input pad. Its AdaptiveAvgPool2d((7, 7)) before fc6
                 is the identity on 224-px inputs; at other sizes it is a fixed linear map,
                 folded into fc6 (exact, noted in converted_from.json). `classifier.6` is kept
                 in MODEL_DIR/supervised_head.npz: logits = ReLU(fc7) @ kernel + bias.
                 Normalisation: ImageNet mean/std on [0, 1] pixels, the same as ours.
Sobel or RGB is read from conv1's input channels (2 or 3). BN epsilon is 1e-5 on both
sides. Conv kernels [out, in, kh, kw] become [kh, kw, in, out]; fc6's inputs are reordered
from PyTorch's (C, H, W) flattening to Keras's (H, W, C); fc7 is transposed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from dc_tf import torch_pickle
from dc_tf.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, UserError

LAYOUTS = ("deepercluster", "deepcluster", "torchvision")
# Where each layout pads the front (Sobel, RGB): DeeperCluster's model_factory pads 2 / 1
# before the network; deepcluster's Sobel conv has padding=1, its RGB conv1 sees the image,
# as torchvision's does (no Sobel front there).
FRONT_PAD = {("deepercluster", True): 2, ("deepercluster", False): 1,
             ("deepcluster", True): 1, ("deepcluster", False): 0,
             ("torchvision", False): 0}
TORCHVISION_POOL = 7          # vgg16_bn's AdaptiveAvgPool2d((7, 7)) before classifier.0
SUPERVISED_HEAD_FILE = "supervised_head.npz"
VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
POOL_AFTER = (2, 4, 7, 10, 13)   # conv indices (1-based) followed by a 2x2 max-pool
BN_OPTIONAL = ("num_batches_tracked",)   # absent from files older than torch 0.4.1
SOBEL_TOLERANCE = 1e-6


class ConversionError(UserError, ValueError):
  """The file is not one of the layouts, or a key is missing, extra or of another shape."""


def torch_feature_indices() -> list[int]:
  """Index in `features` of each conv: conv, BN, ReLU per layer, one module per max-pool."""
  indices, at = [], 0
  for i in range(1, 14):
    indices.append(at)
    at += 3 + (1 if i in POOL_AFTER else 0)
  return indices


def canonical_keys(state: dict, layout: str = "auto") -> tuple[str, dict]:
  """(layout, {key without wrapper prefixes: array}). DeeperCluster wraps the whole net
  (`module.`) and names the VGG `body.`; deepcluster wraps only `features` (`features.module.`)."""
  keys = list(state)
  if layout == "auto":
    if _torchvision_keys(keys):
      layout = "torchvision"
    elif any(k.startswith(("features.module.", "top_layer.")) for k in keys):
      layout = "deepcluster"
    elif any(k.startswith(("module.", "body.", "pred_layer.")) for k in keys):
      layout = "deepercluster"
    else:
      raise ConversionError(
          f"cannot tell the layout from the keys (e.g. {', '.join(keys[:3])}): none is "
          "DeeperCluster's module.body.* / pred_layer.*, deepcluster's features.module.* / "
          "top_layer.* or torchvision's features.* with classifier.6.*; pass "
          "--layout=deepercluster, deepcluster or torchvision")
  out = {}
  for k, v in state.items():
    name = k
    for prefix in ("module.body.", "module.", "body."):
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    name = name.replace("features.module.", "features.")
    if name in out:
      raise ConversionError(f"key {k} duplicates {name} once its wrapper prefix is removed")
    out[name] = v
  return layout, out


def _torchvision_keys(keys) -> bool:
  """torchvision's vgg16_bn: only features.N.* and classifier.N.* (perhaps under a
  DataParallel `module.`), and its 1000-way head classifier.6, which neither original has."""
  bare = [k[len("module."):] if k.startswith("module.") else k for k in keys]
  return ("classifier.6.weight" in bare and
          all(k.startswith(("features.", "classifier.")) for k in bare) and
          not any(k.startswith("features.module.") for k in bare))


def adaptive_pool_matrix(side: int, out: int = TORCHVISION_POOL) -> np.ndarray:
  """[out, side]: PyTorch's adaptive_avg_pool along one axis, bin i averaging
  [floor(i * side / out), ceil((i + 1) * side / out)); the identity when side == out."""
  a = np.zeros([out, side])
  for i in range(out):
    lo, hi = (i * side) // out, -(-((i + 1) * side) // out)
    a[i, lo:hi] = 1.0 / (hi - lo)
  return a


def _subhead_file(keys) -> bool:
  return set(keys) <= {"weight", "bias", "module.weight", "module.bias"}


def state_dict_of(obj, path: str) -> dict:
  """The state dict in a loaded file: `obj['state_dict']` (both originals) or obj itself."""
  state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
  if not isinstance(state, dict) or not state:
    raise ConversionError(f"{path}: no state_dict (found {type(obj).__name__}"
                          f"{' with keys ' + ', '.join(map(str, obj))[:120] if isinstance(obj, dict) else ''})")
  if _subhead_file(state):
    raise ConversionError(
        f"{path} holds one linear layer (keys {', '.join(state)}): a DeeperCluster sub-head "
        "file (N-pred_layer.pth.tar), not a trunk; convert the trunk's file (its heads are "
        "dropped: a new run clusters again)")
  bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ConversionError(f"{path}: state_dict key {bad[0]} is not a tensor")
  return state


@dataclasses.dataclass
class Converted:
  """What a file converts to: its config and the Keras weights, layer by layer."""
  layout: str
  model: ModelConfig
  weights: dict            # Keras layer name -> list of arrays, in the layer's weight order
  dropped: list            # keys read but not converted (heads, BN step counters)
  kept: dict = dataclasses.field(default_factory=dict)    # run-dir file -> {name: array}
  notes: list = dataclasses.field(default_factory=list)   # for converted_from.json


def _expect(key, array, shape):
  if tuple(array.shape) != tuple(shape):
    raise ConversionError(f"key {key} has shape {list(array.shape)}, this architecture needs "
                          f"{list(shape)}")


def _check_sobel(state, used):
  from dc_tf.models import vgg
  gray, sobel = vgg.sobel_kernels()
  want = {"sobel.0.weight": np.full([1, 3, 1, 1], 1 / 3, np.float32),
          "sobel.0.bias": np.zeros([1], np.float32),
          "sobel.1.weight": sobel.transpose(3, 2, 0, 1),
          "sobel.1.bias": np.zeros([2], np.float32)}
  for key, value in want.items():
    if key not in state:
      raise ConversionError(f"missing key {key}: conv1 has 2 input channels (a Sobel model) "
                            "but the file holds no Sobel front")
    _expect(key, state[key], value.shape)
    if not np.allclose(state[key], value, atol=SOBEL_TOLERANCE):
      raise ConversionError(f"key {key} is not the fixed gray/Sobel filter the trunk's frozen "
                            "front computes: this file's front was trained or altered")
    used.add(key)


def convert_state(state: dict, *, image_size: int = 224, layout: str = "auto") -> Converted:
  """Maps a state dict (numpy arrays) onto the trunk's Keras weights, checking every key."""
  from dc_tf.models import vgg
  layout, state = canonical_keys(state, layout)
  conv_at = torch_feature_indices()
  first = state.get(f"features.{conv_at[0]}.weight")
  if first is None or first.ndim != 4:
    raise ConversionError(f"missing key features.0.weight (conv1): not a VGG-16 of the "
                          f"{layout} layout (keys: {', '.join(list(state)[:4])}, ...)")
  sobel = first.shape[1] == 2
  if first.shape[1] not in (2, 3):
    raise ConversionError(f"key features.0.weight has {first.shape[1]} input channels; "
                          "2 (Sobel) or 3 (RGB) expected")
  if sobel and layout == "torchvision":
    raise ConversionError("key features.0.weight has 2 input channels: torchvision's vgg16_bn "
                          "has an RGB conv1 (3 input channels)")
  width = first.shape[0] / 64
  fc = state.get("classifier.0.weight")
  if fc is None:
    raise ConversionError("missing key classifier.0.weight (fc6)")
  if fc.ndim != 2:
    raise ConversionError(f"key classifier.0.weight has shape {list(fc.shape)}, a 2-D "
                          "Linear weight expected")
  model = ModelConfig(image_size=image_size, width=width, fc_dim=int(fc.shape[0]), sobel=sobel,
                      dropout=0.5, input_pad=FRONT_PAD[(layout, sobel)])
  widths = [vgg.channels(c, width) for c in VGG16_CHANNELS]
  side = vgg.front_size(image_size, sobel, model.pad) // 32
  flat = widths[-1] * side * side
  notes = []
  if layout == "torchvision":
    fc, notes = _fold_torchvision_pool(fc, widths[-1], side, image_size)
  if fc.shape[1] != flat:
    found = fc.shape[1] / widths[-1]
    raise ConversionError(
        f"key classifier.0.weight has {fc.shape[1]} inputs = {widths[-1]} x {found:g}: "
        f"--image_size={image_size} gives a {side}x{side} map ({flat} inputs); pass the size "
        "the file was trained at")
  used, weights, dropped = set(), {}, []
  if sobel:
    _check_sobel(state, used)
  c_in = 2 if sobel else 3
  for i, (at, c) in enumerate(zip(conv_at, widths), start=1):
    w, b = f"features.{at}.weight", f"features.{at}.bias"
    bn = [f"features.{at + 1}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    for key in [w, b] + bn:
      if key not in state:
        raise ConversionError(f"missing key {key} (conv{i})")
    _expect(w, state[w], [c, c_in, 3, 3])
    for key in [b] + bn:
      _expect(key, state[key], [c])
    weights[f"conv{i}_conv"] = [state[w].transpose(2, 3, 1, 0), state[b]]
    weights[f"conv{i}_bn"] = [state[k] for k in bn]
    used.update([w, b] + bn)
    for p in BN_OPTIONAL:
      if f"features.{at + 1}.{p}" in state:
        used.add(f"features.{at + 1}.{p}")
        dropped.append(f"features.{at + 1}.{p}")
    c_in = c
  fc_dim = model.fc_units
  for key, shape in (("classifier.0.bias", [fc_dim]), ("classifier.3.weight", [fc_dim, fc_dim]),
                     ("classifier.3.bias", [fc_dim])):
    if key not in state:
      raise ConversionError(f"missing key {key} ({'fc6' if '.0.' in key else 'fc7'})")
    _expect(key, state[key], shape)
  # PyTorch flattens pool5 as (C, H, W), Keras's Flatten as (H, W, C).
  fc6 = fc.reshape(fc_dim, widths[-1], side, side).transpose(2, 3, 1, 0).reshape(flat, fc_dim)
  weights["fc6_dense"] = [fc6, state["classifier.0.bias"]]
  weights["fc7"] = [state["classifier.3.weight"].T, state["classifier.3.bias"]]
  used.update(["classifier.0.weight", "classifier.0.bias", "classifier.3.weight",
               "classifier.3.bias"])
  kept = {}
  if layout == "torchvision":
    kept = _supervised_head(state, fc_dim, used, notes)
  else:   # the clustering heads: a new run clusters again
    head = "pred_layer" if layout == "deepercluster" else "top_layer"
    for key in (f"{head}.weight", f"{head}.bias"):
      if key in state:
        used.add(key)
        dropped.append(key)
  extra = [k for k in state if k not in used]
  if extra:
    raise ConversionError(f"unexpected key {extra[0]}"
                          f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''} in a "
                          f"{layout} VGG-16 state dict")
  weights = {k: [np.ascontiguousarray(a, np.float32) for a in v] for k, v in weights.items()}
  return Converted(layout, model, weights, dropped, kept, notes)


def _fold_torchvision_pool(fc, c, side, image_size):
  """(fc6 weight as if it read pool5's side x side map directly, notes). torchvision's
  AdaptiveAvgPool2d((7, 7)) is linear, so fc6(pool(x)) = (fc6 . pool)(x): the identity at
  224 px (a 7x7 map); at other sizes its bins (averages, repeats when the map is smaller)
  are folded into fc6's weight, which then equals PyTorch's forward at that size."""
  n = TORCHVISION_POOL
  if fc.shape[1] != c * n * n:
    raise ConversionError(
        f"key classifier.0.weight has {fc.shape[1]} inputs = {c} x {fc.shape[1] / c:g}: "
        f"torchvision's vgg16_bn reads a {n}x{n} pooled map ({c * n * n} inputs)")
  if side < 1:
    raise ConversionError(f"--image_size={image_size} leaves no pool5 map (32 px at least)")
  if side == n:
    return fc, [f"AdaptiveAvgPool2d(({n}, {n})) is the identity on the {side}x{side} pool5 "
                f"map of {image_size}-px inputs"]
  a = adaptive_pool_matrix(side, n).astype(np.float32)
  # W'[f, c, h, w] = sum_ij W[f, c, i, j] A[i, h] A[j, w], as two matmuls (no 6-D temporary)
  w = a.T @ (np.asarray(fc, np.float32).reshape(fc.shape[0], c, n, n) @ a)
  return w.reshape(fc.shape[0], c * side * side), [
      f"AdaptiveAvgPool2d(({n}, {n})) folded into fc6 for the {side}x{side} pool5 map of "
      f"{image_size}-px inputs (exact at this size; the weights were trained at 224 px)"]


def _supervised_head(state, fc_dim, used, notes):
  """classifier.6, the supervised 1000-way layer after ReLU(fc7), kept beside the trunk as
  a Keras-oriented kernel [fc_dim, classes] (a linear probe needs only the trunk)."""
  w, b = "classifier.6.weight", "classifier.6.bias"
  for key in (w, b):
    if key not in state:
      raise ConversionError(f"missing key {key} (the supervised head)")
  if state[w].ndim != 2:
    raise ConversionError(f"key {w} has shape {list(state[w].shape)}, a 2-D Linear weight "
                          "expected")
  classes = state[w].shape[0]
  _expect(w, state[w], [classes, fc_dim])
  _expect(b, state[b], [classes])
  used.update([w, b])
  notes.append(f"{w} and {b} ({classes} classes) kept in {SUPERVISED_HEAD_FILE} as kernel "
               "[fc_dim, classes] and bias: logits = ReLU(fc7) @ kernel + bias")
  return {SUPERVISED_HEAD_FILE: {"kernel": np.ascontiguousarray(state[w].T, np.float32),
                                 "bias": np.ascontiguousarray(state[b], np.float32)}}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def staging_dir(model_dir: str) -> str:
  return model_dir.rstrip("/") + ".converting"


def check_targets(model_dir: str, overwrite: bool = False) -> None:
  """Refuses to go on where the run would delete what this run did not write (issue 37): a
  non-empty `model_dir`, or a `<model_dir>.converting` folder (an interrupted conversion's,
  or anyone's), unless `overwrite`. Never prompts: CI has no standard input."""
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise ConversionError(f"--model_dir={model_dir} is a file, not a directory")
  if overwrite:
    return
  if os.path.isdir(model_dir) and os.listdir(model_dir):
    raise ConversionError(f"--model_dir={model_dir} is not empty: the converter writes a new "
                          "run directory; pass --overwrite to replace it")
  staging = staging_dir(model_dir)
  if os.path.lexists(staging):
    raise ConversionError(f"{staging} exists (an interrupted conversion's?): the converter "
                          "stages the run there and deletes only what it wrote; remove it or "
                          "pass --overwrite")


def write_run(converted: Converted, model_dir: str, *, epoch: int = 0, source: dict | None = None,
              overwrite: bool = False):
  """Writes config.json, ckpt/ckpt-<epoch> and converted_from.json, all or nothing: into a
  sibling folder first, renamed to `model_dir` at the end. An existing run dir or staging
  folder is replaced only with `overwrite` (`check_targets`)."""
  check_targets(model_dir, overwrite)
  import tensorflow as tf
  from dc_tf.models import vgg
  from dc_tf.training import checkpointing
  # torchvision's supervised net saw one unrotated view per image, as deepcluster's did.
  mode = "deepercluster" if converted.layout == "deepercluster" else "deepcluster"
  config = ExperimentConfig(
      data=DataConfig(image_size=converted.model.image_size, data_pattern=""),
      model=converted.model, train=TrainConfig(mode=mode, model_dir=model_dir)).validate()
  trunk = vgg.trunk_from_config(config.model)
  for name, arrays in converted.weights.items():
    layer = trunk.get_layer(name)
    want = [tuple(w.shape) for w in layer.weights]
    if want != [a.shape for a in arrays]:   # the mapping and vgg.py disagree: a bug here
      raise ConversionError(f"layer {name}: converted shapes {[a.shape for a in arrays]} do "
                            f"not fit the trunk's {want}")
    layer.set_weights(arrays)
  staging = staging_dir(model_dir)
  if os.path.lexists(staging):      # overwrite: checked above
    if os.path.isdir(staging) and not os.path.islink(staging):
      shutil.rmtree(staging)
    else:
      os.remove(staging)
  try:
    checkpointing.write_config(staging, config)
    # The original counts epochs: saved as step, one step an epoch, so a card says both.
    ckpt = tf.train.Checkpoint(trunk=trunk, step=tf.Variable(epoch, dtype=tf.int64),
                               steps_per_epoch=tf.Variable(1, dtype=tf.int64))
    tf.train.CheckpointManager(ckpt, os.path.join(staging, "ckpt"), max_to_keep=1).save(
        checkpoint_number=epoch)
    for name, arrays in converted.kept.items():
      np.savez(os.path.join(staging, name), **arrays)
    with open(os.path.join(staging, "converted_from.json"), "w") as f:
      json.dump({**(source or {}), "layout": converted.layout, "front": config.model.front,
                 "dropped_keys": converted.dropped,
                 **({"notes": converted.notes} if converted.notes else {})}, f, indent=2)
    _replace_dir(staging, model_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  # A CheckpointManager records absolute paths in ckpt/checkpoint: rewrite them relative,
  # so the run dir can be moved (and the staging name is not kept).
  with open(os.path.join(model_dir, "ckpt", "checkpoint"), "w") as f:
    f.write(f'model_checkpoint_path: "ckpt-{epoch}"\nall_model_checkpoint_paths: "ckpt-{epoch}"\n')
  return config


def _replace_dir(staging: str, model_dir: str) -> None:
  """Renames the staged run to `model_dir`. An empty `model_dir` is removed first; a full one
  (with overwrite) is moved aside and deleted only once the new one is in place."""
  if not os.path.isdir(model_dir):
    os.replace(staging, model_dir)
    return
  if not os.listdir(model_dir):
    os.rmdir(model_dir)
    os.replace(staging, model_dir)
    return
  parent = os.path.dirname(os.path.abspath(model_dir.rstrip("/")))
  aside = tempfile.mkdtemp(prefix=os.path.basename(model_dir.rstrip("/")) + ".replaced.",
                           dir=parent)
  os.replace(model_dir, os.path.join(aside, "old"))
  os.replace(staging, model_dir)
  shutil.rmtree(aside)


def convert_file(path: str, model_dir: str, *, image_size: int = 224, layout: str = "auto",
                 max_load_bytes: int = torch_pickle.DEFAULT_MAX_BYTES,
                 overwrite: bool = False) -> ExperimentConfig:
  """Reads, checks and converts `path`; writes the run dir only once everything fits.
  `max_load_bytes` caps the memory the file's data may take (`torch_pickle.load`)."""
  check_targets(model_dir, overwrite)
  obj = torch_pickle.load(path, max_load_bytes)
  state = state_dict_of(obj, path)
  try:
    converted = convert_state(state, image_size=image_size, layout=layout)
  except ConversionError as e:
    raise ConversionError(f"{path}: {e}") from None
  epoch = obj.get("epoch", 0) if isinstance(obj, dict) else 0
  epoch = epoch if isinstance(epoch, int) and epoch >= 0 else 0
  others = sorted(str(k) for k in obj if k != "state_dict") if isinstance(obj, dict) and \
      "state_dict" in obj else []
  source = {"file": os.path.abspath(path), "sha256": _sha256(path), "epoch": epoch,
            "other_entries_ignored": others}
  return write_run(converted, model_dir, epoch=epoch, source=source, overwrite=overwrite)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  config = convert_file(f.from_pytorch, f.model_dir, image_size=f.image_size, layout=f.layout,
                        max_load_bytes=f.max_load_bytes, overwrite=f.overwrite)
  m = config.model
  print(f"wrote {f.model_dir}: VGG-16-BN, width {m.width:g}, fc {m.fc_units}, "
        f"{m.image_size} px, front {m.front}\n"
        f"  evaluate: python evaluate.py --checkpoint={f.model_dir} ...\n"
        f"  serve:    python -m dc_tf.export --model_dir={f.model_dir}\n"
        f"  train:    python train.py --init_checkpoint={f.model_dir} --image_size={m.image_size} "
        f"--width={m.width:g} --fc_dim={m.fc_units} {m.front} ...")


if __name__ == "__main__":
  from absl import flags
  from dc_tf import cli
  flags.DEFINE_string("from_pytorch", None, "A .pth file of the original (either layout) or "
                      "torchvision's vgg16_bn.",
                      required=True)
  flags.DEFINE_string("model_dir", None, "Run directory to write (new or empty).", required=True)
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --model_dir and delete a "
                    "MODEL_DIR.converting folder left by another run (refused without it).")
  flags.DEFINE_integer("max_load_bytes", torch_pickle.DEFAULT_MAX_BYTES,
                       "The most memory the file's data may take (its storages, copied "
                       "tensors, pickle); a file that needs more is refused. The default, "
                       "2 GiB, is 3.9x torchvision's vgg16_bn, the largest released file.",
                       lower_bound=1)
  flags.DEFINE_integer("image_size", 224, "Input size the file was trained at (the paper: 224).")
  flags.DEFINE_enum("layout", "auto", ("auto",) + LAYOUTS,
                    "Key layout; auto tells them apart by their wrapper prefixes and head.")
  cli.run(main)
