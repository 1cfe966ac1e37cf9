r"""PyTorch reference step for benchmarks/train_step.py: the same VGG-16-BN behind the same
frozen Sobel front, the same heads, batch and thread count, written as the original
DeeperCluster trains (src/trainer.py of facebookresearch/DeeperCluster: eager PyTorch, NCHW,
`torch.optim.SGD` with momentum and coupled weight decay).

Heads, as the original has them on one GPU: ReLU(fc7) -> V (S super-classes) and the one
sub-head W_s of the super-class that GPU's batch is drawn from (k columns; the original feeds
each GPU one super-class), loss CE(V h, s) + CE(W_s h, z); or a plain `classes`-way softmax.

Run by train_step.py in a child process (so TensorFlow's and PyTorch's thread pools never
share the cores), it prints one JSON line:

  python benchmarks/torch_reference.py --image_size=32 --width=0.25 --fc_dim=512 --batch=64 \
      --super_classes=8 --k=40 [--plain_classes=4000] [--threads=2] [--steps=30]
"""

import argparse
import json
import math
import os
import time

import torch
from torch import nn

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


def channels(base, width):
  return max(4, int(round(base * width)))   # as dc_tf.models.vgg.channels


class Trunk(nn.Module):
  """Sobel (gray 1x1, 2-pixel pad, fixed 3x3 Gx/Gy) -> 13 x (conv3x3, BN, ReLU) with 5
  max-pools -> fc6 -> ReLU -> fc7, as dc_tf.models.vgg.build_trunk."""

  def __init__(self, image_size, width, fc_dim):
    super().__init__()
    gray = nn.Conv2d(3, 1, 1, bias=False)
    gray.weight.data.fill_(1.0 / 3.0)
    sobel = nn.Conv2d(1, 2, 3, padding=0, bias=False)
    sobel.weight.data = torch.tensor(
        [[[[1, 0, -1], [2, 0, -2], [1, 0, -1]]], [[[1, 2, 1], [0, 0, 0], [-1, -2, -1]]]],
        dtype=torch.float32)
    self.sobel = nn.Sequential(gray, nn.ZeroPad2d(2), sobel)
    for p in self.sobel.parameters():
      p.requires_grad = False
    layers, c_in = [], 2
    for spec in VGG16_LAYOUT:
      if spec == "M":
        layers.append(nn.MaxPool2d(2))
        continue
      c = channels(spec, width)
      conv = nn.Conv2d(c_in, c, 3, padding=1)
      nn.init.normal_(conv.weight, std=math.sqrt(2.0 / (9 * c)))
      nn.init.zeros_(conv.bias)
      layers += [conv, nn.BatchNorm2d(c, momentum=0.1, eps=1e-5), nn.ReLU(inplace=True)]
      c_in = c
    self.features = nn.Sequential(*layers)
    flat = c_in * (image_size // 32) ** 2
    self.fc = nn.Sequential(nn.Linear(flat, fc_dim), nn.ReLU(inplace=True), nn.Linear(fc_dim, fc_dim))

  def forward(self, x):
    return self.fc(torch.flatten(self.features(self.sobel(x)), 1))


def run(args):
  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  trunk = Trunk(args.image_size, args.width, args.fc_dim)
  if args.plain_classes:
    heads = nn.ModuleList([nn.Linear(args.fc_dim, args.plain_classes)])
  else:
    heads = nn.ModuleList([nn.Linear(args.fc_dim, args.super_classes),
                           nn.Linear(args.fc_dim, args.k)])    # V and this GPU's W_s
  params = [p for p in list(trunk.parameters()) + list(heads.parameters()) if p.requires_grad]
  opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-5)
  cel = nn.CrossEntropyLoss()
  g = torch.Generator().manual_seed(0)
  b = args.batch
  x = torch.randn(b, 3, args.image_size, args.image_size, generator=g)
  first = torch.randint(0, args.plain_classes or args.super_classes, (b,), generator=g)
  sub = torch.randint(0, max(args.k, 1), (b,), generator=g)
  trunk.train()

  def step():
    h = torch.relu(trunk(x))
    loss = cel(heads[0](h), first)
    if not args.plain_classes:
      loss = loss + cel(heads[1](h), sub)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  for _ in range(5):   # warm-up
    step()
  t = time.perf_counter()
  for _ in range(args.steps):
    step().item()
  seconds = time.perf_counter() - t
  return {"examples_per_s": args.steps * b / seconds, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "steps": args.steps, "batch": b}


def main():
  p = argparse.ArgumentParser()
  for name, default in (("image_size", 32), ("fc_dim", 512), ("batch", 64), ("super_classes", 8),
                        ("k", 40), ("plain_classes", 0), ("steps", 30),
                        ("threads", os.cpu_count())):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--width", type=float, default=0.25)
  print(json.dumps(run(p.parse_args())))


if __name__ == "__main__":
  main()
