"""Export: a serving SavedModel (send a JPEG, get features) and a reusable trunk.

  serving/   signatures `serving_default(image_bytes: string[B])` and
             `features_from_pixels(images: float32[B, H, W, 3] in 0..255)`, each returning
             {'fc7': [B, D], 'conv<i>': [B, C_i] globally average-pooled} and the paper's probe
             features, {'probe_<layer>': [B, <10k]} for conv2, conv4, conv7, conv10, conv13,
             fc6, fc7: conv maps average-pooled with the smallest window that brings them
             under 10,000 values (`metrics.pool_until`, what evaluate.py probes; windows and
             sizes in the model card); decoding, resizing, center crop, normalisation and
             Sobel are in the graph.
  trunk/     TF-Hub-style reusable trunk: `__call__(images, training)` -> fc7 features for
             normalised images, traced for training True and False, with `variables`,
             `trainable_variables`, `regularization_losses`; loads with
             `tf.saved_model.load` or `keras.layers.TFSMLayer(path, call_endpoint='serve',
             call_training_endpoint='train', trainable=True)`.
  trunk.keras  the same trunk as ordinary Keras 3 layers (issue 26): `keras.saving.load_model`
             opens it, no dc_tf code needed (the frozen Sobel front is two non-trainable
             Conv2D and a ZeroPadding2D); the functional model's 15 named endpoints, its
             layers freezable one by one. Same inputs as trunk/.
  trunk.onnx   with `--onnx` (needs the optional tf2onnx, requirements-onnx.txt): the feature
             extractor for onnxruntime and other ONNX runtimes, input `images` [B, S, S, 3]
             normalised, the 15 endpoints as outputs (Keras 3 `model.export(format="onnx")`).
  model_card.json   config, training data, the checkpoint's step and epoch (-1: unknown),
             and the sha256 of each export: its keys are exactly the artefacts beside it.
  Loading (`load`, `load_keras`, and so embed, neighbours, evaluate.py) first runs
  `check_model`: the card must be there and match, and a SavedModel's graphs may hold only
  the ops our exports hold (`ALLOWED_OPS`), else the model is refused before any of it runs,
  unless trusted (--trust_model; issue 37).
  Each export first deletes every artefact above that the directory holds (the card first),
  so none is left from an earlier export (issue 37: a trunk.onnx no card lists); other files
  in the directory are not touched.

Usage: python -m dc_tf.export --model_dir=runs/demo --export_dir=runs/demo/export [--onnx]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import keras
import tensorflow as tf

from dc_tf.config import UserError
from dc_tf.data import preprocess
from dc_tf.evaluation import metrics
from dc_tf.models import vgg  # noqa: F401 - registers dc_tf's custom Keras layers (load_keras)

DEFAULT_CONV_ENDPOINTS = ("conv4", "conv7", "conv10", "conv13")
PROBE_LAYERS = ("conv2", "conv4", "conv7", "conv10", "conv13", "fc6", "fc7")  # evaluate.py's
PROBE_MAX_DIM = 10000
KERAS_FILE = "trunk.keras"
ONNX_FILE = "trunk.onnx"
CARD_FILE = "model_card.json"
# Every name an export writes in its directory, the card first: a directory half rewritten
# is never described by an old card.
ARTEFACTS = (CARD_FILE, "serving", "trunk", KERAS_FILE, ONNX_FILE)


class ExportError(UserError, RuntimeError):
  """A missing, corrupt or tampered export; the message names the directory."""


class ServingModule(tf.Module):
  """Forward pass only, preprocessing inside, fixed dtypes."""

  def __init__(self, trunk: keras.Model, image_size: int,
               conv_endpoints=DEFAULT_CONV_ENDPOINTS):
    super().__init__(name="dc_tf_serving")
    self.trunk = trunk
    self.image_size = image_size
    self.conv_endpoints = tuple(conv_endpoints)

  def _features(self, images):
    out = self.trunk(images, training=False)
    feats = {"fc7": tf.cast(out["fc7"], tf.float32)}
    for name in self.conv_endpoints:
      feats[name] = tf.reduce_mean(tf.cast(out[name], tf.float32), axis=[1, 2])
    for name in PROBE_LAYERS:
      feats[f"probe_{name}"] = probe_pool(tf.cast(out[name], tf.float32))
    return feats

  def _prepare(self, image):
    return preprocess.eval_transform(image, self.image_size)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serve_bytes(self, image_bytes):
    def decode(b):
      image = tf.io.decode_image(b, channels=3, expand_animations=False)
      image.set_shape([None, None, 3])
      return self._prepare(image)
    images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec(
        [self.image_size, self.image_size, 3], tf.float32))
    return self._features(images)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
  def serve_pixels(self, images):
    images = tf.map_fn(self._prepare, images, fn_output_signature=tf.TensorSpec(
        [self.image_size, self.image_size, 3], tf.float32))
    return self._features(images)


def probe_pool(x: tf.Tensor, max_dim: int = PROBE_MAX_DIM) -> tf.Tensor:
  """`metrics.pool_until` in the graph: [B, H, W, C] -> [B, H'·W'·C] with the same window,
  crop and (H', W', C) flattening order; vectors pass through."""
  if x.shape.rank == 2:
    return x
  h, w, c = (int(d) for d in x.shape[1:])
  s = metrics.pool_stride(h, w, c, max_dim)
  hh, ww = h // s, w // s
  pooled = tf.nn.avg_pool2d(x[:, :hh * s, :ww * s, :], s, s, "VALID")
  return tf.reshape(pooled, [-1, hh * ww * c])


def probe_layout(trunk: keras.Model, image_size: int) -> dict:
  """{'probe_<layer>': {'layer', 'pool_window', 'dims'}} for the model card."""
  shapes = trunk(tf.zeros([1, image_size, image_size, 3]), training=False)
  layout = {}
  for name in PROBE_LAYERS:
    shape = [int(d) for d in shapes[name].shape[1:]]
    window = metrics.pool_stride(*shape, PROBE_MAX_DIM) if len(shape) == 3 else 1
    dims = (shape[0] // window) * (shape[1] // window) * shape[2] if len(shape) == 3 else shape[0]
    layout[f"probe_{name}"] = {"layer": name, "pool_window": window, "dims": dims}
  return layout


class TrunkModule(tf.Module):
  """TF-Hub-style reusable trunk over normalised images [B, S, S, 3]."""

  # Plain attributes rather than tf.Module's properties, so they are saved and reloaded
  # (the TF-Hub reusable SavedModel convention).
  variables = None
  trainable_variables = None

  def __init__(self, trunk: keras.Model, image_size: int, weight_decay: float = 1e-5):
    super().__init__(name="dc_tf_trunk")
    self.trunk = trunk
    # Dropout's seed-generator state is not tracked by the Keras model; the training-mode
    # trace captures it, so the module must hold it to be saveable.
    self.seed_states = [layer.seed_generator.state for layer in trunk.layers
                        if getattr(layer, "seed_generator", None) is not None]
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
    self.serve = tf.function(lambda images: self._call(images, False), input_signature=[spec])
    self.train = tf.function(lambda images: self._call(images, True), input_signature=[spec])
    # Every named endpoint (conv1..conv13, fc6, fc7), for probes on any layer.
    self.endpoints = tf.function(
        lambda images: {k: tf.cast(v, tf.float32) for k, v in trunk(images, training=False).items()},
        input_signature=[spec])
    self.variables = list(trunk.variables)
    self.trainable_variables = list(trunk.trainable_variables)
    kernels = [v for v in trunk.trainable_variables if "kernel" in v.path]
    self.regularization_losses = [tf.function(
        lambda: 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels]),
        input_signature=[])]

  def _call(self, images, training):
    return tf.cast(self.trunk(images, training=training)["fc7"], tf.float32)

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.float32, name="images"),
      tf.TensorSpec([], tf.bool, name="training")])
  def __call__(self, images, training=False):
    return tf.cond(training, lambda: self._call(images, True), lambda: self._call(images, False))


def _dir_sha256(path: str) -> str:
  """sha256 over every file of a SavedModel directory (names and bytes, sorted)."""
  digest = hashlib.sha256()
  for root, _, files in sorted(tf.io.gfile.walk(path)):
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(os.path.relpath(full, path).encode())
      with tf.io.gfile.GFile(full, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    digest.update(f.read())
  return digest.hexdigest()


ONNX_PACKAGES = ("tf2onnx", "onnx")   # requirements-onnx.txt


def _require_onnx_packages() -> None:
  """Fails before anything is written when the optional ONNX packages are missing."""
  import importlib
  for name in ONNX_PACKAGES:
    try:
      importlib.import_module(name)
    except ImportError:
      raise ExportError(f"--onnx needs the {name} package, which is not installed: "
                        "pip install -r requirements-onnx.txt") from None


def export(trunk: keras.Model, export_dir: str, *, image_size: int, config: dict | None = None,
           step: int = -1, epoch: int = -1, training_data: str = "",
           weight_decay: float = 1e-5, conv_endpoints=DEFAULT_CONV_ENDPOINTS,
           onnx: bool = False) -> dict:
  """Writes serving/ and trunk/ SavedModels, trunk.keras (and trunk.onnx with `onnx`) and
  model_card.json; returns the card. `step` is the global step of the trunk's checkpoint,
  `epoch` the epochs done (`checkpointing.epoch_of`: step // steps_per_epoch), -1 unknown."""
  if onnx:
    _require_onnx_packages()
  remove_artefacts(export_dir)
  serving = ServingModule(trunk, image_size, conv_endpoints)
  serving_dir = os.path.join(export_dir, "serving")
  tf.saved_model.save(serving, serving_dir, signatures={
      "serving_default": serving.serve_bytes.get_concrete_function(),
      "features_from_pixels": serving.serve_pixels.get_concrete_function()})
  trunk_module = TrunkModule(trunk, image_size, weight_decay)
  trunk_dir = os.path.join(export_dir, "trunk")
  tf.saved_model.save(trunk_module, trunk_dir)
  sha = {"serving": _dir_sha256(serving_dir), "trunk": _dir_sha256(trunk_dir)}
  keras_path = os.path.join(export_dir, KERAS_FILE)
  trunk.save(keras_path)
  sha[KERAS_FILE] = _file_sha256(keras_path)
  if onnx:
    onnx_path = os.path.join(export_dir, ONNX_FILE)
    trunk.export(onnx_path, format="onnx", verbose=False)
    sha[ONNX_FILE] = _file_sha256(onnx_path)
  card = {
      "model": "DeeperCluster VGG-16-BN trunk (dc_tf)",
      "reference": "Caron et al., ICCV 2019, Unsupervised Pre-training of Image Features "
                   "on Non-Curated Data",
      "image_size": image_size, "step": step, "epoch": epoch, "training_data": training_data,
      "parameters": int(trunk.count_params()), "conv_endpoints": list(conv_endpoints),
      "probe_features": probe_layout(trunk, image_size),
      "config": config or {},
      "sha256": sha,
      "inputs": {"serving_default": "encoded image bytes (JPEG/PNG/GIF/BMP), string[B]",
                 "features_from_pixels": "float32 RGB in 0..255, [B, H, W, 3]",
                 "trunk": "ImageNet mean/std normalised RGB, [B, S, S, 3]",
                 KERAS_FILE: "as trunk; outputs conv1..conv13 maps, fc6, fc7 (pre-ReLU)",
                 **({ONNX_FILE: "as trunk.keras, input 'images'"} if onnx else {})},
  }
  with tf.io.gfile.GFile(os.path.join(export_dir, CARD_FILE), "w") as f:
    f.write(json.dumps(card, indent=2))
  return card


def remove_artefacts(export_dir: str) -> list:
  """Deletes what an earlier export wrote in `export_dir` (`ARTEFACTS`, nothing else);
  returns the names removed."""
  removed = []
  for name in ARTEFACTS:
    path = os.path.join(export_dir, name)
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)
    else:
      continue
    removed.append(name)
  return removed


