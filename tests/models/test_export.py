"""SavedModel export: both signatures match the in-memory model, trunk reuse, errors."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, jpeg_bytes
from dc_tf import export
from dc_tf.data import preprocess
from dc_tf.models import vgg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  trunk = vgg.build_trunk(32, 0.125, 32)
  d = str(tmp_path_factory.mktemp("export"))
  # trunk.onnx too where the optional ONNX packages are installed (CI installs them).
  onnx = importlib.util.find_spec("tf2onnx") is not None
  card = export.export(trunk, d, image_size=32, step=14, epoch=3, training_data="x-*.tfrecord",
                       onnx=onnx)
  return trunk, d, card


@pytest.mark.slow
def test_signatures_match_in_memory_model(exported):
  trunk, d, card = exported
  assert (card["step"], card["epoch"]) == (14, 3) and len(card["sha256"]["serving"]) == 64
  loaded = export.load(d)
  jpegs = [jpeg_bytes(1, size=(40, 50)), jpeg_bytes(2, size=(64, 64))]
  out = loaded.signatures["serving_default"](image_bytes=tf.constant(jpegs))
  images = tf.stack([preprocess.eval_transform(tf.io.decode_jpeg(j, channels=3), 32) for j in jpegs])
  ref = trunk(images, training=False)
  assert float(tf.reduce_max(tf.abs(out["fc7"] - ref["fc7"]))) < 1e-5
  assert float(tf.reduce_max(tf.abs(out["conv13"] - tf.reduce_mean(ref["conv13"], [1, 2])))) < 1e-5
  pixels = tf.cast(tf.io.decode_jpeg(jpegs[0], channels=3), tf.float32)[None]
  out2 = loaded.signatures["features_from_pixels"](images=pixels)
  assert float(tf.reduce_max(tf.abs(out2["fc7"][0] - ref["fc7"][0]))) < 1e-5
  from dc_tf.evaluation import evaluator
  assert evaluator.load(d).step == 14     # evaluate.py reads the card's step, not its epoch


@pytest.mark.slow
def test_trunk_reuse_with_tfsmlayer_fine_tunes(exported):
  trunk, d, _ = exported
  path = os.path.join(d, "trunk")
  reloaded = tf.saved_model.load(path)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(reloaded(x, training=False), trunk(x, training=False)["fc7"], atol=1e-5)
  assert len(reloaded.trainable_variables) == len(trunk.trainable_variables)
  # L2 on the trainable conv and dense kernels (not biases, batch norm or the frozen Sobel
  # front), 0.5 x weight decay (export's default 1e-5) x the sum of their squares.
  kernels = [layer.kernel.numpy() for layer in trunk.layers if layer.trainable
             and isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
  assert len(kernels) == 13 + 2
  want = 0.5 * 1e-5 * sum(float(np.sum(np.square(k, dtype=np.float64))) for k in kernels)
  assert float(reloaded.regularization_losses[0]()) == pytest.approx(want, rel=1e-5)
  layer = keras.layers.TFSMLayer(path, call_endpoint="serve", call_training_endpoint="train",
                                 trainable=True)
  inputs = keras.Input([32, 32, 3])
  model = keras.Model(inputs, keras.layers.Dense(3)(layer(inputs)))
  before = [w.numpy().copy() for w in layer.trainable_weights]
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
  changed = [not np.allclose(a, b.numpy()) for a, b in zip(before, layer.trainable_weights)]
  assert sum(changed) > len(changed) // 2


def test_missing_corrupt_and_tampered_exports(exported, tmp_path):
  _, d, _ = exported
  with pytest.raises(export.ExportError, match="not found"):
    export.load(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(export.ExportError, match="no saved_model.pb"):
    export.load(str(tmp_path / "empty"))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "saved_model.pb").write_bytes(b"garbage")
  with pytest.raises(export.ExportError, match="no model_card.json"):
    export.load(str(bad))
  with pytest.raises(export.ExportError, match="cannot load"):
    export.load(str(bad), trust=True)
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(d, copy)
  with open(copy / "serving" / "saved_model.pb", "ab") as f:
    f.write(b"\0")
  with pytest.raises(export.ExportError, match="checksum mismatch"):
    export.load(str(copy))
  card = json.load(open(os.path.join(d, "model_card.json")))
  assert card["image_size"] == 32 and card["training_data"] == "x-*.tfrecord"


def _run_dir(path, step, steps_per_epoch):
  """A run dir as the trainer leaves it: config.json and a checkpoint of step `step`; returns
  the dir and the trunk saved."""
  from dc_tf.config import ExperimentConfig, ModelConfig
  from dc_tf.training import checkpointing
  config = ExperimentConfig(model=ModelConfig(image_size=32, width=0.125, fc_dim=32))
  checkpointing.write_config(path, config)
  trunk = vgg.trunk_from_config(config.model)
  ckpt = tf.train.Checkpoint(trunk=trunk,
                             step=tf.Variable(step, dtype=tf.int64),
                             steps_per_epoch=tf.Variable(steps_per_epoch, dtype=tf.int64))
  tf.train.CheckpointManager(ckpt, os.path.join(path, "ckpt"), 1).save(checkpoint_number=step)
  return path, trunk


def test_a_run_is_exported_with_its_step_and_its_epoch(tmp_path, monkeypatch):
  """Issue 29: `python -m dc_tf.export` (`export_run`) wrote the checkpoint's global step as
  the card's epoch. 14 steps of 4 an epoch: step 14, epoch 3 (the card writes what `export`
  is given: the `exported` fixture); a checkpoint that does not record steps_per_epoch has
  an unknown epoch, -1."""
  from dc_tf.training import checkpointing
  run, saved = _run_dir(str(tmp_path / "run"), step=14, steps_per_epoch=4)
  seen = {}
  monkeypatch.setattr(export, "export", lambda trunk, export_dir, **kw: seen.update(
      kw, export_dir=export_dir, weights=trunk.get_weights()))
  export.export_run(run)
  assert (seen["step"], seen["epoch"]) == (14, 3)
  for got, want in zip(seen["weights"], saved.get_weights(), strict=True):
    np.testing.assert_array_equal(got, want)
  assert seen["export_dir"] == os.path.join(run, "export") and seen["image_size"] == 32
  bare = str(tmp_path / "bare")
  tf.train.Checkpoint(step=tf.Variable(5, dtype=tf.int64)).write(os.path.join(bare, "ckpt"))
  assert checkpointing.read_progress(os.path.join(bare, "ckpt")) == (5, -1)


# ----------------------------------------------------------------------------- trunk.keras
# Runs in a fresh process with dc_tf made unimportable: the Keras-native trunk must load from
# Keras alone, freeze layer by layer and fine-tune (issue 26, item 3).
_FINE_TUNE = r"""
import json, re, sys
sys.modules["dc_tf"] = None            # any import of dc_tf fails: the file must not need it
import numpy as np, keras
path, x_path, out_path = sys.argv[1:]
trunk = keras.saving.load_model(path)
x = np.load(x_path)
before = {k: np.asarray(v) for k, v in trunk(x, training=False).items()}
frozen_layers = [l for l in trunk.layers
                 if (m := re.fullmatch(r"conv(\d+)_(conv|bn)", l.name)) and int(m.group(1)) <= 10]
