"""No entry point runs an unscanned model (issue 37, item 2): `export.check_model` reads
saved_model.pb with the protobuf classes and refuses, before `tf.saved_model.load` runs any
op, a model holding an op our exports do not hold, or one whose model card is missing or
does not match; --trust_model (trust=True) is the way out."""

import json
import os
import re
import shutil
import subprocess
import sys
import keras
import pytest
import tensorflow as tf

from conftest import REPO, write_photos
from dc_tf import export

CRAFTED_OPS = ("ReadFile", "WriteFile")


class _RunsAtLoad(tf.saved_model.experimental.TrackableResource):
  """A resource whose initializer `tf.saved_model.load` runs: the op runs while loading,
  before any signature is called."""

  def __init__(self, op, target):
    self._op, self._target = op, target
    super().__init__()

  def _create_resource(self):
    return tf.raw_ops.VarHandleOp(dtype=tf.int32, shape=[])

  def _initialize(self):
    if self._op == "WriteFile":
      tf.io.write_file(self._target, "written while loading")
    else:
      tf.raw_ops.AssignVariableOp(resource=self.resource_handle,
                                  value=tf.strings.length(tf.io.read_file(self._target)))


class _Crafted(tf.Module):
  def __init__(self, op, target):
    super().__init__()
    self.hook = _RunsAtLoad(op, target)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serve(self, image_bytes):
    return {"probe_fc7": tf.zeros([tf.shape(image_bytes)[0], 4])}


def _crafted_export(root, op, target):
  """An export dir (serving/, trunk/ and a forged model_card.json whose sha256 match them),
  so that only the op scan can tell it from ours."""
  module = _Crafted(op, target)
  for name in ("serving", "trunk"):
    tf.saved_model.save(module, os.path.join(root, name),
                        signatures={"serving_default": module.serve.get_concrete_function()})
  sha = {name: export._dir_sha256(os.path.join(root, name)) for name in ("serving", "trunk")}  # noqa: SLF001
  with open(os.path.join(root, export.CARD_FILE), "w") as f:
    json.dump({"sha256": sha, "image_size": 32, "config": {"model": {"image_size": 32}}}, f)
  return root


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
  """{op: crafted export dir}, the file the WriteFile model writes (absent), and the file
  the ReadFile model reads."""
  root = tmp_path_factory.mktemp("crafted")
  secret = root / "secret.txt"
  secret.write_text("not for models")
  written = str(root / "written_by_the_model")
  dirs = {"ReadFile": _crafted_export(str(root / "reads"), "ReadFile", str(secret)),
          "WriteFile": _crafted_export(str(root / "writes"), "WriteFile", written)}
  # Control: loaded without the check, the WriteFile model writes its file while loading.
  shutil.copytree(os.path.join(dirs["WriteFile"], "serving"), root / "control")
  tf.saved_model.load(str(root / "control"))
  assert os.path.exists(written)
  os.remove(written)
  return {"dirs": dirs, "written": written}


@pytest.fixture(scope="module")
def embedded(tiny_export, tmp_path_factory):
  """An embed output of a few photos through our tiny export, its photos and a query."""
  from dc_tf.embed import features
  root = tmp_path_factory.mktemp("embedded")
  photos = write_photos(str(root / "photos"), n=6)
  out = str(root / "out")
  features.run(features.EmbedOptions(input=photos, model=tiny_export, output=out))
  return {"out": out, "photos": photos, "query": os.path.join(photos, "home", "img00.jpg")}


def _names_crafted(embedded, model_dir, dest):
  """A copy of the embed output whose embed.json names `model_dir` (absolute path)."""
  if not os.path.exists(dest):
    shutil.copytree(embedded["out"], dest)
  path = os.path.join(dest, "embed.json")
  with open(path) as f:
    manifest = json.load(f)
  manifest["model"] = os.path.abspath(model_dir)
  with open(path, "w") as f:
    json.dump(manifest, f)
  return dest


