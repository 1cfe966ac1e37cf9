r"""Trunk size and forward throughput (inference) at a given input size and width.
Writes benchmarks/results/forward.json.

  python benchmarks/forward.py [--size=64] [--width=1.0] [--batch=32]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import common  # noqa: E402
from dc_tf.models import vgg  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=10)
  args = p.parse_args()
  rows = []
  for size, width in ((args.size, args.width), (224, 1.0)):
    trunk = vgg.build_trunk(size, width, fc_dim=int(4096 * width))
    x = tf.constant(np.random.default_rng(0).normal(size=(args.batch, size, size, 3)), tf.float32)
    forward = tf.function(lambda images: trunk(images, training=False)["fc7"])
    forward(x).numpy()  # trace
    n = args.batches if size < 224 else 2
    t = time.perf_counter()
    for _ in range(n):
      forward(x).numpy()
    rate = n * args.batch / (time.perf_counter() - t)
    rows.append({"image_size": size, "width": width, "parameters": int(trunk.count_params()),
                 "trainable_parameters": int(sum(np.prod(v.shape) for v in trunk.trainable_variables)),
                 "forward_images_per_s": rate, "batch": args.batch})
    print(rows[-1])
  print(common.write("forward", {"rows": rows}))


if __name__ == "__main__":
  main()
