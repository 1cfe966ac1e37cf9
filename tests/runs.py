"""train.py runs for the tests: their command lines, waits on what a run writes, and what a
finished run leaves behind (log, tables, final weights). The session fixtures that share
runs between tests (tests/conftest.py) are built from these."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import numpy as np
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The uninterrupted single-process run the fault tests compare with (36 steps: 3 epochs of 12,
# reassignments at epochs 0 and 2); dropout off, as its state is not checkpointed.
CLEAN = ("--epochs=3", "--dropout=0")
# The same for two workers (12 steps: 2 epochs of 6, a reassignment at each).
TWO_WORKERS = ("--epochs=2", "--epoch_size=24")


def train_cmd(data, model_dir, *extra):
  """A tiny single-process train.py command line (python included)."""
  return [sys.executable, os.path.join(REPO, "train.py"), f"--data_pattern={data}",
          f"--eval_pattern={data}", f"--model_dir={model_dir}", "--image_size=32", "--width=0.125",
          "--fc_dim=32", "--m=2", "--k=3", "--reassign_every=2", "--pca_dim=8",
          "--kmeans_iters=3", "--batch_per_replica=16", "--lr=0.02", "--steps_per_loop=1",
          "--checkpoint_every=2", "--knn_monitor=false", "--seed=5",
          # pinned, so that changes to the demo preset (applied first) do not change the test
          "--rotnet_warmup_epochs=0", "--dropout=0.5", "--crop_scale_min=0.08", "--epoch_size=0",
          *extra]


def mw_cmd(data, model_dir, *extra):
  """One worker's train.py arguments (for workers.start_workers): global batch 16 over two
  workers, 12 steps an epoch of the 48 tiny images unless --epoch_size says otherwise."""
  return [os.path.join(REPO, "train.py"), f"--data_pattern={data}", f"--eval_pattern={data}",
          f"--model_dir={model_dir}", "--image_size=32", "--width=0.125", "--fc_dim=32", "--m=2",
          "--k=3", "--reassign_every=1", "--pca_dim=8", "--kmeans_iters=3",
          "--batch_per_replica=8", "--lr=0.02", "--steps_per_loop=1", "--knn_monitor=false",
          "--collective_timeout=60", "--checkpoint_every=0", "--seed=3",
          # pinned, so that changes to the demo preset (applied first) do not change the test
          "--rotnet_warmup_epochs=0", "--dropout=0", "--epoch_size=0", "--all_rotations=true",
          *extra]


def train_config(cmd):
  """The ExperimentConfig train.py builds from the command line `cmd` (train_cmd's: no
  flagfile, so the demo preset first), read with train.py's own flag definitions in a
  subprocess that imports no TensorFlow. Trainer(config).fit() in the test's process is then
  the command's training without its start-up and its export."""
  from dc_tf.config import ExperimentConfig
  code = ("import sys, train; from absl import flags; from dc_tf import cli; "
          "flags.FLAGS([sys.argv[0], '--flagfile=' + train.DEFAULT_FLAGFILE, *sys.argv[1:]]); "
          "print(cli.config_from_flags().to_json())")
  out = subprocess.run([sys.executable, "-c", code, *cmd[2:]], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  return ExperimentConfig.from_json(out.stdout)


def user_env():
  """The environment of a user's shell: TF_CPP_MIN_LOG_LEVEL unset (train.py sets it)."""
  env = dict(os.environ)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  return env


def read_log(model_dir):
  with open(os.path.join(model_dir, "log.jsonl")) as f:
    return [json.loads(line) for line in f]


def text(path):
  return open(path, errors="replace").read() if os.path.exists(path) else ""


def steps_shown(log_text, epoch):
  """The most steps of `epoch` that a progress bar in `log_text` shows done (0: none yet)."""
  done = re.findall(rf"epoch {epoch}: .*?\| *(\d+)/\d+ ", log_text.replace("\r", "\n"))
  return max(map(int, done), default=0)


def wait_for(predicate, timeout, what, proc=None):
  """Polls `predicate` until it holds; fails if `proc` ends first or `timeout` passes."""
  deadline = time.time() + timeout
  while not predicate():
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the run ended (status {proc.returncode}) before {what}")
    if time.time() > deadline:
      raise TimeoutError(f"waited {timeout} s for {what}")
    time.sleep(0.05)


def latest_step(ckpt_dir):
  latest = tf.train.latest_checkpoint(str(ckpt_dir)) if os.path.isdir(ckpt_dir) else None
  return int(latest.rsplit("-", 1)[1]) if latest else -1


def iterations(ckpt_dir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(ckpt_dir)))
  return int(reader.get_tensor("optimizer/iterations/.ATTRIBUTES/VARIABLE_VALUE"))


def table(model_dir):
  """The id -> (super, sub) table of a run's last checkpoint."""
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt")))
  return [reader.get_tensor(f"table_{n}/.ATTRIBUTES/VARIABLE_VALUE")
          for n in ("ids", "super", "sub")]


def final_weights(model_dir):
  """Trunk, V and every worker's sub-head pieces of a run's last checkpoint."""
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


def assert_same_final_weights(got_dir, want_dir, rtol=1e-4, atol=1e-6):
  """The two runs end with the same trunk, V and sub-heads, weight by weight, and the same
  table: what an interrupted run must end with to have lost, repeated or shifted no step."""
  got, want = final_weights(got_dir), final_weights(want_dir)
  assert got.keys() == want.keys() and any(n.startswith("pieces/") for n in want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)
  for a, b in zip(table(got_dir), table(want_dir)):
    np.testing.assert_array_equal(a, b)


