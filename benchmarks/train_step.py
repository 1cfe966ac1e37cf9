r"""Train-step throughput: the hierarchical loss (m=4, k=1000: S=16 partitioned sub-heads)
vs the same trunk with one plain mirrored softmax over the m*k = 4000 clusters, and over the
S*k = 16000 (cluster, rotation) targets the hierarchical loss factorises, same batch,
side by side, on 1 replica and on 4 replicas (logical CPU devices: the partitioned heads'
gathers and exchanges run for real); the demo step with and without XLA (--jit_compile); and
the share of wall time spent in reassignment at the demo preset; and our step against the
PyTorch reference (`torch_reference.py`: the same VGG-16-BN + Sobel, heads as the original
has them, same batch and thread count), at the demo shape (32 px) and at 64 px, with the
demo's hierarchical heads (m=2, k=40) and with a plain 4,000-way head, timed in this run in a
child process (needs torch: benchmarks/requirements.txt).
Writes benchmarks/results/train_step.json.

  python benchmarks/train_step.py [--steps=30] [--only_torch]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(   # 4 replicas in one process (before TF starts)
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration() for _ in range(4)])

import common  # noqa: E402
from dc_tf.config import ExperimentConfig  # noqa: E402
from dc_tf.training import step as step_lib  # noqa: E402
from dc_tf.training import trainer  # noqa: E402


def demo_config(model_dir, image_size=32, **clustering):
  cfg = ExperimentConfig().replace(
      data={"image_size": image_size},
      model={"image_size": image_size, "width": 0.25, "fc_dim": 512},
      clustering={"m": 2, "k": 40, "pca_dim": 64, "reassign_every": 2, **clustering},
      train={"model_dir": model_dir, "batch_per_replica": 64, "knn_monitor": False,
             "lr": 0.01})
  return cfg.validate()


def plain_softmax(run, classes):
  """Turns a RotNet trainer into the plain baseline: its V becomes one mirrored `classes`-way
  softmax over ReLU(fc7), trained by the same loop, optimizer and all-reduce."""
  from dc_tf.models import heads
  from dc_tf.training import optim
  cfg = run.config
  with run.strategy.scope():
    run.super_head = heads.SuperHead(classes, dtype="float32")
    run.super_head.build([None, cfg.model.fc_units])
    run.variables = run.trunk.trainable_variables + run.super_head.trainable_variables
    run.optimizer = optim.SGD(run.variables, cfg.train.lr, cfg.train.momentum,
                              cfg.train.weight_decay)
  run._train_loop = step_lib.TrainStep(
      run.strategy, run.trunk, run.super_head, None, run.placement, run.optimizer, None,
      run.global_batch, run.step, jit_compile=cfg.train.jit_compile).loop()
  return run


def throughput(cfg, steps, strategy=None, plain_classes=0):
  """Examples per second per replica, the same fixed batch on every replica."""
  strategy = strategy or tf.distribute.get_strategy()
  run = trainer.Trainer(cfg, strategy)
  if plain_classes:
    run = plain_softmax(run, plain_classes)
  rng = np.random.default_rng(0)
  b = cfg.train.batch_per_replica
  classes = plain_classes or cfg.num_super_classes
  size = cfg.model.image_size
  batch = {"image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
           "super_class": rng.integers(0, classes, b).astype(np.int32),
           "sub_class": rng.integers(0, max(cfg.num_sub_classes, 1), b).astype(np.int32),
           "skipped": np.zeros(b, np.int64)}
  ds = tf.data.Dataset.from_tensors(batch).repeat()
  it = iter(strategy.distribute_datasets_from_function(lambda ctx: ds))
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


def torch_rate(steps, **kw):
  """Examples/s of the PyTorch reference step, in a child process (its own thread pool)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
  args = [f"--{k}={v}" for k, v in kw.items()]
  out = subprocess.run([sys.executable, script, f"--steps={steps}", *args], check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def against_torch(tmp, steps):
  """Our step vs PyTorch's, same shapes, batch 64, demo hierarchical heads and a plain
  4,000-way head, at 32 and 64 px."""
  try:
    import torch  # noqa: F401
  except ImportError:
    return {"skipped": "torch is not installed (pip install -r benchmarks/requirements.txt)"}
  rows = {}
  for size in (32, 64):
    demo = demo_config(f"{tmp}/t{size}", image_size=size)
    shape = dict(image_size=size, width=0.25, fc_dim=512, batch=64)
    ours_h = throughput(demo, steps)
    torch_h = torch_rate(steps, super_classes=demo.num_super_classes, k=demo.clustering.k,
                         **shape)
    ours_p = throughput(demo.replace(train={"mode": "rotnet", "model_dir": f"{tmp}/tp{size}"}),
                        steps, plain_classes=4000)
    torch_p = torch_rate(steps, plain_classes=4000, **shape)
    rows[f"{size}px"] = {
        "hierarchical_m2_k40": {"ours_examples_per_s": ours_h,
                                "torch_examples_per_s": torch_h["examples_per_s"],
                                "ratio_ours_vs_torch": ours_h / torch_h["examples_per_s"]},
        "plain_4000": {"ours_examples_per_s": ours_p,
                       "torch_examples_per_s": torch_p["examples_per_s"],
                       "ratio_ours_vs_torch": ours_p / torch_p["examples_per_s"]},
        "torch": torch_h["torch"], "torch_threads": torch_h["threads"],
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or
        os.cpu_count()}
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--only_torch", action="store_true",
                 help="only the PyTorch comparison; merged into the existing JSON")
  args = p.parse_args()
  import tempfile
  tmp = tempfile.mkdtemp()
  if args.only_torch:
    path = os.path.join(common.RESULTS, "train_step.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    # The other entries keep the machine and date of the run that measured them.
    machine = old.pop("machine", None)
    old["machine_of_other_entries"] = old.get("machine_of_other_entries", machine)
    old["against_torch"] = against_torch(tmp, args.steps)
    print(common.write("train_step", old))
    print(json.dumps(old["against_torch"], indent=1))
    return
  hier = demo_config(tmp + "/h", m=4, k=1000)
  rotnet = hier.replace(train={"mode": "rotnet"})
  results = {"batch_per_replica": 64, "image_size": 32, "width": 0.25, "m": 4, "k": 1000,
             "plain_classes": [4000, 16000]}
  four = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(4)])
  for name, strategy, batch in (("1_replica", None, 64), ("4_replicas", four, 16)):
    h = hier.replace(train={"batch_per_replica": batch, "model_dir": f"{tmp}/h{name}"})
    p = rotnet.replace(train={"batch_per_replica": batch, "model_dir": f"{tmp}/p{name}"})
    hier_rate = throughput(h, args.steps, strategy)
    row = {"batch_per_replica": batch, "hierarchical_examples_per_s_per_replica": hier_rate}
    for classes in (4000, 16000):
      rate = throughput(p.replace(train={"model_dir": f"{tmp}/p{classes}{name}"}), args.steps,
                        strategy, plain_classes=classes)
      row[f"plain_softmax_{classes}_examples_per_s_per_replica"] = rate
      row[f"ratio_hierarchical_vs_plain_{classes}"] = hier_rate / rate
    results[name] = row
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
  results["against_torch"] = against_torch(tmp, args.steps)
  print(common.write("train_step", results))
  for k, v in results.items():
    print(f"{k:40s} {v}")


if __name__ == "__main__":
  main()
