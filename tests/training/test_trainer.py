"""The training loop end to end on tiny shards: reassignment, resume, modes, faults."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import two_cpu_strategy
from runs import assert_same_final_weights, read_log
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
  """One step from the same weights, float32 vs mixed_bfloat16, compared on what the step
  computes (features, and updates w - w0 = -grad at lr 1, no momentum or decay), never on the
  weights themselves (they differ by lr x grad, a small part of w).

  Tolerances come from bfloat16's precision: 8 significant bits, so one rounding moves a
  value by at most u = 2^-8 relative (the spacing; round-to-nearest halves it, u is the
  conservative figure). A layer of the bf16 trunk rounds its input, its weights and its
  output: 3 roundings, so the endpoint after i layers is within 3 i u of float32 to first
  order (errors adding, each layer norm-preserving); the features after 15 layers within
  45 u = 0.18. A head's gradient h^T (p - y) / n takes the features twice (h and, through the
  logits, p): within 2 x 45 u.
  The trunk's own gradients admit no such bound: training-mode batch norm at init amplifies
  a perturbation ~1.3x a layer (measured: the features' error grows from 1.0 u at conv1 to
  17 u at conv13, against 1.9 u at conv13 in inference mode; Yang et al., ICLR 2019), and
  in a float32 run of this trunk rounding only its weights to bfloat16 already turns some
  conv gradients to cos 0.57 (norm ratio 0.75-1.27; V-only loss, 3 seeds). Here the bf16
  updates are at cos >= 0.70, norm ratio 0.71-1.44. So each trunk update is held to cos > 0.3
  and a norm within a factor 2 of float32's, which a trunk that stops training (norm 0) or
  runs batch norm on its moving statistics (cos ~0, ratio down to 0.02) does not meet."""
  from dc_tf.data import preprocess
  cfg = tiny_config(tiny_shards, tmp_path / "f32", lr=1.0, momentum=0.0, weight_decay=0.0)
  cfg = cfg.replace(model={"dropout": 0.0})
  f32 = trainer.Trainer(cfg, tf.distribute.get_strategy())
  mixed = trainer.Trainer(cfg.replace(train={"mixed_precision": True,
                                             "model_dir": str(tmp_path / "bf16")}),
                          tf.distribute.get_strategy())
  assert keras.config.dtype_policy().name == "float32"  # not leaked to the process
  assert {v.dtype for v in mixed.variables} == {"float32"}
  for a, b in zip(f32.variables, mixed.variables):
    b.assign(a)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(0, 255, size=(16, 32, 32, 3)).astype(np.float32),
           # every head gets examples, so every piece has a gradient to compare
           "super_class": rng.permutation(np.arange(16) % cfg.num_super_classes).astype(np.int32),
           "sub_class": rng.integers(0, cfg.num_sub_classes, 16).astype(np.int32),
           "skipped": np.zeros(16, np.int64)}
  u = 2.0 ** -8
  images = preprocess.normalize(batch["image"])
  ref, out = f32.trunk(images, training=True), mixed.trunk(images, training=True)
  assert out["conv4"].dtype == tf.bfloat16 and out["fc7"].dtype == tf.float32
  depth = {f"conv{i}": i for i in range(1, 14)} | {"fc6": 14, "fc7": 15}
  for name, i in depth.items():   # the features the step computes, layer by layer
    a, b = ref[name].numpy(), tf.cast(out[name], tf.float32).numpy()
    assert np.linalg.norm(b - a) <= 3 * i * u * np.linalg.norm(a), name

  def pieces(run):
    return [v for _, k, b in sorted(run.sub_heads.by_name().values(), key=lambda x: x[0])
            for v in (k, b)]
  for a, b in zip(pieces(f32), pieces(mixed)):
    np.testing.assert_array_equal(a.numpy(), b.numpy())   # seeded: the same heads
  runs = {}
  for name, run in (("f32", f32), ("bf16", mixed)):
    held = run.variables + pieces(run)
    before = [v.numpy() for v in held]
    run._train_loop(iter(tf.data.Dataset.from_tensors(batch).repeat()), tf.constant(1))
    runs[name] = [(getattr(v, "path", v.name), v.numpy() - w) for v, w in zip(held, before)]
  heads = len(f32.trunk.trainable_variables)
  checked = 0
  for i, ((name, a), (_, b)) in enumerate(zip(runs["f32"], runs["bf16"])):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if "conv" in name and "bias" in name:
      continue   # zero gradient in exact arithmetic (batch norm follows): noise vs noise
    assert np.linalg.norm(a) > 0, name
    if i >= heads:   # V and the sub-heads: float32 variables fed bf16 features
      assert np.linalg.norm(b - a) <= 2 * 45 * u * np.linalg.norm(a), name
    else:
      cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
      ratio = np.linalg.norm(b) / np.linalg.norm(a)
      assert cos > 0.3 and 0.5 < ratio < 2, (name, cos, ratio)
    checked += 1
  assert checked == 13 * 3 + 2 * 2 + 2 + 2 * cfg.num_super_classes, checked


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_result(kill_9_runs, clean_run):
  """kill -9 at a checkpoint inside epoch 0, then the same command: the uninterrupted run's
  trunk, V and sub-heads. The run is conftest's kill_9_runs, interrupted twice more on its way
  (tests/training/test_reliability.py: kill -9 in a reassignment, a --max_minutes stop);
  that train.py exports after a resume: test_reliability.py's SIGTERM test."""
  model_dir, killed_at = kill_9_runs["model_dir"], kill_9_runs["killed_at"]
  assert 0 < killed_at < 36
  after = read_log(model_dir)[len(kill_9_runs["log_after_first_kill"]):]
  assert after[-1]["step"] == 36
  # Clustering of the current period is not redone after the restart.
  reassigned = [r["epoch"] for r in after if r["event"] == "reassign"]
  assert 0 not in reassigned
  # The same command, never interrupted, ends with the same trunk, V and sub-heads.
  assert_same_final_weights(model_dir, clean_run)


