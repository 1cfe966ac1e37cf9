"""The experiment configuration: a frozen dataclass tree built once at the edge.

`train.py` / `evaluate.py` turn absl flags into an `ExperimentConfig`
(`dc_tf.flags.config_from_flags`), call `validate()`, log it and write it to the
model dir as `config.json`. Nothing below the entry points reads FLAGS.

Symbols follow Caron et al., ICCV 2019 ("Unsupervised Pre-training of Image
Features on Non-Curated Data"):
  m  number of super-clusters (k-means on all data);
  k  number of sub-clusters inside each super-cluster;
  S  number of super-classes = (super-cluster, rotation) pairs = 4m.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MODES = ("deepercluster", "rotnet", "deepcluster")
NUM_ROTATIONS = 4


class UserError(Exception):
  """Something the user can fix (a flag, a path, a file): the entry points print its message
  as one line, `error: ...`, and exit with status 2, without a traceback."""


class ConfigError(UserError, ValueError):
  """A configuration that cannot work; the message names the flag at fault."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  data_pattern: str = "data/train-*.tfrecord"
  eval_pattern: str = "data/val-*.tfrecord"   # labelled held-out slice (kNN monitor)
  image_size: int = 32
  crop_scale_min: float = 0.08                # RandomResizedCrop scale range (0.08, 1)
  shuffle_buffer: int = 4096
  num_parallel_calls: int = -1                # -1 = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  image_size: int = 32
  width: float = 0.25                          # channel-width multiplier (1 = paper)
  fc_dim: int = 0                              # 0 = round(4096 * width)
  sobel: bool = True
  dropout: float = 0.5
  input_pad: int = -1                          # zero pixels before the front (Sobel 3x3 or
                                               # RGB conv1); -1 = ours: Sobel 2, RGB 0

  @property
  def fc_units(self) -> int:
    return self.fc_dim or max(8, int(round(4096 * self.width)))

  @property
  def pad(self) -> int:
    return (2 if self.sobel else 0) if self.input_pad < 0 else self.input_pad

  @property
  def front(self) -> str:
    """The trunk's front, as a flag line: weights trained on one front see other pixels
    on another (issue 26)."""
    return f"--sobel={str(self.sobel).lower()} --input_pad={self.pad}"


