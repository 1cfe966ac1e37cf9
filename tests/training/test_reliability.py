"""Faults: SIGTERM, changed global batch, collapse alarms, export scans."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from runs import assert_same_final_weights, iterations, read_log, table, train_cmd
from test_trainer import tiny_config
from dc_tf import export
from dc_tf.clustering import extract
from dc_tf.training import checkpointing, trainer


@pytest.mark.slow
def test_sigterm_saves_and_resume_loses_no_step(sigterm_run, clean_run):
  """SIGTERM once a step of epoch 1 is done (conftest's sigterm_run, without periodic
  checkpoints): a save at the step the run stopped, then the same command ends with the
  uninterrupted run's weights, so no step was lost, repeated or fed other data."""
  assert sigterm_run["returncode"] == 0, sigterm_run["stderr"][-2000:]
  assert sigterm_run["stop_seconds"] < 60
  stopped_at = sigterm_run["stopped_at"]
  assert 12 < stopped_at < 36                       # inside epoch 1 or 2: the stop's own save
  assert sigterm_run["log_at_stop"][-1]["step"] == stopped_at
  resume, model_dir = sigterm_run["resume"], sigterm_run["model_dir"]
  assert resume.returncode == 0, resume.stderr[-2000:]
  ckpt = os.path.join(model_dir, "ckpt")
  assert iterations(ckpt) == 36 and read_log(model_dir)[-1]["step"] == 36
  assert os.path.isfile(os.path.join(model_dir, "export", "model_card.json"))   # then exported
  assert_same_final_weights(model_dir, clean_run)


@pytest.mark.slow
def test_max_minutes_stops_saves_and_the_same_call_resumes_to_the_uninterrupted_weights(
    kill_9_runs, clean_run):
  """Trainer.fit(max_seconds) (train.py's --max_minutes), the last part of conftest's
  kill_9_runs: its stop agreement's clock passes the deadline once step 29 is done (inside
  epoch 2, between two periodic checkpoints), so the run saves there and stops; the same call
  again resumes to the total, and the run ends with the uninterrupted run's weights."""
  stopped = kill_9_runs["max_minutes"]
  assert stopped["out_of_time"] and not stopped["preempted"]
  assert stopped["step"] == 29 == stopped["history"][-1]["step"] == stopped["saved_at"]
  assert [(r["event"], r["epoch"]) for r in stopped["history"]] == [("reassign", 2), ("epoch", 2)]
  assert not stopped["out_of_time_again"]
  model_dir = kill_9_runs["model_dir"]
  log = read_log(model_dir)
  assert [(r["event"], r["epoch"], r["step"]) for r in log[-2:]] == [
      ("epoch", 2, 29), ("epoch", 2, 36)]                  # resumed: no reassignment redone
  assert iterations(os.path.join(model_dir, "ckpt")) == 36
  assert_same_final_weights(model_dir, clean_run)


def test_changed_global_batch_is_refused(clean_run, tmp_path):
  """A copy of the uninterrupted run (global batch 16) resumed at batch 8."""
  import shutil
  model_dir = shutil.copytree(clean_run, tmp_path / "gb")
  cfg = checkpointing.read_config(str(model_dir)).replace(train={"model_dir": str(model_dir)})
  other = cfg.replace(train={"batch_per_replica": 8})
  from dc_tf.training.checkpointing import CheckpointError
  with pytest.raises(CheckpointError, match="global batch of 16"):
    trainer.Trainer(other, tf.distribute.get_strategy()).fit()


