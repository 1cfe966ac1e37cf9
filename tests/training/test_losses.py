"""Pure loss functions, coupled weight decay, schedules."""

import keras
import numpy as np
import tensorflow as tf

from dc_tf.data import preprocess
from dc_tf.training import losses


def ce(logits, y):
  logits = np.asarray(logits, np.float64)
  return np.log(np.exp(logits).sum()) - logits[y]


def test_super_class_loss_values_and_scaling():
  out = losses.super_class_loss(tf.constant([[2.0, 0.0], [0.0, 1.0]]), [0, 1], global_batch_size=4)
  np.testing.assert_allclose(out["super_loss"], (ce([2, 0], 0) + ce([0, 1], 1)) / 4, rtol=1e-6)
  assert float(out["super_correct"]) == 2
  out = losses.super_class_loss(tf.zeros([3, 1]), [0, 0, 0], 3)   # DeepCluster: no super term
  assert float(out["super_loss"]) == 0.0


def test_partitioned_sub_loss_is_each_examples_own_head_with_masking():
  from dc_tf.placement import HeadPlacement
  rng = np.random.default_rng(0)
  h = rng.normal(size=(10, 6)).astype(np.float32)
  sup = np.array([0, 2, 1, 1, 2, 0, 2, 1, 0, 2])
  sub = np.array([0, 3, 1, -1, 2, 3, 0, 0, 1, 1])      # -1: no sub-class yet, no term
  w = rng.normal(size=(3, 6, 4)).astype(np.float32)
  b = rng.normal(size=(3, 4)).astype(np.float32)
  pieces = [(p, tf.constant(w[p.head]), tf.constant(b[p.head]))
            for p in HeadPlacement(3, 4, 1).pieces(0)]
  out = losses.partitioned_sub_loss(tf.constant(h), sup, sub, pieces, global_batch_size=20,
                                    sharded=False)
  logits = [h[i] @ w[sup[i]] + b[sup[i]] for i in range(10)]
  want = sum(ce(logits[i], sub[i]) for i in range(10) if sub[i] >= 0) / 20
  np.testing.assert_allclose(out["sub_loss"], want, rtol=1e-5)
  hits = sum(int(np.argmax(logits[i]) == sub[i]) for i in range(10) if sub[i] >= 0)
  assert float(out["sub_correct"]) == hits
  # Only head 1's examples with a sub-class count towards n_1 (2 of 3).
  np.testing.assert_allclose(losses.sub_head_gradient_scale(sup, sub, 1, 20), 10.0)


def test_the_originals_gradient_by_hand_on_one_replica(tiny_shards, tmp_path):
  """Trunk and V: the mean over the global batch; W_s: the mean over the batch's examples of
  super-class s (facebookresearch/DeeperCluster averages W_s inside the group of GPUs fed
  super-class s). One SGD step at lr 1, no momentum or decay, moves each weight by -grad."""
  from test_trainer import tiny_config
  from dc_tf.training import trainer
  cfg = tiny_config(tiny_shards, tmp_path / "g", lr=1.0, momentum=0.0, weight_decay=0.0)
  cfg = cfg.replace(model={"dropout": 0.0}, clustering={"m": 2, "k": 5})
  run = trainer.Trainer(cfg, tf.distribute.get_strategy())
  n, rng = 16, np.random.default_rng(1)
  batch = {"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
           "super_class": np.array([0, 0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 7, 7, 0, 1], np.int32),
           "sub_class": rng.integers(0, 5, n).astype(np.int32), "skipped": np.zeros(n, np.int64)}
  with tf.GradientTape() as tape:   # the loss as the paper writes it, averaged per term
    # the train step normalises the pipeline's uint8 pixels on the device, as here
    h = tf.nn.relu(run.trunk(preprocess.normalize(batch["image"]), training=True)["fc7"])
    v_logits = run.super_head(h)
    heads = {p.head: (k, b) for p, k, b in run.sub_heads.of_replica(0)}
    sub_logits = tf.concat([h[i:i + 1] @ heads[s][0] + heads[s][1]
                           for i, s in enumerate(batch["super_class"])], axis=0)
    per_example = (tf.nn.sparse_softmax_cross_entropy_with_logits(batch["super_class"], v_logits)
                   + tf.nn.sparse_softmax_cross_entropy_with_logits(batch["sub_class"], sub_logits))
    mean_loss = tf.reduce_mean(per_example)
  shared = tape.gradient(mean_loss, run.variables)
  h = h.numpy()
  before = [v.numpy().copy() for v in run.variables]
  w_before = {s: k.numpy().copy() for s, (k, _) in heads.items()}
  run._train_loop(iter(tf.data.Dataset.from_tensors(batch).repeat()), tf.constant(1))
  for v, b0, g in zip(run.variables, before, shared):
    np.testing.assert_allclose(b0 - v.numpy(), g.numpy(), rtol=2e-3, atol=1e-6, err_msg=v.name)
  for s, (kernel, bias) in heads.items():
    rows = np.flatnonzero(batch["super_class"] == s)
    z = h[rows] @ w_before[s]   # biases are zero at init
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(rows)), batch["sub_class"][rows]] -= 1
    want = h[rows].T @ p / len(rows)                     # the mean over head s's examples
    np.testing.assert_allclose(w_before[s] - kernel.numpy(), want, rtol=2e-3, atol=1e-6)
    assert np.abs(want).max() > 1e-3


def test_sgd_is_torch_sgd_with_coupled_decay_not_keras_decoupled():
  from dc_tf.training import optim
  w0 = np.array([1.0, -2.0], np.float32)
  grads = [np.array([0.5, 0.1], np.float32), np.array([-0.2, 0.3], np.float32)]
  lr, mu, wd = 0.1, 0.9, 0.01
  # torch.optim.SGD(weight_decay=wd): d = g + wd*w; v = mu*v + d; w -= lr*v
  w, v = w0.copy(), np.zeros(2, np.float32)
  for g in grads:
    v = mu * v + (g + wd * w)
    w = w - lr * v
  var = tf.Variable(w0)
  opt = optim.SGD([var], lr, momentum=mu, weight_decay=wd)
  for g in grads:
    opt.apply([tf.constant(g)])
  np.testing.assert_allclose(var.numpy(), w, rtol=1e-6)
  assert int(opt.iterations.numpy()) == 2
  decoupled = tf.Variable(w0)
  keras_opt = keras.optimizers.SGD(lr, momentum=mu, weight_decay=wd)
  for g in grads:
    keras_opt.apply_gradients([(tf.constant(g), decoupled)])
  assert not np.allclose(decoupled.numpy(), w, rtol=1e-6)
  opt.reset_slots([var])
  assert not opt.slots[0].numpy().any()


def test_learning_rate_schedule():
  lr = losses.learning_rates(100, 0.1, warmup_steps=10, schedule="cosine")
  assert lr[0] == np.float32(0.01) and abs(lr[9] - 0.1) < 1e-6
  assert lr[10] > lr[50] > lr[99] >= 0
  assert (losses.learning_rates(5, 0.2) == np.float32(0.2)).all()
