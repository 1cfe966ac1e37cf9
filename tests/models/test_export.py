"""SavedModel export: both signatures match the in-memory model, trunk reuse, errors."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import jpeg_bytes
from dc_tf import export
from dc_tf.data import preprocess
from dc_tf.models import vgg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  trunk = vgg.build_trunk(32, 0.125, 32)
  d = str(tmp_path_factory.mktemp("export"))
  card = export.export(trunk, d, image_size=32, epoch=3, training_data="x-*.tfrecord")
  return trunk, d, card


@pytest.mark.slow
def test_signatures_match_in_memory_model(exported):
  trunk, d, card = exported
  assert card["epoch"] == 3 and len(card["sha256"]["serving"]) == 64
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


@pytest.mark.slow
def test_trunk_reuse_with_tfsmlayer_fine_tunes(exported):
  trunk, d, _ = exported
  path = os.path.join(d, "trunk")
  reloaded = tf.saved_model.load(path)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(reloaded(x, training=False), trunk(x, training=False)["fc7"], atol=1e-5)
  assert len(reloaded.trainable_variables) == len(trunk.trainable_variables)
  assert float(reloaded.regularization_losses[0]()) > 0
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
  with pytest.raises(export.ExportError, match="cannot load"):
    export.load(str(bad))
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(d, copy)
  with open(copy / "serving" / "saved_model.pb", "ab") as f:
    f.write(b"\0")
  with pytest.raises(export.ExportError, match="checksum mismatch"):
    export.load(str(copy))
  card = json.load(open(os.path.join(d, "model_card.json")))
  assert card["image_size"] == 32 and card["training_data"] == "x-*.tfrecord"
