"""VGG-16-BN trunk with a frozen Sobel front, as in DeepCluster / DeeperCluster.

Caron et al., ICCV 2019, Sec. 4: VGG-16 (configuration D of Simonyan & Zisserman) with
batch norm after every convolution, on Sobel-filtered grayscale input.
"""

from __future__ import annotations

import math

import keras
import numpy as np

# Configuration D: 13 convolutions, 'M' = 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")
CONV_ENDPOINTS = tuple(f"conv{i}" for i in range(1, 14))
ENDPOINTS = CONV_ENDPOINTS + ("fc6", "fc7")

SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32)


def channels(base: int, width: float) -> int:
  return max(4, int(round(base * width)))


def sobel_kernels() -> tuple[np.ndarray, np.ndarray]:
  """(gray 1x1x3x1 kernel of 1/3, sobel 3x3x1x2 kernel [Gx, Gy])."""
  gray = np.full([1, 1, 3, 1], 1.0 / 3.0, np.float32)
  sobel = np.stack([SOBEL_X, SOBEL_Y], axis=-1)[:, :, None, :]
  return gray, sobel


def default_pad(sobel: bool) -> int:
  """The pad of our own fronts (`input_pad=-1`): 2 before the unpadded Sobel 3x3, none for RGB."""
  return 2 if sobel else 0


def front_size(image_size: int, sobel: bool, input_pad: int) -> int:
  """Side of the map conv1 sees: the input padded by `input_pad`, less 2 for the unpadded
  Sobel 3x3 (conv1 and the rest pad 'same')."""
  return image_size + 2 * input_pad - (2 if sobel else 0)


def sobel_block(x, pad: int = 2):
  """Frozen RGB -> gray -> (Gx, Gy): a `pad`-pixel zero pad, then an unpadded 3x3 conv.

  pad 2 is DeeperCluster's (a 224 input gives a 226 map); pad 1 is deepcluster's Sobel conv
  with padding=1 (224 -> 224). DeeperCluster pads the RGB image before the gray conv, we pad
  the gray one: equal, the gray conv has no bias."""
  gray_k, sobel_k = sobel_kernels()
  gray = keras.layers.Conv2D(1, 1, use_bias=False, trainable=False, name="sobel_gray")
  sobel = keras.layers.Conv2D(2, 3, padding="valid", use_bias=False, trainable=False,
                              name="sobel_filter")
  x = gray(x)
  if pad:
    x = keras.layers.ZeroPadding2D(pad, name="sobel_pad")(x)
  x = sobel(x)
  gray.set_weights([gray_k])
  sobel.set_weights([sobel_k])
  return x


def build_trunk(image_size: int = 224, width: float = 1.0, fc_dim: int = 4096,
                sobel: bool = True, dropout: float = 0.5,
                name: str = "vgg16_bn", input_pad: int = -1) -> keras.Model:
  """Builds the trunk as a functional Keras model whose outputs are named endpoints.

  Args:
    image_size: input height = width in pixels (32..224; 5 max-pools).
    width: channel-width multiplier (1 = paper; CPU presets use 0.25-0.5).
    fc_dim: units of fc6 and fc7 (4096 in the paper).
    sobel: frozen Sobel front (2 input channels to conv1); False = raw RGB.
    dropout: after fc6.
    name: model name.
    input_pad: zero pixels around the input of the front (the Sobel 3x3, or conv1 for RGB);
      -1 = ours (`default_pad`: Sobel 2, RGB 0). The original's released files: DeeperCluster
      Sobel 2, DeeperCluster RGB 1, deepcluster Sobel 1 (issue 26). Together with `sobel`
      this is the trunk's front: the same weights on another front see other pixels.
  Returns:
    A `keras.Model` mapping images [B, S, S, 3] (normalised RGB) to a dict with
    conv1..conv13 (after BN+ReLU), fc6 (after ReLU) and fc7 (pre-ReLU: the clustering
    feature; heads use ReLU(fc7)).
  """
  pad = default_pad(sobel) if input_pad < 0 else input_pad
  inputs = keras.Input([image_size, image_size, 3], name="images")
  if sobel:
    x = sobel_block(inputs, pad)
  else:
    x = keras.layers.ZeroPadding2D(pad, name="input_pad")(inputs) if pad else inputs
  outputs = {}
  i = pools = 0
  for spec in VGG16_LAYOUT:
    if spec == "M":
      pools += 1
      x = keras.layers.MaxPooling2D(2, name=f"pool{pools}")(x)
      continue
    i += 1
    c = channels(spec, width)
    # He-style init of the original: N(0, sqrt(2 / (9 * out_channels))), zero bias.
    init = keras.initializers.RandomNormal(stddev=math.sqrt(2.0 / (9 * c)))
    x = keras.layers.Conv2D(c, 3, padding="same", kernel_initializer=init,
                            name=f"conv{i}_conv")(x)
    x = keras.layers.BatchNormalization(synchronized=True, momentum=0.9, epsilon=1e-5,
                                        name=f"conv{i}_bn")(x)
    x = keras.layers.ReLU(name=f"conv{i}")(x)
    outputs[f"conv{i}"] = x
  x = keras.layers.Flatten(name="flatten")(x)
  dense_init = keras.initializers.RandomNormal(stddev=0.01)
  x = keras.layers.Dense(fc_dim, kernel_initializer=dense_init, name="fc6_dense")(x)
  x = keras.layers.ReLU(name="fc6")(x)
  outputs["fc6"] = x
  x = keras.layers.Dropout(dropout, name="fc6_dropout")(x)
  x = keras.layers.Dense(fc_dim, kernel_initializer=dense_init, name="fc7")(x)
  outputs["fc7"] = keras.layers.Activation("linear", dtype="float32", name="fc7_out")(x)
  return keras.Model(inputs, outputs, name=name)


