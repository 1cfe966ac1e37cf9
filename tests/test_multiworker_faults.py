"""Faults across two local worker processes: preemption, a stopped peer, an exception on one
worker, and resuming with another worker count (issue 9)."""

import json
import os
import re
import shutil
import signal
import time

import pytest
import tensorflow as tf

from runs import TWO_WORKERS, assert_same_final_weights, iterations, mw_cmd
from workers import output, run_workers, start_workers, wait_all, wait_for

pytestmark = pytest.mark.slow


def logged(model_dir, event):
  path = os.path.join(model_dir, "log.jsonl")
  if not os.path.exists(path):
    return 0
  return sum(f'"event": "{event}"' in line for line in open(path))


def test_sigterm_to_one_worker_saves_all_at_one_step_and_resume_loses_none(chief_sigterm_run,
                                                                           two_worker_run):
  """conftest's chief_sigterm_run: a chief and a worker, the worker sent SIGTERM once a step
  of epoch 1 is done; both save at one step, and the same command ends with the weights of
  the same command never interrupted (two_worker_run, as two plain workers: the layout
  changes nothing either, tests/test_multiworker.py compares the tables)."""
  run, model_dir = chief_sigterm_run, chief_sigterm_run["model_dir"]
  assert run["stop_seconds"] < 60
  assert "preempted" in run["outputs"][0]           # the chief learned it through the agreement
  chief, other = run["stopped_at"]
  total = 2 * 6                                     # runs.TWO_WORKERS: 2 epochs of 6 steps
  assert chief == other and 6 < chief < total
  assert run["log_at_stop"][-1]["step"] == chief
  assert iterations(os.path.join(model_dir, "ckpt")) == total
  assert iterations(os.path.join(model_dir, "tmp", "worker-1")) == total
  log = [json.loads(l) for l in open(os.path.join(model_dir, "log.jsonl"))]
  assert log[-1]["step"] == total
  assert sorted(r["epoch"] for r in log if r["event"] == "reassign") == [0, 1]
  assert not os.path.exists(os.path.join(model_dir, "export"))       # --export=false
  assert_same_final_weights(model_dir, two_worker_run)


def test_max_minutes_on_one_worker_stops_every_worker_at_one_step(chief_sigterm_run):
  """The resume of conftest's chief_sigterm_run in which only the worker was given
  --max_minutes (6 ms, passed by its first stop agreement): the chief, which has no deadline,
  learns it through the agreement; both save at the same step, before the end, and exit 0
  (the last resume then ends with the uninterrupted weights: the test above)."""
  run = chief_sigterm_run["max_minutes"]
  chief, other = run["stopped_at"]
  assert chief == other and chief_sigterm_run["stopped_at"][0] <= chief < 2 * 6
  for out in run["outputs"]:
    assert re.search(rf"stopped at step {chief} after \d+ s \(--max_minutes\); the same "
                     "command resumes", out), out[-2000:]
    assert "Traceback" not in out, out[-2000:]


def test_stopped_worker_makes_the_other_fail_within_the_timeout(tiny_shards, tmp_path):
  model_dir = tmp_path / "stop"
  procs = start_workers(lambda i: mw_cmd(tiny_shards, model_dir, "--epochs=40",
                                         "--collective_timeout=10"))
  try:
    # Once the first reassignment is logged, the chief's next collective is the stop
    # agreement, already called (and so given no first-call grace) by the resume check.
    wait_for(lambda: logged(model_dir, "reassign") >= 1, 300, "the first reassignment")
    os.kill(procs[1].pid, signal.SIGSTOP)
    t0 = time.time()
    procs[0].wait(timeout=10 + 60)
    detected = time.time() - t0
  finally:
    procs[1].kill()
    procs[0].kill()
  out = output(procs[0])
  assert procs[0].returncode not in (0, None), out[-2000:]
  assert detected < 10 + 60
  assert "worker 0 of 2: a collective failed" in out and "Restart every worker" in out, out[-2000:]
  print(f"stopped peer detected in {detected:.1f} s")


