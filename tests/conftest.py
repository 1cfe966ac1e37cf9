"""Shared fixtures: tiny shards made in the test, two logical CPUs for replica tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Four logical CPU devices, so MirroredStrategy can run 2 or 4 replicas in one process.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(4)])

from dc_tf.data import make_shards, schema  # noqa: E402

_STRATEGIES = {}


def cpu_strategy(n):
  """One MirroredStrategy over n logical CPUs, shared by all tests: strategies created side
  by side in one process reuse collective instance keys, and strategies of different sizes
  would join the same collective groups, so each size gets its own key base (the class
  attribute TF keeps for tests)."""
  if n not in _STRATEGIES:
    tf.distribute.MirroredStrategy._collective_key_base = 10_000 * n
    try:
      _STRATEGIES[n] = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
    finally:
      tf.distribute.MirroredStrategy._collective_key_base = 0
  return _STRATEGIES[n]


def two_cpu_strategy():
  return cpu_strategy(2)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: multi-process or SavedModel round trips (run in CI)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg_bytes(seed: int, size=(40, 48), channels=3, label_color=None) -> bytes:
  """A small JPEG: a colour (or a label-dependent colour) plus noise."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 255, 3) if label_color is None else np.asarray(label_color)
  img = np.clip(base[None, None, :channels] + rng.normal(0, 20, (*size, channels)), 0, 255)
  return tf.io.encode_jpeg(img.astype(np.uint8)).numpy()


def write_image_folder(root, classes=3, per_class=8, seed=0):
  """root/<class>/<i>.jpg with class-dependent colours; returns the root."""
  colors = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220)]
  for c in range(classes):
    d = os.path.join(root, f"class{c}")
    os.makedirs(d, exist_ok=True)
    for i in range(per_class):
      with open(os.path.join(d, f"{i}.jpg"), "wb") as f:
        f.write(jpeg_bytes(seed * 1000 + c * 100 + i, label_color=colors[c % len(colors)]))
  return root


def write_records(path, records):
  """Writes raw tf.train.Examples (bypassing the writer's validation)."""
  with tf.io.TFRecordWriter(path) as w:
    for ex in records:
      w.write(ex.SerializeToString())
  return path


def copy_shards(pattern, dest):
  """Copies the shard files matching `pattern` into the folder `dest`; returns its pattern."""
  import glob
  import shutil
  os.makedirs(dest, exist_ok=True)
  for f in glob.glob(pattern):
    shutil.copy(f, dest)
  return os.path.join(str(dest), os.path.basename(pattern))


def insert_records(path, serialized, at=None):
  """Rewrites a shard with the `serialized` records inserted at position `at` (end: None)."""
  records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
  at = len(records) if at is None else at
  with tf.io.TFRecordWriter(path) as w:
    for r in records[:at] + list(serialized) + records[at:]:
      w.write(r)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
  """4 shards of 48 labelled images (3 classes) made with the project's writer."""
  root = tmp_path_factory.mktemp("tiny")
  images = write_image_folder(str(root / "images"), classes=3, per_class=16)
  make_shards.write_shards("folder", images, str(root / "shards"), "train", 4, seed=0)
  return str(root / "shards" / "train-*.tfrecord")


@pytest.fixture
def example():
  def make(data=None, fmt="jpeg", image_id=1, label=0, **kw):
    data = jpeg_bytes(image_id) if data is None else data
    return schema.make_example(data, fmt, 40, 48, image_id, label=label, **kw)
  return make