# Every op type the graphs of our exports hold (serving/ and trunk/, with every function of
# their libraries): collected from exports of the tiny trunk with the Sobel and the RGB front,
# dropout 0 and 0.5, mixed bfloat16, fold_sobel, 32 and 64 px, under TF 2.21; the test
# (tests/models/test_model_scan.py) exports one again and checks its ops are all here. A model
# holding any other op is refused before it is loaded (issue 37): an allow-list, since a
# deny-list (ReadFile, WriteFile, PrintV2, as `saved_model_cli scan`) misses the ops it did
# not think of. The only ones that touch files are the checkpoint's own (CHECKPOINT_IO_OPS,
# reading and writing the SavedModel's variables/; ShardedFilename and StringJoin only build
# its file names), and those only inside the saver's functions (misplaced_checkpoint_ops).
CHECKPOINT_IO_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints"})
ALLOWED_OPS = CHECKPOINT_IO_OPS | frozenset({
    # variables and resources
    "VarHandleOp", "ReadVariableOp", "AssignVariableOp", "VarIsInitializedOp",
    "DisableCopyOnRead",
    # calls and control flow
    "StatefulPartitionedCall", "NoOp", "Identity", "IdentityN", "Placeholder", "Const", "If",
    "While", "Assert", "StaticRegexFullMatch", "ShardedFilename", "StringJoin",
    # image decoding in serving_default: tf.io.decode_image is DecodeImage; the per-format
    # decoders are what it was built from in older TF (in-memory bytes, no file access)
    "DecodeImage", "DecodeJpeg", "DecodePng", "DecodeGif", "DecodeBmp", "ScaleAndTranslate",
    # map_fn over the batch
    "TensorListFromTensor", "TensorListGetItem", "TensorListReserve", "TensorListSetItem",
    "TensorListStack",
    # the trunk, its preprocessing, pooling and regularisation loss
    "AddN", "AddV2", "All", "AvgPool", "BiasAdd", "Cast", "Ceil", "Conv2D", "DivNoNan",
    "ExpandDims", "FloorDiv", "FloorMod", "Greater", "GreaterEqual", "Less", "LogicalAnd",
    "MatMul", "MaxPool", "Maximum", "Mean", "Min", "Minimum", "Mul", "Neg", "OnesLike",
    "Pack", "Pad", "Range", "RealDiv", "Relu", "Reshape", "Round", "Rsqrt", "Select",
    "SelectV2", "Shape", "Slice", "Square", "Squeeze", "StridedSlice", "Sub", "Sum", "Unpack",
    # dropout in the trunk's training-mode trace
    "StatelessRandomGetKeyCounter", "StatelessRandomUniformV2",
})
TRUST_HINT = ("pass --trust_model (trust=True in Python) only if you know where this model "
              "comes from")


