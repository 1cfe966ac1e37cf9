"""eval_linear.py's linear probe (dc_tf.evaluation.linear_original): RegLog's windows on the
226-px Sobel fronts against torch's AvgPool2d, the learning-rate tables against the two
scripts, and the SGD step against a NumPy reference (issue 35 items 2, issue 37 item 4)."""

import os
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from dc_tf.config import UserError
from dc_tf.evaluation import evaluator, linear_original as lo
from dc_tf.models import vgg

MIRROR = "/work/.mirror/facebookresearch+DeeperCluster/repo"
CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)   # VGG-16
REGLOG_DIMS = (9216, 9216, 8192, 8192, 9216, 9216, 9216, 8192, 8192, 8192, 8192, 8192, 8192)


def _torch_avgpool(x: np.ndarray, window: int) -> np.ndarray:
  """RegLog's nn.AvgPool2d(av, stride=av, padding=0) on an NHWC map, flattened as x.view does
  (NCHW order) and returned NHWC-flattened for comparison with `_pool`."""
  import torch
  out = torch.nn.AvgPool2d(window, stride=window, padding=0)(
      torch.from_numpy(x).permute(0, 3, 1, 2))
  return out.permute(0, 2, 3, 1).reshape(x.shape[0], -1).numpy()


@pytest.mark.parametrize("sobel,pad", [(True, 2), (False, 0), (False, 1), (True, 1)])
def test_reglog_windows_for_any_224_px_front(sobel, pad):
  """A 224-px input gets RegLog's windows whatever the front pads (226 px for the released
  Sobel weights): the pooled map is what torch's AvgPool2d gives on that map, and at VGG-16's
  widths it has RegLog's nn.Linear input size (eval_linear.py l.245-261)."""
  rng = np.random.default_rng(0)
  side = vgg.front_size(224, sobel, pad)
  for i, layer in enumerate(lo.LAYERS):
    h = side >> lo.POOLS_BEFORE[i]                      # MaxPool2d(2, 2) floors
    window = lo.pool_window(layer, (h, h, CHANNELS[i]), image_size=224)
    assert window == lo.WINDOWS[i], (layer, h)
    x = rng.random([1, h, h, CHANNELS[i]], dtype=np.float32)
    want = _torch_avgpool(x, window)
    got = lo._pool(tf.constant(x), window).numpy()
    assert got.shape == want.shape and want.shape[1] == REGLOG_DIMS[i], (layer, h)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The fast probe's rule stays for other input sizes, and without image_size only a map of
  # exactly 224 >> pools counts as the original's.
  assert lo.pool_window("conv3", (16, 16, 16), image_size=32) == lo.metrics.pool_stride(16, 16, 16)
  assert lo.pool_window("conv3", (112, 112, 128)) == 14
  assert lo.pool_window("conv3", (113, 113, 128)) == lo.metrics.pool_stride(113, 113, 128)


def test_probe_windows_on_a_226_px_sobel_trunk():
  """The maps of a real 224-px Sobel trunk (pad 2: conv3-4 are 113 px) get RegLog's windows
  through `probe`'s own path (`pool_window(..., image_size)`), not the fast probe's 13."""
  cfg = evaluator.ModelConfig(image_size=224, width=0.125, fc_dim=16, sobel=True, input_pad=2)
  trunk = vgg.trunk_from_config(cfg)
  maps = trunk(tf.zeros([1, 224, 224, 3]), training=False)
  assert maps["conv3"].shape[1] == 113
  for i, layer in enumerate(lo.LAYERS):
    shape = maps[layer].shape[1:]
    window = lo.pool_window(layer, shape, image_size=224)
    assert window == lo.WINDOWS[i]
    dims = lo._pool(maps[layer], window).shape[1]
    assert dims == _torch_avgpool(np.zeros([1, *shape], np.float32), window).shape[1]
    assert dims * CHANNELS[i] == REGLOG_DIMS[i] * shape[-1]    # RegLog's s at 1/8 width


def _script_rates(script: str) -> dict:
  """{(dataset, conv): (lr, line)} of a DeeperCluster script's eval_linear.py jobs."""
  text = subprocess.run(["git", "-C", MIRROR, "show", f"HEAD:{script}"], check=True,
                        capture_output=True, text=True).stdout
  rates = {}
  for n, line in enumerate(text.splitlines(), 1):
    m = re.search(r"eval_linear.py --conv (\d+) .*--data_path \$DATAPATH_(\w+) .*--lr ([\d.]+)",
                  line)
    if m:
      rates[(m.group(2), int(m.group(1)))] = (float(m.group(3)), n)
  return rates


