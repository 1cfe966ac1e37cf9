"""The linear probe of facebookresearch/DeeperCluster's `eval_linear.py`, next to the fast
`probes.linear_probe` (`evaluate.py --probe=original`; issue 26, item 5).

What the original runs, one job per layer (`linear_classif_layers.sh`, `conv13.sh`):
  - the frozen trunk in inference mode (BN running statistics), its conv<i> map after ReLU;
  - `RegLog`: an average pool of window 18 / 14 / 9 / 6 / 3 (conv1-2 / 3-4 / 5-7 / 8-10 /
    11-13, for a 224-px input whatever the front pads; about 9k or 8k values), then one
    linear layer, PyTorch's default init (U(+-1/sqrt(fan_in)) for weight and bias); no
    feature standardisation;
  - SGD, momentum 0.9, weight decay 1e-5 on weight and bias (PyTorch's: wd * w added to the
    gradient), batch 256, 100 epochs, cross-entropy;
  - the learning rate per layer of the scripts (the tables below), decayed at
    every iteration t as lr0 / sqrt(1 + lr0 * wd * t) (Bottou, "SGD tricks", 2012);
  - training crops drawn on the fly: RandomResizedCrop(224) (scale 0.08-1, ratio 3/4-4/3) and
    a horizontal flip; the test: resize to 256, centre crop 224 (our `eval_transform`);
  - top-1 / top-5 on the validation set after the last epoch.
Here the layers share each batch's crops and one trunk pass (each classifier still has its own
learning rate, momentum and decay: they are independent, so this equals separate jobs up to
which random crops are drawn). Maps of other sizes than the original's (images under 224 px)
are pooled with `metrics.pool_stride` (under 10k values), the fast probe's rule.

`voc_probe` is Table 3's VOC07 column: the same RegLog on conv13 with eval_linear.py's Pascal
branch (multi-label BCE, 'difficult' masked, centre-crop test, its mAP), conv13.sh l.29.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from dc_tf.config import UserError
from dc_tf.data import decoder, preprocess, reader
from dc_tf.evaluation import metrics, voc

LAYERS = tuple(f"conv{i}" for i in range(1, 14))
# --lr per conv layer, one table per script (every job: --wd 0.00001 --batch_size 256
# --nepochs 100). linear_classif_layers.sh is the paper's Fig. 2 / Table 4, conv1..conv13:
# ImageNet l.18, 23, 28, ..., 78 (conv<i> at l.13 + 5i); Places205 l.87, 92, ..., 147 (l.82 + 5i).
# conv13.sh is Table 3, conv13 only: ImageNet l.19 (0.02, as linear_classif_layers.sh l.78),
# Places205 l.24 (0.03, where linear_classif_layers.sh l.147 has 0.02). Its Pascal line (l.29)
# is `voc_probe`'s VocProbeConfig.
LR_TABLES = {
    "imagenet": dict(zip(LAYERS, (0.005, 0.01, 0.03, 0.03, 0.03, 0.03, 0.02, 0.03, 0.03, 0.03,
                                  0.02, 0.02, 0.02))),
    "places205": dict(zip(LAYERS, (0.003, 0.005, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.03,
                                   0.01, 0.01, 0.02))),
    "imagenet_conv13": {"conv13": 0.02},
    "places205_conv13": {"conv13": 0.03},
}
WINDOWS = (18, 18, 14, 14, 9, 9, 9, 6, 6, 6, 3, 3, 3)       # RegLog's AvgPool2d, l.245-260
POOLS_BEFORE = (0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4)     # max-pools before conv<i>
ORIGINAL_SIZE = 224                                        # the crop RegLog's windows are for


@dataclasses.dataclass(frozen=True)
class OriginalProbeConfig:
  epochs: int = 100
  batch_size: int = 256
  weight_decay: float = 1e-5
  momentum: float = 0.9
  lr_table: str = "imagenet"
  shuffle_buffer: int = 10_000
  seed: int = 0


def learning_rate(lr0: float, weight_decay: float, t) -> float:
  """eval_linear.py's `learning_rate_decay` at iteration t."""
  return lr0 / np.sqrt(1.0 + lr0 * weight_decay * t)