def _saved_model(path: str):
  """saved_model.pb of `path`, parsed with the protobuf classes (nothing loaded or run)."""
  from google.protobuf import message
  from tensorflow.core.protobuf import saved_model_pb2
  sm = saved_model_pb2.SavedModel()
  try:
    with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as f:
      sm.ParseFromString(f.read())
  except message.DecodeError as e:
    raise ExportError(f"cannot load SavedModel at {path}: saved_model.pb does not parse "
                      f"({e})") from None
  return sm


def graph_ops(path: str) -> dict:
  """{op type: count} over a SavedModel's graphs and every function of their libraries, read
  from saved_model.pb with the protobuf classes: nothing of the model is loaded or run."""
  found: dict[str, int] = {}
  for meta in _saved_model(path).meta_graphs:
    nodes = list(meta.graph_def.node)
    for fn in meta.graph_def.library.function:
      nodes += list(fn.node_def)
    for node in nodes:
      found[node.op] = found.get(node.op, 0) + 1
  return found


# Where the checkpoint's file ops may be: SaveV2 and MergeV2Checkpoints in what the saver's
# save op calls (no loader runs it), RestoreV2 in what its restore op calls (every load runs it).
_SAVER_OPS = {"save": frozenset({"SaveV2", "MergeV2Checkpoints"}),
              "restore": frozenset({"RestoreV2"})}


