"""The training loop end to end on tiny shards: reassignment, resume, modes, faults."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, two_cpu_strategy
from dc_tf.config import ConfigError, ExperimentConfig
from dc_tf.training import checkpointing, epoch, trainer


def tiny_config(data, model_dir, **train):
  cfg = ExperimentConfig()
  t = dict(model_dir=str(model_dir), epochs=2, batch_per_replica=16, lr=0.02,
           steps_per_loop=2, checkpoint_every=0, knn_monitor=True)
  t.update(train)
  return cfg.replace(
      data={"data_pattern": data, "eval_pattern": data, "image_size": 32, "shuffle_buffer": 64},
      model={"image_size": 32, "width": 0.125, "fc_dim": 32},
      clustering={"m": 2, "k": 3, "reassign_every": 1, "pca_dim": 8, "kmeans_iters": 3},
      train=t).validate()


def read_log(model_dir):
  with open(os.path.join(model_dir, "log.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_config_validation_names_the_flag():
  with pytest.raises(ConfigError, match="--mode"):
    ExperimentConfig().replace(train={"mode": "simclr"}).validate()
  with pytest.raises(ConfigError, match="--image_size"):
    ExperimentConfig().replace(data={"image_size": 16}, model={"image_size": 16}).validate()
  cfg = ExperimentConfig().replace(train={"mode": "rotnet"})
  assert (cfg.num_super_classes, cfg.num_sub_classes) == (4, 0)
  cfg = ExperimentConfig().replace(train={"mode": "deepcluster"}, clustering={"k": 10})
  assert (cfg.num_super_classes, cfg.num_sub_classes, cfg.num_rotations) == (1, 10, 1)
  assert ExperimentConfig().replace(clustering={"m": 4}).num_super_classes == 16


def test_deepercluster_end_to_end_and_resume(tiny_shards, tmp_path):
  cfg = tiny_config(tiny_shards, tmp_path / "run")
  run = trainer.Trainer(cfg, tf.distribute.get_strategy())
  history = run.fit()
  events = [r["event"] for r in history]
  assert events == ["reassign", "epoch", "reassign", "epoch"]
  assert 0 <= history[2]["nmi_previous"] <= 1 and "knn_top1" in history[0]
  assert history[-1]["step"] == 2 * (48 // 4)       # 48 images, 4 per step (16 / 4 rotations)
  assert np.isfinite(history[-1]["loss"]) and history[-1]["super_accuracy"] > 0
  ids = run.table_ids.numpy()
  assert len(ids) == 48 and (np.diff(ids) > 0).all()
  assert os.path.isdir(tmp_path / "run" / "tb")
  weights = [w.numpy() for w in run.trunk.weights]
  # A second trainer resumes at the end: no reassignment, no step.
  again = trainer.Trainer(cfg, tf.distribute.get_strategy())
  assert again.fit() == []
  assert int(again.step.numpy()) == history[-1]["step"]
  np.testing.assert_array_equal(again.table_ids.numpy(), ids)
  for a, b in zip(weights, again.trunk.weights):
    np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("mode", ["rotnet", "deepcluster"])
def test_other_modes_train(tiny_shards, tmp_path, mode):
  cfg = tiny_config(tiny_shards, tmp_path / mode, mode=mode, epochs=1)
  history = trainer.Trainer(cfg, tf.distribute.get_strategy()).fit()
  assert history[-1]["event"] == "epoch" and np.isfinite(history[-1]["loss"])
  if mode == "rotnet":
    assert history[-1]["sub_loss"] == 0 and history[-1]["super_accuracy"] > 0
  else:
    assert history[0]["event"] == "reassign" and history[-1]["super_loss"] == 0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_shards, tmp_path):
  cfg = tiny_config(tiny_shards, tmp_path / "nan", lr=1e30, epochs=1)
  run = trainer.Trainer(cfg, tf.distribute.get_strategy())
  with pytest.raises(epoch.TrainingDiverged, match="last good checkpoint"):
    run.fit()
  latest = checkpointing.latest_checkpoint(str(tmp_path / "nan"))
  assert latest.endswith("ckpt-0")   # saved after the initial reassignment, not after NaN


def test_two_replicas_match_one_for_the_same_global_batch(tiny_shards, tmp_path):
  cfg = tiny_config(tiny_shards, tmp_path / "r", mode="rotnet", weight_decay=1e-3)
  cfg = cfg.replace(model={"dropout": 0.0})
  one = trainer.Trainer(cfg.replace(train={"batch_per_replica": 16}), tf.distribute.get_strategy())
  two = trainer.Trainer(cfg.replace(train={"batch_per_replica": 8, "model_dir": str(tmp_path / "r2")}),
                        two_cpu_strategy())
  for a, b in zip(one.trunk.weights + one.super_head.weights, two.trunk.weights + two.super_head.weights):
    b.assign(a)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           "super_class": rng.integers(0, 4, 16).astype(np.int32),
           "sub_class": np.full(16, -1, np.int32), "skipped": np.zeros(16, np.int64)}
  ds = tf.data.Dataset.from_tensors(batch).repeat()
  for run in (one, run2 := two):
    it = iter(run.strategy.experimental_distribute_dataset(ds))
    run._train_loop(it, tf.constant(2))
  for a, b in zip(one.variables, run2.variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("replicas", [2, 4])
def test_jit_compile_with_several_replicas_is_refused_in_one_line(tmp_path, replicas):
  """Synchronised batch norm all-reduces inside the compiled trunk: tf.distribute cannot
  nest that (a RuntimeError deep in BatchNormalization.call at the first step before)."""
  from conftest import cpu_strategy
  from multiworker_job import layout_config
  from dc_tf.config import UserError
  cfg = layout_config("deepercluster", str(tmp_path), replicas).replace(
      train={"jit_compile": True})
  with pytest.raises(UserError, match=f"one replica only; this run has {replicas}"):
    trainer.Trainer(cfg, cpu_strategy(replicas))


def test_jit_compile_trains_the_same_weights(tiny_shards, tmp_path):
  """--jit_compile XLA-compiles forward and backward; the weights after two steps match the
  plain graph's (hierarchical loss with sub-heads, batch norm, weight decay)."""
  cfg = tiny_config(tiny_shards, tmp_path / "plain", weight_decay=1e-3).replace(
      model={"dropout": 0.0})
  plain = trainer.Trainer(cfg, tf.distribute.get_strategy())
  xla = trainer.Trainer(cfg.replace(train={"jit_compile": True,
                                           "model_dir": str(tmp_path / "xla")}),
                        tf.distribute.get_strategy())
  for a, b in zip(plain.trunk.weights + plain.super_head.weights, xla.trunk.weights + xla.super_head.weights):
    b.assign(a)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           "super_class": rng.integers(0, cfg.num_super_classes, 16).astype(np.int32),
           "sub_class": rng.integers(0, cfg.num_sub_classes, 16).astype(np.int32),
           "skipped": np.zeros(16, np.int64)}
  ds = tf.data.Dataset.from_tensors(batch).repeat()
  before = [v.numpy() for v in plain.variables]
  losses = [run._train_loop(iter(ds), tf.constant(2))["loss"].numpy() for run in (plain, xla)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
  for a, b in zip(plain.variables, xla.variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=2e-5)
  # The steps moved the weights, so the comparison is not vacuous.
  assert sum(not np.allclose(v.numpy(), w) for v, w in zip(plain.variables, before)) > 10


def test_mixed_precision_trunk_in_bfloat16_tracks_float32(tiny_shards, tmp_path):
  cfg = tiny_config(tiny_shards, tmp_path / "f32").replace(model={"dropout": 0.0})
  f32 = trainer.Trainer(cfg, tf.distribute.get_strategy())
  mixed = trainer.Trainer(cfg.replace(train={"mixed_precision": True,
                                             "model_dir": str(tmp_path / "bf16")}),
                          tf.distribute.get_strategy())
  assert keras.config.dtype_policy().name == "float32"  # not leaked to the process
  assert {v.dtype for v in mixed.variables} == {"float32"}
  for a, b in zip(f32.trunk.weights + f32.super_head.weights, mixed.trunk.weights + mixed.super_head.weights):
    b.assign(a)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(0, 255, size=(16, 32, 32, 3)).astype(np.float32),
           "super_class": rng.integers(0, cfg.num_super_classes, 16).astype(np.int32),
           "sub_class": rng.integers(0, cfg.num_sub_classes, 16).astype(np.int32),
           "skipped": np.zeros(16, np.int64)}
  out = mixed.trunk(batch["image"], training=False)
  assert out["conv4"].dtype == tf.bfloat16 and out["fc7"].dtype == tf.float32
  ds = tf.data.Dataset.from_tensors(batch).repeat()
  losses = [run._train_loop(iter(ds), tf.constant(3))["loss"].numpy() for run in (f32, mixed)]
  assert np.isfinite(losses[1])
  np.testing.assert_allclose(losses[1], losses[0], rtol=0.05)