def test_allow_list_is_what_an_export_holds_and_no_file_io_beyond_the_checkpoint(tiny_export):
  ops = set(export.graph_ops(os.path.join(tiny_export, "serving")))
  ops |= set(export.graph_ops(os.path.join(tiny_export, "trunk")))
  assert ops <= export.ALLOWED_OPS, sorted(ops - export.ALLOWED_OPS)
  assert export.scan_ops(os.path.join(tiny_export, "serving")) == {}
  # Derived from an export: all of it is in one, but the per-format image decoders.
  assert export.ALLOWED_OPS - ops <= {"DecodeJpeg", "DecodePng", "DecodeGif", "DecodeBmp"}
  registered = {name for name in dir(tf.raw_ops) if not name.startswith("_")}
  assert export.ALLOWED_OPS <= registered       # no misspelt name that never matches
  # Of every TF op whose name says files, printing, datasets, readers, writers, summaries,
  # lookup tables (loaded from text files), Python or remote calls, only the checkpoint's own
  # are allowed (ShardedFilename only joins strings).
  io = re.compile(r"File|Print|Save|Restore|Reader|Writer|Summary|Dataset|Iterator|PyFunc|"
                  r"Matching|Table|Checkpoint|Load|Remote|Debug|Record")
  io_ops = {name for name in registered if io.search(name)}
  assert {"ReadFile", "WriteFile", "PrintV2", "MatchingFiles", "PyFunc", "EagerPyFunc",
          "InitializeTableFromTextFileV2", "WholeFileReaderV2"} <= io_ops
  assert io_ops & export.ALLOWED_OPS == export.CHECKPOINT_IO_OPS | {"ShardedFilename"}


@pytest.mark.parametrize("op", CRAFTED_OPS)
def test_library_loaders_refuse_a_crafted_model_before_it_runs(crafted, embedded, op, tmp_path):
  from dc_tf import neighbours
  from dc_tf.embed import features
  from dc_tf.evaluation import evaluator
  d = crafted["dirs"][op]
  # The forged card matches: the scan alone finds the op, in both SavedModels.
  for name in ("serving", "trunk"):
    assert op in export.scan_ops(os.path.join(d, name))
  with open(embedded["query"], "rb") as f:
    query = f.read()
  loaders = {
      "export.load": lambda: export.load(d),
      "features.Model": lambda: features.Model(os.path.join(d, "serving")),
      "evaluator.load": lambda: evaluator.load(d),
      "neighbours.search": lambda: neighbours.search(
          _names_crafted(embedded, d, str(tmp_path / "out")), query, n=2),
  }
  for name, load in loaders.items():
    with pytest.raises(export.ExportError) as e:
      load()
    message = str(e.value)
    assert op in message and d in message and "--trust_model" in message, (name, message)
    assert "\n" not in message and "checksum" not in message and "no model_card" not in message
    assert not os.path.exists(crafted["written"]), name


def test_a_missing_or_mismatched_card_is_refused_unless_trusted(tiny_export, tmp_path):
  lone = str(tmp_path / "lone" / "serving")
  shutil.copytree(os.path.join(tiny_export, "serving"), lone)
  with pytest.raises(export.ExportError, match="no model_card.json") as e:
    export.load(lone)
  assert lone in str(e.value) and "--trust_model" in str(e.value)
  assert "serving_default" in export.load(lone, trust=True).signatures
  from dc_tf.embed import features     # what embed and neighbours load through
  with pytest.raises(export.ExportError, match="no model_card.json"):
    features.Model(lone)
  assert "probe_fc7" in features.Model(lone, trust=True).outputs
  from dc_tf.evaluation import evaluator   # evaluate.py: an export dir without its card
  shutil.copytree(os.path.join(tiny_export, "trunk"), tmp_path / "lone" / "trunk")
  with pytest.raises(export.ExportError, match="no model_card.json.*--trust_model"):
    evaluator.load(str(tmp_path / "lone"))
  with pytest.raises(export.ExportError, match="holds the model config"):
    evaluator.load(str(tmp_path / "lone"), trust=True)
  copy = tmp_path / "copy"
  shutil.copytree(tiny_export, copy)
  card = json.loads((copy / export.CARD_FILE).read_text())
  card["sha256"]["serving"] = "0" * 64
  (copy / export.CARD_FILE).write_text(json.dumps(card))
  with pytest.raises(export.ExportError, match="checksum mismatch") as e:
    export.load(str(copy))
  assert str(copy / "serving") in str(e.value)
  assert "serving_default" in export.load(str(copy), trust=True).signatures
  del card["sha256"]["serving"]
  (copy / export.CARD_FILE).write_text(json.dumps(card))
  with pytest.raises(export.ExportError, match="records no sha256 for serving"):
    export.load(str(copy))


