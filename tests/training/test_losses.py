"""Pure loss functions, coupled weight decay, schedules."""

import keras
import numpy as np
import pytest
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


def by_hand_sub_gradients(h, super_class, sub_class, kernels, biases):
  """{head: (dL/dW_s, dL/db_s)} of the mean cross-entropy over head s's n_s examples that have
  a sub-class: with P = softmax(h W_s + b_s) - onehot(z), h^T P / n_s and the column sums
  of P / n_s."""
  out = {}
  for s, (w, b) in enumerate(zip(kernels, biases)):
    rows = np.flatnonzero((super_class == s) & (sub_class >= 0))
    if not len(rows):
      continue
    z = h[rows] @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(rows)), sub_class[rows]] -= 1
    out[s] = (h[rows].T @ p / len(rows), p.sum(0) / len(rows))
  return out


def test_the_originals_gradient_by_hand_on_one_replica(tiny_shards, tmp_path):
  """Trunk and V: the mean over the global batch; W_s and its bias: the mean over the batch's
  n_s examples of super-class s that have a sub-class (facebookresearch/DeeperCluster
  averages W_s inside the group of GPUs fed super-class s; two examples here have none, so
  n_s runs from 1 to 3 and N / n_s from 16 to 5.3). One SGD step at lr 1, no momentum or
  decay, moves each weight by -grad."""
  from test_trainer import tiny_config
  from dc_tf.training import trainer
  cfg = tiny_config(tiny_shards, tmp_path / "g", lr=1.0, momentum=0.0, weight_decay=0.0)
  cfg = cfg.replace(model={"dropout": 0.0}, clustering={"m": 2, "k": 5})
  run = trainer.Trainer(cfg, tf.distribute.get_strategy())
  n, rng = 16, np.random.default_rng(1)
  super_class = np.array([0, 0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 7, 7, 0, 1], np.int32)
  sub_class = rng.integers(0, 5, n).astype(np.int32)
  sub_class[[2, 13]] = -1                                  # no sub term: n_0 = n_7 = 3
  batch = {"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
           "super_class": super_class, "sub_class": sub_class, "skipped": np.zeros(n, np.int64)}
  labelled = np.flatnonzero(sub_class >= 0)
  heads = {p.head: (k, b) for p, k, b in run.sub_heads.of_replica(0)}
  with tf.GradientTape() as tape:   # the loss as the paper writes it, averaged per term
    # the train step normalises the pipeline's uint8 pixels on the device, as here
    h = tf.nn.relu(run.trunk(preprocess.normalize(batch["image"]), training=True)["fc7"])
    sub_logits = tf.concat([h[i:i + 1] @ heads[super_class[i]][0] + heads[super_class[i]][1]
                            for i in labelled], axis=0)
    mean_loss = (tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        super_class, run.super_head(h))) + tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(sub_class[labelled], sub_logits))) / n
  shared = tape.gradient(mean_loss, run.variables)
  want = by_hand_sub_gradients(h.numpy(), super_class, sub_class,
                               *zip(*[(heads[s][0].numpy(), heads[s][1].numpy())
                                      for s in range(8)]))
  before = [v.numpy().copy() for v in run.variables]
  w_before = {s: (k.numpy().copy(), b.numpy().copy()) for s, (k, b) in heads.items()}
  run._train_loop(iter(tf.data.Dataset.from_tensors(batch).repeat()), tf.constant(1))
  for v, b0, g in zip(run.variables, before, shared):
    np.testing.assert_allclose(b0 - v.numpy(), g.numpy(), rtol=2e-3, atol=1e-6, err_msg=v.name)
  assert sorted(want) == list(range(8))
  for s, (kernel, bias) in heads.items():
    np.testing.assert_allclose(w_before[s][0] - kernel.numpy(), want[s][0], rtol=2e-3,
                               atol=1e-6, err_msg=f"W_{s}")
    np.testing.assert_allclose(w_before[s][1] - bias.numpy(), want[s][1], rtol=2e-3,
                               atol=1e-6, err_msg=f"b_{s}")
    assert np.abs(want[s][0]).max() > 1e-3 and np.abs(want[s][1]).max() > 1e-2


@tf.custom_gradient
def _dense_gradient(x):
  """Identity with a dense gradient, as the train step wraps its collectives."""
  return tf.identity(x), tf.convert_to_tensor


