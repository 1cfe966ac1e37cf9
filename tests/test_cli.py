"""The command line speaks plainly: a user error is one line, `error: ...`, exit status 2."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def run(script, *args):
  env = dict(os.environ)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)    # as a user's shell has it
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True,
                        text=True, timeout=180, env=env, cwd=REPO)


@pytest.mark.parametrize("script,args,message", [
    ("train.py", ["--epochs=0"], "error: --epochs must be >= 1, got 0"),
    ("train.py", ["--epochs=many"], "error: flag --epochs=many"),
    ("train.py", ["--data_pattern=/nonexistent/*"], "error: no shard file matches '/nonexistent/*'"),
    ("evaluate.py", ["--checkpoint=/nothere"], "error: checkpoint or export not found: /nothere"),
])
def test_user_errors_are_one_line_and_exit_2(script, args, message):
  out = run(script, *args)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  lines = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and lines[0].startswith(message), out.stderr[-2000:]


def test_a_shard_of_random_bytes_is_named(tmp_path):
  bad = tmp_path / "train-00000-of-00001.tfrecord"
  bad.write_bytes(os.urandom(4096))
  out = run("train.py", f"--data_pattern={bad}", "--mode=rotnet", f"--model_dir={tmp_path}/r")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "1 corrupt shard file" in out.stderr and str(bad) in out.stderr, out.stderr[-2000:]


def test_tensorflow_info_lines_are_hidden_unless_asked(sigterm_run):
  """Read from the two train.py runs of conftest's sigterm_run, started as a user's shell
  starts them (no TF_CPP_MIN_LOG_LEVEL): the resume (checkpoints, then the export) with the
  default verbosity, and the interrupted run (checkpoints) with --verbosity=1."""
  quiet = sigterm_run["resume"]
  assert quiet.returncode == 0, quiet.stderr[-2000:]
  assert "functional_saver.py" not in quiet.stderr and "fingerprint" not in quiet.stderr
  assert '"event": "epoch"' in quiet.stderr             # our own log lines stay
  assert "exported to" in quiet.stderr                  # the export's lines were hidden
  loud = sigterm_run["stderr"]
  assert "functional_saver.py" in loud
  # issue 28: the first screen is ours (the config line, the progress bar), no line from TF's
  # C++ logging (oneDNN and CPU-feature notes, absl's InitializeLog warning) unless asked
  cxx = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+\.(cc|h):\d+\]|absl::InitializeLog")
  first = quiet.stderr.splitlines()[:20]
  assert not [l for l in first if cxx.search(l)], first
  assert any("full config in" in l for l in first[:3]), first   # the one-line config summary
  assert [l for l in loud.splitlines()[:20] if cxx.search(l)], loud.splitlines()[:20]


def preset(name):
  """{flag: value} of a flagfile in flags/ (comments skipped) and its comment text."""
  values, comment = {}, []
  for line in open(os.path.join(REPO, "flags", name)):
    line = line.strip()
    if line.startswith("#"):
      comment.append(line)
    elif line.startswith("--"):
      key, _, value = line[2:].partition("=")
      values[key] = value
  return values, "\n".join(comment)


def test_the_paper_presets_are_what_the_original_ran():
  """The original's latest main.sh: --pretrained (RotNet) --dim_pca 4096 --super_classes 16
  --k 320000 --niter 10 --reassignment 3 --nepochs 100 --batch_size 48 --lr 0.1 --wd 0.00001."""
  deeper, _ = preset("deepercluster_yfcc100m.cfg")
  assert {k: deeper[k] for k in ("pca_dim", "m", "k", "kmeans_iters", "reassign_every", "epochs",
                                 "batch_per_replica", "lr", "weight_decay",
                                 "require_init_checkpoint")} == {
      "pca_dim": "4096", "m": "4", "k": "80000", "kmeans_iters": "10", "reassign_every": "3",
      "epochs": "100", "batch_per_replica": "48", "lr": "0.1", "weight_decay": "1e-5",
      "require_init_checkpoint": "true"}
  for name in ("deepcluster_yfcc100m.cfg", "rotnet_yfcc100m.cfg", "deepercluster_yfcc100m.cfg"):
    values, comment = preset(name)
    assert f"T={values['reassign_every']}" in comment, name
    # src/utils.py check_parameters: epoch_size = size_dataset // nmb_super_clusters // 4, one
    # rotation per process: an epoch draws each image once with one rotation (RotNet,
    # DeeperCluster's 16 groups), or a quarter of the pool (DeepCluster: one group).
    assert values["all_rotations"] == "false", name
    assert values.get("epoch_size", "0") == "0", name
    assert values.get("epoch_fraction", "1") == ("0.25" if "deepcluster_" in name else "1"), name
  deep, comment = preset("deepcluster_yfcc100m.cfg")
  assert deep["pca_dim"] == "4096" and "--dim_pca 4096" in comment
  # Issue 38: DeepCluster as the paper trained it, on a 1.3M subset (the original's prefix of
  # flickr_unique_ids.npy) with facebookresearch/deepcluster's k, both sources quoted.
  assert deep["k"] == "10000" and "--nmb_cluster 10000" in comment
  assert "indexes[:min(size, len(indexes))]" in comment and "[:1300000]" in comment
  assert deep["k"] != deeper["k"] and deep["m"] == "1"


def test_the_demo_preset_says_it_keeps_its_own_choices():
  demo, comment = preset("demo.cfg")
  assert demo["all_rotations"] == "true" and demo["pca_dim"] != "4096"
  assert "keeps its own choices" in comment and "--all_rotations=true" in comment


@pytest.mark.parametrize("name,steps", [
    ("rotnet_yfcc100m.cfg", 48 // 8),               # the pool once, one rotation each
    ("deepcluster_yfcc100m.cfg", 48 // 4 // 8),     # a quarter of the pool
])
def test_a_paper_presets_epoch_is_the_originals(name, steps, tiny_shards, tmp_path):
  """The trainer's epoch under the preset's epoch flags, on 48 images at batch 8: the
  --epoch_fraction wiring, not only the flagfile's text. A deadline already passed stops
  the run before its first step, once the epoch is fixed (and DeepCluster has clustered)."""
  import tensorflow as tf
  from dc_tf.config import ExperimentConfig
  from dc_tf.training import trainer
  values, _ = preset(name)
  cfg = ExperimentConfig().replace(
      data={"image_size": 32, "data_pattern": tiny_shards},
      model={"image_size": 32, "width": 0.125, "fc_dim": 32},
      clustering={"m": 1, "k": 3, "pca_dim": 8, "kmeans_iters": 2, "chunk_size": 16},
      train={"mode": values["mode"], "all_rotations": values["all_rotations"] == "true",
             "epoch_size": int(values.get("epoch_size", 0)),
             "epoch_fraction": float(values.get("epoch_fraction", 1)),
             "batch_per_replica": 8, "epochs": 1, "knn_monitor": False,
             "model_dir": str(tmp_path)}).validate()
  run = trainer.Trainer(cfg, tf.distribute.get_strategy())
  run.fit(max_seconds=1e-9)
  assert int(run.steps_per_epoch.numpy()) == steps


def test_the_deepercluster_preset_refuses_random_weights_unless_asked(tiny_shards, tmp_path):
  small = [f"--data_pattern={tiny_shards}", "--image_size=32", "--width=0.125", "--fc_dim=32",
           "--k=3", "--pca_dim=8", "--epochs=1", "--epoch_size=8", "--batch_per_replica=8"]
  out = run("train.py", f"--flagfile={REPO}/flags/deepercluster_yfcc100m.cfg", *small,
            f"--model_dir={tmp_path}/r")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "--init_checkpoint" in out.stderr and "--require_init_checkpoint=false" in out.stderr


def test_the_tiny200_preset_is_the_demo_recipe_with_what_its_comment_says():
  """flags/tiny200.cfg: the demo's settings except pool, size and clusters, and the step count
  and the DeepCluster command line its comment gives (benchmarks/tiny200.py runs that line)."""
  demo, _ = preset("demo.cfg")
  tiny, comment = preset("tiny200.cfg")
  changed = {k for k in demo.keys() | tiny.keys() if demo.get(k) != tiny.get(k)}
  assert changed == {"data_pattern", "model_dir", "k", "epochs", "epoch_size",
                     "checkpoint_every"}
  steps_per_epoch = int(tiny["epoch_size"]) * 4 // int(tiny["batch_per_replica"])
  assert f"{steps_per_epoch} steps of 64" in comment
  assert f"{steps_per_epoch * int(tiny['epochs']):,} steps in all" in comment
  clusters = int(tiny["m"]) * int(tiny["k"])
  assert (f"--mode=deepcluster --m=1 --k={clusters} --rotnet_warmup_epochs=0 "
          f"--epoch_size={4 * int(tiny['epoch_size'])}") in comment


def test_the_continuation_preset_is_the_demo_recipe_started_from_a_trunk():
  """flags/continuation.cfg (issue 39): the demo's recipe, with the clustering from epoch 0 of
  a trunk that --init_checkpoint must give, and the pool's size pinned so that the small Fig. 3's
  quarter and half pools train the same steps; benchmarks/continuation.py's DeepCluster arm
  draws 4x the images an epoch, so it too trains the same steps."""
  demo, _ = preset("demo.cfg")
  cont, comment = preset("continuation.cfg")
  changed = {k for k in demo.keys() | cont.keys() if demo.get(k) != cont.get(k)}
  assert changed == {"model_dir", "rotnet_warmup_epochs", "require_init_checkpoint",
                     "epoch_size"}
  assert cont["rotnet_warmup_epochs"] == "0" and cont["require_init_checkpoint"] == "true"
  steps = int(cont["epoch_size"]) * 4 // int(cont["batch_per_replica"]) * int(cont["epochs"])
  assert f"{steps:,} steps" in comment
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import continuation
  assert f"--epoch_size={4 * int(cont['epoch_size'])}" in continuation.ARMS["deepcluster"]
  assert f"--k={int(cont['m']) * int(cont['k'])}" in continuation.ARMS["deepcluster"]


def test_continuation_pairs_arms_by_seed_and_says_beyond_the_spread():
  """benchmarks/continuation.py's paired difference: arm minus arm of the same seed, its mean
  and standard error over seeds; 'beyond' only when the mean exceeds twice the SE."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import continuation
  layers = continuation.LAYERS

  def scored(v):
    return {"top1": {l: v for l in layers}}

  pieces = {}
  for s, (a, b) in enumerate([(10.0, 8.0), (11.0, 8.5), (9.0, 7.5)]):   # a - b: 2, 2.5, 1.5
    pieces[f"score deepercluster-s{s} selection"] = scored(a)
    pieces[f"score rotnet-s{s} selection"] = scored(b)
  d = continuation.paired({"pieces": pieces}, "deepercluster", "rotnet", [0, 1, 2], "selection")
  assert d[layers[0]]["mean"] == pytest.approx(2.0)
  assert d[layers[0]]["se"] == pytest.approx(0.5 / 3 ** 0.5)
  assert d[layers[0]]["beyond"] and d[layers[0]]["n"] == 3
  pieces["score rotnet-s2 selection"] = scored(9.0 + 6.0)    # now 2, 2.5, -6: mean -0.5
  d = continuation.paired({"pieces": pieces}, "deepercluster", "rotnet", [0, 1, 2], "selection")
  assert d[layers[0]]["mean"] == pytest.approx(-0.5) and not d[layers[0]]["beyond"]
  del pieces["score rotnet-s2 selection"]                     # a seed missing: not paired
  d = continuation.paired({"pieces": pieces}, "deepercluster", "rotnet", [0, 1, 2], "selection")
  assert d[layers[0]]["n"] == 2 and d[layers[0]]["mean"] == pytest.approx(2.25)


