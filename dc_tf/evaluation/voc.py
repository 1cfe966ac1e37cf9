"""Pascal VOC 2007 classification on a frozen trunk, two protocols (the paper's Table 4).
Point either at a VOC2007 folder (JPEGImages/, Annotations/, ImageSets/Main/<split>.txt).

Every entry (`evaluate_voc`, `fc6_8`, `linear_original.voc_probe`) takes `splits`: the
original's two partitions, "trainval/test" (the published numbers) or "train/val" (what the
scripts run without --split: eval_voc_classif.py l.36 `--split` default 'train' and l.66-69
test 'val' / 'test'; DeeperCluster's eval_linear.py l.67 and l.111 the same).

  evaluate_voc   linear: a 20-way multi-label logistic probe on frozen fc6 / fc7 features,
                 BCE ignoring 'difficult' labels, 10-crop test (4 corners + centre, mirrored).
  fc6_8          as the original's eval_voc_classif.py ran it: fc6, fc7 and a 20-way fc8
                 re-initialised (N(0, 0.01), bias 0.1) on the frozen conv trunk (BN in inference
                 mode), dropout kept, SGD (momentum 0.9, lr 0.003, gradients clipped to norm 10,
                 batch 16, 150k steps), random resized crops and flips for training, the sum
                 over 10 such random crops at test. Weight decay and lr step are its README's
                 published command (`--fc6_8 true --wd 0.00001 --stepsize 20000`: 1e-5, lr
                 halved every 20k), not the script's argparse defaults (1e-6, 10k).
  all layers     `fc6_8(..., all_layers=True)`, the README's "ALL" command (`--fc6_8 false
                 --wd 0.0001 --stepsize 10000`): the same, with the conv trunk trained too
                 (BN still on its running statistics: `model.body.features.eval()`), weight
                 decay 1e-4, lr halved every 10k; on a copy of the trunk.
mAP is scikit-learn's average precision per class over the images that are not 'difficult'
for it, averaged over classes."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import keras
import numpy as np
import tensorflow as tf

from dc_tf.config import UserError
from dc_tf.data import preprocess
from dc_tf.evaluation import metrics, probes

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
           "train", "tvmonitor")


# (train, test) pairs the original scripts can run: eval_voc_classif.py l.36 and l.66-69,
# eval_linear.py l.67 (`choices=['train', 'trainval']`) and l.111.
SPLITS = {"trainval/test": ("trainval", "test"), "train/val": ("train", "val")}


class VocError(UserError, FileNotFoundError):
  """A VOC folder or split that cannot be read; the message names the file or flag."""


def parse_splits(splits: str) -> tuple[str, str]:
  """'trainval/test' -> ('trainval', 'test'); the flag is evaluate.py's --voc_split."""
  if splits not in SPLITS:
    raise VocError(f"--voc_split must be one of {', '.join(SPLITS)} (the original's train -> "
                   f"test partitions), got {splits!r}")
  return SPLITS[splits]


def read_split(voc_dir: str, split: str) -> tuple[list[str], np.ndarray]:
  """Image paths and targets [n, 20]: 1 present, 0 absent, -1 only 'difficult'."""
  list_file = os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt")
  if not os.path.isfile(list_file):
    raise VocError(f"VOC split list not found: {list_file} (--voc_dir)")
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
                 splits: str = "trainval/test") -> dict:
  """mAP (%) per layer of a linear multi-label probe, 10-crop test."""
  train_split, test_split = parse_splits(splits)
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


def eval_linear_map(scores: np.ndarray, targets: np.ndarray) -> tuple[float, dict]:
  """(mAP %, {class: AP %}) as DeeperCluster's eval_linear.py `evaluate_pascal` scores
  (l.230-237): per class, scikit-learn's AP over the images not 'difficult' for it
  (`gts <= 1`: 255 there, -1 here), on the score less 1e-5 * target ("to make AP work for tied
  scores", l.234): a positive less than 1e-5 above a negative ranks below it (exact ties
  sklearn already counts as one group). Classes with no positive in the split are left out
  (the original would average sklearn's 0 for them; every VOC07 split has all 20)."""
  from sklearn.metrics import average_precision_score
  aps = {}
  for c, name in enumerate(CLASSES[:targets.shape[1]]):
    keep = targets[:, c] >= 0
    gt = targets[keep, c]
    if gt.sum() > 0:
      aps[name] = 100.0 * float(average_precision_score(gt, scores[keep, c] - 1e-5 * gt))
  return (float(np.mean(list(aps.values()))) if aps else float("nan")), aps


