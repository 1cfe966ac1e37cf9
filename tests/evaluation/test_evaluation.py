"""Metrics against scikit-learn / NumPy, probes, the twin report, VOC protocol, errors."""

import json
import os

import numpy as np
import pytest
from sklearn import metrics as skm

from conftest import jpeg_bytes
from dc_tf.evaluation import evaluator, metrics, probes, voc
from dc_tf.training import checkpointing


def test_cluster_scores_match_sklearn():
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 4, 200), rng.integers(0, 5, 200)
  s = metrics.cluster_scores(a, b)
  assert s["nmi"] == pytest.approx(skm.normalized_mutual_info_score(a, b))
  assert s["ari"] == pytest.approx(skm.adjusted_rand_score(a, b))
  table = np.zeros([4, 5])
  np.add.at(table, (a, b), 1)
  assert s["purity"] == pytest.approx(table.max(0).sum() / 200)


def test_knn_against_brute_force():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
  q = rng.normal(size=(10, 5))
  pred = metrics.knn_predict(x, y, q, k=5, temperature=0.1)
  xn, qn = x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
  for i in range(10):
    sims = xn @ qn[i]
    top = np.argsort(-sims)[:5]
    votes = np.bincount(y[top], weights=np.exp(sims[top] / 0.1), minlength=3)
    assert pred[i] == votes.argmax()
  loo = metrics.knn_leave_one_out(np.repeat(np.eye(3), 5, 0), np.repeat(np.arange(3), 5), k=3)
  assert loo == 1.0


def test_pool_until_under_10k():
  fmap = np.ones([2, 34, 34, 16], np.float32)
  flat, s = metrics.pool_until(fmap)
  assert flat.shape[1] < 10000 and s == 2 and flat.shape == (2, 17 * 17 * 16)
  assert metrics.pool_until(np.ones([2, 4, 4, 8]))[1] == 1


def test_linear_probe_separable_reaches_100():
  rng = np.random.default_rng(0)
  centers = rng.normal(0, 5, (4, 16))
  y = rng.integers(0, 4, 400)
  x = centers[y] + rng.normal(size=(400, 16))
  res = probes.linear_probe(x[:300], y[:300], x[300:], y[300:], epochs=30)
  assert res["top1"] == 100.0 and res["top5"] == 100.0
  with pytest.raises(ValueError, match="labels"):
    probes.linear_probe(x, -np.ones(400, int), x, y, epochs=1)


def test_voc_map_matches_sklearn_and_ignores_difficult():
  rng = np.random.default_rng(2)
  t = rng.integers(0, 2, (50, 3)).astype(np.float32)
  t[0, 0] = -1
  scores = rng.normal(size=(50, 3))
  m, aps = probes.voc_map(scores, t)
  keep = t[:, 0] >= 0
  assert aps[0] == pytest.approx(skm.average_precision_score(t[keep, 0], scores[keep, 0]))
  assert m == pytest.approx(100 * np.mean(aps))


def _synthetic_voc(root):
  for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  splits = {"trainval": [], "test": []}
  colors = {"cat": (220, 30, 30), "dog": (30, 30, 220)}
  for i in range(24):
    cls = "cat" if i % 2 else "dog"
    name = f"{i:06d}"
    with open(os.path.join(root, "JPEGImages", name + ".jpg"), "wb") as f:
      f.write(jpeg_bytes(i, size=(48, 64), label_color=colors[cls]))
    difficult = "1" if i == 3 else "0"
    open(os.path.join(root, "Annotations", name + ".xml"), "w").write(
        f"<annotation><object><name>{cls}</name><difficult>{difficult}</difficult></object>"
        "</annotation>")
    splits["trainval" if i < 16 else "test"].append(name)
  for split, names in splits.items():
    open(os.path.join(root, "ImageSets/Main", split + ".txt"), "w").write("\n".join(names))


def test_voc_protocol_on_synthetic_folder(tmp_path):
  _synthetic_voc(str(tmp_path))
  paths, t = voc.read_split(str(tmp_path), "trainval")
  assert len(paths) == 16 and t[3, voc.CLASSES.index("cat")] == -1
  twin = evaluator.random_twin(evaluator.ModelConfig(image_size=32, width=0.125, fc_dim=16))
  res = voc.evaluate_voc(twin, str(tmp_path), layers=("fc6",))
  assert 0 <= res["fc6"] <= 100
  crops = voc.ten_crops(np.zeros([40, 60, 3], np.uint8), 32)
  assert crops.shape == (10, 32, 32, 3)