def trunk_from_config(model_config) -> keras.Model:
  """Builds the trunk from a `dc_tf.config.ModelConfig`."""
  return build_trunk(image_size=model_config.image_size, width=model_config.width,
                     fc_dim=model_config.fc_units, sobel=model_config.sobel,
                     dropout=model_config.dropout, input_pad=model_config.pad)


def sobel_rgb_kernel(conv1_kernel: np.ndarray) -> np.ndarray:
  """conv1 [3, 3, 2, C] after gray (1/3 each of RGB) and Sobel [Gx, Gy] (3x3, no bias) as one
  [5, 5, 3, C] kernel: cross-correlations compose as y[p] = sum_a k1[a] sum_u G[u] g[p + a + u],
  so tap a + u gets G[u] k1[a] (the original's `computeweight`/`aux` in model_factory.py's
  sobel2RGB, every tap of it)."""
  gray_k, sobel_k = sobel_kernels()
  k5 = np.zeros([5, 5, 1, conv1_kernel.shape[-1]], np.float64)
  for a in range(3):
    for b in range(3):
      k5[a:a + 3, b:b + 3, 0, :] += np.einsum("uvk,kc->uvc", sobel_k[:, :, 0, :],
                                              conv1_kernel[a, b])
  return (np.repeat(k5, 3, axis=2) * gray_k[0, 0, 0, 0]).astype(np.float32)


def after_conv1(trunk: keras.Model, x) -> dict:
  """The endpoints of `trunk`'s layers from conv1's BN on, applied to a new conv1 output `x`
  (the layers are shared): what a front rebuilt in front of conv1 feeds."""
  outputs, started = {}, False
  for layer in trunk.layers:
    started = started or layer.name == "conv1_bn"
    if not started:
      continue
    x = layer(x)
    if layer.name in CONV_ENDPOINTS or layer.name == "fc6":
      outputs[layer.name] = x
  outputs["fc7"] = x                                            # fc7_out is the last layer
  return outputs


def fold_sobel(trunk: keras.Model) -> keras.Model:
  """An RGB trunk whose first layer is a 5x5 conv over RGB: the frozen Sobel front
  (gray, 2-pixel pad, 3x3 Gx/Gy) folded into conv1, as the paper did for fine-tuning on
  RGB (ImageNet experiments). Layers after conv1 are shared with `trunk`.

  Why there is a border term: unfolded, conv1 ('same') sees the Sobel map padded with
  zeros; folded, a 5x5 conv over gray padded by 3 sees Sobel responses on that ring.
  Writing s_full for the Sobel map of the 3-padded gray image,
    conv1(pad1(s)) = conv1(s_full) - conv1(s_full * ring),
  so the folded model adds a frozen linear correction on the image border. Outputs equal
  the unfolded model's (tested). With the 2-pixel Sobel pad, the only one allowed here, that
  ring's Sobel responses see nothing but padding, so the correction is exactly zero
  (tests/training/test_finetune.py measures it): the plain 5x5 conv (`sobel_rgb_kernel`,
  what `python -m dc_tf.finetune --sobel2rgb` trains) is the same front.
  """
  if "sobel_filter" not in [l.name for l in trunk.layers]:
    raise ValueError("fold_sobel: this trunk has no Sobel front (built with sobel=False)")
  image_size = trunk.input_shape[1]
  if trunk.get_layer("sobel_filter").output.shape[1] != image_size + 2:
    raise ValueError("fold_sobel: the border term is derived for the 2-pixel Sobel pad; this "
                     "trunk's Sobel front pads otherwise (input_pad)")
  k1, b1 = trunk.get_layer("conv1_conv").get_weights()        # [3,3,2,c1], [c1]
  inputs = keras.Input([image_size, image_size, 3], name="images")
  x = keras.layers.ZeroPadding2D(3, name="folded_pad")(inputs)
  conv = keras.layers.Conv2D(k1.shape[-1], 5, padding="valid", name="conv1_conv_folded")
  y = conv(x)
  conv.set_weights([sobel_rgb_kernel(k1), b1])
  y = keras.layers.Add(name="conv1_folded")([y, SobelBorderCorrection(k1, image_size)(inputs)])
  outputs = after_conv1(trunk, y)
  return keras.Model(inputs, outputs, name=trunk.name + "_folded")


@keras.saving.register_keras_serializable(package="dc_tf")
class SobelBorderCorrection(keras.layers.Layer):
  """-conv1(s_full * ring): the frozen border term of `fold_sobel` (see its docstring).
  Registered, so a folded trunk saved as .keras loads after `import dc_tf.models.vgg`."""

  def __init__(self, conv1_kernel, image_size, **kw):
    kw.setdefault("name", "conv1_border_correction")
    kw["trainable"] = False          # get_config carries trainable; from_config passes it back
    super().__init__(**kw)
    self.conv1_kernel = np.asarray(conv1_kernel, np.float32)
    self.image_size = int(image_size)
    ring = np.ones([self.image_size + 4, self.image_size + 4, 1], np.float32)
    ring[1:-1, 1:-1] = 0.0
    self.ring = ring

  def call(self, images):
    from keras import ops
    gray_k, sobel_k = sobel_kernels()
    g = ops.conv(images, gray_k, padding="valid")
    g = ops.pad(g, [[0, 0], [3, 3], [3, 3], [0, 0]])
    s_ring = ops.conv(g, sobel_k, padding="valid") * self.ring[None]
    return -ops.conv(s_ring, self.conv1_kernel, padding="valid")

  def get_config(self):
    return {**super().get_config(), "conv1_kernel": self.conv1_kernel.tolist(),
            "image_size": self.image_size}
