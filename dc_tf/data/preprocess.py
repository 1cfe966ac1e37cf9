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


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
  """RandomResizedCrop (Inception-style) then resize to size x size, seeded."""
  shape = tf.shape(image)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  return tf.image.resize(crop, [size, size], method="bilinear", antialias=True)


def train_transform(image: tf.Tensor, size: int, seed: tf.Tensor,
                    scale_min: float = 0.08) -> tf.Tensor:
  """Training parser: RandomResizedCrop(scale_min..1, 3/4..4/3), h-flip, normalise."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  image = random_resized_crop(image, size, seeds[0], scale=(scale_min, 1.0))
  image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  return normalize(image)


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
  Applied after resizing, so the rotation task has no resize-asymmetry shortcut."""
  return tf.image.rot90(image, k=tf.cast(rotation, tf.int32))