for layer in frozen_layers:
  layer.trainable = False
frozen_layers += [l for l in trunk.layers if l.name.startswith("sobel_")]
frozen = {w.path: w.numpy().copy() for l in frozen_layers for w in l.weights}
tuned = {w.path: w.numpy().copy() for w in trunk.trainable_weights}
inputs = keras.Input(x.shape[1:])
head = keras.layers.Dense(3, name="new_head")
model = keras.Model(inputs, head(keras.layers.ReLU()(trunk(inputs)["fc7"])))
model.compile(optimizer=keras.optimizers.SGD(0.05),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, np.arange(len(x)) % 3, batch_size=len(x), epochs=3, verbose=0)   # 3 SGD steps
after = {w.path: w.numpy() for l in trunk.layers for w in l.weights}
np.savez(out_path, **{f"before_{k}": v for k, v in before.items()})
json.dump({
    "frozen_vars": len(frozen), "tuned_vars": len(tuned),
    "frozen_max_change": max(float(np.abs(after[k] - v).max()) for k, v in frozen.items()),
    "tuned_unchanged": sorted(k for k, v in tuned.items() if np.allclose(after[k], v)),
    "optimizer_steps": int(model.optimizer.iterations.numpy()),
    "frozen_in_trainable": sum(w.path in frozen for w in model.trainable_weights),
}, open(out_path + ".json", "w"))
"""


@pytest.mark.slow
def test_keras_trunk_loads_without_dc_tf_and_fine_tunes_in_a_fresh_process(exported, tmp_path):
  trunk, d, card = exported
  assert card["sha256"][export.KERAS_FILE] == export._file_sha256(os.path.join(d, "trunk.keras"))
  pixels = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
  x = tf.stack([preprocess.eval_transform(p, 32) for p in tf.constant(pixels)]).numpy()
  np.save(tmp_path / "x.npy", x)
  (tmp_path / "fine_tune.py").write_text(_FINE_TUNE)
  out = str(tmp_path / "out.npz")
  subprocess.run([sys.executable, str(tmp_path / "fine_tune.py"), os.path.join(d, "trunk.keras"),
                  str(tmp_path / "x.npy"), out], check=True, cwd=str(tmp_path), timeout=180,
                 env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                 | {"TF_CPP_MIN_LOG_LEVEL": "2"})
  got = np.load(out)
  res = json.load(open(out + ".json"))
  # Before fine-tuning: the serving SavedModel's fc7 for the same pixels, and every endpoint
  # of trunk/ for the same normalised images.
  loaded = export.load(d)           # held: its signatures need its variables alive
  serving = loaded.signatures["features_from_pixels"](images=pixels)
  np.testing.assert_allclose(got["before_fc7"], serving["fc7"].numpy(), atol=1e-5)
  np.testing.assert_allclose(got["before_conv13"].mean(axis=(1, 2)), serving["conv13"].numpy(),
                             atol=1e-5)
  trunk_module = tf.saved_model.load(os.path.join(d, "trunk"))
  ref = trunk_module.endpoints(x)
  assert sorted(k[len("before_"):] for k in got.files) == sorted(vgg.ENDPOINTS)
  for name in vgg.ENDPOINTS:
    np.testing.assert_allclose(got[f"before_{name}"], ref[name].numpy(), atol=1e-5, err_msg=name)
  # conv1-conv10 (kernels, biases, BN scales and running statistics) and the Sobel front did
  # not move; conv11-13 and fc6/fc7 did; the new head trained for 3 steps.
  assert res["optimizer_steps"] == 3
  assert res["frozen_vars"] == 10 * 6 + 2 and res["frozen_in_trainable"] == 0
  assert res["frozen_max_change"] == 0.0
  # Every unfrozen variable moved but conv11-13's biases: BN in training mode subtracts the
  # batch mean right after them, so their gradient is exactly zero.
  assert res["tuned_vars"] == 3 * 4 + 4
  assert res["tuned_unchanged"] == [f"conv{i}_conv/bias" for i in (11, 12, 13)]


def test_keras_trunk_refuses_a_tampered_file_and_round_trips_a_folded_trunk(exported, tmp_path):
  import shutil
  _, d, _ = exported
  m = export.load_keras(d)
  assert [l.name for l in m.layers if not l.trainable] == ["sobel_gray", "sobel_filter"]
  copy = tmp_path / "copy"
  shutil.copytree(d, copy, ignore=shutil.ignore_patterns("serving", "trunk"))
  with open(copy / "trunk.keras", "ab") as f:
    f.write(b"\0")
  with pytest.raises(export.ExportError, match="checksum mismatch"):
    export.load_keras(str(copy))
  with pytest.raises(export.ExportError, match="not found"):
    export.load_keras(str(tmp_path))
  # The one custom layer (fold_sobel's border term) is registered: a folded trunk reloads.
  folded = vgg.fold_sobel(vgg.build_trunk(32, 0.125, 16))
  folded.save(tmp_path / "folded.keras")
  again = keras.saving.load_model(tmp_path / "folded.keras")
  x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(again(x)["fc7"], folded(x)["fc7"], atol=1e-6)
  assert not again.get_layer("conv1_border_correction").trainable


# ------------------------------------------------------------------ artefacts (issue 37)
@pytest.mark.slow
def test_an_export_leaves_no_stale_artefact_and_its_card_lists_exactly_what_is_there(
    exported, tmp_path):
  """Re-exporting without --onnx over an export that has trunk.onnx (the fixture's, where
  the ONNX packages are installed; a planted one otherwise) removes it; the user's own
  files stay."""
  trunk, d, first = exported
  assert sorted(os.listdir(d)) == sorted([*first["sha256"], export.CARD_FILE])
  target = tmp_path / "export"
  shutil.copytree(d, target)
  if not (target / export.ONNX_FILE).exists():
    (target / export.ONNX_FILE).write_bytes(b"stale")
  (target / "serving" / "stale.txt").write_text("from an older export")
  (target / "notes.md").write_text("mine")
  card = export.export(trunk, str(target), image_size=32, step=15)
  assert not (target / export.ONNX_FILE).exists()
  assert not (target / "serving" / "stale.txt").exists()
  assert sorted(os.listdir(target)) == sorted([*card["sha256"], export.CARD_FILE, "notes.md"])
  assert export.ONNX_FILE not in card["inputs"] and export.ONNX_FILE not in card["sha256"]
  assert json.load(open(target / export.CARD_FILE)) == card
  assert export.load(str(target)) is not None      # the card's sha256 match what is there


# ----------------------------------------------------------------------------- trunk.onnx
def test_onnx_trunk_matches_tensorflow_on_every_endpoint(exported):
  ort = pytest.importorskip("onnxruntime", reason="pip install -r requirements-onnx.txt")
  trunk, d, card = exported
  path = os.path.join(d, export.ONNX_FILE)
  assert card["sha256"][export.ONNX_FILE] == export._file_sha256(path)
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == ["images"]
  x = np.random.default_rng(3).normal(size=(5, 32, 32, 3)).astype(np.float32)
  names = [o.name for o in session.get_outputs()]
  assert sorted(names) == sorted(vgg.ENDPOINTS)
  ref = trunk(x, training=False)
  for name, value in zip(names, session.run(None, {"images": x})):
    np.testing.assert_allclose(value, ref[name].numpy(), atol=1e-4, rtol=0, err_msg=name)


def test_onnx_export_without_tf2onnx_fails_naming_the_package(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tf2onnx", None)     # import tf2onnx raises ImportError
  with pytest.raises(export.ExportError, match="needs the tf2onnx package"):
    export.export(vgg.build_trunk(32, 0.125, 16), str(tmp_path / "x"), image_size=32, onnx=True)
  assert not (tmp_path / "x").exists()                  # nothing written
  code = ("import runpy, sys; sys.modules['tf2onnx'] = None; "
          "sys.argv = ['export', '--model_dir=/nonexistent', '--onnx']; "
          "runpy.run_module('dc_tf.export', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=120)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and "tf2onnx" in errors[0], proc.stderr[-500:]