def _train_cmd(data, model_dir, *extra):
  return [sys.executable, os.path.join(REPO, "train.py"), f"--data_pattern={data}",
          f"--eval_pattern={data}", f"--model_dir={model_dir}", "--image_size=32", "--width=0.125",
          "--fc_dim=32", "--m=2", "--k=3", "--reassign_every=2", "--pca_dim=8",
          "--kmeans_iters=3", "--batch_per_replica=16", "--lr=0.02", "--steps_per_loop=1",
          "--checkpoint_every=2", "--knn_monitor=false", "--seed=5",
          # pinned, so that changes to the demo preset (applied first) do not change the test
          "--rotnet_warmup_epochs=0", "--dropout=0.5", "--crop_scale_min=0.08", "--epoch_size=0",
          *extra]


def final_weights(model_dir):
  """Trunk, V and every sub-head piece of a run's last checkpoint."""
  from dc_tf.training.checkpointing import SUBHEADS
  ckpt = tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt"))
  step = ckpt.rsplit("-", 1)[1]
  out = {}
  for prefix in [ckpt] + [p[:-len(".index")] for p in tf.io.gfile.glob(
      os.path.join(model_dir, SUBHEADS, "*", f"ckpt-{step}.index"))]:
    reader = tf.train.load_checkpoint(prefix)
    out.update({n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix)
                if n.startswith(("trunk/", "super_head/", "pieces/"))})
  return out


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_result(tiny_shards, tmp_path):
  model_dir = str(tmp_path / "killed")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  cmd = _train_cmd(tiny_shards, model_dir, "--epochs=3", "--dropout=0")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  ckpt_dir = os.path.join(model_dir, "ckpt")
  while time.time() < deadline:   # wait for a mid-epoch checkpoint (steps 2..10 of 12)
    latest = tf.train.latest_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if latest and 4 <= int(latest.rsplit("-", 1)[1]) < 12:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = int(tf.train.latest_checkpoint(ckpt_dir).rsplit("-", 1)[1])
  assert 0 < killed_at < 36
  before = read_log(model_dir)
  subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 timeout=400)
  after = read_log(model_dir)[len(before):]
  assert after[-1]["step"] == 36
  # Clustering of the current period is not redone after the restart.
  reassigned = [r["epoch"] for r in after if r["event"] == "reassign"]
  assert 0 not in reassigned
  assert os.path.isfile(os.path.join(model_dir, "export", "model_card.json"))
  # The same command, never interrupted, ends with the same trunk, V and sub-heads.
  clean_dir = str(tmp_path / "clean")
  subprocess.run(_train_cmd(tiny_shards, clean_dir, "--epochs=3", "--dropout=0"), env=env,
                 check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=400)
  resumed, clean = final_weights(model_dir), final_weights(clean_dir)
  assert resumed.keys() == clean.keys() and any(n.startswith("pieces/") for n in clean)
  for name in clean:
    np.testing.assert_allclose(resumed[name], clean[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_rotation_warmup_then_clustering(tiny_shards, tmp_path):
  cfg = tiny_config(tiny_shards, tmp_path / "warm", rotnet_warmup_epochs=1, epochs=3,
                    knn_monitor=False).replace(clustering={"reassign_every": 2})
  history = trainer.Trainer(cfg, tf.distribute.get_strategy()).fit()
  assert [(r["event"], r["epoch"]) for r in history] == [
      ("epoch", 0), ("reassign", 1), ("epoch", 1), ("epoch", 2)]
  assert history[0]["sub_loss"] == 0 and history[0]["super_accuracy"] > 0
  assert history[2]["sub_loss"] > 0


@pytest.mark.parametrize("local_replicas", [2, 4])
def test_local_replicas_run_every_step_of_the_epoch(tiny_shards, tmp_path, local_replicas):
  """Trainer.fit through distribute_datasets_from_function with G replicas in one worker: each
  takes one batch per step, so the worker's dataset holds G batches per step (it used to
  hold one per step, and the epoch stopped half-way with OutOfRangeError)."""
  from conftest import cpu_strategy
  cfg = tiny_config(tiny_shards, tmp_path / f"g{local_replicas}", mode="rotnet", epochs=1,
                    knn_monitor=False, batch_per_replica=16 // local_replicas)
  history = trainer.Trainer(cfg, cpu_strategy(local_replicas)).fit()
  assert history[-1]["step"] == 48 * 4 // 16


def test_a_workers_epoch_draws_the_plans_images(tiny_shards):
  from dc_tf.data import reader, sampler
  ids = reader.read_image_ids(tiny_shards)
  labels = np.arange(len(ids)) % 5
  mult = sampler.epoch_multiplicity(labels, len(ids), seed=0, epoch=1)
  plan = reader.EpochPlan(ids, mult, np.zeros(len(ids), np.int32), labels.astype(np.int32))
  g, b = 2, 8                               # 2 local replicas, 16 examples = 4 images per step
  steps = len(ids) * 4 // (g * b)
  ds = reader.build_train_dataset(tiny_shards, image_size=32, batch_size=b, steps=steps * g,
                                  plan=plan, num_rotations=4, all_rotations=True, seed=0,
                                  epoch=1)
  drawn = np.concatenate([batch["image_id"].numpy() for batch in ds])
  assert len(drawn) == steps * g * b
  counts = {i: c // 4 for i, c in zip(*np.unique(drawn, return_counts=True))}
  assert counts == {i: m for i, m in zip(ids, mult) if m}


def test_resume_after_the_warmup_with_bad_records_keeps_epoch_and_lr(tiny_shards, tmp_path,
                                                                     example, monkeypatch):
  """4 undecodable records: the pool is 52 records before the first clustering and 48
  images after it. A run stopped after the clustering resumes on the epochs and learning
  rates of the uninterrupted run (steps per epoch and pool size come from the checkpoint)."""
  from conftest import copy_shards, insert_records
  pattern = copy_shards(tiny_shards, tmp_path / "s")
  insert_records(str(tmp_path / "s" / "train-00001-of-00004.tfrecord"),
                 [example(data=b"not an image", image_id=10**6 + i).SerializeToString()
                  for i in range(4)])
  cfg = tiny_config(pattern, tmp_path / "clean", rotnet_warmup_epochs=1,
                    epochs=3, knn_monitor=False, schedule="cosine")
  clean = trainer.Trainer(cfg, tf.distribute.get_strategy()).fit()
  stopped_cfg = cfg.replace(train={"model_dir": str(tmp_path / "stopped")})
  run = trainer.Trainer(stopped_cfg, tf.distribute.get_strategy())
  real = trainer.Trainer.should_stop
  monkeypatch.setattr(trainer.Trainer, "should_stop", lambda self: real(self) or (
      int(self.assignment_epoch.numpy()) >= 1 and int(self.step.numpy()) >= 15))
  run.fit()
  monkeypatch.setattr(trainer.Trainer, "should_stop", real)
  resumed = trainer.Trainer(stopped_cfg, tf.distribute.get_strategy()).fit()
  epochs = lambda h: [(r["epoch"], r["step"], r["lr"], r["lr_last"])  # noqa: E731
                      for r in h if r["event"] == "epoch"]
  assert epochs(clean)[0][1] == 13                 # 52 records // 4 images per step
  assert epochs(resumed) == epochs(clean)[1:]
  # lr is the epoch's first step's rate and lr_last its last step's, on the schedule's table
  from dc_tf.training import losses
  t = cfg.train
  lrs = losses.learning_rates(39, t.lr, int(t.warmup_epochs * 13), t.schedule)
  for epoch, step, lr, lr_last in epochs(clean):
    assert lr == pytest.approx(float(lrs[epoch * 13])) and lr_last == pytest.approx(
        float(lrs[step - 1])) and lr_last != pytest.approx(lr)
