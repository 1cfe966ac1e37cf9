"""Parsers: the training and extraction transforms, and the rotation pretext op.

All randomness is stateless and seeded per element, so an epoch's augmentations depend
only on (seed, epoch, element index): a resumed run sees exactly the same images.
"""

from __future__ import annotations

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Extraction resizes the shorter side to size / CENTER_CROP_FRACTION, then crops `size`.
CENTER_CROP_FRACTION = 0.875


def normalize(image: tf.Tensor) -> tf.Tensor:
  """uint8 or [0,255] float RGB -> ImageNet mean/std normalised float32."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - IMAGENET_MEAN) / IMAGENET_STD


def crop_window(image_shape: tf.Tensor, seed: tf.Tensor, scale=(0.08, 1.0),
                ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
  """RandomResizedCrop's window (Inception-style), seeded: int32 [y, x, height, width]."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
  """RandomResizedCrop of a decoded image, then resize to size x size, seeded."""
  w = crop_window(tf.shape(image), seed, scale, ratio)
  return resize_crop(tf.slice(image, [w[0], w[1], 0], [w[2], w[3], -1]), size)


def resize_crop(crop: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to size x size, antialiased when a side shrinks. When no side shrinks
  the antialiasing kernel is bilinear interpolation itself (equal to 1e-3 of a pixel
  level), and the plain op costs less: most 64 px crops are enlarged (issue 17)."""
  shrinks = tf.reduce_any(tf.shape(crop)[:2] > size)
  return tf.cond(shrinks,
                 lambda: tf.image.resize(crop, [size, size], method="bilinear", antialias=True),
                 lambda: tf.image.resize(crop, [size, size], method="bilinear"))


def decode_random_crop(encoded: tf.Tensor, seed: tf.Tensor, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
  """The RandomResizedCrop window of an encoded image, decoded: uint8 RGB [h, w, 3].

  A JPEG's window is drawn from the size in its header and only that window is decoded
  (`decode_and_crop_jpeg` skips the rows above and below it and most of the columns beside
  it): YFCC photos are ~500 x 375 and decoding is most of the input pipeline's work. Other
  formats are decoded whole, then cropped. The window is the one `random_resized_crop` draws
  from the decoded image with the same seed, so both give the same crop."""
  def jpeg():
    w = crop_window(tf.image.extract_jpeg_shape(encoded), seed, scale, ratio)
    return tf.image.decode_and_crop_jpeg(encoded, w, channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    w = crop_window(tf.shape(image), seed, scale, ratio)
    return tf.slice(image, [w[0], w[1], 0], [w[2], w[3], 3])

  is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), tf.constant(b"\xff\xd8\xff"))
  crop = tf.cond(is_jpeg, jpeg, other)
  crop.set_shape([None, None, 3])
  return crop


def train_transform(image: tf.Tensor, size: int, seed: tf.Tensor,
                    scale_min: float = 0.08) -> tf.Tensor:
  """Training parser: RandomResizedCrop(scale_min..1, 3/4..4/3), h-flip; uint8 RGB.

  The result stays uint8 and is normalised by the train step on the replica's device
  (`normalize`): a quarter of the host's bytes per image for the flip, the rotation, the
  batch and the copy to an accelerator (issue 17)."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  image = random_resized_crop(image, size, seeds[0], scale=(scale_min, 1.0))
  return tf.image.stateless_random_flip_left_right(to_uint8(image), seeds[1])


def train_transform_encoded(encoded: tf.Tensor, size: int, seed: tf.Tensor,
                            scale_min: float = 0.08) -> tf.Tensor:
  """`train_transform` from the encoded bytes, decoding only the crop window (tested
  against decoding first)."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  image = resize_crop(decode_random_crop(encoded, seeds[0], scale=(scale_min, 1.0)), size)
  return tf.image.stateless_random_flip_left_right(to_uint8(image), seeds[1])


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] float pixels (a resize's output) rounded to uint8."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def eval_transform(image: tf.Tensor, size: int) -> tf.Tensor:
  """Extraction parser: resize the shorter side, center crop, normalise. Deterministic."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  target = tf.math.ceil(size / CENTER_CROP_FRACTION)
  scale = target / tf.reduce_min(shape)
  new_hw = tf.cast(tf.math.round(shape * scale), tf.int32)
  new_hw = tf.maximum(new_hw, size)
  image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
  image = tf.image.resize_with_crop_or_pad(image, size, size)
  return normalize(image)


def rotate(image: tf.Tensor, rotation: tf.Tensor) -> tf.Tensor:
  """Rotates by rotation*90 degrees counter-clockwise (like np.rot90 in the original).
  Applied after resizing, so the rotation task has no resize-asymmetry shortcut.

  uint8 pixels are turned through a float32 view: a uint8 (or int32) rot90 is a transpose that
  oneDNN builds of TF refuse on CPUs without its AVX-512 integer support, logging an
  "E0000 ... oneDNN supports DT_UINT8 only on platforms with AVX-512" line per process before
  falling back to Eigen (benchmarks/uint8_input.py times both ways)."""
  k = tf.cast(rotation, tf.int32)
  return _on_float32_view(image, lambda x: tf.image.rot90(x, k=k))


def rotations(image: tf.Tensor, num_rotations: int) -> tf.Tensor:
  """All `num_rotations` rotations of `image` stacked [n, H, W, C] (--all_rotations), uint8
  turned through one float32 view for all of them (see rotate)."""
  return _on_float32_view(image, lambda x: tf.stack(
      [tf.image.rot90(x, k=r) for r in range(num_rotations)]))


def _on_float32_view(image: tf.Tensor, turn) -> tf.Tensor:
  if image.dtype != tf.uint8:
    return turn(image)
  return tf.cast(turn(tf.cast(image, tf.float32)), tf.uint8)
