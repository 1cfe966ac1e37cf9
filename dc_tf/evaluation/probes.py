"""Linear probes on frozen features (softmax regression), and the VOC07 multi-label probe."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def moments(x, rows_per_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Per-column mean and standard deviation of an [n, d] array or `feature_store.LayerRows`,
  one pass over blocks, merged in float64 (Chan et al.'s pairwise update: no
  sum-of-squares cancellation); memory is a block."""
  n_all, mean, m2 = 0, None, None
  for start in range(0, len(x), rows_per_block):
    block = np.asarray(x[start:start + rows_per_block], np.float64)
    n, block_mean = len(block), block.mean(0)
    block_m2 = ((block - block_mean) ** 2).sum(0)
    if mean is None:
      n_all, mean, m2 = n, block_mean, block_m2
      continue
    delta, total = block_mean - mean, n_all + n
    mean = mean + delta * (n / total)
    m2 = m2 + block_m2 + delta ** 2 * (n_all * n / total)
    n_all = total
  return mean, np.sqrt(m2 / n_all)


def linear_probe(train_x, train_y, test_x, test_y, *, epochs: int = 60, batch_size: int = 256,
                 lr: float = 1e-3, weight_decay: float = 5e-4, seed: int = 0,
                 train_ids=None, rows_per_block: int = 1024) -> dict:
  """Multinomial logistic regression (Adam, L2) on standardised features.

  train_x / test_x: [n, d] arrays, or `feature_store.LayerRows` (features on disk, issue 35):
  only a minibatch or a block of `rows_per_block` rows is in memory at a time, and the
  mean / std come from one streaming pass in float64 (cast to float32 to standardise, as
  before). With `train_ids` (the images' ids) the minibatches are drawn from the rows in id
  order, so the result does not depend on the order the features were read in (shards are
  interleaved; minibatch order alone moved top-1 by ~1 point). Returns top-1 / top-5 (%) on
  the test set.
  """
  train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
  if (train_y < 0).any() or (test_y < 0).any():
    raise ValueError("linear probe needs labels: these shards have images without a label")
  by_id = (np.argsort(np.asarray(train_ids), kind="stable") if train_ids is not None
           else np.arange(len(train_y)))
  train_y = train_y[by_id]
  mean, std = moments(train_x, rows_per_block)
  mean, std = mean.astype(np.float32), (std + 1e-6).astype(np.float32)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  tf.random.set_seed(seed)
  w = tf.Variable(tf.zeros([train_x.shape[1], num_classes]))
  b = tf.Variable(tf.zeros([num_classes]))
  import keras
  opt = keras.optimizers.Adam(lr)

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      logits = tf.matmul(x, w) + b
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
      loss += weight_decay * tf.reduce_sum(tf.square(w))
    opt.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))
    return loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(train_y))
    for start in range(0, len(order), batch_size):
      idx = order[start:start + batch_size]
      x = (np.asarray(train_x[by_id[idx]], np.float32) - mean) / std
      step(tf.constant(x), tf.constant(train_y[idx]))
  w_np, b_np = w.numpy(), b.numpy()
  hits1 = hits5 = 0
  for start in range(0, len(test_y), rows_per_block):
    x = (np.asarray(test_x[start:start + rows_per_block], np.float32) - mean) / std
    top5 = np.argsort(-(x @ w_np + b_np), axis=1)[:, :5]
    y = test_y[start:start + rows_per_block]
    hits1 += int(np.sum(top5[:, 0] == y))
    hits5 += int(np.sum((top5 == y[:, None]).any(axis=1)))
  return {"top1": float(100 * (hits1 / len(test_y))), "top5": float(100 * (hits5 / len(test_y)))}


def multilabel_probe(train_x, train_t, test_x, test_t, *, epochs: int = 100, lr: float = 1e-3,
                     weight_decay: float = 1e-4, seed: int = 0) -> np.ndarray:
  """Linear one-vs-rest logistic regression with BCE that ignores 'difficult' labels
  (targets: 1 positive, 0 negative, -1 ignored). Returns test scores [n_test, C]; for a
  10-crop test pass test_x as [n_test, crops, d]: scores are averaged over crops."""
  import keras
  train_x = np.asarray(train_x, np.float32)
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x = (train_x - mean) / std
  test_x = (np.asarray(test_x, np.float32) - mean) / std
  t = np.asarray(train_t, np.float32)
  w = tf.Variable(tf.zeros([train_x.shape[1], t.shape[1]]))
  b = tf.Variable(tf.zeros([t.shape[1]]))
  opt = keras.optimizers.Adam(lr)
  x, y = tf.constant(train_x), tf.constant(t)
  mask = tf.cast(y >= 0, tf.float32)
  tf.random.set_seed(seed)
  for _ in range(epochs):
    with tf.GradientTape() as tape:
      logits = tf.matmul(x, w) + b
      bce = tf.nn.sigmoid_cross_entropy_with_logits(tf.maximum(y, 0.0), logits)
      loss = tf.reduce_sum(bce * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
      loss += weight_decay * tf.reduce_sum(tf.square(w))
    opt.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))
  scores = test_x @ w.numpy() + b.numpy()
  return scores.mean(axis=1) if scores.ndim == 3 else scores


def voc_map(scores: np.ndarray, targets: np.ndarray) -> tuple[float, list[float]]:
  """Mean average precision over classes, 'difficult' (-1) examples ignored (sklearn AP)."""
  from sklearn.metrics import average_precision_score
  aps = []
  for c in range(targets.shape[1]):
    keep = targets[:, c] >= 0
    if targets[keep, c].sum() == 0:
      continue
    aps.append(float(average_precision_score(targets[keep, c], scores[keep, c])))
  return float(100 * np.mean(aps)), aps