def _callees(node, library) -> set:
  """The library functions a node calls: its op when that names one, and every function
  attribute (StatefulPartitionedCall's f, If's branches, While's cond and body, a function
  handed to another inside a function attribute's own attributes, ...)."""
  names = {node.op} & library.keys()
  todo = list(node.attr.values())
  while todo:
    attr = todo.pop()
    for fn in ([attr.func] if attr.func.name else []) + list(attr.list.func):
      names.add(fn.name)
      todo.extend(fn.attr.values())
  return names


def _mentioned_functions(meta) -> set:
  """Every function the MetaGraph names outside its graph's nodes: the object graph's (each
  function, bare concrete function and the concrete-function map; the loader runs resource
  initializers from there) and the gradients of the library."""
  names = set(meta.object_graph_def.concrete_functions)
  for obj in meta.object_graph_def.nodes:
    kind = obj.WhichOneof("kind")
    if kind == "function":
      names.update(obj.function.concrete_functions)
    elif kind == "bare_concrete_function":
      names.add(obj.bare_concrete_function.concrete_function_name)
  library = meta.graph_def.library
  names.update(g.gradient_func for g in library.gradient)
  names.update(g.gradient_func for g in library.registered_gradients)
  return names


def _reachable(roots, library) -> set:
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name in seen or name not in library:
      continue
    seen.add(name)
    for node in library[name].node_def:
      todo.extend(_callees(node, library))
  return seen


