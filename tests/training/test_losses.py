"""Pure loss functions, coupled weight decay, schedules."""

import keras
import numpy as np
import tensorflow as tf

from dc_tf.training import losses


def test_hierarchical_loss_values_and_scaling():
  sup = tf.constant([[2.0, 0.0], [0.0, 1.0]])
  sub = tf.constant([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
  out = losses.hierarchical_loss(sup, [0, 1], sub, [0, 2], global_batch_size=4)
  ce = lambda l, y: -np.log(np.exp(l[y]) / np.exp(l).sum())  # noqa: E731
  want_super = (ce(np.array([2.0, 0]), 0) + ce(np.array([0, 1.0]), 1)) / 4
  want_sub = (ce(np.array([1.0, 0, 0]), 0) + ce(np.array([0, 0, 3.0]), 2)) / 4
  np.testing.assert_allclose(out["super_loss"], want_super, rtol=1e-6)
  np.testing.assert_allclose(out["sub_loss"], want_sub, rtol=1e-6)
  np.testing.assert_allclose(out["loss"], want_super + want_sub, rtol=1e-6)
  assert float(out["super_correct"]) == 2 and float(out["sub_correct"]) == 2


def test_single_super_class_and_no_sub_heads():
  out = losses.hierarchical_loss(tf.zeros([3, 1]), [0, 0, 0], None, None, 3)
  assert float(out["loss"]) == 0.0


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