def test_tensorflow_import_lines_are_filtered_and_other_stderr_kept():
  """cli._TensorFlowImportedQuietly: TF builds that print their oneDNN INFO notes whatever
  TF_CPP_MIN_LOG_LEVEL says (tensorflow-cpu 2.21.0 on some machines) still start quietly, and
  the process's stderr works as before once the import is done."""
  from dc_tf import cli
  assert cli._CXX_LOG_LINE.search("I0000 00:00:1796214003.730120   18401 port.cc:153] oneDNN")
  assert cli._CXX_LOG_LINE.search("WARNING: All log messages before absl::InitializeLog() is")
  assert not cli._CXX_LOG_LINE.search("E0000 00:00:1796214003.730120   18401 util.cc:131] x")
  assert not cli._CXX_LOG_LINE.search("I1202 12:20:56.280272 140529589791616 train.py:52] ours")
  code = ("import os, sys; from dc_tf import cli; sys.meta_path.insert(0, "
          "cli._TensorFlowImportedQuietly()); "
          "import tensorflow; os.write(2, b'after\\n')")
  import runs
  env = dict(runs.user_env(), PYTHONSTARTUP="")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "port.cc" not in out.stderr and "InitializeLog" not in out.stderr, out.stderr
  assert out.stderr.splitlines()[-1] == "after"


