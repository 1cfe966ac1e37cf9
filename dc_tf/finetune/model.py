"""The network `eval_pretrain.py` trains: the pre-trained VGG-16-BN, its Sobel front merged
into conv1, fc6/fc7 re-initialised, and a new classifier (facebookresearch/DeeperCluster).

What the original does, in order (eval_pretrain.py l.122-139):
  * `model_factory(args, relu=True, num_classes)` (l.125): the trunk with ReLU after fc7, then
    `pred_layer`, a Linear(4096, classes) with PyTorch's default init; dropout 0.5 after fc6
    only (vgg16.py l.22, l.26-31);
  * `load_pretrained` (l.128): every trunk weight but the Sobel and prediction layers
    (pretrain.py l.41-51);
  * `sobel2RGB` (l.131-132, model_factory.py l.137-174): the frozen gray (1x1, 1/3) and
    Sobel (3x3, no bias, pad 0) convs and conv1 (3x3, pad 1) become one trainable
    Conv2d(3, 64, kernel_size=5, padding=1) with conv1's bias; the input's ConstantPad2d(2) is
    kept (only `net.sobel` is set to None), so the 5x5 conv sees the image padded by 3. An RGB
    trunk returns unchanged (l.138-139);
  * fc6 and fc7 (`body.classifier`'s Linear layers) re-initialised N(0, 0.01), bias 0.1
    (l.135-139); `pred_layer` is not in `body.classifier` and keeps its default init.

`sobel_to_rgb` here composes all 25 taps of the 5x5 kernel. The original's loop runs its
indices over `conv_old.kernel_size[0]` = 3 (l.166-167), so it writes only the taps [0:3, 0:3]
of the 5x5 kernel and leaves the other 16 at Conv2d's random init: its converted front is not
the Sobel front + conv1 it replaces. Ours is (tests/training/test_finetune.py).

Relation to `dc_tf.models.vgg.fold_sobel`: the same 5x5 kernel (`vgg.sobel_rgb_kernel`), over
the image padded by 3, without building fold_sobel's model (its custom layer does not take
--mixed_precision's policy). fold_sobel also adds a frozen `SobelBorderCorrection`
built from the initial conv1, which would go stale once conv1 trains; with the 2-pixel pad it is
identically zero (the Sobel map of a 3-padded image is zero on its outer ring, exactly the
zeros conv1's own pad adds), so it is left out here and the converted front is a plain
trainable conv, as the original's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from dc_tf.config import ModelConfig, UserError
from dc_tf.models import vgg


class SourceError(UserError, FileNotFoundError):
  """--from names nothing usable; the message names the path."""


@contextlib.contextmanager
def dtype_policy(mixed_precision: bool):
  """--mixed_precision: layers built inside compute in bfloat16 with float32 variables (as the
  trainer's trunk); the policy is restored after, so nothing else inherits it."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("mixed_bfloat16" if mixed_precision else previous)
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


def _keras_file(path: str) -> str | None:
  if path.endswith(".keras") and tf.io.gfile.exists(path):
    return path
  candidate = os.path.join(path, "trunk.keras")
  return candidate if tf.io.gfile.exists(candidate) else None


def _card_model_config(keras_path: str) -> ModelConfig | None:
  card = os.path.join(os.path.dirname(keras_path), "model_card.json")
  if not tf.io.gfile.exists(card):
    return None
  with tf.io.gfile.GFile(card) as f:
    model = (json.load(f).get("config") or {}).get("model")
  if not model:
    return None
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in model.items() if k in known})


def infer_model_config(trunk: keras.Model) -> ModelConfig:
  """The ModelConfig of a trunk loaded from trunk.keras whose model card has none (an export
  made outside a run): read off its layers."""
  names = {l.name for l in trunk.layers}
  sobel = "sobel_filter" in names
  pad_layer = "sobel_pad" if sobel else "input_pad"
  pad = int(trunk.get_layer(pad_layer).padding[0][0]) if pad_layer in names else 0
  return ModelConfig(image_size=int(trunk.input_shape[1]),
                     width=trunk.get_layer("conv1_conv").filters / 64.0,
                     fc_dim=int(trunk.get_layer("fc6_dense").units), sobel=sobel, input_pad=pad)


def source_model_config(source: str, random_model: ModelConfig,
                        trust: bool = False) -> ModelConfig:
  """The architecture of --from: a run dir's config.json, an export's model card (or its
  layers), or `random_model` for "random". `trust`: see `export.load_keras`."""
  from dc_tf.finetune.config import RANDOM
  from dc_tf.training import checkpointing
  if source == RANDOM:
    return random_model
  if tf.io.gfile.exists(os.path.join(source, "config.json")):
    return checkpointing.read_config(source).model
  keras_path = _keras_file(source)
  if keras_path is None:
    raise SourceError(f"--from={source}: no such run dir (config.json) or export (trunk.keras)"
                      if tf.io.gfile.exists(source) else f"--from={source}: no such file or "
                      "directory (a run dir, an export, or 'random')")
  return (_card_model_config(keras_path)
          or infer_model_config(_load_keras(keras_path, trust)))


