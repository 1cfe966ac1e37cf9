r"""Input pipeline throughput: tf.data (training and extraction) vs a PIL + Python loop.

Side by side in one run over the same JPEGs (the embedded data): the PIL loop is the
original's loader style (open, RandomResizedCrop, flip, to array, normalise, rotate, one
image at a time in Python). Writes benchmarks/results/input_pipeline.json.

  python benchmarks/input_pipeline.py [--size=64] [--images=3000]
"""

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402
from dc_tf.data import decoder, preprocess, reader  # noqa: E402

PATTERN = "data/train-*.tfrecord"


def tf_train_rate(size, images, all_rotations):
  ds = reader.build_train_dataset(PATTERN, image_size=size, batch_size=64, steps=10**6,
                                  plan=None, num_rotations=4, all_rotations=all_rotations,
                                  seed=0, epoch=0)
  it = iter(ds)
  next(it)  # warm-up
  n, t = 0, time.perf_counter()
  while n < images * (4 if all_rotations else 1):
    n += int(next(it)["image"].shape[0])
  return n / (time.perf_counter() - t)


def tf_extraction_rate(size, images):
  n, t = 0, time.perf_counter()
  ds = reader.build_extraction_dataset(PATTERN, image_size=size, batch_size=256)
  for batch in ds:
    n += int(batch["image"].shape[0])
    if n >= images:
      break
  return n / (time.perf_counter() - t)


def jpegs(count):
  ds = tf.data.TFRecordDataset(reader.list_shards(PATTERN))
  ds = ds.map(lambda r: decoder.parse_record(r, tf.constant(""))["encoded"])
  return [b.numpy() for b in ds.take(count)]


def pil_rate(data, size):
  rng = np.random.default_rng(0)
  mean, std = np.array(preprocess.IMAGENET_MEAN), np.array(preprocess.IMAGENET_STD)
  t = time.perf_counter()
  for raw in data:
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    w, h = img.size
    for _ in range(10):  # RandomResizedCrop(0.08-1, 3/4-4/3)
      area = w * h * rng.uniform(0.08, 1.0)
      ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
      if 0 < cw <= w and 0 < ch <= h:
        break
    else:
      cw, ch = w, h
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = (np.asarray(img, np.float32) / 255.0 - mean) / std
    np.rot90(arr, rng.integers(4)).copy()
  return len(data) / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--images", type=int, default=3000)
  args = p.parse_args()
  data = jpegs(args.images)
  pil = pil_rate(data, args.size)
  train = tf_train_rate(args.size, args.images, all_rotations=False)
  extraction = tf_extraction_rate(args.size, args.images)
  demo = tf_train_rate(32, args.images, all_rotations=True)
  result = {"image_size": args.size, "images": len(data),
            "pil_loop_images_per_s": pil, "tf_train_images_per_s": train,
            "tf_extraction_images_per_s": extraction,
            "ratio_train_vs_pil": train / pil, "ratio_extraction_vs_pil": extraction / pil,
            "demo_preset_examples_per_s": demo,
            "note": "demo preset: 32 px, each image with its 4 rotations (examples = rotated "
                    "images); compare with the train step's examples/s"}
  print(common.write("input_pipeline", result))
  for k, v in result.items():
    print(f"{k:32s} {v:.1f}" if isinstance(v, float) else f"{k:32s} {v}")


if __name__ == "__main__":
  main()