def misplaced_checkpoint_ops(path: str) -> dict:
  """{"OP in FUNCTION (…)": count} for each checkpoint file op (CHECKPOINT_IO_OPS) outside
  the part of the saver it belongs to ({} for our exports). A SavedModel's saver_def names a
  save node and a restore node of its graph; the functions they call, and only those, may hold
  SaveV2 / MergeV2Checkpoints (save) and RestoreV2 (restore). A serving function, a resource
  initializer or the restore function that writes or moves checkpoint files on a path of its
  choosing is refused, as is a saver function that something else calls or names (another
  function, a function attribute's own attributes, the object graph, a gradient), and a graph
  node, signature or collection that runs a saver node (the init op with ^save as an input).
  Found by walking the call graph in saved_model.pb."""
  found: dict[str, int] = {}

  def flag(what):
    found[what] = found.get(what, 0) + 1

  for meta in _saved_model(path).meta_graphs:
    graph = meta.graph_def
    library = {f.signature.name: f for f in graph.library.function}
    nodes = {n.name: n for n in graph.node}
    saver_nodes = {part: getattr(meta.saver_def, field).split(":")[0]
                   for part, field in (("save", "save_tensor_name"),
                                       ("restore", "restore_op_name"))}
    part_of = {}     # function -> the saver part(s) whose node reaches it
    for part, name in saver_nodes.items():
      if name in nodes:
        for fn in _reachable(_callees(nodes[name], library), library):
          part_of.setdefault(fn, set()).add(part)
    # Everything else that can run: the other graph nodes, every function the object graph
    # or the gradients name, and any function outside the saver's (a caller of a saver
    # function is caught this way).
    roots = _mentioned_functions(meta) | (library.keys() - part_of.keys())
    for node in graph.node:
      if node.name not in saver_nodes.values():
        roots |= _callees(node, library)
      # A node fed by a saver node (data or ^control) runs it: the init op, a signature's
      # output, or one saver node running the other.
      for source in {i.lstrip("^").split(":")[0] for i in node.input}:
        for part, name in saver_nodes.items():
          if source == name and node.name != name:
            flag(f"graph node {node.name} runs the saver's {part} node")
    for key, collection in meta.collection_def.items():
      for value in collection.node_list.value:
        for part, name in saver_nodes.items():
          if value.lstrip("^").split(":")[0] == name:
            flag(f"collection {key} names the saver's {part} node")
    others = _reachable(roots, library)
    for fn in sorted(part_of.keys() & others):
      flag(f"the saver's {'/'.join(sorted(part_of[fn]))} function {fn} called from elsewhere")
    for sig_name, sig in meta.signature_def.items():
      tensors = [t.name for t in list(sig.inputs.values()) + list(sig.outputs.values())]
      if any(t.split(":")[0] in saver_nodes.values() for t in tensors if t):
        flag(f"signature {sig_name} is the saver's node")
    for node in graph.node:
      if node.op in CHECKPOINT_IO_OPS:
        flag(f"{node.op} in the main graph")
    for name, fn in library.items():
      for node in fn.node_def:
        if node.op not in CHECKPOINT_IO_OPS:
          continue
        parts = part_of.get(name, set())
        if len(parts) != 1 or node.op not in _SAVER_OPS[next(iter(parts))]:
          where = f"the saver's {'/'.join(sorted(parts))} function" if parts else "a function"
          flag(f"{node.op} in {where} {name}")
  return dict(sorted(found.items()))