def test_sharded_sub_loss_and_gradients_by_hand_on_four_replicas():
  """R = 4 > S = 2: each head's 5 columns cut between two replicas (2 + 3), the softmax
  spanning them through the collectives. Summed over replicas the loss is the hand-computed
  mean, and each piece's gradient, scaled by N / n_s (sub_head_gradient_scale), is its
  columns of the hand-computed per-head mean, for the kernel and for the bias (non-zero
  here, so it enters the logits too)."""
  from conftest import cpu_strategy
  from dc_tf.placement import HeadPlacement
  strategy, placement = cpu_strategy(4), HeadPlacement(2, 5, 4)
  assert placement.sharded
  rng = np.random.default_rng(3)
  n, d = 12, 6
  h = rng.normal(size=(n, d)).astype(np.float32)
  sup = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0], np.int32)
  sub = np.array([0, 4, 2, -1, 3, 1, 4, 0, 1, -1, 2, 3], np.int32)
  w = rng.normal(size=(2, d, 5)).astype(np.float32)
  b = rng.normal(size=(2, 5)).astype(np.float32)
  pieces = {}
  for r in range(4):
    with tf.device(f"/cpu:{r}"):
      pieces[r] = [(p, tf.Variable(w[p.head][:, p.start:p.stop]),
                    tf.Variable(b[p.head][p.start:p.stop])) for p in placement.pieces(r)]

  @tf.function
  def step():
    def fn():
      ctx = tf.distribute.get_replica_context()
      mine = pieces[int(tf.get_static_value(ctx.replica_id_in_sync_group))]
      variables = [v for _, kernel, bias in mine for v in (kernel, bias)]
      with tf.GradientTape() as tape:
        out = losses.partitioned_sub_loss(
            tf.constant(h), sup, sub, mine, global_batch_size=n, sharded=True,
            cross_replica_max=lambda x: tf.reduce_max(
                ctx.all_gather(tf.identity(x[None]), axis=0), axis=0),
            cross_replica_sum=lambda x: _dense_gradient(
                ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(x))))
      grads = tape.gradient(out["sub_loss"], variables)
      scales = [losses.sub_head_gradient_scale(sup, sub, p.head, n) for p, _, _ in mine]
      return out["sub_loss"], out["sub_correct"], [g * scales[i // 2] for i, g in enumerate(grads)]
    return strategy.run(fn)

  loss, hits, grads = (strategy.experimental_local_results(v) for v in step())
  logits = [h[i] @ w[sup[i]] + b[sup[i]] for i in range(n)]
  labelled = [i for i in range(n) if sub[i] >= 0]
  np.testing.assert_allclose(sum(float(x) for x in loss),
                             sum(ce(logits[i], sub[i]) for i in labelled) / n, rtol=1e-5)
  assert sum(float(x) for x in hits) == sum(int(np.argmax(logits[i]) == sub[i])
                                            for i in labelled)
  want = by_hand_sub_gradients(h, sup, sub, w, b)
  for r in range(4):
    (piece, _, _), = pieces[r]
    gw, gb = (g.numpy() for g in grads[r])               # this replica's [kernel, bias]
    np.testing.assert_allclose(gw, want[piece.head][0][:, piece.start:piece.stop], rtol=1e-4,
                               atol=1e-6, err_msg=piece.name)
    np.testing.assert_allclose(gb, want[piece.head][1][piece.start:piece.stop], rtol=1e-4,
                               atol=1e-6, err_msg=piece.name)


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
  """Values at exact steps, from the formula: linear warm-up base (s + 1) / w for s < w, then
  base (1 + cos(pi (s - w) / (T - w))) / 2."""
  lr = losses.learning_rates(100, 0.1, warmup_steps=10, schedule="cosine")
  assert lr.dtype == np.float32 and lr.shape == (100,)
  cosine = lambda s: 0.1 * 0.5 * (1 + np.cos(np.pi * (s - 10) / 90))  # noqa: E731
  want = {0: 0.01, 4: 0.05, 9: 0.1,                          # warm-up, its last step
          10: 0.1,                                           # cosine from the top
          55: 0.05,                                          # its midpoint
          70: cosine(70), 99: 0.05 * (1 - np.cos(np.pi / 90))}   # the last: 3.05e-5, not 0
  for step, value in want.items():
    np.testing.assert_allclose(lr[step], value, rtol=1e-6, err_msg=str(step))
  np.testing.assert_allclose(lr[10:], cosine(np.arange(10, 100)), rtol=1e-6)
  np.testing.assert_allclose(losses.learning_rates(4, 0.2, schedule="cosine"),
                             [0.2, 0.2 * (1 + np.cos(np.pi / 4)) / 2, 0.1,
                              0.2 * (1 + np.cos(3 * np.pi / 4)) / 2], rtol=1e-6)
  # constant: the base after a linear warm-up
  np.testing.assert_allclose(losses.learning_rates(6, 0.2, warmup_steps=4),
                             [0.05, 0.1, 0.15, 0.2, 0.2, 0.2], rtol=1e-6)
  assert (losses.learning_rates(5, 0.2) == np.float32(0.2)).all()
