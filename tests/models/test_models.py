"""Trunk shapes and endpoints, Sobel, Sobel folding, hierarchical heads."""

import numpy as np
import pytest
import tensorflow as tf

from dc_tf.models import heads, vgg


@pytest.mark.parametrize("size,width", [(32, 0.125), (64, 0.125), (224, 0.0625)])
def test_shapes_and_endpoints(size, width):
  trunk = vgg.build_trunk(size, width, fc_dim=32)
  out = trunk(np.zeros([1, size, size, 3], np.float32), training=False)
  assert tuple(out) == vgg.ENDPOINTS or set(out) == set(vgg.ENDPOINTS)
  sobel_size = size + 2                         # 2-pixel pad, unpadded 3x3: 224 -> 226
  assert out["conv1"].shape[1] == sobel_size
  assert out["conv13"].shape[1] == sobel_size // 16
  assert out["conv13"].shape[-1] == vgg.channels(512, width)
  assert out["fc7"].shape == (1, 32)


def test_sobel_filters_are_frozen_and_correct():
  trunk = vgg.build_trunk(32, 0.125, 16)
  gray = trunk.get_layer("sobel_gray").get_weights()[0]
  sob = trunk.get_layer("sobel_filter").get_weights()[0]
  np.testing.assert_allclose(gray, np.full([1, 1, 3, 1], 1 / 3), rtol=1e-6)
  np.testing.assert_array_equal(sob[:, :, 0, 0], [[1, 0, -1], [2, 0, -2], [1, 0, -1]])
  np.testing.assert_array_equal(sob[:, :, 0, 1], [[1, 2, 1], [0, 0, 0], [-1, -2, -1]])
  names = {v.path.split("/")[0] for v in trunk.trainable_variables}
  assert "sobel_gray" not in names and "sobel_filter" not in names
  # A constant image has no edges: the Sobel map is zero away from the border.
  x = tf.ones([1, 32, 32, 3])
  s = trunk.get_layer("sobel_filter")(trunk.get_layer("sobel_pad")(trunk.get_layer("sobel_gray")(x)))
  assert float(tf.reduce_max(tf.abs(s[:, 2:-2, 2:-2]))) == 0.0


def test_no_sobel_is_rgb_and_init_std():
  trunk = vgg.build_trunk(32, 0.5, 16, sobel=False)
  assert trunk.get_layer("conv1_conv").get_weights()[0].shape[2] == 3
  k = trunk.get_layer("conv13_conv").get_weights()[0]
  assert abs(k.std() - np.sqrt(2 / (9 * k.shape[-1]))) < 0.1 * np.sqrt(2 / (9 * k.shape[-1]))
  assert not trunk.get_layer("conv13_conv").get_weights()[1].any()


def test_folded_sobel_equals_unfolded():
  trunk = vgg.build_trunk(32, 0.25, 32)
  folded = vgg.fold_sobel(trunk)
  assert folded.get_layer("conv1_conv_folded").get_weights()[0].shape == (5, 5, 3, 16)
  x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  a, b = trunk(x, training=False), folded(x, training=False)
  for name in ("conv1", "conv7", "fc7"):
    np.testing.assert_allclose(a[name], b[name], atol=1e-4, rtol=1e-4)


def test_heads_group_equals_gather_and_masking():
  h = tf.random.stateless_normal([12, 8], [0, 1])
  s = tf.constant([0, 3, 1, 1, 2, 0, 3, 3, 2, 1, 0, 2])
  group = heads.HierarchicalHeads(4, 5, impl="group")
  group.build([None, 8])
  gather = heads.HierarchicalHeads(4, 5, impl="gather")
  gather.build([None, 8])
  for a, b in zip(gather.weights, group.weights):
    a.assign(b)
  np.testing.assert_allclose(group.sub_logits(h, s), gather.sub_logits(h, s), atol=1e-6)
  # Only the example's own head gets gradient.
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(group.sub_logits(h[:1], s[:1]))
  g = tape.gradient(loss, group.w_kernel).numpy()
  assert np.abs(g[0]).sum() > 0 and np.abs(g[1:]).sum() == 0


def test_heads_reinitialize():
  hd = heads.HierarchicalHeads(4, 3)
  hd.build([None, 6])
  v_before, w_before = hd.v_kernel.numpy().copy(), hd.w_kernel.numpy().copy()
  hd.w_bias.assign(tf.ones_like(hd.w_bias))
  reset = hd.reinitialize(seed=1, include_super=False)
  assert len(reset) == 2
  assert not np.allclose(hd.w_kernel.numpy(), w_before) and not hd.w_bias.numpy().any()
  np.testing.assert_array_equal(hd.v_kernel.numpy(), v_before)
  hd.reinitialize(seed=2, include_super=True)
  assert not np.allclose(hd.v_kernel.numpy(), v_before)