def test_voc_fc6_8_protocol_on_synthetic_folder(tmp_path):
  import tensorflow as tf
  _synthetic_voc(str(tmp_path))
  # 'difficult' (-1) targets add nothing to the loss; the rest is BCE summed, batch-averaged.
  logits = tf.constant([[2.0, -1.0], [0.5, 3.0]])
  targets = tf.constant([[1.0, -1.0], [0.0, 1.0]])
  want = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(0.5)) + np.log1p(np.exp(-3.0))) / 2
  assert float(voc.masked_bce(logits, targets)) == pytest.approx(want, rel=1e-5)
  head = voc.build_fc6_8(12, 8, 0.5)
  assert np.allclose(head.get_layer("fc6").bias.numpy(), 0.1)
  x = np.ones([4, 12], np.float32)
  assert not np.allclose(head(x, training=True), head(x, training=True))  # dropout kept
  assert np.allclose(head(x, training=False), head(x, training=False))
  twin = evaluator.random_twin(evaluator.ModelConfig(image_size=32, width=0.125, fc_dim=16))
  res = voc.fc6_8(twin, str(tmp_path), steps=12, lr_halving_steps=5, test_crops=2)
  assert res["steps"] == 12 and 0 <= res["map"] <= 100 and len(res["aps"]) == 2


def test_twin_report_end_to_end(tiny_shards, tmp_path):
  from dc_tf.config import ExperimentConfig
  from dc_tf.models import vgg
  import tensorflow as tf
  cfg = ExperimentConfig().replace(data={"image_size": 32}, model={"image_size": 32, "width": 0.125,
                                                                   "fc_dim": 16})
  run = tmp_path / "run"
  checkpointing.write_config(str(run), cfg)
  trunk = vgg.trunk_from_config(cfg.model)
  tf.train.CheckpointManager(tf.train.Checkpoint(trunk=trunk, step=tf.Variable(7, dtype=tf.int64)),
                             str(run / "ckpt"), 1).save()
  loaded = evaluator.load(str(run))
  assert loaded.step == 7
  report = evaluator.evaluate(loaded, train_pattern=tiny_shards, test_pattern=tiny_shards,
                              output_dir=str(tmp_path / "eval"), layers=("conv4", "fc7"),
                              probe_epochs=5)
  assert set(report["results"]) == {"trained", "random"}
  assert set(report["margin_top1"]) == {"conv4", "fc7"}
  assert 0 <= report["results"]["trained"]["clusters"]["label"]["nmi"] <= 1
  for f in ("report.json", "report.md", "probe_layers.png", "clusters_trained.png"):
    assert os.path.getsize(tmp_path / "eval" / f) > 0
  assert json.load(open(tmp_path / "eval" / "report.json"))["best_layer"]["layer"] in ("conv4", "fc7")


def test_clear_errors(tmp_path, tiny_shards):
  with pytest.raises(checkpointing.CheckpointError, match="not found"):
    evaluator.load(str(tmp_path / "missing"))
  from dc_tf.data import make_shards
  from conftest import write_image_folder
  make_shards.write_shards("folder", write_image_folder(str(tmp_path / "i"), 2, 3),
                           str(tmp_path / "s"), "nolabel", 1, drop_labels=True)
  twin = evaluator.random_twin(evaluator.ModelConfig(image_size=32, width=0.125, fc_dim=16))
  with pytest.raises(ValueError, match="labels"):
    evaluator.evaluate(twin, train_pattern=str(tmp_path / "s/nolabel-*"), test_pattern=tiny_shards,
                       output_dir=str(tmp_path / "e"), layers=("fc7",), twin=False)


def test_least_frequent_tag_and_gps_cells():
  tags = np.array([b"a,b", b"a", b"", b"c,a"])
  assert list(evaluator.least_frequent_tag(tags)) == [b"b", b"a", b"", b"c"]
  cells = evaluator.gps_cells(np.array([48.8, np.nan]), np.array([2.3, 1.0]))
  assert list(cells) == [b"48:2", b""]


@pytest.mark.slow
def test_scoring_the_serving_export_reproduces_evaluate(tmp_path):
  """A client that sends the embedded data's JPEG bytes to `serving_default` and fits the
  same probe on the returned `probe_<layer>` features gets evaluate.py's figures."""
  import glob

  import tensorflow as tf

  from conftest import REPO
  from dc_tf import export
  from dc_tf.config import ModelConfig
  train, test = (os.path.join(REPO, "data", f"{s}-*.tfrecord") for s in ("train", "val"))
  cfg = ModelConfig(image_size=32, width=0.125, fc_dim=32)
  trunk = evaluator.random_twin(cfg, seed=3).fn
  layers = ("conv4", "conv13", "fc7")
  report = evaluator.evaluate(evaluator.LoadedTrunk(trunk, cfg, "weights"), train_pattern=train,
                              test_pattern=test, output_dir=str(tmp_path / "e"), layers=layers,
                              twin=False, probe_epochs=10)
  card = export.export(trunk, str(tmp_path / "x"), image_size=32)
  serve = export.load(str(tmp_path / "x")).signatures["serving_default"]

  def client_features(pattern):
    jpegs, labels, ids = [], [], []
    for f in sorted(glob.glob(pattern)):
      for r in tf.data.TFRecordDataset(f):
        ex = tf.train.Example.FromString(r.numpy()).features.feature
        jpegs.append(ex["image/encoded"].bytes_list.value[0])
        labels.append(ex["label"].int64_list.value[0])
        ids.append(ex["image/id"].int64_list.value[0])
    feats = {l: [] for l in layers}
    for start in range(0, len(jpegs), 256):
      out = serve(image_bytes=tf.constant(jpegs[start:start + 256]))
      for l in layers:
        feats[l].append(out[f"probe_{l}"].numpy())
    return {l: np.concatenate(v) for l, v in feats.items()}, np.array(labels), np.array(ids)

  (train_x, train_y, train_ids), (test_x, test_y, _) = client_features(train), client_features(test)
  for layer in layers:  # the model card tells a client each window and width
    assert card["probe_features"][f"probe_{layer}"] == {
        "layer": layer, "pool_window": report["results"]["trained"]["pool_sizes"][layer],
        "dims": train_x[layer].shape[1]}
  for layer in layers:
    mine = probes.linear_probe(train_x[layer], train_y, test_x[layer], test_y, epochs=10,
                               train_ids=train_ids)["top1"]
    theirs = report["results"]["trained"]["probe"][layer]["top1"]
    assert abs(mine - theirs) <= 0.1, (layer, mine, theirs)


