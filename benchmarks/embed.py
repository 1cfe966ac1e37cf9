r"""Embedding: the one-box path vs the Beam path (DirectRunner), side by side in one run.

On the same export (a trunk of --width at --image_size, random weights: the cost does not
depend on them), two inputs:
  * the embedded data: data/train-*.tfrecord (make_shards' 64 x 64 JPEGs), --images of them
  * --photos JPEGs at 500 x 375 (YFCC's download size), the embedded images re-encoded
each through `python -m dc_tf.embed` one-box and `--runner=DirectRunner`, into temporary folders.
Reports images/s by wall time and images per core-second (this process and its children, from
getrusage; the planning pass, which reads and checks every image, included), and projects the
Beam path's core-seconds per photo to 96M photos on N workers (compute only: no storage
reads, worker start-up or shuffle counted). Writes benchmarks/results/embed.json
(embed_quick.json with --quick, which only checks that the benchmark runs).

  python benchmarks/embed.py [--width=1 --image_size=224 --images=5000 --photos=1000]
  python benchmarks/embed.py --quick
"""

import argparse
import glob
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import common  # noqa: E402
from dc_tf import export  # noqa: E402
from dc_tf.data import schema  # noqa: E402
from dc_tf.embed import features, on_beam  # noqa: E402
from dc_tf.models import vgg  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                    "train-*.tfrecord")
YFCC_IMAGES = 96_000_000


def _core_seconds() -> float:
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(fn) -> dict:
  c, t = _core_seconds(), time.perf_counter()
  manifest = fn()
  wall, core = time.perf_counter() - t, _core_seconds() - c
  n = manifest["rows"]
  return {"images": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 2),
          "core_s": round(core, 2), "images_per_core_s": round(n / core, 3),
          "dropped": manifest["dropped"]}


def _write_inputs(pattern: str, images: int, photos: int, tmp: str) -> tuple[str, str]:
  """(a list-free folder of the first `images` embedded JPEGs, one of `photos` at 500 x 375)."""
  data_dir, photo_dir = os.path.join(tmp, "data"), os.path.join(tmp, "photos")
  os.makedirs(data_dir)
  os.makedirs(photo_dir)
  ds = tf.data.TFRecordDataset(sorted(glob.glob(pattern))).map(
      lambda r: tf.io.parse_single_example(r, schema.FEATURE_SPEC)[schema.ENCODED])
  for i, data in enumerate(ds.take(max(images, photos))):
    if i < images:
      with open(os.path.join(data_dir, f"{i:06d}.jpg"), "wb") as f:
        f.write(data.numpy())
    if i < photos:
      photo = tf.cast(tf.image.resize(tf.io.decode_jpeg(data, channels=3), [375, 500]), tf.uint8)
      with open(os.path.join(photo_dir, f"{i:06d}.jpg"), "wb") as f:
        f.write(tf.io.encode_jpeg(photo, quality=90).numpy())
  return data_dir, photo_dir


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", default=DATA)
  ap.add_argument("--images", type=int, default=5000)
  ap.add_argument("--photos", type=int, default=1000)
  ap.add_argument("--width", type=float, default=1.0)
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--layers", default="probe_fc7,fc7")
  ap.add_argument("--quick", action="store_true", help="a tiny run that only checks it works")
  args = ap.parse_args()
  if args.quick:
    args.images, args.photos, args.width, args.image_size = 24, 8, 0.125, 32
  tmp = tempfile.mkdtemp(prefix="bench_embed_")
  results = {}
  try:
    model = os.path.join(tmp, "export")
    fc = int(4096 * args.width)
    export.export(vgg.build_trunk(args.image_size, args.width, fc), model,
                  image_size=args.image_size)
    data_dir, photo_dir = _write_inputs(args.data, args.images, args.photos, tmp)
    layers = tuple(args.layers.split(","))
    for source, folder in (("embedded data (64x64)", data_dir), ("500x375 photos", photo_dir)):
      for path in ("one-box", "beam DirectRunner"):
        out = os.path.join(tmp, f"{source[:4]}-{path[:4]}")
        opts = features.EmbedOptions(input=folder, model=model, output=out, layers=layers,
                                     batch_size=args.batch_size)
        run = (lambda o=opts: features.run(o)) if path == "one-box" else (
            lambda o=opts: on_beam.run(o, ["--runner=DirectRunner"]))
        results[f"{source}, {path}"] = _measure(run)
        print(source, path, results[f"{source}, {path}"], flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  core_s = 1 / results["500x375 photos, beam DirectRunner"]["images_per_core_s"]
  payload = {
      "model": f"VGG-16-BN trunk width {args.width} at {args.image_size} px (random weights)",
      "layers": list(layers), "batch_size": args.batch_size, "quick": args.quick,
      "results": results,
      "projected_hours_for_96M_photos": {
          f"{w} workers x {c} cores": round(YFCC_IMAGES * core_s / (w * c) / 3600, 1)
          for w, c in ((16, 4), (64, 4), (256, 4))},
      "projection_note": "core-seconds per 500 x 375 photo on the Beam path x 96M / "
                         "(workers x cores): CPU compute only; no storage reads, worker "
                         "start-up or accelerators counted",
  }
  print(common.write("embed_quick" if args.quick else "embed", payload))


if __name__ == "__main__":
  main()
