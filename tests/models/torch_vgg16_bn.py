"""torchvision's `vgg16_bn`, built by hand in PyTorch for the conversion tests (issue 35).

torchvision is not a dependency; this module has the same structure, so its state dict has
exactly torchvision's keys: `features` = [Conv2d(3x3, padding=1), BatchNorm2d, ReLU] per conv
with MaxPool2d(2, 2) after conv 2, 4, 7, 10, 13 (features.{0,1,3,4,7,...}); `avgpool` =
AdaptiveAvgPool2d((7, 7)) (no parameters); `classifier` = Linear, ReLU, Dropout, Linear, ReLU,
Dropout, Linear (classifier.{0,3,6}). `channels`, `fc_dim` and `num_classes` shrink it for
tests; `endpoints` returns what dc_tf calls conv1..conv13 (after BN+ReLU), fc6 (after ReLU),
fc7 (before the ReLU) and the supervised head's `logits`.
"""

from __future__ import annotations

import torch
from torch import nn

import torch_original  # noqa: E402  (tests/models, next to this file)


class VGG16BN(nn.Module):
  """torchvision.models.VGG with cfg D and batch_norm=True: features, avgpool, classifier."""

  def __init__(self, channels, fc_dim=4096, num_classes=1000):
    super().__init__()
    self.features = torch_original.vgg_features(channels, 3)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(channels[-1] * 7 * 7, fc_dim), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(fc_dim, fc_dim), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(fc_dim, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build(channels, fc_dim: int, image_size: int, num_classes: int = 10, seed: int = 0):
  """(model in eval mode, endpoints function); random weights and non-trivial BN statistics
  (those of a calibration batch: random ones fade with depth, hiding a wrong mapping)."""
  torch.manual_seed(seed)
  net = VGG16BN(channels, fc_dim, num_classes)
  for m in net.features:
    if isinstance(m, nn.Conv2d):
      m.weight.data.normal_(0, (2.0 / (9 * m.out_channels)) ** 0.5)
      m.bias.data.normal_(0, 0.1)
    if isinstance(m, nn.BatchNorm2d):
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.normal_(0, 0.2)
      m.momentum = None
  for m in net.classifier:
    if isinstance(m, nn.Linear):          # biases non-zero, so their mapping is exercised
      m.bias.data.normal_(0, 0.1)
  net.features.train()
  with torch.no_grad():
    net.features(torch.randn(8, 3, image_size, image_size))
  net.eval()

  @torch.no_grad()
  def endpoints(images_nchw):
    x, out, i = images_nchw, {}, 0
    for m in net.features:
      x = m(x)
      if isinstance(m, nn.ReLU):
        i += 1
        out[f"conv{i}"] = x
    x = torch.flatten(net.avgpool(x), 1)
    c = net.classifier
    out["fc6"] = c[1](c[0](x))
    out["fc7"] = c[3](c[2](out["fc6"]))
    out["logits"] = net(images_nchw)       # a fresh pass: classifier.4 is an in-place ReLU
    return out

  return net, endpoints