def _load_keras(keras_path: str, trust: bool = False) -> keras.Model:
  from dc_tf import export
  return export.load_keras(keras_path, trust=trust)


def load_source_weights(trunk: keras.Model, source: str, model_config: ModelConfig,
                        trust: bool = False) -> int:
  """Fills `trunk` from --from (a run's newest checkpoint, or trunk.keras layer by layer);
  returns the source's step (-1 for an export)."""
  from dc_tf.training import checkpointing
  if tf.io.gfile.exists(os.path.join(source, "config.json")):
    return checkpointing.restore_trunk(trunk, source, model_config)
  saved = _load_keras(_keras_file(source), trust)
  for layer in trunk.layers:
    if layer.weights:
      try:
        layer.set_weights(saved.get_layer(layer.name).get_weights())
      except (ValueError, KeyError) as e:
        raise SourceError(f"--from={source}: layer {layer.name} does not fit this trunk "
                          f"({str(e).splitlines()[0][:200]})") from e
  return -1


def sobel_to_rgb(trunk: keras.Model) -> keras.Model:
  """The trunk with its frozen Sobel front and conv1 merged into one trainable 5x5 conv over
  the RGB image padded by 3 (the original's `sobel2RGB`, all 25 taps: module docstring).
  Layers after conv1 are shared with `trunk`; outputs are the same named endpoints."""
  image_size = int(trunk.input_shape[1])
  names = [l.name for l in trunk.layers]
  if "sobel_filter" not in names or trunk.get_layer("sobel_filter").output.shape[1] != (
      image_size + 2):
    raise UserError("sobel2rgb: the trunk has no Sobel front padded by 2 pixels")
  k1, b1 = trunk.get_layer("conv1_conv").get_weights()
  k5 = vgg.sobel_rgb_kernel(k1)
  inputs = keras.Input([image_size, image_size, 3], name="images")
  # ConstantPad2d(2) kept (model_factory.py l.84-86) + the new conv's padding=1 (l.165).
  x = keras.layers.ZeroPadding2D(3, name="sobel2rgb_pad")(inputs)
  conv = keras.layers.Conv2D(k5.shape[-1], 5, padding="valid", name="conv1_conv_rgb")
  x = conv(x)
  conv.set_weights([k5, b1])
  outputs = vgg.after_conv1(trunk, x)
  return keras.Model(inputs, outputs, name=trunk.name + "_rgb")


def reinit_fc(trunk: keras.Model, seed: int) -> None:
  """fc6 and fc7: N(0, 0.01), bias 0.1 (eval_pretrain.py l.134-139)."""
  rng = np.random.default_rng(seed)
  for name in ("fc6_dense", "fc7"):
    kernel, bias = trunk.get_layer(name).get_weights()
    trunk.get_layer(name).set_weights([rng.normal(0, 0.01, kernel.shape).astype(np.float32),
                                       np.full(bias.shape, 0.1, np.float32)])


def build_classifier(trunk: keras.Model, num_classes: int, seed: int) -> keras.Model:
  """images -> logits: ReLU(fc7) (model_factory(relu=True), vgg16.py l.32-33) then the new
  prediction layer, PyTorch's default Linear init U(+-1/sqrt(fan_in)) for weight and bias
  (eval_pretrain.py's pred_layer is not re-initialised). Logits are float32."""
  image_size = int(trunk.input_shape[1])
  fan_in = int(trunk.output["fc7"].shape[-1])
  bound = 1.0 / math.sqrt(fan_in)
  init = lambda s: keras.initializers.RandomUniform(-bound, bound, seed=s)  # noqa: E731
  inputs = keras.Input([image_size, image_size, 3], name="images")
  h = keras.layers.ReLU(name="fc7_relu")(trunk(inputs)["fc7"])
  logits = keras.layers.Dense(num_classes, kernel_initializer=init(seed),
                              bias_initializer=init(seed + 1), dtype="float32",
                              name="classifier")(h)
  return keras.Model(inputs, logits, name="finetune")


def build_network(model_config: ModelConfig, *, dropout: float, sobel2rgb: bool,
                  num_classes: int, seed: int, mixed_precision: bool = False,
                  source: str | None = None,
                  trust: bool = False) -> tuple[keras.Model, keras.Model]:
  """(classifier, trunk): the trunk of `model_config` with `dropout` after fc6, filled from
  `source` when one is given (None: random init, or a resume that restores it all), its Sobel
  front converted (`sobel2rgb`), fc6/fc7 re-initialised, and the classifier on top."""
  model_config = dataclasses.replace(model_config, dropout=dropout)
  keras.utils.set_random_seed(seed)
  with dtype_policy(mixed_precision):
    trunk = vgg.trunk_from_config(model_config)
    if source is not None:
      load_source_weights(trunk, source, model_config, trust)
    if model_config.sobel and sobel2rgb:
      if model_config.pad != 2:
        raise UserError(
            f"--sobel2rgb folds a Sobel front padded by 2 (DeeperCluster's); this trunk's is "
            f"{model_config.front}: pass --sobel2rgb=false to keep its frozen Sobel front")
      trunk = sobel_to_rgb(trunk)
    reinit_fc(trunk, seed)
    model = build_classifier(trunk, num_classes, seed)
  return model, trunk