def test_finetune_source_with_a_mismatched_card_is_refused_unless_trusted(tiny_export, tmp_path):
  from dc_tf.config import ModelConfig
  from dc_tf.finetune import model as model_lib
  from dc_tf.models import vgg
  shutil.copytree(tiny_export, tmp_path / "x", ignore=shutil.ignore_patterns("serving", "trunk"))
  card = json.loads((tmp_path / "x" / export.CARD_FILE).read_text())
  card["sha256"][export.KERAS_FILE] = "0" * 64
  (tmp_path / "x" / export.CARD_FILE).write_text(json.dumps(card))
  config = ModelConfig(image_size=32, width=0.125, fc_dim=32)
  trunk = vgg.trunk_from_config(config)
  with pytest.raises(export.ExportError, match="checksum mismatch.*--trust_model"):
    model_lib.load_source_weights(trunk, str(tmp_path / "x"), config)
  assert model_lib.load_source_weights(trunk, str(tmp_path / "x"), config, trust=True) == -1
  saved = keras.saving.load_model(os.path.join(tiny_export, export.KERAS_FILE))
  assert (trunk.get_layer("conv7_conv").kernel.numpy()
          == saved.get_layer("conv7_conv").kernel.numpy()).all()


def test_keras_trunk_loads_in_safe_mode_only(tiny_export, tmp_path):
  # A Lambda layer, with a card whose sha256 matches: safe mode refuses its code.
  inputs = keras.Input([4])
  model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
  path = tmp_path / export.KERAS_FILE
  model.save(path)
  (tmp_path / export.CARD_FILE).write_text(json.dumps(
      {"sha256": {export.KERAS_FILE: export._file_sha256(str(path))}}))  # noqa: SLF001
  with pytest.raises(export.ExportError, match="Lambda"):
    export.load_keras(str(tmp_path))
  with pytest.raises(export.ExportError, match="Lambda"):
    export.load_keras(str(tmp_path), trust=True)  # trust is about the card, not about code
  # Nowhere on a user's path is safe mode turned off.
  unsafe = re.compile(r"safe_mode\s*=\s*False|enable_unsafe_deserialization")
  sources = [os.path.join(REPO, name) for name in ("evaluate.py", "train.py")]
  for root, _, files in os.walk(os.path.join(REPO, "dc_tf")):
    sources += [os.path.join(root, name) for name in files if name.endswith(".py")]
  offenders = [s for s in sources if os.path.exists(s) and unsafe.search(open(s).read())]
  assert offenders == []


