r"""Input pipeline throughput: tf.data (training and extraction) vs a PIL + Python loop.

Side by side in one run over the same JPEGs: the PIL loop is the original's loader style
(open, RandomResizedCrop, flip, to array, normalise, rotate, one image at a time in Python,
one process). Two cases:
  * the embedded data as it is (64 x 64 Tiny ImageNet JPEGs), trained at 64 px;
  * YFCC-sized photos: the same images re-encoded at 500 x 375, quality 90, into shards
    under a temp folder, trained at 224 px, where decoding dominates. Beside the pipeline as
    it is (only the crop window decoded), the previous path (decode whole, then crop) runs
    on the same shards.
Rates per core (images/s divided by the cores each side uses) size CPUs per GPU.
Writes benchmarks/results/input_pipeline.json.

  python benchmarks/input_pipeline.py [--size=64] [--images=3000] [--photo_images=1500]
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
from dc_tf.data import decoder, preprocess, reader, schema  # noqa: E402

PATTERN = "data/train-*.tfrecord"
AUTOTUNE = tf.data.AUTOTUNE


def tf_train_rate(size, images, all_rotations, pattern=PATTERN):
  ds = reader.build_train_dataset(pattern, image_size=size, batch_size=64, steps=10**6,
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


def tf_decode_whole_rate(pattern, size, images):
  """A reduced pipeline with the previous transform: every image decoded whole, then
  cropped, antialiased resize always, float32 normalised per image, per-record parsing. It
  leaves out the reader's byte checks, shuffle, rotation and bad-record counting, so it
  is not the previous reader itself and flatters the old path slightly."""
  files = tf.data.Dataset.from_tensor_slices(reader.list_shards(pattern))
  ds = files.interleave(tf.data.TFRecordDataset, cycle_length=4, num_parallel_calls=AUTOTUNE)
  def transform(i, record):
    ex = decoder.parse_record(record, tf.constant(""))
    image = decoder.decode_rgb(ex["encoded"])
    seeds = tf.random.experimental.stateless_split(tf.stack([tf.constant(0, tf.int64), i]), 2)
    w = preprocess.crop_window(tf.shape(image), seeds[0])
    crop = tf.slice(image, [w[0], w[1], 0], [w[2], w[3], 3])
    crop = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
    return preprocess.normalize(tf.image.stateless_random_flip_left_right(crop, seeds[1]))
  ds = ds.repeat().enumerate().map(transform, num_parallel_calls=AUTOTUNE).batch(64)
  it = iter(ds.prefetch(AUTOTUNE))
  next(it)
  n, t = 0, time.perf_counter()
  while n < images:
    n += int(next(it).shape[0])
  return n / (time.perf_counter() - t)


def write_photo_shards(data, folder, shards=4):
  """The JPEGs re-encoded at 500 x 375 (w x h), quality 90, as YFCC-sized photos."""
  os.makedirs(folder, exist_ok=True)
  writers = [tf.io.TFRecordWriter(os.path.join(folder, f"photos-{i:05d}-of-{shards:05d}.tfrecord"))
             for i in range(shards)]
  out = []
  for i, raw in enumerate(data):
    img = Image.open(io.BytesIO(raw)).convert("RGB").resize((500, 375), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    out.append(buf.getvalue())
    writers[i % shards].write(schema.make_example(out[-1], "jpeg", 375, 500, i).SerializeToString())
  for w in writers:
    w.close()
  return os.path.join(folder, "photos-*.tfrecord"), out


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
  p.add_argument("--photo_images", type=int, default=1500)
  p.add_argument("--photo_size", type=int, default=224)
  args = p.parse_args()
  cores = os.cpu_count()
  data = jpegs(args.images)
  pil = pil_rate(data, args.size)
  train = tf_train_rate(args.size, args.images, all_rotations=False)
  whole = tf_decode_whole_rate(PATTERN, args.size, args.images)
  extraction = tf_extraction_rate(args.size, args.images)
  demo = tf_train_rate(32, args.images, all_rotations=True)
  import tempfile
  pattern, photos = write_photo_shards(data[:args.photo_images], tempfile.mkdtemp() + "/photos")
  photo_pil = pil_rate(photos, args.photo_size)
  photo_train = tf_train_rate(args.photo_size, len(photos), all_rotations=False, pattern=pattern)
  photo_whole = tf_decode_whole_rate(pattern, args.photo_size, len(photos))
  result = {
      "cores": cores,
      "thumbnails_64px": {
          "image_size": args.size, "images": len(data),
          "pil_loop_images_per_s": pil, "tf_train_images_per_s": train,
          "tf_train_decode_whole_images_per_s": whole,
          "tf_extraction_images_per_s": extraction,
          "ratio_train_vs_pil": train / pil, "ratio_extraction_vs_pil": extraction / pil,
          "pil_images_per_s_per_core": pil, "tf_train_images_per_s_per_core": train / cores,
          "demo_preset_examples_per_s": demo},
      "photos_500x375": {
          "image_size": args.photo_size, "images": len(photos), "jpeg_quality": 90,
          "mean_jpeg_bytes": float(np.mean([len(b) for b in photos])),
          "pil_loop_images_per_s": photo_pil, "tf_train_images_per_s": photo_train,
          "tf_train_decode_whole_images_per_s": photo_whole,
          "ratio_train_vs_pil": photo_train / photo_pil,
          "ratio_crop_window_vs_decode_whole": photo_train / photo_whole,
          "pil_images_per_s_per_core": photo_pil,
          "tf_train_images_per_s_per_core": photo_train / cores},
      "note": "PIL loop: one process, one core; tf.data: all cores. demo preset: 32 px, each "
              "image with its 4 rotations (examples = rotated images); compare with the train "
              "step's examples/s"}
  print(common.write("input_pipeline", result))
  for case in ("thumbnails_64px", "photos_500x375"):
    for k, v in result[case].items():
      print(f"{case:16s} {k:40s} {v:.1f}" if isinstance(v, float) else f"{case:16s} {k:40s} {v}")


if __name__ == "__main__":
  main()
