"""The original's VGG-16-BN, built in PyTorch as its code builds it, for the conversion tests.

Written from the facts of facebookresearch/DeeperCluster (src/model/model_factory.py,
src/model/vgg16.py) and facebookresearch/deepcluster (models/vgg16.py), not copied:
  DeeperCluster: Net(padding, sobel, body, pred_layer) wrapped in DistributedDataParallel
    (keys `module.`); padding ConstantPad2d(2) before a Sobel front, (1) before RGB; the
    Sobel front is Sequential(gray Conv2d(3, 1, 1), Conv2d(1, 2, 3, padding=0)), biases zero;
    body.features = [Conv2d(3x3, padding=1), BatchNorm2d, ReLU] per conv, MaxPool2d(2) after
    conv 2, 4, 7, 10, 13; body.classifier = Linear, ReLU, Dropout, Linear (no final ReLU:
    relu=False in model_factory); pred_layer Linear.
  deepcluster: VGG(features wrapped in DataParallel: keys `features.module.`), its Sobel
    conv with padding=1, classifier ending in ReLU, top_layer Linear.
`channels` and `fc_dim` shrink the net for tests; `endpoints` returns what dc_tf calls
conv1..conv13 (after BN+ReLU), fc6 (after ReLU) and fc7 (before the ReLU).
"""

from __future__ import annotations

import torch
from torch import nn

from dc_tf.convert import POOL_AFTER


class Wrapped(nn.Module):
  """What (Distributed)DataParallel adds to a state dict: a `module.` level."""

  def __init__(self, module):
    super().__init__()
    self.module = module

  def forward(self, x):
    return self.module(x)


def sobel_front(pad_inside: int) -> nn.Sequential:
  gray = nn.Conv2d(3, 1, kernel_size=1)
  gray.weight.data.fill_(1.0 / 3.0)
  gray.bias.data.zero_()
  sobel = nn.Conv2d(1, 2, kernel_size=3, padding=pad_inside)
  sobel.weight.data[0, 0] = torch.tensor([[1., 0, -1], [2, 0, -2], [1, 0, -1]])
  sobel.weight.data[1, 0] = torch.tensor([[1., 2, 1], [0, 0, 0], [-1, -2, -1]])
  sobel.bias.data.zero_()
  return nn.Sequential(gray, sobel)


def vgg_features(channels, c_in) -> nn.Sequential:
  layers = []
  for i, c in enumerate(channels, start=1):
    layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
    if i in POOL_AFTER:
      layers.append(nn.MaxPool2d(2, 2))
    c_in = c
  return nn.Sequential(*layers)


def vgg_classifier(flat, fc_dim, final_relu) -> nn.Sequential:
  head = [nn.Linear(flat, fc_dim), nn.ReLU(), nn.Dropout(0.5), nn.Linear(fc_dim, fc_dim)]
  return nn.Sequential(*(head + ([nn.ReLU()] if final_relu else [])))


class Body(nn.Module):
  """DeeperCluster's VGG16 module: features, classifier."""

  def __init__(self, channels, c_in, flat, fc_dim):
    super().__init__()
    self.features = vgg_features(channels, c_in)
    self.classifier = vgg_classifier(flat, fc_dim, final_relu=False)


class DeeperClusterNet(nn.Module):
  """model_factory's Net: padding, optional Sobel, body, pred_layer."""

  def __init__(self, sobel, channels, fc_dim, side, num_classes=8):
    super().__init__()
    self.padding = nn.ConstantPad2d(2 if sobel else 1, 0.0)
    self.sobel = sobel_front(0) if sobel else None
    self.body = Body(channels, 2 if sobel else 3, channels[-1] * side * side, fc_dim)
    self.pred_layer = nn.Linear(fc_dim, num_classes)

  def front(self, x):
    x = self.padding(x)
    return self.sobel(x) if self.sobel is not None else x


class DeepClusterVGG(nn.Module):
  """deepcluster's VGG: Sobel padded inside, features in DataParallel, top_layer."""

  def __init__(self, sobel, channels, fc_dim, side, num_classes=8):
    super().__init__()
    self.features = Wrapped(vgg_features(channels, 2 if sobel else 3))
    self.classifier = vgg_classifier(channels[-1] * side * side, fc_dim, final_relu=True)
    self.top_layer = nn.Linear(fc_dim, num_classes)
    self.sobel = sobel_front(1) if sobel else None

  def front(self, x):
    return self.sobel(x) if self.sobel is not None else x


def build(layout: str, sobel: bool, channels, fc_dim: int, image_size: int, seed: int = 0):
  """(model whose state_dict has the layout's keys, endpoints function), BN statistics random."""
  torch.manual_seed(seed)
  pad = {("deepercluster", True): 2, ("deepercluster", False): 1,
         ("deepcluster", True): 1, ("deepcluster", False): 0}[(layout, sobel)]
  side = (image_size + 2 * pad - (2 if sobel else 0)) // 32
  if layout == "deepercluster":
    net = DeeperClusterNet(sobel, channels, fc_dim, side)
    features, classifier, saved = net.body.features, net.body.classifier, Wrapped(net)
  else:
    net = DeepClusterVGG(sobel, channels, fc_dim, side)
    features, classifier, saved = net.features.module, net.classifier, net
  for m in features:
    if isinstance(m, nn.Conv2d):          # the original's init, N(0, sqrt(2 / (9 out)))
      m.weight.data.normal_(0, (2.0 / (9 * m.out_channels)) ** 0.5)
      m.bias.data.normal_(0, 0.1)         # non-zero, so the bias mapping is exercised
    if isinstance(m, nn.BatchNorm2d):
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.normal_(0, 0.2)
      m.momentum = None                   # running statistics = the calibration batch's
  # Statistics of real activations: with random ones the signal fades with depth and fc7
  # hardly depends on the image, so a wrong conv mapping would pass unseen.
  features.train()
  with torch.no_grad():
    features(net.front(torch.randn(16, 3, image_size, image_size)))
  saved.eval()

  @torch.no_grad()
  def endpoints(images_nchw):
    x, out, i = net.front(images_nchw), {}, 0
    for m in features:
      x = m(x)
      if isinstance(m, nn.ReLU):
        i += 1
        out[f"conv{i}"] = x
    x = torch.flatten(x, 1)
    out["fc6"] = classifier[1](classifier[0](x))
    out["fc7"] = classifier[3](out["fc6"])
    return out

  return saved, endpoints