# ----------------------------------------------------------------------------- fc6-8
def _encoded_split(voc_dir: str, split: str):
  paths, targets = read_split(voc_dir, split)
  return [tf.io.gfile.GFile(p, "rb").read() for p in paths], targets


def _random_crops(encoded: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """RandomResizedCrop(0.08-1, 3/4-4/3) and a horizontal flip, normalised."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  image = preprocess.resize_crop(preprocess.decode_random_crop(encoded, seeds[0]), size)
  return preprocess.normalize(tf.image.stateless_random_flip_left_right(image, seeds[1]))


def _conv_features(trunk, images):
  """The frozen conv trunk's output as fc6 sees it: conv13, max-pooled, flattened."""
  conv13 = trunk(images, training=False)["conv13"]
  pooled = tf.nn.max_pool2d(tf.cast(conv13, tf.float32), 2, 2, "VALID")
  return tf.reshape(pooled, [tf.shape(pooled)[0], -1])


def build_fc6_8(input_dim: int, fc_dim: int, dropout: float, num_classes: int = len(CLASSES),
                seed: int = 0):
  """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> fc8, freshly initialised as the original does."""
  init = keras.initializers.RandomNormal(stddev=0.01, seed=seed)
  bias = keras.initializers.Constant(0.1)
  inputs = keras.Input([input_dim])
  x = keras.layers.Dense(fc_dim, activation="relu", kernel_initializer=init, bias_initializer=bias,
                         name="fc6")(inputs)
  x = keras.layers.Dropout(dropout, seed=seed)(x)
  x = keras.layers.Dense(fc_dim, activation="relu", kernel_initializer=init, bias_initializer=bias,
                         name="fc7")(x)
  outputs = keras.layers.Dense(num_classes, kernel_initializer=init, bias_initializer=bias,
                               name="fc8")(x)
  return keras.Model(inputs, outputs, name="fc6_8")


def masked_bce(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
  """BCE summed over the classes that are not 'difficult' (-1), averaged over the batch."""
  mask = tf.cast(targets >= 0, tf.float32)
  bce = tf.nn.sigmoid_cross_entropy_with_logits(tf.maximum(targets, 0.0), logits)
  return tf.reduce_sum(bce * mask) / tf.cast(tf.shape(logits)[0], tf.float32)


def clip_then_decay(grads, variables, clip_norm: float, weight_decay: float) -> list:
  """The gradient torch's SGD steps on in eval_voc_classif.py: the raw gradient clipped to
  global norm `clip_norm` first (l.235, `clip_grad_norm_(model.parameters(), 10)`), then
  `optimizer.step()` (l.237) adds wd * w inside SGD (l.104-108, `weight_decay=args.wd`), so
  the decay term is never clipped. (torch divides by norm + 1e-6, TF by the norm: 1e-7
  relative at norm 10.)"""
  grads, _ = tf.clip_by_global_norm(grads, clip_norm)
  return [g + weight_decay * v for g, v in zip(grads, variables)]


# (weight decay, lr halving step) of the original README's two published commands.
PUBLISHED = {"fc6_8": (1e-5, 20_000), "all": (1e-4, 10_000)}


def _trainable_copy(trunk):
  """A Keras copy of the trunk's weights to fine-tune (the evaluated trunk stays as it is)."""
  from dc_tf.models import vgg
  model = getattr(trunk, "fn", trunk)
  if not isinstance(model, keras.Model):
    raise ValueError("VOC 'all layers' fine-tuning needs a Keras trunk: pass a run directory, "
                     "or load the export's trunk.keras")
  copy = vgg.trunk_from_config(trunk.model_config)
  copy.set_weights(model.get_weights())
  return copy


def fc6_8(trunk, voc_dir: str, *, steps: int = 150_000, batch_size: int = 16, lr: float = 0.003,
          lr_halving_steps: int | None = None, weight_decay: float | None = None,
          momentum: float = 0.9, clip_norm: float = 10.0, test_crops: int = 10, seed: int = 0,
          splits: str = "trainval/test", all_layers: bool = False) -> dict:
  """Trains fc6-fc8 on the frozen conv trunk (`all_layers`: the conv trunk too); weight decay
  and halving step default to the published command's (`PUBLISHED`). Returns {'map': %,
  'aps': [...], 'steps', 'protocol', 'weight_decay', 'lr_halving_steps', 'trained_variables'}."""
  train_split, test_split = parse_splits(splits)
  default_wd, default_step = PUBLISHED["all" if all_layers else "fc6_8"]
  weight_decay = default_wd if weight_decay is None else weight_decay
  lr_halving_steps = default_step if lr_halving_steps is None else lr_halving_steps
  size = trunk.model_config.image_size
  conv_trunk = _trainable_copy(trunk) if all_layers else trunk
  train_bytes, train_t = _encoded_split(voc_dir, train_split)
  test_bytes, test_t = _encoded_split(voc_dir, test_split)
  n = len(train_bytes)
  ds = (tf.data.Dataset.from_tensor_slices((train_bytes, train_t))
        .shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
        .enumerate()
        .map(lambda i, bt: (_random_crops(bt[0], size, tf.stack([seed, tf.cast(i, tf.int32)])),
                            bt[1]), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=n >= batch_size).take(steps)
        .prefetch(tf.data.AUTOTUNE))
  probe_dim = int(_conv_features(conv_trunk, tf.zeros([1, size, size, 3])).shape[1])
  head = build_fc6_8(probe_dim, trunk.model_config.fc_units, trunk.model_config.dropout,
                     seed=seed)
  # All layers: every conv kernel, bias and BN scale/offset up to conv13 (the trunk's own fc6 /
  # fc7 are replaced by the new head, as the original re-initialises its classifier).
  conv_vars = [v for v in conv_trunk.trainable_variables
               if v.path.split("/")[-2].startswith("conv")] if all_layers else []
  variables = conv_vars + list(head.trainable_variables)
  step_var = tf.Variable(0, dtype=tf.int64)
  opt = keras.optimizers.SGD(learning_rate=lr, momentum=momentum)

  @tf.function(reduce_retracing=True)
  def train_step(images, targets):
    with tf.GradientTape() as tape:
      feats = _conv_features(conv_trunk, images)   # BN in inference mode in both protocols
      loss = masked_bce(head(feats, training=True), targets)
    grads = clip_then_decay(tape.gradient(loss, variables), variables, clip_norm, weight_decay)
    # lr halved every lr_halving_steps, as the original's step decay.
    opt.learning_rate.assign(lr * 0.5 ** tf.cast(step_var // lr_halving_steps, tf.float32))
    opt.apply_gradients(zip(grads, variables))
    step_var.assign_add(1)
    return loss

  conv_before = [v.numpy() for v in conv_vars]
  for images, targets in ds:
    train_step(images, targets)
  conv_moved = sum(not np.array_equal(b, v.numpy()) for b, v in zip(conv_before, conv_vars))

  @tf.function(reduce_retracing=True)
  def scores(images):
    return head(_conv_features(conv_trunk, images), training=False)

  total = np.zeros([len(test_bytes), len(CLASSES)], np.float64)
  for crop in range(test_crops):
    seed_base = 10_000 + crop
    test_ds = (tf.data.Dataset.from_tensor_slices(test_bytes).enumerate()
               .map(lambda i, b: _random_crops(b, size, tf.stack([seed_base, tf.cast(i, tf.int32)])))
               .batch(64))
    total += np.concatenate([scores(x).numpy() for x in test_ds])
  m, aps = probes.voc_map(total, test_t)
  return {"map": m, "aps": aps, "steps": int(step_var.numpy()), "splits": splits,
          "protocol": "all" if all_layers else "fc6_8", "weight_decay": weight_decay,
          "lr_halving_steps": lr_halving_steps, "final_lr": float(opt.learning_rate.numpy()),
          "trained_variables": len(variables), "conv_variables_moved": conv_moved}
