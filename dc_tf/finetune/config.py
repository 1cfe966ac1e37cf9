"""The fine-tuning recipe as one frozen dataclass, built once by `python -m dc_tf.finetune`.

Defaults are facebookresearch/DeeperCluster's README command for Table 2 (README.md l.178:
`eval_pretrain.py --sobel true --sobel2RGB true --nepochs 100 --batch_size 256 --lr 0.1
--wd 0.0001`) and `eval_pretrain.py` itself (momentum 0.9: model_factory.py l.132; the step
decay lr * 0.1 ** (epoch // 30): eval_pretrain.py l.183-186; seed 35: l.48).
"""

from __future__ import annotations

import dataclasses
import json

from dc_tf.config import ConfigError, ModelConfig

RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Args:
    source: a run dir, an export (dir or its trunk.keras), or "random" (`model` then says
      the architecture: the baseline row of Tables 2 and 5).
    output_dir: checkpoints (ckpt/), TensorBoard (tb/), log.jsonl, finetune.json.
    train_pattern, val_pattern: labelled TFRecord shards (the `label` field).
    model: the architecture for `source="random"`; a trained source brings its own.
    sobel2rgb: fold a Sobel front into a trainable 5x5 RGB conv1 (`sobel2RGB`).
    epochs, global_batch, lr, lr_decay, lr_decay_every, momentum, weight_decay, dropout:
      the recipe (module docstring); global_batch is over all replicas.
    num_classes: 0 = 1 + the largest train label.
    seed: init of the new layers, data order and augmentation.
    max_steps: stop (resumably) at this global step; 0 = run to the end (a testing aid).
    trust_model: load an export's trunk.keras whose model card does not match it
      (`export.check_model`, issue 37).
  """
  source: str = ""
  output_dir: str = ""
  train_pattern: str = ""
  val_pattern: str = ""
  model: ModelConfig = ModelConfig(image_size=224, width=1.0)
  sobel2rgb: bool = True
  epochs: int = 100
  global_batch: int = 256
  lr: float = 0.1
  lr_decay: float = 0.1
  lr_decay_every: int = 30
  momentum: float = 0.9
  weight_decay: float = 1e-4
  dropout: float = 0.5
  num_classes: int = 0
  crop_scale_min: float = 0.08
  shuffle_buffer: int = 10_000
  seed: int = 35
  steps_per_loop: int = 20
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  cpu_replicas: int = 0
  mixed_precision: bool = False
  jit_compile: bool = False
  max_steps: int = 0
  trust_model: bool = False

  def validate(self) -> "FinetuneConfig":
    checks = [
        (self.source, "--from is required: a run dir, an export, or 'random'"),
        (self.output_dir, "--output_dir is required"),
        (self.train_pattern, "--train_pattern is required (labelled shards)"),
        (self.val_pattern, "--val_pattern is required (labelled shards)"),
        (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
        (self.global_batch >= 1, f"--global_batch must be >= 1, got {self.global_batch}"),
        (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
        (self.lr_decay_every >= 1, f"--lr_decay_every must be >= 1, got {self.lr_decay_every}"),
        (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
        (self.num_classes >= 0, f"--num_classes must be >= 0, got {self.num_classes}"),
        (0 < self.crop_scale_min <= 1, "--crop_scale_min must be in (0, 1]"),
        (self.steps_per_loop >= 1, "--steps_per_loop must be >= 1"),
        (self.max_steps >= 0, "--max_steps must be >= 0"),
        (self.model.image_size >= 32, f"--image_size must be >= 32, got {self.model.image_size}"),
        (0 < self.model.width <= 4, f"--width must be in (0, 4], got {self.model.width}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(message)
    return self

  def lr_at_epoch(self, epoch: int) -> float:
    """eval_pretrain.py's adjust_learning_rate (l.183-186): lr * 0.1 ** (epoch // 30)."""
    return self.lr * self.lr_decay ** (epoch // self.lr_decay_every)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)