def kill_9_twice_then_resume(data, model_dir, stop_at=29):
  """runs.CLEAN killed (SIGKILL) twice, each time resumed by the same command: first once a
  checkpoint inside epoch 0 is written (checkpoints every 2 steps), then as soon as the
  reassignment at epoch 2 has begun. Then, in this process, on the command's config (train.py
  writes it first): Trainer.fit(max_seconds) whose stop agreement sees the clock pass the
  deadline once step `stop_at` is done (inside epoch 2, between two periodic checkpoints),
  and the same call again, to the end. Returns what each interruption left."""
  cmd = train_cmd(data, model_dir, *CLEAN)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  ckpt_dir = os.path.join(model_dir, "ckpt")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    wait_for(lambda: 4 <= latest_step(ckpt_dir) < 12, 300, "a mid-epoch checkpoint", proc)
  finally:
    proc.kill()
    proc.wait()
  out = {"killed_at": latest_step(ckpt_dir), "log_after_first_kill": read_log(model_dir)}
  err = model_dir + "-second.err"
  with open(err, "w") as f:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=f)
    try:
      # Killed at once: the reassignment (extraction, then k-means) takes ~1 s after this line.
      wait_for(lambda: "reassignment at epoch 2" in text(err), 300, "the reassignment at epoch 2",
               proc)
    finally:
      proc.kill()
      proc.wait()
  latest = tf.train.latest_checkpoint(ckpt_dir)
  reader = tf.train.load_checkpoint(latest)
  out.update(second_stderr=text(err), log_after_second_kill=read_log(model_dir),
             step_after_second_kill=int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")),
             tensors_after_second_kill={n: reader.get_tensor(n) is not None
                                        for n, _ in tf.train.list_variables(latest)})
  from dc_tf.training import checkpointing, stopping, trainer
  config = checkpointing.read_config(model_dir)
  run = trainer.Trainer(config, tf.distribute.get_strategy())
  real = stopping.time
  stopping.time = types.SimpleNamespace(
      time=lambda: real.time() + (1e9 if int(run.step.numpy()) >= stop_at else 0))
  try:
    history = run.fit(max_seconds=600)
  finally:
    stopping.time = real
  out["max_minutes"] = {"out_of_time": run.out_of_time, "preempted": run.preempted,
                        "step": int(run.step.numpy()), "history": history,
                        "saved_at": latest_step(ckpt_dir)}
  again = trainer.Trainer(config, tf.distribute.get_strategy())
  again.fit(max_seconds=600)
  out["max_minutes"]["out_of_time_again"] = again.out_of_time
  return out


def sigterm_then_resume(data, model_dir):
  """runs.CLEAN without periodic checkpoints, sent SIGTERM once a step of epoch 1 is done
  (as its progress bar shows), then the same command to the end. Both run as a user's shell
  runs them (TF_CPP_MIN_LOG_LEVEL unset), the interrupted one with --verbosity=1 (what
  tests/test_cli.py reads)."""
  cmd = train_cmd(data, model_dir, *CLEAN, "--checkpoint_every=0")
  err = model_dir + "-sigterm.err"
  with open(err, "w") as f:
    proc = subprocess.Popen(cmd + ["--verbosity=1"], env=user_env(), stdout=subprocess.DEVNULL,
                            stderr=f)
    try:
      wait_for(lambda: steps_shown(text(err), 1) >= 1, 300, "a step of epoch 1", proc)
      t0 = time.time()
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=120)
      stop_seconds = time.time() - t0
    finally:
      if proc.poll() is None:
        proc.kill()
  out = {"returncode": proc.returncode, "stop_seconds": stop_seconds,
         "stderr": text(err), "stopped_at": latest_step(os.path.join(model_dir, "ckpt")),
         "log_at_stop": read_log(model_dir)}
  out["resume"] = subprocess.run(cmd, env=user_env(), capture_output=True, text=True,
                                 timeout=400)
  return out


def two_workers_sigterm_then_resume(data, model_dir):
  """TWO_WORKERS as TF_CONFIG's chief (process 0) and one worker, the worker sent SIGTERM once
  a step of epoch 1 is done (as the chief's progress bar shows); resumed with --max_minutes
  given to the worker alone, so small (6 ms) that it has passed by the worker's first stop
  agreement; then the same command on both to the end (--export=false: the uninterrupted run
  exports)."""
  from workers import run_workers, start_workers, wait_all
  cmd = mw_cmd(data, model_dir, *TWO_WORKERS, "--export=false")
  steps_saved = lambda: [iterations(os.path.join(model_dir, "ckpt")),  # noqa: E731
                         iterations(os.path.join(model_dir, "tmp", "worker-1"))]
  procs = start_workers(lambda i: cmd, chief=True)
  try:
    wait_for(lambda: steps_shown(text(procs[0].log.name), 1) >= 1, 300, "a step of epoch 1",
             procs[0])
  except BaseException:
    for p in procs:
      p.kill()
    raise
  t0 = time.time()
  procs[1].send_signal(signal.SIGTERM)            # the non-chief worker is preempted
  codes, outs = wait_all(procs, 120)
  assert codes == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  out = {"outputs": outs, "stop_seconds": time.time() - t0,
         "stopped_at": steps_saved(), "log_at_stop": read_log(model_dir)}
  outs = run_workers(lambda i: cmd + (["--max_minutes=0.0001"] if i == 1 else []), 120,
                     chief=True)
  out["max_minutes"] = {"outputs": outs, "stopped_at": steps_saved()}
  run_workers(lambda i: cmd, chief=True)
  return out
