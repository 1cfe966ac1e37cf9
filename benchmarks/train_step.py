r"""Train-step throughput: the hierarchical loss (m=4, k=1000; grouped and gathered
sub-heads) vs the same trunk with one plain softmax head over m*k classes, same batch,
side by side; the demo step with and without XLA (--jit_compile); and the share of wall time
spent in reassignment at the demo preset.
Writes benchmarks/results/train_step.json.

  python benchmarks/train_step.py [--steps=30]
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
from dc_tf.config import ExperimentConfig  # noqa: E402
from dc_tf.training import trainer  # noqa: E402


def demo_config(model_dir, **clustering):
  cfg = ExperimentConfig().replace(
      data={"image_size": 32}, model={"image_size": 32, "width": 0.25, "fc_dim": 512},
      clustering={"m": 2, "k": 40, "pca_dim": 64, "reassign_every": 2, **clustering},
      train={"model_dir": model_dir, "batch_per_replica": 64, "knn_monitor": False,
             "lr": 0.01})
  return cfg.validate()


def throughput(cfg, steps, plain=False):
  run = trainer.Trainer(cfg, tf.distribute.get_strategy())
  rng = np.random.default_rng(0)
  b = cfg.train.batch_per_replica
  s = cfg.num_super_classes
  batch = {"image": rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
           "super_class": (np.zeros(b) if plain else rng.integers(0, s, b)).astype(np.int32),
           "sub_class": rng.integers(0, cfg.num_sub_classes, b).astype(np.int32),
           "skipped": np.zeros(b, np.int64)}
  it = iter(tf.data.Dataset.from_tensors(batch).repeat())
  run._train_loop(it, tf.constant(5))  # trace + warm-up
  t = time.perf_counter()
  run._train_loop(it, tf.constant(steps))
  return steps * b / (time.perf_counter() - t)


def reassign_share(tmp):
  """One reassignment vs T epochs of training at the demo preset, on the embedded data."""
  demo = demo_config(tmp)
  run = trainer.Trainer(demo.replace(train={"knn_monitor": True}), tf.distribute.get_strategy())
  t = time.perf_counter()
  stats = run.reassign(0)
  reassign_s = time.perf_counter() - t
  return reassign_s, stats


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=30)
  args = p.parse_args()
  import tempfile
  tmp = tempfile.mkdtemp()
  hier = demo_config(tmp + "/h", m=4, k=1000)
  results = {"batch": 64, "image_size": 32, "width": 0.25, "m": 4, "k": 1000}
  results["hierarchical_group_examples_per_s"] = throughput(hier, args.steps)
  results["hierarchical_gather_examples_per_s"] = throughput(
      hier.replace(train={"sub_head_impl": "gather"}), args.steps)
  plain = hier.replace(train={"mode": "deepcluster"}, clustering={"k": 4000})
  results["plain_softmax_4000_examples_per_s"] = throughput(plain, args.steps, plain=True)
  results["ratio_group_vs_plain"] = (results["hierarchical_group_examples_per_s"]
                                     / results["plain_softmax_4000_examples_per_s"])
  results["ratio_gather_vs_plain"] = (results["hierarchical_gather_examples_per_s"]
                                      / results["plain_softmax_4000_examples_per_s"])
  reassign_s, stats = reassign_share(tmp + "/r")
  demo = demo_config(tmp + "/d")
  rate = throughput(demo, args.steps)
  jit_rate = throughput(demo.replace(train={"jit_compile": True, "model_dir": tmp + "/j"}),
                        args.steps)
  epoch_s = 5000 * 4 / rate
  t_epochs = demo.clustering.reassign_every
  results.update({"demo_reassign_seconds": reassign_s, "demo_examples_per_s": rate,
                  "demo_jit_examples_per_s": jit_rate, "ratio_jit_vs_plain": jit_rate / rate,
                  "demo_epoch_seconds_estimate": epoch_s,
                  "demo_reassign_share": reassign_s / (reassign_s + t_epochs * epoch_s),
                  "demo_reassign_stats": stats})
  print(common.write("train_step", results))
  for k, v in results.items():
    print(f"{k:40s} {v}")


if __name__ == "__main__":
  main()
