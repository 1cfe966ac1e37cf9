"""Generated shards whose clusters are planted (issue 38): group g has its own user, rarest
tag, GPS cell, device and colour, and its images' colours spread by SPREAD[g]."""

import numpy as np
import tensorflow as tf

from conftest import write_records
from dc_tf.config import ExperimentConfig
from dc_tf.data import schema
from dc_tf.training import checkpointing

GROUPS, PER_GROUP = 4, 60
BASES = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (128, 128, 128)]
SPREAD = [45, 25, 10, 2]             # sd of an image's colour around its group's, per channel


def planted_records(seed=0):
  rng = np.random.default_rng(seed)
  out, groups, colours = [], [], []
  for i in range(GROUPS * PER_GROUP):
    g = i % GROUPS
    colour_ = np.clip(np.array(BASES[g]) + rng.normal(0, SPREAD[g], 3), 0, 255)
    img = np.broadcast_to(colour_, (16, 16, 3)).astype(np.uint8)
    enc = tf.io.encode_png(img).numpy()       # lossless: the mean colour is the planted one
    out.append(schema.make_example(
        enc, "png", 16, 16, 1000 + 7 * i, user_id=f"user{g}",
        tags=f"common,tag{g}" + (",other" if i % 5 else ""),   # tag{g} the rarest
        lat=10.0 * g + 0.5, lon=-3.5 - g, device=f"cam{g}"))
    groups.append(g)
    colours.append(img[0, 0])
  return out, np.array(groups), np.array(colours)


def make_planted(root):
  records, groups, colours = planted_records()
  half = len(records) // 2
  for s, part in enumerate((records[:half], records[half:])):
    write_records(str(root / f"train-{s:05d}-of-00002.tfrecord"), part)
  pattern = str(root / "train-*.tfrecord")
  run = str(root / "run")
  config = ExperimentConfig().replace(data={"data_pattern": pattern},
                                      clustering={"m": 1, "k": GROUPS},
                                      train={"mode": "deepcluster", "model_dir": run})
  checkpointing.write_config(run, config)
  ids = 1000 + 7 * np.arange(len(groups), dtype=np.int64)
  checkpointing.save_assignments(run, 0, ids, groups.astype(np.int32))    # the planted groups
  independent = np.random.default_rng(1).integers(0, GROUPS, len(ids)).astype(np.int32)
  checkpointing.save_assignments(run, 3, ids, independent)
  return pattern, run, groups, independent, colours


