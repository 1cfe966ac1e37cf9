"""Run by the multi-worker tests in separate processes (TF_CONFIG set by the test).

  python tests/multiworker_job.py kmeans OUT.npz SHARDS WEIGHTS.npz   # extraction + k-means
  python tests/multiworker_job.py steps INIT.npz OUT_PREFIX   # 3 train steps, 2 CPU replicas
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from dc_tf import distribute as dist  # noqa: E402


def fixed_data(n=900, d=8, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(0, 4, (9, d))
  x = (centers[rng.integers(9, size=n)] + rng.normal(size=(n, d))).astype(np.float32)
  return x, np.arange(n, dtype=np.int64) * 11 + 5


def kmeans_job(out_path, shards, weights_path):
  """2 logical CPU replicas per worker: (a) hierarchical k-means on fixed data split over the
  4 replicas; (b) every replica extracts its share of `shards` with the trunk saved in
  `weights_path`, then the table is clustered from the per-replica rows."""
  from dc_tf.clustering import extract, hierarchy
  from dc_tf.models import vgg
  strategy = dist.make_strategy(cpu_replicas=2)
  x, ids = fixed_data()
  w, n = dist.worker_index(strategy), strategy.num_replicas_in_sync
  parts = np.array_split(np.arange(len(x)), n)[2 * w:2 * w + 2]
  a = hierarchy.cluster(strategy, [x[p] for p in parts], [ids[p] for p in parts], m=3, k=3,
                        iters=8, seed=0)
  with strategy.scope():
    trunk = vgg.build_trunk(32, 0.125, 16)
  weights = np.load(weights_path)
  trunk.set_weights([weights[f"w{i}"] for i in range(len(weights.files))])
  per = extract.extract_per_replica(strategy, trunk, shards, image_size=32, batch_size=4,
                                    progress=False)
  b = hierarchy.cluster(strategy, [p["fc7"] for p in per], [p["image_id"] for p in per],
                        m=2, k=3, iters=5, pca_dim=8, seed=0)
  np.savez(out_path, ids=a.image_ids, sup=a.super_cluster, sub=a.sub_cluster,
           x_ids=b.image_ids, x_sup=b.super_cluster, x_sub=b.sub_cluster,
           rows=[len(p["image_id"]) for p in per],
           devices=[p["computed_on"] for p in per])


MODES = ("deepercluster", "deepcluster")   # S = 8 whole heads; S = 1 head cut into shards
GLOBAL_BATCH = 16


def layout_config(mode, model_dir, replicas):
  """A tiny run whose global batch (16) is the same for any replica count."""
  from dc_tf.config import ExperimentConfig
  return ExperimentConfig().replace(
      data={"data_pattern": "unused", "image_size": 32},
      model={"image_size": 32, "width": 0.125, "fc_dim": 32, "dropout": 0.0},
      clustering={"m": 2, "k": 7},
      train={"mode": mode, "model_dir": model_dir, "batch_per_replica": GLOBAL_BATCH // replicas,
             "lr": 0.05, "weight_decay": 1e-3, "knn_monitor": False}).validate()


def fixed_global_batch(cfg):
  rng = np.random.default_rng(7)
  n = GLOBAL_BATCH
  return {"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
          "super_class": rng.integers(0, cfg.num_super_classes, n).astype(np.int32),
          "sub_class": rng.integers(0, cfg.num_sub_classes, n).astype(np.int32),
          "skipped": np.zeros(n, np.int64)}


def three_steps(run, batch, init=None):
  """Loads `init` (trunk and V), runs 3 steps through distribute_datasets_from_function, each
  replica fed its rows of the fixed global batch; returns every weight this worker holds
  (shared_i: trunk and V; piece_<name> and bias_<name>: its sub-head pieces' W and b)."""
  import tensorflow as tf
  if init is not None:
    for v, value in zip(run.variables, init):
      v.assign(value)
  b = run.config.train.batch_per_replica

  def dataset_fn(ctx):   # one dataset per worker, one batch per local replica and step
    n_local = GLOBAL_BATCH // b // ctx.num_input_pipelines
    first = ctx.input_pipeline_id * n_local
    rows = {k: v[first * b:(first + n_local) * b] for k, v in batch.items()}
    return tf.data.Dataset.from_tensor_slices(rows).batch(b).repeat()
  run._train_loop(iter(run.strategy.distribute_datasets_from_function(dataset_fn)),
                  tf.constant(3))
  out = {f"shared_{i}": v.numpy() for i, v in enumerate(run.variables)}
  for name, (_, kernel, bias) in run.sub_heads.by_name().items():
    out.update({f"piece_{name}": kernel.numpy(), f"bias_{name}": bias.numpy()})
  return out


def steps_job(init_path, out_prefix):
  from dc_tf.training import trainer
  strategy = dist.make_strategy(cpu_replicas=2)
  assert strategy.num_replicas_in_sync == 4, strategy.num_replicas_in_sync
  init = np.load(init_path)
  for mode in MODES:
    cfg = layout_config(mode, f"{out_prefix}-{mode}-run", 4)
    run = trainer.Trainer(cfg, strategy)
    out = three_steps(run, fixed_global_batch(cfg), [init[f"{mode}_{i}"] for i in
                                                     range(len(run.variables))])
    np.savez(f"{out_prefix}-{mode}.npz", **out)


if __name__ == "__main__":
  {"kmeans": kmeans_job, "steps": steps_job}[sys.argv[1]](*sys.argv[2:])
