"""Pascal VOC 2007 classification on frozen features (the paper's Table 4 protocol,
linear part): 20-way multi-label BCE ignoring 'difficult' labels, mAP from scikit-learn's
average precision, 10-crop test. Point it at a VOC2007 folder (JPEGImages/, Annotations/,
ImageSets/Main/{trainval,test}.txt)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow as tf

from dc_tf.data import preprocess
from dc_tf.evaluation import metrics, probes

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
           "train", "tvmonitor")


def read_split(voc_dir: str, split: str) -> tuple[list[str], np.ndarray]:
  """Image paths and targets [n, 20]: 1 present, 0 absent, -1 only 'difficult'."""
  list_file = os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt")
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"VOC split list not found: {list_file}")
  names = [l.strip() for l in open(list_file) if l.strip()]
  targets = np.zeros([len(names), len(CLASSES)], np.float32)
  for i, name in enumerate(names):
    root = ET.parse(os.path.join(voc_dir, "Annotations", f"{name}.xml")).getroot()
    for obj in root.iter("object"):
      c = CLASSES.index(obj.findtext("name").strip())
      difficult = obj.findtext("difficult", "0").strip() == "1"
      if not difficult:
        targets[i, c] = 1
      elif targets[i, c] == 0:
        targets[i, c] = -1
  return [os.path.join(voc_dir, "JPEGImages", f"{n}.jpg") for n in names], targets


def ten_crops(image: tf.Tensor, size: int) -> tf.Tensor:
  """4 corners + center, and their mirror images, after resizing the shorter side."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.math.ceil(size / preprocess.CENTER_CROP_FRACTION) / tf.reduce_min(shape)
  hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = tf.image.resize(image, hw, antialias=True)
  h, w = hw[0], hw[1]
  offsets = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
             ((h - size) // 2, (w - size) // 2)]
  crops = [tf.image.crop_to_bounding_box(image, y, x, size, size) for y, x in offsets]
  crops += [tf.image.flip_left_right(c) for c in crops]
  return preprocess.normalize(tf.stack(crops))


def _features(trunk, paths, size, layer, crops):
  out = []
  for p in paths:
    image = tf.io.decode_jpeg(tf.io.read_file(p), channels=3)
    batch = ten_crops(image, size) if crops else preprocess.eval_transform(image, size)[None]
    f, _ = metrics.pool_until(trunk(batch, training=False)[layer].numpy())
    out.append(f)
  return np.stack(out)   # [n, crops, d]


def evaluate_voc(trunk, voc_dir: str, layers=("fc6", "fc7"), seed: int = 0,
                 train_split: str = "trainval", test_split: str = "test") -> dict:
  """mAP (%) per layer of a linear multi-label probe, 10-crop test."""
  size = trunk.model_config.image_size
  train_paths, train_t = read_split(voc_dir, train_split)
  test_paths, test_t = read_split(voc_dir, test_split)
  result = {}
  for layer in layers:
    train_x = _features(trunk, train_paths, size, layer, crops=False)[:, 0]
    test_x = _features(trunk, test_paths, size, layer, crops=True)
    scores = probes.multilabel_probe(train_x, train_t, test_x, test_t, seed=seed)
    result[layer] = probes.voc_map(scores, test_t)[0]
  return result
