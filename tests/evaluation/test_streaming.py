"""evaluate.py streams (issue 35, item 1): its peak memory does not grow with the number of
images. Pooled conv1..conv13 of a 32-px width-1/8 trunk are ~35k floats (~140 KB) an image,
so holding the train and test sets whole (as the code did before) grows the peak RSS by
~280 MB per 1000 images; streaming keeps it to a batch of pooled features plus per-image
ids and labels."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, jpeg_bytes
from dc_tf.data import schema
from dc_tf.evaluation import evaluator, feature_store, metrics, probes

ALL_CONV = ",".join(f"conv{i}" for i in range(1, 14))


def write_shards(folder: str, n: int, shards: int = 4) -> str:
  """n labelled 32x32 JPEGs (3 colour classes, ids 0..n-1) in `shards` TFRecord files."""
  os.makedirs(folder, exist_ok=True)
  colors = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
  writers = [tf.io.TFRecordWriter(os.path.join(folder, f"s-{i:02d}.tfrecord"))
             for i in range(shards)]
  for i in range(n):
    data = jpeg_bytes(i, size=(32, 32), label_color=colors[i % 3])
    writers[i % shards].write(schema.make_example(data, "jpeg", 32, 32, i, label=i % 3)
                              .SerializeToString())
  for w in writers:
    w.close()
  return os.path.join(folder, "s-*.tfrecord")


def write_run_dir(path: str) -> str:
  """A run dir with a step-7 checkpoint of a tiny trunk (as test_twin_report_end_to_end)."""
  from dc_tf.config import ExperimentConfig
  from dc_tf.models import vgg
  from dc_tf.training import checkpointing
  cfg = ExperimentConfig().replace(data={"image_size": 32},
                                   model={"image_size": 32, "width": 0.125, "fc_dim": 16})
  checkpointing.write_config(path, cfg)
  trunk = vgg.trunk_from_config(cfg.model)
  tf.train.CheckpointManager(tf.train.Checkpoint(trunk=trunk, step=tf.Variable(7, dtype=tf.int64)),
                             os.path.join(path, "ckpt"), 1).save()
  return path


def peak_rss(repo: str, run_dir: str, pattern: str, output_dir: str, *extra) -> int:
  """Peak resident set (bytes) of `python evaluate.py` run from `repo` (os.wait4's
  ru_maxrss of that child alone)."""
  cmd = [sys.executable, os.path.join(repo, "evaluate.py"), f"--checkpoint={run_dir}",
         f"--train_data={pattern}", f"--test_data={pattern}", f"--output_dir={output_dir}",
         "--baseline=none", "--probe_epochs=1", f"--layers={ALL_CONV},fc7", *extra]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  with open(output_dir + ".log", "w") as log:
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  assert proc.returncode == 0, open(output_dir + ".log").read()[-3000:]
  return usage.ru_maxrss * 1024


def test_store_rows_are_those_extract_holds(tiny_shards, tmp_path):
  """The files hold `evaluator.features`' pooled rows in its order; any rows (unsorted,
  repeated) read back equal the array's; max_images keeps the first ones."""
  twin = evaluator.random_twin(evaluator.ModelConfig(image_size=32, width=0.125, fc_dim=16))
  layers = ("conv1", "conv7", "fc7")
  held, pools = evaluator.features(twin, tiny_shards, layers)
  store = feature_store.write(twin, tiny_shards, layers, str(tmp_path / "f"), image_size=32,
                              batch_size=10, progress=False)
  assert store.pool_sizes == pools and len(store) == 48
  np.testing.assert_array_equal(store.image_id, held["image_id"])
  np.testing.assert_array_equal(store.label, held["label"])
  rows = np.array([47, 3, 3, 4, 5, 0, 46, 47])
  for layer in layers:
    assert os.path.getsize(tmp_path / "f" / f"{layer}.f32") == 48 * held[layer].shape[1] * 4
    np.testing.assert_array_equal(store[layer][0:48], held[layer])
    np.testing.assert_array_equal(store[layer][rows], held[layer][rows])
    np.testing.assert_array_equal(store[layer][40:60], held[layer][40:])
  first = feature_store.write(twin, tiny_shards, ("fc7",), str(tmp_path / "g"), image_size=32,
                              batch_size=10, max_images=15, progress=False)
  np.testing.assert_array_equal(first["fc7"][0:15], held["fc7"][:15])
  assert len(first) == 15
  store.remove()
  assert not os.path.exists(tmp_path / "f")


