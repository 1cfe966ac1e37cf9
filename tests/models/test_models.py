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


def test_sub_head_initial_values_do_not_depend_on_the_layout():
  from dc_tf.placement import HeadPlacement
  whole = heads.SubHeads(HeadPlacement(2, 600, 1), 8, [0], [None], seed=3)
  cut = heads.SubHeads(HeadPlacement(2, 600, 6), 8, list(range(6)), [None] * 6, seed=3)
  assert len(cut.by_name()) == 6 and len(whole.by_name()) == 2
  for s, w in whole.full_kernels().items():
    assert w.shape == (8, 600) and 0.005 < w.std() < 0.02
    np.testing.assert_array_equal(cut.full_kernels()[s], w)
  assert not np.allclose(whole.full_kernels()[0], whole.full_kernels()[1])


def test_heads_reinitialize():
  from dc_tf.placement import HeadPlacement
  sub = heads.SubHeads(HeadPlacement(4, 3, 1), 6, [0], [None], seed=0)
  v = heads.SuperHead(4)
  v.build([None, 6])
  before = sub.full_kernels()[0].copy()
  sub.pieces[0][0][2].assign(tf.ones([3]))
  assert len(sub.reinitialize(seed=1)) == 8
  assert not np.allclose(sub.full_kernels()[0], before)
  assert not sub.pieces[0][0][2].numpy().any()
  v_before = v.kernel.numpy().copy()
  assert len(v.reinitialize(seed=2)) == 2 and not np.allclose(v.kernel.numpy(), v_before)


@pytest.mark.parametrize("sobel,input_pad,conv1_size", [
    (True, -1, 34), (True, 2, 34), (True, 1, 32), (False, -1, 32), (False, 0, 32), (False, 1, 34)])
def test_fronts_of_the_original_set_the_conv1_map(sobel, input_pad, conv1_size):
  """Issue 26: DeeperCluster pads Sobel by 2 and RGB by 1, deepcluster's Sobel by 1 inside;
  -1 keeps ours (Sobel 2, RGB 0), so existing runs build the trunk they were trained with."""
  trunk = vgg.build_trunk(32, 0.125, 16, sobel=sobel, input_pad=input_pad)
  assert trunk(np.zeros([1, 32, 32, 3], np.float32))["conv1"].shape[1] == conv1_size
  assert vgg.front_size(32, sobel, input_pad if input_pad >= 0 else vgg.default_pad(sobel)) == conv1_size
  if sobel and conv1_size != 34:
    with pytest.raises(ValueError, match="2-pixel Sobel pad"):
      vgg.fold_sobel(trunk)