def test_a_reassignment_reinitializes_the_heads_from_the_documented_seed(tiny_shards, tmp_path):
  """After the reassignment at epoch e the sub-heads (and V when m > 1) are drawn afresh from
  seed train.seed + 7919 (e + 1), with zero biases and zero momentum, and the trunk's momentum
  is kept; with m = 1 V stays as it was (its classes, the rotations, are unchanged); with
  --reinit_heads=false everything stays."""
  from dc_tf import placement
  from dc_tf.models import heads

  def trained_looking(cfg):
    """A run whose heads and momentum are all non-zero, as after some training."""
    run = trainer.Trainer(cfg, tf.distribute.get_strategy())
    for v in run.super_head.weights + [v for _, k, b in run.sub_heads.by_name().values()
                                       for v in (k, b)]:
      v.assign(tf.fill(v.shape, 0.5))
    for slot in run.optimizer.slots + list(run.local_optimizer.slots.values()):
      slot.assign(tf.ones_like(slot))
    return run

  def state(run):
    return {"V": [v.numpy() for v in run.super_head.weights],
            "heads": {n: (k.numpy(), b.numpy(), run.local_optimizer.slot(k).numpy(),
                          run.local_optimizer.slot(b).numpy())
                      for n, (_, k, b) in run.sub_heads.by_name().items()},
            "slots": [s.numpy() for s in run.optimizer.slots]}

  base = tiny_config(tiny_shards, tmp_path / "m2", epochs=1, knn_monitor=False)
  for m, reinit in ((2, True), (1, True), (2, False)):
    cfg = base.replace(clustering={"m": m}, train={"reinit_heads": reinit,
                                                   "model_dir": str(tmp_path / f"{m}{reinit}")})
    run = trained_looking(cfg)
    before = state(run)
    run.reassign(3)
    after = state(run)
    n_trunk = len(run.trunk.trainable_variables)   # optimizer slots: trunk's, then V's
    for a, b in zip(after["slots"][:n_trunk], before["slots"][:n_trunk]):
      np.testing.assert_array_equal(a, b)          # the trunk's momentum is kept
    if not reinit:
      for a, b in zip(after["V"] + after["slots"], before["V"] + before["slots"]):
        np.testing.assert_array_equal(a, b)
      for name, fields in before["heads"].items():
        for a, b in zip(after["heads"][name], fields):
          np.testing.assert_array_equal(a, b)
      continue
    seed = cfg.train.seed + 7919 * (3 + 1)
    fresh = heads.SubHeads(run.placement, cfg.model.fc_units,
                           placement.local_replica_ids(run.strategy), [None], seed=seed)
    assert fresh.by_name().keys() == after["heads"].keys()
    for name, (_, kernel, _) in fresh.by_name().items():
      k, b, k_momentum, b_momentum = after["heads"][name]
      np.testing.assert_array_equal(k, kernel.numpy())
      assert np.abs(k - before["heads"][name][0]).max() > 0, name
      assert not (b.any() or k_momentum.any() or b_momentum.any()), name
    if m > 1:
      v = heads.SuperHead(cfg.num_super_classes)
      v.build([None, cfg.model.fc_units])
      v.reinitialize(seed)
      np.testing.assert_array_equal(after["V"][0], v.kernel.numpy())
      assert not after["V"][1].any() and not any(s.any() for s in after["slots"][n_trunk:])
    else:
      for a, b in zip(after["V"] + after["slots"], before["V"] + before["slots"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("local_replicas", [2, 4])
def test_local_replicas_run_every_step_and_count_each_bad_record_once(bad_shards, tmp_path,
                                                                     local_replicas):
  """Trainer.fit through distribute_datasets_from_function with G replicas in one worker: each
  takes one batch per step, so the worker's dataset holds G batches per step (it used to
  hold one per step, and the epoch stopped half-way with OutOfRangeError). The shards hold
  5 undecodable records, read before the rest: the epoch counts 5, not 5 per local replica
  (each of the G batches of a step carries the worker's running count)."""
  from conftest import BAD_RECORDS, cpu_strategy
  cfg = tiny_config(bad_shards, tmp_path / f"g{local_replicas}", mode="rotnet", epochs=1,
                    knn_monitor=False, batch_per_replica=16 // local_replicas)
  history = trainer.Trainer(cfg, cpu_strategy(local_replicas)).fit()
  assert history[-1]["step"] == 48 * 4 // 16
  assert history[-1]["skipped_records"] == sum(BAD_RECORDS.values())


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
  """One rotation-only epoch, then clustering every 2 epochs: the uninterrupted run trains
  epoch 0 on rotations alone and clusters at epoch 1 only. 4 undecodable records: the pool is
  52 records before the first clustering and 48 images after it. A run stopped after the
  clustering resumes on the epochs and learning rates of the uninterrupted run (steps per
  epoch and pool size come from the checkpoint)."""
  from conftest import copy_shards, insert_records
  pattern = copy_shards(tiny_shards, tmp_path / "s")
  insert_records(str(tmp_path / "s" / "train-00001-of-00004.tfrecord"),
                 [example(data=b"not an image", image_id=10**6 + i).SerializeToString()
                  for i in range(4)])
  cfg = tiny_config(pattern, tmp_path / "clean", rotnet_warmup_epochs=1,
                    epochs=3, knn_monitor=False, schedule="cosine").replace(
                        clustering={"reassign_every": 2})
  clean = trainer.Trainer(cfg, tf.distribute.get_strategy()).fit()
  assert [(r["event"], r["epoch"]) for r in clean] == [
      ("epoch", 0), ("reassign", 1), ("epoch", 1), ("epoch", 2)]
  assert clean[0]["sub_loss"] == 0 and clean[0]["super_accuracy"] > 0   # rotations only
  assert clean[2]["sub_loss"] > 0
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
