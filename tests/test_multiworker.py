"""Two local worker processes on 127.0.0.1 (TF_CONFIG, or SLURM's variables): k-means and training
agree."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from runs import table
from workers import run_workers

pytestmark = pytest.mark.slow


def test_two_workers_of_two_devices_extract_and_cluster_like_one_process(tiny_shards, tmp_path):
  """2 MWMS workers x 2 logical CPUs: every device extracts its share, and k-means on fixed
  data and on the extracted features gives the 1-replica table (issue 25)."""
  from multiworker_job import fixed_data
  from dc_tf.clustering import extract, hierarchy
  from dc_tf.models import vgg
  trunk = vgg.build_trunk(32, 0.125, 16)
  np.savez(tmp_path / "trunk.npz", **{f"w{i}": w for i, w in enumerate(trunk.get_weights())})
  run_workers(lambda i: [os.path.join(REPO, "tests", "multiworker_job.py"), "kmeans",
                         str(tmp_path / f"w{i}.npz"), tiny_shards, str(tmp_path / "trunk.npz")])
  x, ids = fixed_data()
  single = hierarchy.cluster(tf.distribute.get_strategy(), [x], [ids], m=3, k=3, iters=8, seed=0)
  feats = extract.extract(trunk, tiny_shards, image_size=32, batch_size=4, progress=False)
  table = hierarchy.cluster(tf.distribute.get_strategy(), [feats["fc7"]], [feats["image_id"]],
                            m=2, k=3, iters=5, pca_dim=8, seed=0)
  rows = 0
  for i in range(2):
    got = np.load(tmp_path / f"w{i}.npz")
    np.testing.assert_array_equal(got["ids"], single.image_ids)
    np.testing.assert_array_equal(got["sup"], single.super_cluster)
    np.testing.assert_array_equal(got["sub"], single.sub_cluster)
    np.testing.assert_array_equal(got["x_ids"], table.image_ids)
    np.testing.assert_array_equal(got["x_sup"], table.super_cluster)
    np.testing.assert_array_equal(got["x_sub"], table.sub_cluster)
    assert list(got["rows"]) == [12, 12]   # each worker reads 2 of the 4 shards (24 images)
    assert [d.rsplit(":", 1)[1] for d in got["devices"]] == ["0", "1"]
    assert all(f"task:{i}" in d for d in got["devices"])
    rows += got["rows"].sum()
  assert rows == 48


def test_two_worker_training_ends_with_identical_weights_and_counts_every_bad_record(
    two_worker_run):
  """conftest's two_worker_run: 2 plain workers (srun's variables, --cluster=slurm), 2 epochs,
  on shards where worker 0's hold 3 undecodable records and worker 1's 2. Both workers run
  the same steps (else the collectives would hang) and end with the same weights and table;
  every record is counted (skipped_records: the sum over the workers' shards, in the
  training epochs and in the reassignments)."""
  from conftest import BAD_RECORDS
  model_dir = two_worker_run
  log = [json.loads(l) for l in open(os.path.join(model_dir, "log.jsonl"))]
  assert [r["event"] for r in log] == ["reassign", "epoch", "reassign", "epoch"]
  chief = tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt"))
  other = tf.train.latest_checkpoint(os.path.join(model_dir, "tmp", "worker-1"))
  assert chief.rsplit("-", 1)[1] == other.rsplit("-", 1)[1] == str(log[-1]["step"])
  r1, r2 = tf.train.load_checkpoint(chief), tf.train.load_checkpoint(other)
  names = [n for n, _ in tf.train.list_variables(chief) if n.startswith(("trunk/", "super_head/", "table"))]
  assert len(names) > 20
  for n in names:
    np.testing.assert_array_equal(r1.get_tensor(n), r2.get_tensor(n), err_msg=n)
  bad = sum(BAD_RECORDS.values())
  assert [r["skipped_records"] for r in log if r["event"] == "epoch"] == [bad] * 2
  assert [r["skipped_records"] for r in log if r["event"] == "reassign"] == [bad] * 2
  assert [r["images"] for r in log if r["event"] == "reassign"] == [48, 48]
  assert os.path.isfile(os.path.join(model_dir, "export", "model_card.json"))  # the chief's


def test_worker_index_counts_a_chief_once():
  from types import SimpleNamespace
  from dc_tf import distribute as dist
  from workers import tf_config

  def fake(cfg):
    spec = tf.train.ClusterSpec(cfg["cluster"])
    resolver = SimpleNamespace(task_type=cfg["task"]["type"], task_id=cfg["task"]["index"],
                               cluster_spec=lambda: spec)
    return SimpleNamespace(cluster_resolver=resolver)
  addresses = ["a:1", "b:2", "c:3"]
  assert [dist.worker_index(fake(tf_config(addresses, i, chief=True))) for i in range(3)] == [0, 1, 2]
  assert [dist.worker_index(fake(tf_config(addresses, i))) for i in range(3)] == [0, 1, 2]
  assert [dist.is_chief(fake(tf_config(addresses, i, chief=True))) for i in range(3)] == [True, False, False]
  evaluator = fake({"cluster": {"worker": addresses}, "task": {"type": "evaluator", "index": 0}})
  with pytest.raises(ValueError, match="evaluator"):
    dist.worker_index(evaluator)


def test_chief_and_worker_build_the_table_of_two_plain_workers(chief_sigterm_run, two_worker_run):
  """Chief + 1 worker (conftest's chief_sigterm_run, interrupted and resumed) read disjoint
  shards (a chief counted as worker 0 would read shards 0 and 2 twice) and build the same
  id -> cluster table as 2 plain workers (two_worker_run, the same command); their weights
  are compared in tests/test_multiworker_faults.py."""
  model_dir = chief_sigterm_run["model_dir"]
  assert os.path.isdir(os.path.join(model_dir, "tmp", "worker-1"))   # the non-chief's copy
  tables = [table(two_worker_run), table(model_dir)]
  assert len(tables[0][0]) == 48 == len(np.unique(tables[1][0]))
  for a, b in zip(*tables):
    np.testing.assert_array_equal(a, b)
