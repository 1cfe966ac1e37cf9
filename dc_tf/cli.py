"""Every absl flag of train.py, defined in one place and turned into the frozen config; and
how every command starts and fails (`run`, `quiet_start`).

Presets are flagfiles in flags/ (`--flagfile=flags/demo.cfg`); flags given after the
flagfile override it. `config_from_flags` is the only reader of FLAGS.

A quiet start: the first screen of a command is its own (issue 28, issue 36 item 4). TF's
C++ start-up lines, absl's InitializeLog note and Beam's import warnings ("apitools not
found") are hidden unless --verbosity asks for them. `python -m dc_tf.<command>` gets this
from the package itself (dc_tf/__init__.py calls `quiet_start` while the command is being
located, before its module imports TensorFlow or Beam at its top); train.py and evaluate.py
import TensorFlow after `run` has parsed the flags, which installs the same finders.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import warnings

from absl import app, flags

from dc_tf.config import (ClusteringConfig, DataConfig, ExperimentConfig, ModelConfig,
                          TrainConfig, MODES, UserError)

FLAGS = flags.FLAGS
_D, _M, _C, _T = DataConfig(), ModelConfig(), ClusteringConfig(), TrainConfig()


def define_train_flags() -> None:
  # data
  flags.DEFINE_string("data_pattern", _D.data_pattern, "Training TFRecord shards (glob, gs:// ok).")
  flags.DEFINE_string("eval_pattern", _D.eval_pattern, "Labelled held-out shards for the kNN monitor.")
  flags.DEFINE_integer("image_size", _D.image_size, "Input size in pixels (paper: 224).")
  flags.DEFINE_float("crop_scale_min", _D.crop_scale_min, "RandomResizedCrop minimum area.")
  flags.DEFINE_integer("shuffle_buffer", _D.shuffle_buffer, "Shuffle buffer (examples).")
  # model
  flags.DEFINE_float("width", _M.width, "Channel-width multiplier (paper: 1).")
  flags.DEFINE_integer("fc_dim", _M.fc_dim, "fc6/fc7 units; 0 = 4096 * width.")
  flags.DEFINE_bool("sobel", _M.sobel, "Frozen Sobel front (False: raw RGB).")
  flags.DEFINE_integer("input_pad", _M.input_pad,
                       "Zero pixels around the input of the front (Sobel 3x3, or conv1 for "
                       "RGB); -1 = ours (Sobel 2, RGB 0). A converted trunk's config.json "
                       "says its own (python -m dc_tf.convert).")
  flags.DEFINE_float("dropout", _M.dropout, "Dropout after fc6.")
  # clustering
  flags.DEFINE_integer("m", _C.m, "Super-clusters (paper: 4).")
  flags.DEFINE_integer("k", _C.k, "Sub-clusters per super-cluster (paper: 80000).")
  flags.DEFINE_integer("reassign_every", _C.reassign_every, "T: epochs between reassignments.")
  flags.DEFINE_integer("pca_dim", _C.pca_dim, "PCA dimension before k-means; 0 = keep all.")
  flags.DEFINE_integer("pca_sample", _C.pca_sample, "Rows to fit PCA on; 0 = all.")
  flags.DEFINE_integer("kmeans_iters", _C.kmeans_iters, "Lloyd iterations.")
  flags.DEFINE_enum("kmeans_init", _C.kmeans_init, ["random", "kmeans++"], "k-means seeding.")
  flags.DEFINE_integer("chunk_size", _C.chunk_size, "Rows per k-means assignment chunk.")
  flags.DEFINE_integer("fit_sample", _C.fit_sample,
                       "Rows per replica (GPU) that PCA and the centroids are fitted on, as the "
                       "original's 3,150,000 per process; chosen by a hash of the image id, the "
                       "same rows for any workers x replicas layout of as many replicas; every "
                       "row is then assigned. 0 = all.")
  flags.DEFINE_enum("feature_dtype", _C.feature_dtype, ["float32", "float16"],
                    "Precision of the features held in host memory for clustering.")
  # training
  flags.DEFINE_enum("mode", _T.mode, list(MODES), "deepercluster | rotnet | deepcluster.")
  flags.DEFINE_string("model_dir", _T.model_dir, "Run directory (checkpoints, logs, export).")
  flags.DEFINE_integer("epochs", _T.epochs, "Epochs.")
  flags.DEFINE_integer("epoch_size", _T.epoch_size,
                       "Images drawn per epoch; 0 = --epoch_fraction of the pool.")
  flags.DEFINE_float("epoch_fraction", _T.epoch_fraction,
                     "With --epoch_size=0: the share of the pool drawn per epoch "
                     "(the original's DeepCluster mode draws 0.25).")
  flags.DEFINE_integer("batch_per_replica", _T.batch_per_replica, "Examples per replica and step.")
  flags.DEFINE_bool("all_rotations", _T.all_rotations, "Each image with its 4 rotations in a batch.")
  flags.DEFINE_float("lr", _T.lr, "Base learning rate.")
  flags.DEFINE_float("warmup_epochs", _T.warmup_epochs, "Linear warm-up, in epochs.")
  flags.DEFINE_enum("schedule", _T.schedule, ["constant", "cosine"], "Learning-rate schedule.")
  flags.DEFINE_float("momentum", _T.momentum, "SGD momentum.")
  flags.DEFINE_float("weight_decay", _T.weight_decay, "Coupled L2 weight decay.")
  flags.DEFINE_bool("uniform_sampler", _T.uniform_sampler, "Sample epochs uniformly over clusters.")
  flags.DEFINE_bool("reinit_heads", _T.reinit_heads, "Re-initialise heads after reassignment.")
  flags.DEFINE_integer("rotnet_warmup_epochs", _T.rotnet_warmup_epochs,
                       "Rotation-only epochs before the first clustering (deepercluster mode).")
  flags.DEFINE_integer("cpu_replicas", _T.cpu_replicas,
                       "Testing aid: this many replicas per worker on logical CPU devices "
                       "(a CPU stand-in for a machine with several GPUs); 0 = one per device.")
  flags.DEFINE_integer("steps_per_loop", _T.steps_per_loop, "Train steps per tf.function call.")
  flags.DEFINE_integer("checkpoint_every", _T.checkpoint_every, "Steps between checkpoints.")
  flags.DEFINE_integer("keep_checkpoints", _T.keep_checkpoints, "Checkpoints kept.")
  flags.DEFINE_integer("keep_assignments", _T.keep_assignments,
                       "Assignment tables kept under MODEL_DIR/assignments, one per "
                       "reassignment (python -m dc_tf.analysis reads them); 0 = all.")
  flags.DEFINE_integer("seed", _T.seed, "Seed for sampling, augmentation and clustering.")
  flags.DEFINE_bool("mixed_precision", _T.mixed_precision, "Trunk in mixed bfloat16 (GPU/TPU); float32 variables, heads and loss.")
  flags.DEFINE_bool("jit_compile", _T.jit_compile, "XLA-compile the forward and backward pass (GPU; see benchmarks/train_step.py for CPU).")
  flags.DEFINE_string("init_checkpoint", _T.init_checkpoint, "Start the trunk from this run/ckpt.")
  flags.DEFINE_bool("require_init_checkpoint", _T.require_init_checkpoint,
                    "Refuse to start from random weights: a new run needs --init_checkpoint "
                    "(the paper's DeeperCluster starts from RotNet).")
  flags.DEFINE_string("export_dir", _T.export_dir, "Export here at the end ('' = MODEL_DIR/export).")
  flags.DEFINE_bool("export", True, "Export when training ends; false: the checkpoints only "
                    "(python -m dc_tf.export --model_dir=... exports them later).")
  flags.DEFINE_bool("knn_monitor", _T.knn_monitor, "kNN on --eval_pattern at each reassignment.")
  flags.DEFINE_float("collective_timeout", _T.collective_timeout,
                     "Multi-worker: a worker whose collectives make no progress for this many "
                     "seconds (a stopped or dead peer) exits non-zero; 0 = wait forever. Set it "
                     "above the time of one loop of --steps_per_loop steps.")
  # where this process is in a multi-worker job (docs/launching-on-a-cluster.md)
  flags.DEFINE_enum("cluster", "tf_config", ["tf_config", "slurm"],
                    "tf_config: TF_CONFIG as Kubeflow's TFJob, Vertex AI or you set it (none: "
                    "one worker); slurm: built from the SLURM job step (srun) by TF's "
                    "SlurmClusterResolver, SLURM_PROCID 0 the chief.")
  flags.DEFINE_integer("slurm_port_base", 8888,
                       "--cluster=slurm: the port of each node's first task; its next tasks "
                       "take the ports after it.")
  flags.DEFINE_float("max_minutes", 0.0, "Stop (resumably) after this many minutes; 0 = no limit.")
  # --plan: print the memory plan for a layout and exit, allocating nothing
  flags.DEFINE_bool("plan", False, "Print the memory plan (per replica and per worker) and the "
                    "reassignment's FLOPs, bytes and time, and exit.")
  flags.DEFINE_integer("num_replicas", 1, "--plan: replicas in sync over all workers.")
  flags.DEFINE_integer("replicas_per_worker", 1, "--plan: replicas (GPUs) per worker.")
  flags.DEFINE_integer("num_images", 0, "--plan: images in the pool; 0 = count --data_pattern.")
  flags.DEFINE_float("device_gb", 80.0, "--plan: accelerator memory to check the plan against.")
  flags.DEFINE_float("host_gb", 1000.0, "--plan: host memory per worker free for clustering "
                     "(above it the plan recommends float16 features or more workers).")


def config_from_flags() -> ExperimentConfig:
  f = FLAGS
  config = ExperimentConfig(
      data=DataConfig(data_pattern=f.data_pattern, eval_pattern=f.eval_pattern,
                      image_size=f.image_size, crop_scale_min=f.crop_scale_min,
                      shuffle_buffer=f.shuffle_buffer),
      model=ModelConfig(image_size=f.image_size, width=f.width, fc_dim=f.fc_dim, sobel=f.sobel,
                        dropout=f.dropout, input_pad=f.input_pad),
      clustering=ClusteringConfig(m=f.m, k=f.k, reassign_every=f.reassign_every,
                                  pca_dim=f.pca_dim, pca_sample=f.pca_sample,
                                  kmeans_iters=f.kmeans_iters, kmeans_init=f.kmeans_init,
                                  chunk_size=f.chunk_size, seed=f.seed,
                                  fit_sample=f.fit_sample, feature_dtype=f.feature_dtype),
      train=TrainConfig(mode=f.mode, model_dir=f.model_dir, epochs=f.epochs,
                        epoch_size=f.epoch_size, epoch_fraction=f.epoch_fraction,
                        batch_per_replica=f.batch_per_replica,
                        all_rotations=f.all_rotations, lr=f.lr, warmup_epochs=f.warmup_epochs,
                        schedule=f.schedule, momentum=f.momentum, weight_decay=f.weight_decay,
                        uniform_sampler=f.uniform_sampler, reinit_heads=f.reinit_heads,
                        rotnet_warmup_epochs=f.rotnet_warmup_epochs,
                        cpu_replicas=f.cpu_replicas, steps_per_loop=f.steps_per_loop,
                        checkpoint_every=f.checkpoint_every,
                        keep_checkpoints=f.keep_checkpoints,
                        keep_assignments=f.keep_assignments, seed=f.seed,
                        mixed_precision=f.mixed_precision, jit_compile=f.jit_compile,
                        init_checkpoint=f.init_checkpoint,
                        require_init_checkpoint=f.require_init_checkpoint, export_dir=f.export_dir,
                        knn_monitor=f.knn_monitor, collective_timeout=f.collective_timeout))
  return config.validate()


def _error(message) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


class _HideLibraryInfo(logging.Filter):
  """Drops INFO (and DEBUG) records logged from inside TensorFlow, Keras or Beam: they log
  through the same absl handler as our own lines, so only where a record comes from tells
  them apart."""
  LIBRARIES = tuple(f"{os.sep}{name}{os.sep}"
                    for name in ("tensorflow", "keras", "tf_keras", "matplotlib", "apache_beam"))

  def filter(self, record):
    return record.levelno > logging.INFO or not any(p in record.pathname for p in self.LIBRARIES)


class _AroundImport(importlib.abc.MetaPathFinder):
  """A finder that runs the modules it `wants` through `around(run_module, module)`; every
  other import is left to the finders after it."""

  def wants(self, name: str) -> bool:
    raise NotImplementedError

  def around(self, run_module, module) -> None:
    raise NotImplementedError

  def find_spec(self, name, path=None, target=None):
    if not self.wants(name):
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
      return spec
    run_module = spec.loader.exec_module
    spec.loader.exec_module = lambda module: self.around(run_module, module)
    return spec


class _KerasWithoutPyplot(_AroundImport):
  """`import keras` (and TF's `keras._tf_keras`) imports matplotlib.pyplot for plotting helpers
  of keras.src.visualization that dc_tf never calls; on a fresh machine that builds
  matplotlib's font cache ("generated new fontManager", seconds) at every start. While a
  keras module runs, `import matplotlib.pyplot` is refused; Keras catches the ImportError and
  leaves those helpers off. Nothing is imported ahead of need, and our own figures import
  pyplot when they draw (outside keras)."""

  def wants(self, name):
    return name == "keras" or name.startswith("keras.")

  def around(self, run_module, module):
    blocked = "matplotlib.pyplot" not in sys.modules
    if blocked:
      sys.modules["matplotlib.pyplot"] = None   # `import matplotlib.pyplot` -> ImportError
    try:
      run_module(module)
    finally:
      if blocked and sys.modules.get("matplotlib.pyplot", 0) is None:
        del sys.modules["matplotlib.pyplot"]


# A line of TF's C++ logging (absl's format) and absl's note that precedes the first of them.
_CXX_LOG_LINE = re.compile(r"^[IW]\d{4} [\d:.]+\s+\d+ \S+\.(cc|h):\d+\]|"
                           r"^WARNING: All log messages before absl::InitializeLog")


class _TensorFlowImportedQuietly(_AroundImport):
  """While `tensorflow` itself is imported, file descriptor 2 is a pipe to a forked filter
  that passes on to stderr, line by line, all but TF's C++ INFO and WARNING lines (the
  "oneDNN custom operations are on" notes and absl's InitializeLog warning). Some TF builds
  print these whatever TF_CPP_MIN_LOG_LEVEL says (tensorflow-cpu 2.21.0 on this project's CI
  machines), so the variable alone does not hide them. Errors and anything else TF prints
  are kept, and a fatal abort inside the import (a missing library, an unsupported CPU) still
  shows its message: the filter outlives the importer and drains the pipe. Lines logged later,
  while training, are not touched. Without os.fork, the import is left as it is."""

  def wants(self, name):
    return name == "tensorflow"

  def around(self, run_module, module):
    if not hasattr(os, "fork"):
      return run_module(module)
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():   # 3.12+ warns of fork beside threads: the filter
      warnings.simplefilter("ignore", DeprecationWarning)   # takes no lock
      pid = os.fork()
    if pid == 0:     # the filter; its fd 2 is the real stderr
      try:
        os.close(write_end)
        _forward_filtered(read_end, 2)
      finally:
        os._exit(0)
    os.close(read_end)
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
      run_module(module)
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)        # the pipe's last write end is gone: the filter drains and ends
      os.close(saved)
      _reap(pid)


def _forward_filtered(read_end: int, out: int) -> None:
  """Copies lines from `read_end` to `out` until end of file, dropping `_CXX_LOG_LINE`s."""
  pending = b""
  while chunk := os.read(read_end, 65536):
    *lines, pending = (pending + chunk).split(b"\n")
    kept = [l for l in lines if not _CXX_LOG_LINE.search(l.decode(errors="replace"))]
    if kept:
      _write_all(out, b"\n".join(kept) + b"\n")
  if pending and not _CXX_LOG_LINE.search(pending.decode(errors="replace")):
    _write_all(out, pending + b"\n")


def _write_all(fd: int, data: bytes) -> None:
  """os.write until all of `data` is written (a pipe or terminal may take part of it)."""
  view = memoryview(data)
  while view:
    try:
      view = view[os.write(fd, view):]
    except BlockingIOError:     # a non-blocking stderr that is full: wait for room
      import select
      select.select([], [fd], [], 1.0)


def _reap(pid: int, seconds: float = 5.0) -> None:
  """Waits for the filter; one still running after `seconds` (a process started during the
  import holds the pipe open) is killed rather than waited on for ever."""
  import signal
  import time
  deadline = time.monotonic() + seconds
  try:
    while time.monotonic() < deadline:
      if os.waitpid(pid, os.WNOHANG)[0]:
        return
      time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
  except (ChildProcessError, ProcessLookupError):   # SIGCHLD ignored: reaped already
    pass


class _NotBeamWarnings(logging.Filter):
  def filter(self, record):
    return (record.levelno > logging.WARNING or
            f"{os.sep}apache_beam{os.sep}" not in record.pathname)


class _BeamImportedQuietly(_AroundImport):
  """While `apache_beam` is imported, its WARNING (and lower) records are dropped: its GCP
  modules log "apitools not found, and bigquery client libraries are not available" through
  the root logger at import, and that first call would also give the root logger
  logging.basicConfig's handler, printing every later root record a second time beside absl's.
  A handler of our own stands in while the import runs, so basicConfig adds none; Beam's
  errors still reach stderr."""

  def wants(self, name):
    return name == "apache_beam"

  def around(self, run_module, module):
    root, hide = logging.getLogger(), _NotBeamWarnings()
    stand_in = [] if root.handlers else [logging.StreamHandler(sys.stderr)]
    for h in stand_in:
      root.addHandler(h)
    handlers = list(root.handlers)
    root.addFilter(hide)
    for h in handlers:
      h.addFilter(hide)
    try:
      run_module(module)
    finally:
      root.removeFilter(hide)
      for h in handlers:
        h.removeFilter(hide)
      for h in stand_in:
        root.removeHandler(h)


def asks_for_verbosity(argv) -> bool:
  """Whether a command line sets absl's --verbosity (-v) to 1 or more (read before the flags
  are parsed; a flagfile's --verbosity is not seen)."""
  argv = list(argv or [])
  for i, arg in enumerate(argv):
    m = re.match(r"^--?(?:v|verbosity)(?:=(.*))?$", arg)
    if m:
      value = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


def _install(finder_class) -> None:
  if not any(isinstance(f, finder_class) for f in sys.meta_path):
    sys.meta_path.insert(0, finder_class())


def quiet_start(verbose: bool | None = None) -> None:
  """Hides the libraries' start-up lines of a command unless `verbose` (by default: whether
  sys.argv asks for --verbosity >= 1): TF_CPP_MIN_LOG_LEVEL=2 unless the environment sets
  it, and the finders that filter TensorFlow's and Beam's imports (only for a library not
  imported yet). Keras never imports pyplot (_KerasWithoutPyplot). Safe to call again."""
  if verbose is None:
    verbose = asks_for_verbosity(sys.argv[1:])
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # C++ INFO and WARNING lines
    if "tensorflow" not in sys.modules:
      _install(_TensorFlowImportedQuietly)
    if "apache_beam" not in sys.modules:
      _install(_BeamImportedQuietly)
  if "keras" not in sys.modules:
    _install(_KerasWithoutPyplot)


def run(main, known_only: bool = False) -> None:
  """`app.run(main)` for our entry points: a bad flag or a `UserError` (bad value, missing
  shards, missing or tampered checkpoint or export) prints one line, `error: ...`, and exits
  with status 2, no traceback. TensorFlow's and Keras' own INFO lines (a saver line per
  checkpoint, collective set-up, export fingerprints) are hidden unless --verbosity=1 or
  more asks for them; our log lines and progress bars stay. TF's C++ start-up lines (oneDNN
  and CPU-feature notes) are hidden through TF_CPP_MIN_LOG_LEVEL=2, set before TensorFlow is
  first imported unless the environment sets it already, and, for builds that ignore it, by
  filtering what TF writes to stderr while it is imported (_TensorFlowImportedQuietly).
  `known_only`: flags nobody defined are passed on to `main` (make_shards hands them to
  Beam) instead of being refused."""
  def parse(argv):
    try:
      return FLAGS(argv, known_only=known_only)
    except flags.Error as e:
      _error(e)

  def quiet_main(argv):
    if FLAGS.verbosity < 1:
      from absl import logging as absl_logging
      absl_logging.get_absl_handler().addFilter(_HideLibraryInfo())
    quiet_start(verbose=FLAGS.verbosity >= 1)
    try:
      return main(argv)
    except UserError as e:
      _error(e)
  app.run(quiet_main, flags_parser=parse)