def write_photos(root, n=12, seed=0):
  """A folder of JPEGs a newcomer might bring (issue 27): n good ones of three colours in two
  sub-folders, two byte-identical copies, and bad files: not an image, a truncated JPEG, an
  empty file. Returns the root."""
  import shutil
  colors = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
  for i in range(n):
    d = os.path.join(root, "trip" if i % 2 else "home")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"img{i:02d}.jpg"), "wb") as f:
      f.write(jpeg_bytes(seed * 100 + i, size=(40 + i, 48), label_color=colors[i % 3]))
  shutil.copy(os.path.join(root, "home", "img00.jpg"), os.path.join(root, "copy_of_00.jpg"))
  shutil.copy(os.path.join(root, "trip", "img01.jpg"), os.path.join(root, "trip", "zz_copy.jpg"))
  with open(os.path.join(root, "notes.jpg"), "wb") as f:
    f.write(b"this is not an image at all")
  good = jpeg_bytes(999, size=(40, 40))
  with open(os.path.join(root, "cut.jpg"), "wb") as f:
    f.write(good[:len(good) // 2])
  open(os.path.join(root, "empty.jpg"), "wb").close()
  return root


@pytest.fixture
def photos(tmp_path):
  return write_photos(str(tmp_path / "photos"))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
  """A serving export of a random width-1/8, 32 px trunk."""
  from dc_tf import export
  from dc_tf.models import vgg
  d = str(tmp_path_factory.mktemp("embed_export"))
  export.export(vgg.build_trunk(32, 0.125, 32), d, image_size=32)
  return d


# ---------------------------------------------------------------- runs shared between tests
# Each is run once per test session and read by several tests (tests/runs.py says how).
BAD_RECORDS = {0: 3, 1: 2}   # shard -> undecodable records at its start


@pytest.fixture(scope="session")
def bad_shards(tiny_shards, tmp_path_factory):
  """tiny_shards (and their manifest: 48 images) with 3 undecodable records at the start of
  shard 0 and 2 at the start of shard 1, so every record read after them carries their count.
  Two workers: worker 0 reads shards 0 and 2 (3 bad), worker 1 shards 1 and 3 (2 bad)."""
  import shutil
  root = tmp_path_factory.mktemp("bad_shards")
  pattern = copy_shards(tiny_shards, root)
  shutil.copy(os.path.join(os.path.dirname(tiny_shards), "train.json"), root)
  for shard, n in BAD_RECORDS.items():
    bad = [schema.make_example(b"not an image", "jpeg", 40, 48, 10**6 + 10 * shard + i)
           for i in range(n)]
    insert_records(str(root / f"train-{shard:05d}-of-00004.tfrecord"),
                   [ex.SerializeToString() for ex in bad], at=0)
  return pattern


@pytest.fixture(scope="session")
def clean_run(tiny_shards, tmp_path_factory):
  """runs.CLEAN (one process, 36 steps) never interrupted: what the runs that are killed,
  sent SIGTERM or stopped by --max_minutes must end equal to. Trained here, on the command's
  own config (runs.train_config). Its model dir."""
  import runs
  from dc_tf.training import checkpointing, trainer
  model_dir = str(tmp_path_factory.mktemp("clean") / "run")
  config = runs.train_config(runs.train_cmd(tiny_shards, model_dir, *runs.CLEAN))
  checkpointing.write_config(model_dir, config)      # as train.py does
  trainer.Trainer(config, tf.distribute.get_strategy()).fit()
  return model_dir


@pytest.fixture(scope="session")
def kill_9_runs(tiny_shards, tmp_path_factory):
  """runs.CLEAN killed mid-epoch, resumed, killed inside a reassignment, resumed (in this
  process) until a --max_minutes stop, resumed to the end."""
  import runs
  model_dir = str(tmp_path_factory.mktemp("kill_9") / "run")
  return dict(runs.kill_9_twice_then_resume(tiny_shards, model_dir), model_dir=model_dir)


@pytest.fixture(scope="session")
def sigterm_run(tiny_shards, tmp_path_factory):
  """runs.CLEAN sent SIGTERM in epoch 1, then resumed to the end by the same command."""
  import runs
  model_dir = str(tmp_path_factory.mktemp("sigterm") / "run")
  return dict(runs.sigterm_then_resume(tiny_shards, model_dir), model_dir=model_dir)


@pytest.fixture(scope="session")
def slurm_two_worker_run(bad_shards, tmp_path_factory):
  """runs.TWO_WORKERS on bad_shards, launched as srun launches a 1-node, 2-task job step: no
  TF_CONFIG, SLURM's variables and --cluster=slurm (so two plain workers), never interrupted.
  Its model dir, the two processes' outputs and the first task's port."""
  import runs
  from workers import start_workers, wait_all
  model_dir = str(tmp_path_factory.mktemp("two_workers") / "run")
  procs = start_workers(lambda i: runs.mw_cmd(bad_shards, model_dir, *runs.TWO_WORKERS),
                        slurm=True)
  codes, outs = wait_all(procs)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  return {"model_dir": model_dir, "outputs": outs, "port_base": procs[0].slurm_port_base}


@pytest.fixture(scope="session")
def two_worker_run(slurm_two_worker_run):
  """slurm_two_worker_run's model dir: what the two-worker tests compare with."""
  return slurm_two_worker_run["model_dir"]


@pytest.fixture(scope="session")
def chief_sigterm_run(bad_shards, tmp_path_factory):
  """runs.TWO_WORKERS on bad_shards as a chief and a worker, the worker sent SIGTERM in
  epoch 1, then both resumed to the end by the same command."""
  import runs
  model_dir = str(tmp_path_factory.mktemp("chief_sigterm") / "run")
  return dict(runs.two_workers_sigterm_then_resume(bad_shards, model_dir), model_dir=model_dir)