def pool_window(layer: str, shape, image_size: int | None = None) -> int:
  """RegLog's window (eval_linear.py l.245-260) for a 224-px input, else the fast probe's rule.

  The original fixes the window by the layer alone, for its 224-px crops, whatever the front
  pads: the released Sobel trunks see 226 px (2 pixels of pad before the unpadded 3x3 Sobel,
  `vgg.front_size`), so conv3-4 are 113 px, and AvgPool2d(14, stride 14, padding 0) floors
  113 / 14 to 8 as it does 112 / 14 (`_pool` floors the same way). `image_size` is the input
  side; without it, a map of exactly 224 >> (max-pools before the layer) counts as one."""
  i = LAYERS.index(layer)
  h, w, c = (int(d) for d in shape)
  original = (image_size == ORIGINAL_SIZE if image_size is not None
              else h == ORIGINAL_SIZE >> POOLS_BEFORE[i] and w == h)
  if not original:
    return metrics.pool_stride(h, w, c)
  if min(h, w) < WINDOWS[i]:
    raise ValueError(f"{layer}'s {h}x{w} map is smaller than RegLog's window {WINDOWS[i]}")
  return WINDOWS[i]


def _pool(x: tf.Tensor, s: int) -> tf.Tensor:
  h, w, c = (int(d) for d in x.shape[1:])
  hh, ww = h // s, w // s                     # AvgPool2d(s, stride=s, padding=0) floors
  pooled = tf.nn.avg_pool2d(tf.cast(x[:, :hh * s, :ww * s, :], tf.float32), s, s, "VALID")
  return tf.reshape(pooled, [-1, hh * ww * c])


def _examples(pattern: str) -> tf.data.Dataset:
  files = reader.list_shards(pattern)
  ds = tf.data.TFRecordDataset(files).map(lambda r: decoder.parse_record(r, tf.constant("")))
  return ds.filter(lambda ex: tf.equal(ex["status"], decoder.OK) & (ex["label"] >= 0))


def train_dataset(pattern: str, image_size: int, cfg: OriginalProbeConfig) -> tf.data.Dataset:
  """(normalised crops, labels) batches: a new random resized crop and flip of each image at
  every draw, reshuffled every epoch, `cfg.epochs` epochs."""
  ds = (_examples(pattern).map(lambda ex: (ex["encoded"], ex["label"]))
        .shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)
        .repeat(cfg.epochs).enumerate())

  def crop(i, pair):
    seed = tf.stack([tf.constant(cfg.seed, tf.int64), i])
    image = preprocess.train_transform_encoded(pair[0], image_size, seed)
    return preprocess.normalize(image), pair[1]
  return (ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE).batch(cfg.batch_size)
          .prefetch(tf.data.AUTOTUNE))


def _test_dataset(pattern: str, image_size: int, batch_size: int) -> tf.data.Dataset:
  def center(ex):
    image = decoder.decode_rgb(ex["encoded"])
    return preprocess.eval_transform(image, image_size), ex["label"]
  return _examples(pattern).map(center, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)