ENTRY_POINTS = {
    "evaluate": lambda c, e, tmp: [os.path.join(REPO, "evaluate.py"), f"--checkpoint={c}",
                                   f"--output_dir={tmp / 'eval'}"],
    "embed": lambda c, e, tmp: ["-m", "dc_tf.embed", f"--input={e['photos']}",
                                f"--model={c}", f"--output={tmp / 'out'}"],
    "neighbours": lambda c, e, tmp: ["-m", "dc_tf.neighbours", "--features=" + _names_crafted(
        e, c, str(tmp / "out")), f"--query={e['query']}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_commands_refuse_a_crafted_model_in_one_line(crafted, embedded, entry, tmp_path):
  """--notrust_model (the default) also checks that each command defines the flag."""
  d = crafted["dirs"]["WriteFile"]
  args = ENTRY_POINTS[entry](d, embedded, tmp_path)
  r = subprocess.run([sys.executable, *args, "--notrust_model"], cwd=REPO,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
  assert "WriteFile" in errors[0] and d in errors[0] and "--trust_model" in errors[0]
  assert "Traceback" not in r.stderr
  assert not os.path.exists(crafted["written"])


class _MovesCheckpointAtLoad(tf.saved_model.experimental.TrackableResource):
  """A resource whose initializer (run by `tf.saved_model.load`) merges a checkpoint of the
  victim's into `dest` and deletes the victim's files: the checkpoint's own op, used outside
  the saver."""

  def __init__(self, victim, dest):
    self._victim, self._dest = victim, dest
    super().__init__()

  def _create_resource(self):
    return tf.raw_ops.VarHandleOp(dtype=tf.int32, shape=[])

  def _initialize(self):
    with tf.control_dependencies([tf.raw_ops.MergeV2Checkpoints(
        checkpoint_prefixes=[self._victim], destination_prefix=self._dest,
        delete_old_dirs=True)]):
      tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=tf.constant(1))


class _MovesFiles(tf.Module):
  def __init__(self, victim, dest):
    super().__init__()
    self.hook = _MovesCheckpointAtLoad(victim, dest)
    self.count = tf.Variable(0)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serve(self, image_bytes):   # stateful, so called as ours are (StatefulPartitionedCall)
    return {"probe_fc7": tf.identity(image_bytes), "count": self.count.read_value()}


def test_checkpoint_ops_outside_the_saver_are_refused(tiny_export, tmp_path):
  """Every op of a model that moves files with MergeV2Checkpoints while it loads is in
  ALLOWED_OPS (the checkpoint needs it); the call graph is what tells it from ours: the op sits
  in a resource initializer, not in the saver's save function. Also refused: MergeV2Checkpoints
  planted in the saver's restore function (which every load runs), and a serving function that
  calls the saver's save function."""
  victim = str(tmp_path / "victim" / "ckpt")
  tf.train.Checkpoint(v=tf.Variable(3.0)).write(victim)
  module = _MovesFiles(victim, str(tmp_path / "moved"))
  crafted = str(tmp_path / "crafted" / "serving")
  tf.saved_model.save(module, crafted,
                      signatures={"serving_default": module.serve.get_concrete_function()})
  with open(os.path.join(os.path.dirname(crafted), export.CARD_FILE), "w") as f:
    json.dump({"sha256": {"serving": export._dir_sha256(crafted)}}, f)  # noqa: SLF001 - forged
  assert set(export.graph_ops(crafted)) <= export.ALLOWED_OPS     # the op list alone passes it
  bad = export.scan_ops(crafted)
  assert [k for k in bad if k.startswith("MergeV2Checkpoints in a function ")], bad
  with pytest.raises(export.ExportError, match="MergeV2Checkpoints in a function") as e:
    export.load(os.path.dirname(crafted))
  assert "--trust_model" in str(e.value) and "\n" not in str(e.value)
  assert os.path.exists(victim + ".index") and not os.path.exists(str(tmp_path / "moved.index"))
  # Control: loaded without the check, it moves the victim's checkpoint while loading.
  tf.saved_model.load(crafted)
  assert os.path.exists(str(tmp_path / "moved.index")) and not os.path.exists(victim + ".index")

  # Our export, edited in saved_model.pb only.
  from tensorflow.core.protobuf import saved_model_pb2
  ours = os.path.join(tiny_export, "serving")
  assert export.misplaced_checkpoint_ops(ours) == {}
  edits = {
      "restore merges": "MergeV2Checkpoints in the saver's restore function",
      "serving saves": "the saver's save function",
      # a function the save node calls that holds MergeV2Checkpoints (allowed there), but that
      # the object graph also names, so the loader may run it (found in review)
      "object graph runs": "called from elsewhere",
      # the init op with the save node as a control input: loading runs the save (in review)
      "init op saves": "runs the saver's save node",
      "saver runs saver": "runs the saver's save node",
      "nested function attr": "the saver's save function",
  }
  for edit, expected in edits.items():
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(ours, "saved_model.pb"), "rb") as f:
      sm.ParseFromString(f.read())
    meta = sm.meta_graphs[0]
    graph = meta.graph_def
    fns = {f.signature.name: f for f in graph.library.function}
    save_fn = next(n for n in fns if "traced_save" in n)
    save_node = meta.saver_def.save_tensor_name.split(":")[0]
    wrapper = fns[next(n for n in fns if "signature_wrapper" in n)]
    if edit == "restore merges":
      fn = fns[next(n for n in fns if "traced_restore" in n)]
      fn.node_def.add(name="planted", op="MergeV2Checkpoints")
    elif edit == "serving saves":
      wrapper.node_def.add(name="planted", op="StatefulPartitionedCall").attr["f"].func.name = save_fn
    elif edit == "object graph runs":
      planted = graph.library.function.add()
      planted.signature.name = "__inference_planted_1"
      planted.node_def.add(name="m", op="MergeV2Checkpoints")
      fns[save_fn].node_def.add(name="c", op="StatefulPartitionedCall").attr["f"].func.name = (
          "__inference_planted_1")
      obj = meta.object_graph_def.nodes.add()
      obj.bare_concrete_function.concrete_function_name = "__inference_planted_1"
    elif edit == "init op saves":
      graph.node.add(name="planted_init", op="NoOp").input.append(f"^{save_node}")
    elif edit == "saver runs saver":
      restore = next(n for n in graph.node
                     if n.name == meta.saver_def.restore_op_name.split(":")[0])
      restore.input.append(f"^{save_node}")
    else:   # the save function handed to a call inside another function attribute's attrs
      call = wrapper.node_def.add(name="planted", op="StatefulPartitionedCall")
      call.attr["f"].func.name = next(n for n in fns if n != save_fn and "traced" not in n)
      call.attr["f"].func.attr["inner"].func.name = save_fn
    edited = str(tmp_path / edit.replace(" ", "_"))
    shutil.copytree(ours, edited)
    with open(os.path.join(edited, "saved_model.pb"), "wb") as f:
      f.write(sm.SerializeToString())
    bad = export.misplaced_checkpoint_ops(edited)
    assert any(expected in k for k in bad), (edit, bad)