def test_cluster_sample_is_the_smallest_hashed_ids_in_shard_order(tiny_shards, tmp_path):
  twin = evaluator.random_twin(evaluator.ModelConfig(image_size=32, width=0.125, fc_dim=16))
  stores = [feature_store.write(twin, tiny_shards, ("fc7",), str(tmp_path / str(b)),
                                image_size=32, batch_size=b, sample=10, seed=3, progress=False)
            for b in (4, 48)]
  keys = feature_store.sample_keys(stores[0].image_id, seed=3)
  want = np.sort(np.argsort(keys)[:10])
  for store in stores:   # the same rows whatever the batching (bottom-10 kept while streaming)
    np.testing.assert_array_equal(store.sample_rows, want)
    np.testing.assert_array_equal(store.sample_meta["image_id"], store.image_id[want])
    np.testing.assert_array_equal(store.sample_meta["label"], store.label[want])
  other = feature_store.sample_keys(stores[0].image_id, seed=4)
  assert set(np.argsort(other)[:10]) != set(want)             # the seed picks another sample


def test_fast_probe_and_knn_on_disk_equal_in_memory(tmp_path):
  rng = np.random.default_rng(0)
  centers = rng.normal(0, 2, (3, 12))
  y = rng.integers(0, 3, 130)
  x = (centers[y] + rng.normal(size=(130, 12))).astype(np.float32)
  ids = rng.permutation(1000)[:130]
  for name, part in (("train", x[:100]), ("test", x[100:])):
    part.tofile(tmp_path / f"{name}.f32")
  train = feature_store.LayerRows(str(tmp_path / "train.f32"), 100, 12)
  test = feature_store.LayerRows(str(tmp_path / "test.f32"), 30, 12)
  mean, std = probes.moments(train, rows_per_block=7)
  np.testing.assert_allclose(mean, x[:100].astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(std, x[:100].astype(np.float64).std(0), rtol=1e-12)
  kw = dict(epochs=3, batch_size=16, train_ids=ids[:100])
  want = probes.linear_probe(x[:100], y[:100], x[100:], y[100:], **kw)
  assert probes.linear_probe(train, y[:100], test, y[100:], rows_per_block=7, **kw) == want
  # kNN: a running top-k over train blocks of 7 equals one block over the whole set.
  whole = metrics.knn_predict(x[:100], y[:100], x[100:], k=5, chunk=1000)
  np.testing.assert_array_equal(metrics.knn_predict(train, y[:100], test, k=5, chunk=7), whole)
  np.testing.assert_array_equal(metrics.knn_predict(x, y, x, k=5, chunk=9, exclude_self=True),
                                metrics.knn_predict(x, y, x, k=5, chunk=1000, exclude_self=True))


def test_extraction_through_two_replicas_gives_one_devices_rows(tiny_shards, tmp_path):
  from conftest import two_cpu_strategy
  from dc_tf.models import vgg
  cfg = evaluator.ModelConfig(image_size=32, width=0.125, fc_dim=16)
  one = evaluator.random_twin(cfg)
  strategy = two_cpu_strategy()
  with strategy.scope():
    trunk = vgg.trunk_from_config(cfg)
  trunk.set_weights(one.fn.get_weights())
  single = feature_store.write(one, tiny_shards, ("conv4", "fc7"), str(tmp_path / "a"),
                              image_size=32, batch_size=8, progress=False)
  both = feature_store.write(evaluator.LoadedTrunk(trunk, cfg, "mirrored"), tiny_shards,
                            ("conv4", "fc7"), str(tmp_path / "b"), image_size=32, batch_size=8,
                            strategy=strategy, progress=False)
  np.testing.assert_array_equal(both.image_id, single.image_id)
  for layer in ("conv4", "fc7"):
    np.testing.assert_allclose(both[layer][0:48], single[layer][0:48], rtol=1e-5, atol=1e-5)
  assert [d.rsplit("/", 1)[1] for d in both.computed_on] == ["device:CPU:0", "device:CPU:1"]
  assert len(single.computed_on) == 1


def test_cluster_scores_on_two_replicas_equal_one_replicas():
  """The sample is split between the local replicas (41 rows: 21 + 20) for whitening and
  k-means; assignments come back in row order, as on one device."""
  from conftest import two_cpu_strategy
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 41)
  x = (rng.normal(0, 3, (3, 8))[y] + rng.normal(size=(41, 8))).astype(np.float32)
  blank = np.array([b""] * 41)
  meta = {"label": y, "user_id": blank, "device": blank, "tags": blank,
          "lat": np.full(41, np.nan), "lon": np.full(41, np.nan)}
  one, assign_one = evaluator.cluster_quality(x, meta, 3, seed=0)
  two, assign_two = evaluator.cluster_quality(x, meta, 3, seed=0, strategy=two_cpu_strategy())
  np.testing.assert_array_equal(assign_two, assign_one)
  assert two == one and len(np.unique(assign_one)) == 3