def test_collapse_alarm(tiny_shards, tmp_path, monkeypatch, caplog):
  real = extract.extract_per_replica

  def collapsing(*args, **kwargs):
    (out,) = real(*args, **kwargs)   # one replica
    rng = np.random.default_rng(0)
    f = np.tile(rng.normal(size=(1, out["fc7"].shape[1])), (len(out["fc7"]), 1))
    f[: len(f) // 8] += rng.normal(size=(len(f) // 8, f.shape[1])) * 5  # 1/8 spread, rest one point
    out["fc7"] = f.astype(np.float32)  # 7/8 of the images share one feature vector
    return [out]
  monkeypatch.setattr(extract, "extract_per_replica", collapsing)
  cfg = tiny_config(tiny_shards, tmp_path / "col", epochs=1, knn_monitor=False)
  run = trainer.Trainer(cfg, tf.distribute.get_strategy())
  with caplog.at_level("WARNING"):
    stats = run.reassign(0)
  assert stats.get("collapse_alarm") and "collapse alarm" in caplog.text


def test_serving_export_has_no_file_io_and_reloads_in_a_fresh_process(tiny_export, tmp_path):
  assert export.scan_ops(os.path.join(tiny_export, "serving")) == {}
  x = np.random.default_rng(0).uniform(0, 255, (2, 40, 40, 3)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  want = export.load(tiny_export).signatures["features_from_pixels"](images=x)["fc7"].numpy()
  code = ("import numpy as np, tensorflow as tf, sys; from dc_tf import export; "
          f"m = export.load({tiny_export!r}); x = np.load({str(tmp_path / 'x.npy')!r}); "
          "np.save(sys.argv[1], m.signatures['features_from_pixels'](images=x)['fc7'].numpy())")
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "y.npy")], check=True, cwd=REPO,
                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=120)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=1e-6)
  # The scan does find file I/O where there is some.
  class Reader(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def read(self, path):
      return tf.io.read_file(path)
  tf.saved_model.save(Reader(), str(tmp_path / "bad"))
  assert export.scan_ops(str(tmp_path / "bad")).get("ReadFile", 0) >= 1


def test_pool_without_a_decodable_image_fails_instead_of_hanging(tmp_path, example):
  from conftest import write_records
  from dc_tf.data import reader
  path = write_records(str(tmp_path / "bad-00000-of-00001.tfrecord"),
                       [example(data=b"", image_id=1), example(data=b"text", image_id=2)])
  cfg = tiny_config(path, tmp_path / "bad", mode="rotnet", epochs=1, knn_monitor=False)
  with pytest.raises(reader.DataError, match="no decodable image"):
    trainer.Trainer(cfg, tf.distribute.get_strategy()).fit()


@pytest.mark.slow
def test_kill_9_during_reassignment_then_resume_gives_the_clean_assignments(kill_9_runs,
                                                                           clean_run):
  """kill -9 as soon as the reassignment at epoch 2 has begun (the second kill of conftest's
  kill_9_runs; the first is tests/training/test_trainer.py's): the checkpoint before it is
  valid, and the resumed run redoes the reassignment into the uninterrupted run's table."""
  assert "reassignment at epoch 2" in kill_9_runs["second_stderr"]
  log = kill_9_runs["log_after_second_kill"]
  assert ("reassign", 2) not in [(r["event"], r["epoch"]) for r in log]   # killed inside it
  assert kill_9_runs["step_after_second_kill"] == 24                       # valid, loads
  assert all(kill_9_runs["tensors_after_second_kill"].values())
  model_dir = kill_9_runs["model_dir"]
  assert read_log(model_dir)[-1]["step"] == read_log(clean_run)[-1]["step"] == 36
  for got, want in zip(table(model_dir), table(clean_run)):
    np.testing.assert_array_equal(got, want)                              # same assignments


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_leaves_a_valid_checkpoint(tiny_shards, tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  model_dir = str(tmp_path / "save")
  ckpt_dir = os.path.join(model_dir, "ckpt")
  # fc 4096: ~17M parameters plus momentum, so that a save takes long enough to be hit.
  cmd = train_cmd(tiny_shards, model_dir, "--mode=rotnet", "--epochs=1", "--fc_dim=4096",
                  "--checkpoint_every=3")

  def saving_after_a_first_checkpoint():
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    return any("_temp" in n for n in names) and tf.train.latest_checkpoint(ckpt_dir) is not None
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not saving_after_a_first_checkpoint():
    time.sleep(0.005)
  proc.kill()
  proc.wait()
  assert any("_temp" in n for n in os.listdir(ckpt_dir))                  # killed mid-save
  latest = tf.train.latest_checkpoint(ckpt_dir)
  reader = tf.train.load_checkpoint(latest)
  for name, _ in tf.train.list_variables(latest):                         # every tensor reads
    reader.get_tensor(name)
  # The command's own config (train.py writes it first), resumed here: no start-up, no export.
  trainer.Trainer(checkpointing.read_config(model_dir), tf.distribute.get_strategy()).fit()
  assert iterations(ckpt_dir) == 12 and read_log(model_dir)[-1]["step"] == 12


def test_resume_on_another_replica_count_recuts_the_sub_heads(tiny_shards, tmp_path):
  """Written by 1 replica (one head of k=5 columns, DeepCluster mode), resumed on 2: each
  replica takes its column shard of the saved head, momentum included."""
  from conftest import cpu_strategy
  cfg = tiny_config(tiny_shards, tmp_path / "rc", mode="deepcluster", epochs=1,
                    knn_monitor=False).replace(clustering={"k": 5})
  one = trainer.Trainer(cfg, tf.distribute.get_strategy())
  one.fit()
  saved = {p.name: (k.numpy(), one.local_optimizer.slot(k).numpy())
           for p, k, _ in one.sub_heads.of_replica(0)}
  assert list(saved) == ["s0_c0-5"] and np.abs(saved["s0_c0-5"][1]).max() > 0
  two = trainer.Trainer(cfg.replace(train={"batch_per_replica": 8}), cpu_strategy(2))
  assert two.restore()
  pieces = [p for r in (0, 1) for p in two.sub_heads.of_replica(r)]
  assert [p.name for p, _, _ in pieces] == ["s0_c0-2", "s0_c2-5"]
  kernel, momentum = saved["s0_c0-5"]
  for p, k, _ in pieces:
    np.testing.assert_array_equal(k.numpy(), kernel[:, p.start:p.stop])
    np.testing.assert_array_equal(two.local_optimizer.slot(k).numpy(), momentum[:, p.start:p.stop])


def test_resume_without_every_workers_pieces_is_refused_naming_both_counts(tmp_path):
  """Only worker 0's file of a 2-replica run is readable here (no shared folder): a 1-replica
  resume lacks the other half of the head and says so."""
  from dc_tf.placement import HeadPlacement
  from dc_tf.training import checkpointing
  placement = HeadPlacement(1, 6, 2)
  mine = {p.name: {"kernel": tf.Variable(tf.ones([4, p.width]))} for p in placement.pieces(0)}
  checkpointing.save_pieces(str(tmp_path), 0, 7, mine, num_replicas=2, keep=1)
  want = {"s0_c0-6": {"kernel": tf.Variable(tf.zeros([4, 6]))}}
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"columns 3\.\.5 of sub-head 0.*written by 2 replicas, this run has 1"):
    checkpointing.restore_pieces(str(tmp_path), 7, want, num_replicas=1)
  half = {"s0_c0-3": {"kernel": tf.Variable(tf.zeros([4, 3]))}}
  checkpointing.restore_pieces(str(tmp_path), 7, half, num_replicas=1)
  assert half["s0_c0-3"]["kernel"].numpy().min() == 1


def test_init_checkpoint_restores_every_trunk_variable_or_names_what_is_wrong(tiny_shards, tmp_path):
  from dc_tf.models import vgg
  from dc_tf.training import checkpointing
  cfg = tiny_config(tiny_shards, tmp_path / "src", mode="rotnet")
  source = trainer.Trainer(cfg, tf.distribute.get_strategy())
  source.save()
  same = vgg.build_trunk(32, 0.125, 32)
  checkpointing.restore_trunk(same, str(tmp_path / "src"))
  for a, b in zip(source.trunk.weights, same.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  wider = vgg.build_trunk(32, 0.25, 32)     # another architecture: shapes differ
  with pytest.raises(checkpointing.CheckpointError, match="does not fit this trunk.*shape"):
    checkpointing.restore_trunk(wider, str(tmp_path / "src"))
  tf.train.Checkpoint(step=tf.Variable(3, dtype=tf.int64)).save(str(tmp_path / "bare" / "ckpt"))
  with pytest.raises(checkpointing.CheckpointError, match=r"has no value for 84 of the trunk.s 84 variables"):
    checkpointing.restore_trunk(same, str(tmp_path / "bare"))


def test_a_preemption_requested_during_the_stop_agreement_is_not_lost(tiny_shards, tmp_path):
  """A SIGTERM handler runs on the training thread as soon as a blocking call returns: one
  that lands while the agreement's all-reduce is in flight must be acted on at the next
  agreement (the chief once exported a run whose worker had been sent SIGTERM)."""
  from conftest import cpu_strategy
  cfg = tiny_config(tiny_shards, tmp_path / "agree", mode="rotnet", epochs=1, knn_monitor=False,
                    batch_per_replica=8)
  run = trainer.Trainer(cfg, cpu_strategy(2))
  real_agree = run.stopping._agree

  def agree_then_signal(flag):
    out = real_agree(flag)
    run.request_preemption()   # what the handler does when the blocking call returns
    return out

  run.stopping._agree = agree_then_signal
  assert run.should_stop() is False     # this agreement was computed before the request...
  run.stopping._agree = real_agree
  assert run.should_stop() is True      # ...and the next one carries it
  assert run.preempted and not run.out_of_time