# ------------------------------------------------------- the original's protocols (issue 26)
def test_original_linear_probe_protocol(tiny_shards, tmp_path):
  import tensorflow as tf
  from dc_tf.config import UserError
  from dc_tf.evaluation import linear_original as lo
  # eval_linear.py's decay lr0 / sqrt(1 + lr0 wd t); RegLog's windows on 224-px maps.
  assert lo.learning_rate(0.02, 1e-5, 0) == 0.02
  assert lo.learning_rate(0.02, 1e-5, 5e6) == pytest.approx(0.02 / np.sqrt(2.0))
  assert [lo.pool_window(l, s) for l, s in [("conv1", (224, 224, 64)), ("conv4", (112, 112, 128)),
                                            ("conv8", (28, 28, 512)), ("conv13", (14, 14, 512))]] \
      == [18, 14, 6, 3]
  assert lo.pool_window("conv1", (32, 32, 8)) == metrics.pool_stride(32, 32, 8)
  # Crops and flips drawn on the fly: the same images (no shuffle) in two epochs differ.
  cfg = lo.OriginalProbeConfig(epochs=2, batch_size=48, shuffle_buffer=1)
  (a, ya), (b, yb) = list(lo.train_dataset(tiny_shards, 32, cfg))
  assert a.shape == (48, 32, 32, 3) and np.array_equal(ya, yb)
  assert float(tf.reduce_max(tf.abs(a - b))) > 0.5
  twin = evaluator.random_twin(evaluator.ModelConfig(image_size=32, width=0.125, fc_dim=16))
  with pytest.raises(UserError, match="conv1..conv13"):
    lo.probe(twin, tiny_shards, tiny_shards, layers=("fc7",))
  cfg = lo.OriginalProbeConfig(epochs=1, batch_size=16)
  res = lo.probe(twin, tiny_shards, tiny_shards, layers=("conv1", "conv13"), cfg=cfg)
  assert res["conv1"]["steps"] == 3 and res["conv1"]["lr0"] == 0.005 and res["conv13"]["lr0"] == 0.02
  assert res["conv13"]["final_lr"] == pytest.approx(lo.learning_rate(0.02, 1e-5, 2))
  assert res["conv1"]["momentum"] == 0.9 and res["conv1"]["weight_decay"] == 1e-5
  for r in res.values():
    assert 0 <= r["top1"] <= r["top5"] <= 100 and np.isfinite(r["train_loss"])
  # Through evaluate(): the option replaces the fast probe and is recorded in the report.
  report = evaluator.evaluate(twin, train_pattern=tiny_shards, test_pattern=tiny_shards,
                              output_dir=str(tmp_path / "eval"), layers=None, twin=False,
                              probe="original", original_probe=cfg)
  assert report["probe_protocol"] == "original" and report["layers"] == list(lo.LAYERS)
  probe = report["results"]["trained"]["probe"]
  assert all(probe[l]["protocol"] == "original" and np.isfinite(probe[l]["top1"])
             for l in lo.LAYERS)


def test_voc_published_defaults_and_all_layers_fine_tuning(tmp_path):
  _synthetic_voc(str(tmp_path))
  twin = evaluator.random_twin(evaluator.ModelConfig(image_size=32, width=0.125, fc_dim=16))
  weights = [w.copy() for w in twin.fn.get_weights()]
  frozen = voc.fc6_8(twin, str(tmp_path), steps=3, test_crops=1)
  assert (frozen["weight_decay"], frozen["lr_halving_steps"]) == (1e-5, 20_000)
  assert frozen["protocol"] == "fc6_8" and frozen["trained_variables"] == 6
  assert frozen["conv_variables_moved"] == 0
  full = voc.fc6_8(twin, str(tmp_path), steps=3, test_crops=1, all_layers=True)
  assert (full["weight_decay"], full["lr_halving_steps"]) == (1e-4, 10_000)
  # conv1..conv13 (kernel, bias, BN gamma, beta) are trained, on a copy of the trunk.
  assert full["trained_variables"] == 13 * 4 + 6 and full["conv_variables_moved"] >= 13 * 3
  assert np.isfinite(full["map"]) and 0 <= full["map"] <= 100
  assert all(np.array_equal(a, b) for a, b in zip(weights, twin.fn.get_weights()))  # a copy