def test_a_fatal_abort_inside_the_tensorflow_import_keeps_its_message(tmp_path):
  """A `tensorflow` that dies in its import (as a missing library or an unsupported CPU makes
  the real one abort) still shows what it wrote, filtered: the forked filter drains the pipe
  after the importer is gone. With the captured-to-a-file stderr of before, nothing showed."""
  fake = tmp_path / "fake" / "tensorflow"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text(
      "import os\n"
      "os.write(2, b'I0000 00:00:1796214003.730120   18401 port.cc:153] oneDNN on\\n')\n"
      "os.write(2, b'F0000 fatal: libcudart.so.12 not found\\nno newline at the end')\n"
      "os.abort()\n")
  code = (f"import sys; sys.path.insert(0, {str(tmp_path / 'fake')!r}); from dc_tf import cli; "
          "sys.meta_path.insert(0, cli._TensorFlowImportedQuietly()); import tensorflow")
  import runs
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=runs.user_env(),
                       capture_output=True, text=True, timeout=60)
  assert out.returncode != 0
  assert "F0000 fatal: libcudart.so.12 not found" in out.stderr, out.stderr
  assert "no newline at the end" in out.stderr and "port.cc" not in out.stderr, out.stderr
  # A parent that ignores SIGCHLD (inherited across exec): the filter is reaped for us, and
  # the import still succeeds with its lines passed on (found in review).
  (fake / "__init__.py").write_text("import os\nos.write(2, b'kept line\\n')\n")
  code = "import signal; signal.signal(signal.SIGCHLD, signal.SIG_IGN); " + code + \
      "; print('imported')"
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=runs.user_env(),
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and out.stdout.strip() == "imported", out.stderr[-2000:]
  assert out.stderr.strip() == "kept line", out.stderr


def test_verbosity_is_read_from_the_command_line_before_the_flags_are_parsed():
  """cli.quiet_start runs while `python -m dc_tf.<command>` is located, before absl parses
  anything: it reads --verbosity (or -v) itself, in each spelling absl accepts."""
  from dc_tf import cli
  for argv in (["--verbosity=1"], ["-v", "2"], ["--input=x", "--v=1"], ["--verbosity", "3"]):
    assert cli.asks_for_verbosity(argv), argv
  for argv in ([], ["--verbosity=0"], ["--input=x"], ["-v"], ["--verbose_name=1"]):
    assert not cli.asks_for_verbosity(argv), argv