def init_head(dim: int, num_classes: int, rng: np.random.Generator) -> list:
  """RegLog's nn.Linear (eval_linear.py l.261) with torch's default initialisation:
  U(+-1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / math.sqrt(dim)
  return [tf.Variable(rng.uniform(-bound, bound, [dim, num_classes]).astype(np.float32)),
          tf.Variable(rng.uniform(-bound, bound, [num_classes]).astype(np.float32))]


def softmax_ce(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """nn.CrossEntropyLoss (eval_linear.py l.285): the batch mean."""
  return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))


def make_step(trunk, windows: dict, heads: dict, lr0: dict, cfg, loss_fn=softmax_ce):
  """One eval_linear.py iteration (`train_network`, l.287-321) for every layer's RegLog.

  `trunk(images, training=False)` gives {layer: map}; `windows`, `heads` ([w, b]) and `lr0`
  are keyed by layer; `cfg` gives `weight_decay` and `momentum`. Each step sets the rate
  lr0 / sqrt(1 + lr0 * wd * t) at iteration t (l.291, `learning_rate_decay` l.371-374), then
  torch.optim.SGD's step (`sgd_optimizer`, src/model/model_factory.py l.128-134: momentum
  0.9, dampening 0, weight_decay=wd): g += wd * w; buf = m * buf + g (buf = g at the first
  step, the same as from zero); w -= lr * buf. Returns (step(images, y) -> {layer: loss},
  t), t the iteration counter."""
  layers = tuple(windows)
  momenta = {l: [tf.Variable(tf.zeros_like(v)) for v in heads[l]] for l in layers}
  t = tf.Variable(0, dtype=tf.int64)

  @tf.function(reduce_retracing=True)
  def step(images, y):
    feats = trunk(images, training=False)   # model.eval(), no gradient (l.182, l.304-305)
    losses = {}
    for l in layers:
      x = tf.stop_gradient(_pool(feats[l], windows[l]))
      with tf.GradientTape() as tape:
        loss = loss_fn(tf.matmul(x, heads[l][0]) + heads[l][1], y)
      lr = lr0[l] / tf.sqrt(1.0 + lr0[l] * cfg.weight_decay * tf.cast(t, tf.float32))
      for v, g, buf in zip(heads[l], tape.gradient(loss, heads[l]), momenta[l]):
        g = g + cfg.weight_decay * v
        buf.assign(cfg.momentum * buf + g)
        v.assign_sub(lr * buf)
      losses[l] = loss
    t.assign_add(1)
    return losses
  return step, t


def probe(trunk, train_pattern: str, test_pattern: str, layers=LAYERS,
          cfg: OriginalProbeConfig = OriginalProbeConfig()) -> dict:
  """{layer: {'top1', 'top5', 'lr0', 'final_lr', 'steps', 'pool_window', 'dims', ...}}."""
  bad = [l for l in layers if l not in LAYERS]
  if bad:
    raise UserError(f"--probe=original probes conv1..conv13 (eval_linear.py's --conv); "
                    f"not {', '.join(bad)}")
  if cfg.lr_table not in LR_TABLES:
    raise UserError(f"unknown --probe_lr_table {cfg.lr_table!r}: {sorted(LR_TABLES)}")
  unset = [l for l in layers if l not in LR_TABLES[cfg.lr_table]]
  if unset:
    raise UserError(f"--probe_lr_table={cfg.lr_table} (conv13.sh) has a rate for "
                    f"{', '.join(LR_TABLES[cfg.lr_table])} only, not {', '.join(unset)}: "
                    "pass --layers=conv13")
  size = trunk.model_config.image_size
  labels = np.concatenate([y.numpy() for _, y in _examples(train_pattern).map(
      lambda ex: (ex["encoded"], ex["label"])).batch(4096)] or [np.zeros([0], np.int64)])
  if not len(labels):
    raise UserError(f"--probe=original needs labelled images; {train_pattern} has none")
  num_classes = int(labels.max()) + 1
  shapes = trunk(tf.zeros([1, size, size, 3]), training=False)
  windows = {l: pool_window(l, shapes[l].shape[1:], size) for l in layers}
  rng = np.random.default_rng(cfg.seed)
  heads = {l: init_head(int(_pool(shapes[l], windows[l]).shape[1]), num_classes, rng)
           for l in layers}
  lr0 = {l: LR_TABLES[cfg.lr_table][l] for l in layers}
  step, t = make_step(trunk, windows, heads, lr0, cfg)

  last = {}
  for images, y in train_dataset(train_pattern, size, cfg):
    last = step(images, y)
  steps = int(t.numpy())
  correct1 = {l: 0 for l in layers}
  correct5 = {l: 0 for l in layers}
  n = 0
  for images, y in _test_dataset(test_pattern, size, cfg.batch_size):
    feats = trunk(images, training=False)
    y = y.numpy()
    n += len(y)
    for l in layers:
      logits = _pool(feats[l], windows[l]).numpy() @ heads[l][0].numpy() + heads[l][1].numpy()
      top5 = np.argsort(-logits, axis=1)[:, :5]
      correct1[l] += int(np.sum(top5[:, 0] == y))
      correct5[l] += int(np.sum((top5 == y[:, None]).any(axis=1)))
  return {l: {"top1": 100.0 * correct1[l] / max(n, 1), "top5": 100.0 * correct5[l] / max(n, 1),
              "protocol": "original", "lr0": lr0[l],
              "final_lr": float(learning_rate(lr0[l], cfg.weight_decay, max(steps - 1, 0))),
              "weight_decay": cfg.weight_decay, "momentum": cfg.momentum, "steps": steps,
              "epochs": cfg.epochs, "batch_size": cfg.batch_size, "pool_window": windows[l],
              "dims": int(heads[l][0].shape[0]),
              "train_loss": float(last[l]) if l in last else float("nan")}
          for l in layers}


# ------------------------------------------------------------ Table 3's VOC07 column
@dataclasses.dataclass(frozen=True)
class VocProbeConfig:
  """conv13.sh l.29: `--conv 13 --batch_size 128 --lr 0.02 --wd 0.00001 --nepochs 60` (momentum
  0.9 from `sgd_optimizer`)."""
  layer: str = "conv13"
  epochs: int = 60
  batch_size: int = 128
  lr: float = 0.02
  weight_decay: float = 1e-5
  momentum: float = 0.9
  seed: int = 0


def voc_train_dataset(encoded: list, targets: np.ndarray, image_size: int,
                      cfg: VocProbeConfig) -> tf.data.Dataset:
  """(crops, targets) batches as eval_linear.py's Pascal loader gives them: reshuffled every
  epoch (l.129-131, shuffle=True), batches that stop at the epoch's end (drop_last False, so
  ceil(n / batch) iterations an epoch), a new RandomResizedCrop(224) and flip of each image
  at every draw (`tr_train`, l.138-139; src/data/loader.py l.53-58)."""
  ds = (tf.data.Dataset.from_tensor_slices((encoded, targets))
        .shuffle(len(encoded), seed=cfg.seed, reshuffle_each_iteration=True)
        .batch(cfg.batch_size).repeat(cfg.epochs).enumerate())

  def crops(i, batch):
    j = tf.range(tf.shape(batch[0])[0], dtype=tf.int64)
    seeds = tf.stack([tf.fill(tf.shape(j), tf.constant(cfg.seed, tf.int64)),
                      i * cfg.batch_size + j], axis=1)
    images = tf.map_fn(
        lambda a: preprocess.normalize(preprocess.train_transform_encoded(a[0], image_size, a[1])),
        (batch[0], seeds), fn_output_signature=tf.TensorSpec([image_size, image_size, 3]))
    return images, batch[1]
  return ds.map(crops, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def voc_probe(trunk, voc_dir: str, cfg: VocProbeConfig = VocProbeConfig(),
              splits: str = "train/val") -> dict:
  """eval_linear.py on Pascal VOC 2007 (conv13.sh l.29, the paper's Table 3 VOC column).

  RegLog on `cfg.layer` with 20 outputs (l.154-155), nn.BCEWithLogitsLoss per class, the
  'difficult' (255 there, -1 here) entries zeroed, summed and divided by the batch size
  (l.283, l.309-313: `voc.masked_bce`), `make_step`'s SGD and rate. The test
  (`evaluate_pascal`, l.205-238) scores one centre crop per image (`tr_val`, resize 256 and
  crop 224: l.138-140, loader.py l.45-50), the output added twice (l.227-229; a scaling, AP
  unchanged), and averages sklearn's AP over classes (`voc.eval_linear_map`); the original
  logs it after every epoch, this the last. `splits` defaults to what conv13.sh runs: it
  passes no --split, so eval_linear.py trains on 'train' (l.67) and tests on 'val' (l.111);
  "trainval/test" is the other partition. Returns {'map': %, 'aps': {class: %}, ...}."""
  if cfg.layer not in LAYERS:
    raise UserError(f"the VOC probe takes conv1..conv13 (eval_linear.py's --conv), not "
                    f"{cfg.layer!r}")
  train_split, test_split = voc.parse_splits(splits)
  train_bytes, train_t = voc._encoded_split(voc_dir, train_split)
  test_bytes, test_t = voc._encoded_split(voc_dir, test_split)
  if not train_bytes or not test_bytes:
    raise UserError(f"--voc_dir {voc_dir}: the {splits} split lists are empty")
  size, layer = trunk.model_config.image_size, cfg.layer
  shape = trunk(tf.zeros([1, size, size, 3]), training=False)[layer]
  window = pool_window(layer, shape.shape[1:], size)
  head = init_head(int(_pool(shape, window).shape[1]), len(voc.CLASSES),
                   np.random.default_rng(cfg.seed))
  step, t = make_step(trunk, {layer: window}, {layer: head}, {layer: cfg.lr}, cfg,
                      loss_fn=voc.masked_bce)
  last = {}
  for images, targets in voc_train_dataset(train_bytes, train_t, size, cfg):
    last = step(images, targets)
  steps = int(t.numpy())

  def center(encoded):
    return preprocess.eval_transform(decoder.decode_rgb(encoded), size)
  test_ds = (tf.data.Dataset.from_tensor_slices(test_bytes)
             .map(center, num_parallel_calls=tf.data.AUTOTUNE).batch(cfg.batch_size))
  logits = np.concatenate([
      _pool(trunk(x, training=False)[layer], window).numpy() @ head[0].numpy() + head[1].numpy()
      for x in test_ds])
  m, aps = voc.eval_linear_map(2.0 * logits, test_t)
  return {"map": m, "aps": aps, "protocol": "eval_linear_pascal", "layer": layer,
          "splits": splits, "steps": steps, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
          "lr0": cfg.lr, "final_lr": float(learning_rate(cfg.lr, cfg.weight_decay,
                                                         max(steps - 1, 0))),
          "weight_decay": cfg.weight_decay, "momentum": cfg.momentum, "pool_window": window,
          "dims": int(head[0].shape[0]),
          "train_loss": float(last[layer]) if layer in last else float("nan")}