def test_exception_on_one_worker_is_reported_by_every_worker(tiny_shards, tmp_path, example):
  """Worker 1 reads shards 1 and 3; shard 3 gets a record without its image field, a data
  error on worker 1 only. Both workers must exit non-zero and say why."""
  from conftest import copy_shards, insert_records
  copy_shards(tiny_shards, tmp_path / "s")
  shards = tmp_path / "s"
  no_image = tf.train.Example(features=tf.train.Features(feature={
      "image/id": tf.train.Feature(int64_list=tf.train.Int64List(value=[10**6]))}))
  insert_records(str(shards / "train-00003-of-00004.tfrecord"), [no_image.SerializeToString()],
                 at=2)
  model_dir = tmp_path / "exc"
  t0 = time.time()
  codes, outs = wait_all(start_workers(lambda i: mw_cmd(
      f"{shards}/train-*", model_dir, "--mode=rotnet", "--epochs=2", "--collective_timeout=20")),
      timeout=240)
  assert codes[0] != 0 and codes[1] != 0, outs
  assert "missing" in outs[1].lower() and "train-00003-of-00004" in outs[1], outs[1][-2000:]
  assert "worker 0 of 2: a collective failed" in outs[0], outs[0][-2000:]
  print(f"both workers failed within {time.time() - t0:.1f} s")


def test_resume_with_another_worker_count_and_a_worker_on_an_older_checkpoint_is_refused(
    two_worker_run, bad_shards, tmp_path):
  """A copy of conftest's two_worker_run (2 workers, 2 epochs of 6 steps, global batch 16)
  resumed on 1 worker (this process, the same global batch), then on 2 again; on the way
  another global batch is refused, and so are two workers that restored different
  checkpoints (one reads a copy taken before the 1-worker resume: the Trainer's check that
  all workers agree)."""
  from dc_tf.training import checkpointing, trainer
  steps = 6
  a = shutil.copytree(two_worker_run, tmp_path / "run")
  older = shutil.copytree(two_worker_run, tmp_path / "older")
  # 2 -> 1 with the same global batch (16) resumes where the two workers stopped.
  one = checkpointing.read_config(str(a)).replace(
      train={"model_dir": str(a), "epochs": 3, "batch_per_replica": 16})
  trainer.Trainer(one, tf.distribute.get_strategy()).fit()
  log = [json.loads(l) for l in open(a / "log.jsonl")]
  assert [(r["event"], r["epoch"]) for r in log] == [
      ("reassign", 0), ("epoch", 0), ("reassign", 1), ("epoch", 1), ("reassign", 2), ("epoch", 2)]
  assert log[-1]["step"] == 3 * steps and log[4]["images"] == 48   # global table
  # ... and with another global batch it refuses, naming both.
  with pytest.raises(checkpointing.CheckpointError, match="global batch of 16.*this run has 8"):
    trainer.Trainer(one.replace(train={"batch_per_replica": 8}),
                    tf.distribute.get_strategy()).restore()
  logged = (a / "log.jsonl").read_text()
  cmd = lambda d, *extra: mw_cmd(bad_shards, d, *TWO_WORKERS, "--export=false", *extra)  # noqa: E731
  # Workers that restored different states refuse to train, each naming its own: worker 1
  # reads the older copy (step 12), the chief the 1-worker run's checkpoint (step 18).
  codes, outs = wait_all(start_workers(lambda i: cmd(older if i else a, "--epochs=4")),
                         timeout=240)
  assert codes[0] == codes[1] == 2, outs
  for i, (step, epoch) in enumerate([(3 * steps, 2), (2 * steps, 1)]):
    assert "workers resumed from different checkpoints" in outs[i], outs[i][-2000:]
    assert f"worker {i} has step {step}, assignment epoch {epoch}, 48 table rows" in outs[i]
    assert "the mean over workers is step 15.0" in outs[i]
  assert (a / "log.jsonl").read_text() == logged               # nothing trained, nothing logged
  # 1 -> 2: both workers resume from the chief's checkpoint (the 1-worker run's).
  run_workers(lambda i: cmd(a, "--epochs=4"))
  assert iterations(a / "ckpt") == iterations(a / "tmp" / "worker-1") == 4 * steps
  log = [json.loads(l) for l in open(a / "log.jsonl")]
  assert [(r["event"], r["epoch"]) for r in log][-2:] == [("reassign", 3), ("epoch", 3)]