def scan_ops(path: str) -> dict:
  """{op type: count} of the ops of a SavedModel that are not in `ALLOWED_OPS`, and {"OP in
  FUNCTION": count} of the checkpoint's file ops where ours do not have them
  (`misplaced_checkpoint_ops`): {} for our exports."""
  bad = {op: n for op, n in sorted(graph_ops(path).items()) if op not in ALLOWED_OPS}
  return {**bad, **misplaced_checkpoint_ops(path)}


def check_model(path: str, trust: bool = False, require_card: bool = True) -> None:
  """Refuses, before anything of it is loaded, a SavedModel dir or a .keras file of an export
  (`path`) whose model card (model_card.json beside it) is missing (unless not
  `require_card`) or records another sha256 for it, or a SavedModel holding an op outside
  `ALLOWED_OPS`. `trust` accepts such a model (a warning names what was found). The card
  proves only that the files are the ones it describes, not who wrote them: both sit in the
  same folder, so a forged model comes with a forged card; the op scan is what keeps a model
  from reading or writing files through ReadFile, WriteFile and the like, and keeps the
  checkpoint's own file ops (SaveV2, RestoreV2, MergeV2Checkpoints) inside the saver's save
  and restore functions (`misplaced_checkpoint_ops`)."""
  path = path.rstrip("/") or path
  folder = os.path.dirname(path) or "."
  problems = []
  card_path = os.path.join(folder, CARD_FILE)
  name = os.path.basename(path)
  if not tf.io.gfile.exists(card_path):
    if require_card:
      problems.append(f"no {CARD_FILE} in {folder}, so nothing vouches for {path}")
    else:
      logging.warning("%s has no %s beside it: its checksum is not checked", path, CARD_FILE)
  else:
    try:
      with tf.io.gfile.GFile(card_path) as f:
        expected = (json.load(f).get("sha256") or {}).get(name)
    except (ValueError, AttributeError):
      expected = None
    digest = _dir_sha256 if tf.io.gfile.isdir(path) else _file_sha256
    if not expected:
      problems.append(f"the model card {card_path} records no sha256 for {name}")
    elif expected != digest(path):
      problems.append(f"checksum mismatch for {path}: the export was modified after it was "
                      f"written (model card {card_path})")
  if tf.io.gfile.isdir(path):
    try:
      bad = scan_ops(path)
    except ExportError:
      if not problems:
        raise
      bad = {}     # saved_model.pb changed and does not parse: the checksum names it
    if bad:
      ops = ", ".join(f"{op} (x{n})" for op, n in bad.items())
      problems.append(f"{path} holds ops that no dc_tf export has, or has only in its saver: "
                      f"{ops} (an op outside export.ALLOWED_OPS, or a checkpoint op outside "
                      "the saver, may read, write or move files, even while it loads)")
  if not problems:
    return
  if trust:
    logging.warning("loading %s though %s (--trust_model)", path, "; ".join(problems))
    return
  raise ExportError(f"refusing to load the model at {path}: {'; '.join(problems)}; "
                    f"{TRUST_HINT}")