@dataclasses.dataclass(frozen=True)
class ClusteringConfig:
  m: int = 4                      # super-clusters
  k: int = 80                     # sub-clusters per super-cluster
  reassign_every: int = 3         # T, epochs between reassignments
  pca_dim: int = 128              # 0 = keep all dimensions
  pca_sample: int = 0             # rows used to fit PCA; 0 = all
  kmeans_iters: int = 20
  kmeans_init: str = "random"     # or "kmeans++"
  chunk_size: int = 8192          # rows per assignment chunk (never N x k at once)
  fit_sample: int = 3_150_000     # rows per replica (GPU) that PCA and centroids are
                                  # fitted on, as the original's per-process cache; chosen
                                  # globally by a hash of the image id, so any layout of
                                  # the same replica count fits on the same rows; 0 = all;
                                  # all rows are then assigned
  feature_dtype: str = "float32"  # or float16: the features held for clustering
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  mode: str = "deepercluster"
  model_dir: str = "runs/demo"
  epochs: int = 6
  epoch_size: int = 0                 # images sampled per epoch; 0 = epoch_fraction of the pool
  epoch_fraction: float = 1.0         # with epoch_size 0: this share of the pool an epoch
                                      # (the original's DeepCluster mode draws a quarter)
  batch_per_replica: int = 64
  all_rotations: bool = True          # each image appears with its 4 rotations in a batch
  lr: float = 0.1
  warmup_epochs: float = 0.0
  schedule: str = "constant"          # constant | cosine
  momentum: float = 0.9
  weight_decay: float = 1e-5          # coupled L2, as torch.optim.SGD in the original
  uniform_sampler: bool = True
  reinit_heads: bool = True
  rotnet_warmup_epochs: int = 0       # rotation-only epochs before the first clustering
  cpu_replicas: int = 0               # >1: replicas per worker on logical CPUs (testing aid)
  steps_per_loop: int = 10
  checkpoint_every: int = 200         # steps; also at every epoch end
  keep_checkpoints: int = 3
  keep_assignments: int = 0           # assignment tables kept under MODEL_DIR/assignments
                                      # (one per reassignment, for the cluster analyses); 0 = all
  seed: int = 0
  mixed_precision: bool = False
  jit_compile: bool = False
  init_checkpoint: str = ""
  require_init_checkpoint: bool = False  # refuse to start from random weights (paper preset)
  export_dir: str = ""
  knn_monitor: bool = True            # quick kNN on eval_pattern at each reassignment
  collective_timeout: float = 0.0     # seconds without collective progress; 0 = wait forever


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  clustering: ClusteringConfig = ClusteringConfig()
  train: TrainConfig = TrainConfig()

  # --- derived quantities (one place for the mode rules) ---------------------
  @property
  def num_rotations(self) -> int:
    return 1 if self.train.mode == "deepcluster" else NUM_ROTATIONS

  @property
  def num_super_clusters(self) -> int:
    """m; RotNet has no clusters (one trivial super-cluster)."""
    if self.train.mode == "rotnet":
      return 1
    if self.train.mode == "deepcluster":
      return 1
    return self.clustering.m

  @property
  def num_super_classes(self) -> int:
    """S = 4m (rotation x super-cluster)."""
    return self.num_super_clusters * self.num_rotations

  @property
  def num_sub_classes(self) -> int:
    """k sub-classes per super-class; 0 when there is no clustering (RotNet)."""
    return 0 if self.train.mode == "rotnet" else self.clustering.k

  @property
  def uses_clustering(self) -> bool:
    return self.train.mode != "rotnet"

  def validate(self) -> "ExperimentConfig":
    t, c, d, mo = self.train, self.clustering, self.data, self.model
    checks = [
        (t.mode in MODES, f"--mode must be one of {MODES}, got {t.mode!r}"),
        (d.image_size == mo.image_size, "data and model image_size differ"),
        (mo.image_size >= 32, f"--image_size must be >= 32 (5 max-pools), got {mo.image_size}"),
        (0 < mo.width <= 4, f"--width must be in (0, 4], got {mo.width}"),
        (-1 <= mo.input_pad <= 3, f"--input_pad must be in -1..3, got {mo.input_pad}"),
        (c.m >= 1, f"--m must be >= 1, got {c.m}"),
        (not self.uses_clustering or c.k >= 2, f"--k must be >= 2, got {c.k}"),
        (c.reassign_every >= 1, f"--reassign_every must be >= 1, got {c.reassign_every}"),
        (c.kmeans_init in ("random", "kmeans++"), f"--kmeans_init: {c.kmeans_init!r}"),
        (c.fit_sample >= 0, f"--fit_sample must be >= 0, got {c.fit_sample}"),
        (c.feature_dtype in ("float32", "float16"), f"--feature_dtype: {c.feature_dtype!r}"),
        (t.batch_per_replica >= 1, "--batch_per_replica must be >= 1"),
        (t.epochs >= 1, f"--epochs must be >= 1, got {t.epochs}"),
        (t.epoch_size >= 0, f"--epoch_size must be >= 0, got {t.epoch_size}"),
        (0 < t.epoch_fraction <= 1, f"--epoch_fraction must be in (0, 1], got {t.epoch_fraction}"),
        (t.lr > 0, f"--lr must be > 0, got {t.lr}"),
        (t.schedule in ("constant", "cosine"), f"--schedule: {t.schedule!r}"),
        (t.cpu_replicas >= 0, f"--cpu_replicas must be >= 0, got {t.cpu_replicas}"),
        (t.steps_per_loop >= 1, "--steps_per_loop must be >= 1"),
        (t.keep_assignments >= 0, f"--keep_assignments must be >= 0, got {t.keep_assignments}"),
        (0 < d.crop_scale_min <= 1, "--crop_scale_min must be in (0, 1]"),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(message)
    return self

  def replace(self, **sections: Any) -> "ExperimentConfig":
    """Returns a copy with whole sections or fields replaced: replace(train={'lr': 1})."""
    updates = {}
    for name, value in sections.items():
      current = getattr(self, name)
      updates[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(self, **updates)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def summary(self) -> str:
    """One line for the screen: what runs, on what, for how long (config.json has it all)."""
    t, c, d, mo = self.train, self.clustering, self.data, self.model
    clusters = (f"m={self.num_super_clusters} x k={c.k}, re-cluster every {c.reassign_every}"
                if self.uses_clustering else "no clustering")
    return (f"{t.mode}: {clusters}; VGG-16 width {mo.width:g} at {mo.image_size} px; "
            f"{t.epochs} epochs, batch {t.batch_per_replica}/replica, lr {t.lr:g} "
            f"{t.schedule}; data {d.data_pattern}; run dir {t.model_dir}")

  @classmethod
  def from_dict(cls, d: dict) -> "ExperimentConfig":
    sections = {"data": DataConfig, "model": ModelConfig,
                "clustering": ClusteringConfig, "train": TrainConfig}
    kwargs = {}
    for name, klass in sections.items():
      known = {f.name for f in dataclasses.fields(klass)}
      kwargs[name] = klass(**{k: v for k, v in d.get(name, {}).items() if k in known})
    return cls(**kwargs)

  @classmethod
  def from_json(cls, text: str) -> "ExperimentConfig":
    return cls.from_dict(json.loads(text))