def test_evaluate_keeps_features_when_asked_and_refuses_bad_flags(tiny_shards, tmp_path):
  from dc_tf.config import UserError
  twin = evaluator.random_twin(evaluator.ModelConfig(image_size=32, width=0.125, fc_dim=16))
  kw = dict(train_pattern=tiny_shards, test_pattern=tiny_shards, layers=("conv13", "fc7"),
            twin=False, probe_epochs=1)
  report = evaluator.evaluate(twin, output_dir=str(tmp_path / "e"), cluster_sample=20,
                              feature_dir=str(tmp_path / "feats"), keep_features=True, **kw)
  res = report["results"]["trained"]
  assert res["cluster_sample"] == 20 and res["clusters"]["k"] == 3
  for split in ("train", "test"):
    for layer in ("conv13", "fc7"):
      path = tmp_path / "feats" / "trained" / split / f"{layer}.f32"
      assert os.path.getsize(path) == 48 * 4 * (16 if layer == "fc7" else 64 * 2 * 2)
  with pytest.raises(UserError, match="--feature_dir"):
    evaluator.evaluate(twin, output_dir=str(tmp_path / "e"), feature_dir="gs://b/f", **kw)
  with pytest.raises(UserError, match="--cluster_sample"):
    evaluator.evaluate(twin, output_dir=str(tmp_path / "e"), cluster_sample=1, **kw)
  # The kept files are neither overwritten nor deleted by the next evaluation there.
  before = os.path.getmtime(tmp_path / "feats" / "trained" / "test" / "fc7.f32")
  with pytest.raises(UserError, match="exists .* another --feature_dir"):
    evaluator.evaluate(twin, output_dir=str(tmp_path / "e"), feature_dir=str(tmp_path / "feats"),
                       **kw)
  assert os.path.getmtime(tmp_path / "feats" / "trained" / "test" / "fc7.f32") == before
  # k larger than the cluster sample is refused before any probe trains (3 labels, 2 images).
  with pytest.raises(UserError, match="3 clusters cannot be made of the 2 images"):
    evaluator.evaluate(twin, output_dir=str(tmp_path / "e2"), cluster_sample=2, **kw)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_images(tmp_path):
  run_dir = write_run_dir(str(tmp_path / "run"))
  n = 1000
  peaks = {}
  for size in (n, 2 * n):
    pattern = write_shards(str(tmp_path / f"data{size}"), size)
    keep = ["--keep_features"] if size == n else []
    peaks[size] = peak_rss(REPO, run_dir, pattern, str(tmp_path / f"eval{size}"), *keep)
  report = json.load(open(tmp_path / f"eval{2 * n}" / "report.json"))
  assert report["results"]["trained"]["cluster_sample"] == 2 * n   # all of them (under 20k)
  assert set(report["results"]["trained"]["probe"]) == {*ALL_CONV.split(","), "fc7"}
  # the features files are gone at the end
  left = [f for _, _, fs in os.walk(tmp_path / f"eval{2 * n}") for f in fs if f.endswith(".f32")]
  assert not left
  growth = peaks[2 * n] / peaks[n] - 1
  print(f"peak RSS {peaks[n] / 2**20:.0f} MiB at {n} images, "
        f"{peaks[2 * n] / 2**20:.0f} MiB at {2 * n} ({100 * growth:+.1f}%)")
  assert growth < 0.10, peaks
  # Holding the sets (as before) would have added what N images' feature files hold, twice.
  held = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / f"eval{n}")
             for f in fs if f.endswith(".f32"))
  assert held > 200 * 2**20 and peaks[2 * n] - peaks[n] < held / 2, (held, peaks)