def load(path: str, trust: bool = False):
  """Loads serving/ or trunk/ (or an export dir: serving/) with clear errors, after
  `check_model` (card, sha256, op scan: a model that fails it is refused unless `trust`)."""
  if not tf.io.gfile.isdir(path):
    raise ExportError(f"export directory not found: {path}")
  if tf.io.gfile.isdir(os.path.join(path, "serving")):
    path = os.path.join(path, "serving")
  if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
    raise ExportError(f"not a SavedModel (no saved_model.pb): {path}")
  check_model(path, trust)    # before tf.saved_model.load: loading runs the restore ops
  try:
    return tf.saved_model.load(path)
  except Exception as e:  # noqa: BLE001 - any loader failure means a corrupt export
    raise ExportError(f"cannot load SavedModel at {path}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}") from e


def load_keras(path: str, trust: bool = False) -> keras.Model:
  """The Keras-native trunk: `path` is an export dir or its trunk.keras. `check_model` first
  (a card beside it must record the file's sha256; refused unless `trust`), then
  `keras.saving.load_model` in its safe mode, which is what keeps code out: a .keras file
  holds no graph, only a config of registered layer classes and weights, and safe mode
  refuses a Lambda layer's pickled code instead of running it. A .keras file without a card
  loads (a warning says so): `python -m dc_tf.finetune --from=` takes a bare trunk.keras."""
  if tf.io.gfile.isdir(path):
    path = os.path.join(path, KERAS_FILE)
  if not tf.io.gfile.exists(path):
    raise ExportError(f"Keras trunk not found: {path} (exports before issue 26 have none: "
                      "re-export with python -m dc_tf.export)")
  check_model(path, trust, require_card=False)
  try:
    return keras.saving.load_model(path, safe_mode=True)
  except Exception as e:  # noqa: BLE001 - any loader failure means a corrupt file
    raise ExportError(f"cannot load Keras trunk at {path}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e


def export_run(model_dir: str, export_dir: str = "", onnx: bool = False) -> dict:
  """Exports the newest checkpoint of a training run dir (to MODEL_DIR/export by default);
  returns the card."""
  from dc_tf.training import checkpointing
  if onnx:
    _require_onnx_packages()
  # One checkpoint for the weights and the card, though a running job may write a newer one.
  prefix = checkpointing.latest_checkpoint(model_dir)
  config = checkpointing.read_config(model_dir)
  trunk = vgg.trunk_from_config(config.model)
  checkpointing.restore_trunk(trunk, prefix)
  step, epoch = checkpointing.read_progress(prefix)
  return export(trunk, export_dir or os.path.join(model_dir, "export"),
                image_size=config.model.image_size, config=config.to_dict(), step=step,
                epoch=epoch, training_data=config.data.data_pattern,
                weight_decay=config.train.weight_decay, onnx=onnx)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  card = export_run(f.model_dir, f.export_dir, f.onnx)
  print(json.dumps(card["sha256"], indent=1))


if __name__ == "__main__":
  from absl import flags
  from dc_tf import cli
  flags.DEFINE_string("model_dir", None, "Training run directory (checkpoints).", required=True)
  flags.DEFINE_string("export_dir", "", "Where to write (default MODEL_DIR/export).")
  flags.DEFINE_bool("onnx", False, "Also write trunk.onnx (needs tf2onnx and onnx: "
                    "pip install -r requirements-onnx.txt).")
  cli.run(main)
