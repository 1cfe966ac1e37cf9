r"""Shard writing: the Beam pipeline on the DirectRunner vs the writer it replaced.

Side by side in one run, on the same images (Tiny ImageNet's train_250per_class.zip, 50,000
JPEGs of 64 x 64, read in place), into temporary folders:
  * legacy     the previous writer (benchmarks/legacy_writer.py): a process pool, 2 processes
  * beam x1    make_shards on the DirectRunner, one in-process worker
  * beam x2    make_shards on the DirectRunner, 2 worker processes (multi_processing)
Each reports images/s by wall time and core-seconds per image (this process plus its
children, from getrusage). Then beam x1 runs on --photos of the images re-encoded at 500 x 375
(YFCC's download size), and from its core-seconds per record the cost of 96M images on N
cluster workers is projected (compute only: no storage reads or shuffle service counted).
Checks that Beam wrote the legacy writer's records (as parsed Examples) less the exact
duplicates it drops.
Writes benchmarks/results/make_shards.json.

  python benchmarks/make_shards.py [--images=50000] [--zip=../shared/.../train_250per_class.zip]
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
import legacy_writer  # noqa: E402
from dc_tf.data import make_shards, sources  # noqa: E402

ZIP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets",
                   "tiny-imagenet-200", "train_250per_class.zip")
YFCC_IMAGES = 96_000_000


def _cpu_seconds() -> float:
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(fn, images: int) -> dict:
  """Rates per image read (the Beam writer drops the exact duplicates the legacy one kept)."""
  cpu, t = _cpu_seconds(), time.perf_counter()
  out = fn()
  written, dropped = (out, {}) if isinstance(out, int) else (out["records"], out["dropped"])
  wall, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
  return {"images": images, "records": written, "dropped": dropped, "wall_s": round(wall, 1),
          "images_per_s": round(images / wall, 1),
          "core_ms_per_image": round(1000 * cpu / images, 3)}


def _record_set(folder: str) -> set:
  out = set()
  for f in glob.glob(os.path.join(folder, "*.tfrecord")):
    for r in tf.data.TFRecordDataset(f):
      ex = tf.train.Example.FromString(r.numpy())
      out.add(ex.SerializeToString(deterministic=True))
  return out


def _write_photos(zip_path: str, count: int, folder: str) -> None:
  """`count` of the images re-encoded at 500 x 375, quality 90: YFCC-sized photos."""
  import zipfile
  os.makedirs(folder, exist_ok=True)
  items = sources.tiny_imagenet_items(zip_path, "train", per_class=max(1, count // 200))[:count]
  with zipfile.ZipFile(zip_path) as z:
    for i, it in enumerate(items):
      image = tf.io.decode_jpeg(z.read(it.path), channels=3)
      photo = tf.cast(tf.image.resize(image, [375, 500]), tf.uint8)
      with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
        f.write(tf.io.encode_jpeg(photo, quality=90).numpy())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--zip", default=ZIP)
  ap.add_argument("--images", type=int, default=50_000)
  ap.add_argument("--num_shards", type=int, default=48)
  ap.add_argument("--photos", type=int, default=2000, help="500 x 375 photos for the projection")
  args = ap.parse_args()
  per_class = max(1, args.images // 200)
  items = sources.tiny_imagenet_items(args.zip, "train", per_class=per_class)
  n = len(items)
  tmp = tempfile.mkdtemp(prefix="bench_make_shards_")
  results, folders = {}, {}
  try:
    folders["legacy"] = os.path.join(tmp, "legacy")
    results["legacy"] = _measure(lambda: legacy_writer.write(
        items, folders["legacy"], "train", args.num_shards, num_workers=2), n)
    print("legacy", results["legacy"], flush=True)
    for label, beam_args in (("beam x1", ()),
                             ("beam x2", ("--direct_num_workers=2",
                                          "--direct_running_mode=multi_processing"))):
      folders[label] = os.path.join(tmp, label.replace(" ", "_"))
      results[label] = _measure(lambda: make_shards.write_shards(
          "tiny_imagenet", args.zip, folders[label], "train", args.num_shards,
          per_class=per_class, beam_args=beam_args), n)
      print(label, results[label], flush=True)
    sets = {k: _record_set(v) for k, v in folders.items()}
    # Beam keeps the legacy writer's records less the exact duplicates it drops.
    same = all(s <= sets["legacy"] and len(sets["legacy"] - s)
               == results[k]["dropped"].get("duplicate", 0) for k, s in sets.items() if k != "legacy")
    _write_photos(args.zip, args.photos, os.path.join(tmp, "photos"))
    results["beam x1, 500x375 photos"] = _measure(lambda: make_shards.write_shards(
        "folder", os.path.join(tmp, "photos"), os.path.join(tmp, "photo_shards"), "p",
        4), args.photos)
    print("photos", results["beam x1, 500x375 photos"], flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  core_s = results["beam x1, 500x375 photos"]["core_ms_per_image"] / 1000
  projection = {
      f"{workers} workers x {cores} cores": round(YFCC_IMAGES * core_s / (workers * cores) / 3600, 1)
      for workers, cores in ((16, 4), (64, 4), (256, 4))}
  payload = {
      "images": n, "source": os.path.basename(args.zip) + " (64 x 64 JPEGs, read in place)",
      "num_shards": args.num_shards, "results": results,
      "beam_records_are_legacy_records_less_duplicates": same,
      "beam_x2_vs_legacy_wall": round(results["legacy"]["wall_s"] / results["beam x2"]["wall_s"], 2),
      "beam_x1_core_cost_vs_legacy": round(results["beam x1"]["core_ms_per_image"]
                                           / results["legacy"]["core_ms_per_image"], 2),
      "projected_hours_for_96M_images": projection,
      "projection_note": "core-seconds per record of beam x1 on 500 x 375 JPEGs (YFCC's "
                         "typical download size) x 96M / (workers x cores): compute only, "
                         "no storage reads, shuffle service or worker start-up counted",
  }
  print(common.write("make_shards", payload))
  print(payload)


if __name__ == "__main__":
  main()