@pytest.mark.skipif(not os.path.isdir(MIRROR), reason="the original's mirror is not here")
def test_lr_tables_are_the_scripts():
  """Every rate against the script it cites, read from the original; conv13.sh differs from
  linear_classif_layers.sh on Places205 conv13 only (0.03 against 0.02)."""
  layers = _script_rates("linear_classif_layers.sh")
  for dataset, table in (("IMAGENET", "imagenet"), ("PLACES", "places205")):
    for i, layer in enumerate(lo.LAYERS, 1):
      lr, line = layers[(dataset, i)]
      assert lo.LR_TABLES[table][layer] == lr, (table, layer)
      assert line == (13 if dataset == "IMAGENET" else 82) + 5 * i     # the cited lines
  table3 = _script_rates("conv13.sh")
  assert set(table3) == {("IMAGENET", 13), ("PLACES", 13), ("PASCAL", 13)}
  assert lo.LR_TABLES["imagenet_conv13"] == {"conv13": table3[("IMAGENET", 13)][0]}
  assert lo.LR_TABLES["places205_conv13"] == {"conv13": table3[("PLACES", 13)][0]}
  assert lo.LR_TABLES["places205_conv13"]["conv13"] != lo.LR_TABLES["places205"]["conv13"]
  assert lo.LR_TABLES["imagenet_conv13"]["conv13"] == lo.LR_TABLES["imagenet"]["conv13"]
  assert lo.VocProbeConfig().lr == table3[("PASCAL", 13)][0]


def test_conv13_table_refuses_other_layers():
  cfg = lo.OriginalProbeConfig(lr_table="places205_conv13")
  with pytest.raises(UserError, match="--probe_lr_table=places205_conv13.*conv1"):
    lo.probe(None, "unused", "unused", layers=("conv1", "conv13"), cfg=cfg)
  with pytest.raises(UserError, match="--probe_lr_table"):
    lo.probe(None, "unused", "unused", layers=("conv13",),
             cfg=lo.OriginalProbeConfig(lr_table="places"))


def _numpy_sgd(w, b, x, y, lr0, wd, momentum, steps, decay=True):
  """Two torch.optim.SGD steps on the batch mean cross-entropy, by hand."""
  bw, bb = np.zeros_like(w), np.zeros_like(b)
  for t in range(steps):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    gw, gb = x.T @ p / len(y) + wd * w, p.mean(0) + wd * b
    bw, bb = momentum * bw + gw, momentum * bb + gb
    lr = lr0 / np.sqrt(1 + lr0 * wd * t) if decay else lr0
    w, b = w - lr * bw, b - lr * bb
  return w, b


def test_step_is_two_torch_sgd_steps():
  """`make_step` on a fixed batch (an identity 'trunk', window 2) equals two steps of the
  NumPy reference: momentum, weight decay in the gradient, lr0 / sqrt(1 + lr0 wd t). The
  decay is large here so that each part moves the result beyond the tolerance."""
  rng = np.random.default_rng(3)
  images = rng.normal(size=[6, 4, 4, 3]).astype(np.float32)
  y = np.array([0, 1, 2, 1, 0, 2])
  x = images.reshape(6, 2, 2, 2, 2, 3).mean((2, 4)).reshape(6, -1)   # AvgPool2d(2), NHWC flat
  head = lo.init_head(12, 3, np.random.default_rng(0))
  w0, b0 = head[0].numpy(), head[1].numpy()
  cfg = lo.OriginalProbeConfig(weight_decay=0.2, momentum=0.9)
  step, t = lo.make_step(lambda im, training: {"conv5": im}, {"conv5": 2}, {"conv5": head},
                         {"conv5": 0.5}, cfg)
  for _ in range(2):
    step(tf.constant(images), tf.constant(y))
  assert int(t.numpy()) == 2
  want_w, want_b = _numpy_sgd(w0, b0, x, y, 0.5, 0.2, 0.9, 2)
  np.testing.assert_allclose(head[0].numpy(), want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(head[1].numpy(), want_b, rtol=1e-5, atol=1e-6)
  # Each ingredient matters at this tolerance: no momentum, no decay, no rate decay differ.
  for other in (_numpy_sgd(w0, b0, x, y, 0.5, 0.2, 0.0, 2)[0],
                _numpy_sgd(w0, b0, x, y, 0.5, 0.0, 0.9, 2)[0],
                _numpy_sgd(w0, b0, x, y, 0.5, 0.2, 0.9, 2, decay=False)[0]):
    assert np.abs(other - want_w).max() > 1e-3
  bound = 1 / np.sqrt(12)                                  # torch.nn.Linear's init
  assert np.abs(w0).max() <= bound and np.abs(b0).max() <= bound and w0.std() > bound / 3
