r"""Supervised training from a pre-trained trunk (the paper's Tables 2 and 5).

  python -m dc_tf.finetune --flagfile=flags/finetune_imagenet_100ep.cfg \
      --from=runs/deepercluster_yfcc100m --train_pattern=gs://.../imagenet-train-* \
      --val_pattern=gs://.../imagenet-val-* --output_dir=runs/finetune_100ep
  python -m dc_tf.finetune ... --from=random          # the random-init row, same architecture
  TF_CONFIG='{"cluster": {"worker": [...]}, ...}' python -m dc_tf.finetune ...   # multi-worker

--from: a train.py run dir (its newest checkpoint), a converted original (python -m
dc_tf.convert writes a run dir), an export dir or its trunk.keras, or `random` (then
--image_size, --width, --fc_dim, --sobel, --input_pad give the architecture). Re-running the
same command resumes from the newest checkpoint in --output_dir.
"""

from __future__ import annotations

import signal

from absl import flags, logging

from dc_tf import cli
from dc_tf.config import ModelConfig
from dc_tf.finetune.config import FinetuneConfig

FLAGS = flags.FLAGS
_F, _M = FinetuneConfig(), FinetuneConfig().model


def define_flags() -> None:
  flags.DEFINE_string("from", None, "Run dir, export dir, trunk.keras, or 'random'.")
  flags.DEFINE_bool("trust_model", False, "Load --from's trunk.keras even if the model card "
                    "beside it does not match it (issue 37).")
  flags.DEFINE_string("output_dir", None, "Checkpoints, log.jsonl, TensorBoard.")
  flags.DEFINE_string("train_pattern", None, "Labelled training shards (glob, gs:// ok).")
  flags.DEFINE_string("val_pattern", None, "Labelled validation shards.")
  # architecture, for --from=random (a trained trunk brings its own)
  flags.DEFINE_integer("image_size", _M.image_size, "--from=random: input size (paper 224).")
  flags.DEFINE_float("width", _M.width, "--from=random: channel-width multiplier.")
  flags.DEFINE_integer("fc_dim", _M.fc_dim, "--from=random: fc6/fc7 units; 0 = 4096 * width.")
  flags.DEFINE_bool("sobel", _M.sobel, "--from=random: a Sobel front (then folded, "
                    "--sobel2rgb) rather than RGB.")
  flags.DEFINE_integer("input_pad", _M.input_pad, "--from=random: pad before the front; -1 = "
                       "ours (Sobel 2, RGB 0).")
  flags.DEFINE_bool("sobel2rgb", _F.sobel2rgb, "Merge a Sobel front into a trainable 5x5 "
                    "conv1 (eval_pretrain.py --sobel2RGB); false keeps it frozen.")
  # recipe
  flags.DEFINE_integer("epochs", _F.epochs, "Epochs (Table 2: 100, Table 5: 90).")
  flags.DEFINE_integer("global_batch", _F.global_batch, "Images per step over all replicas.")
  flags.DEFINE_float("lr", _F.lr, "Learning rate of the first epochs.")
  flags.DEFINE_float("lr_decay", _F.lr_decay, "Factor applied every --lr_decay_every epochs.")
  flags.DEFINE_integer("lr_decay_every", _F.lr_decay_every, "Epochs between decays.")
  flags.DEFINE_float("momentum", _F.momentum, "SGD momentum.")
  flags.DEFINE_float("weight_decay", _F.weight_decay, "Coupled L2 on every trainable variable.")
  flags.DEFINE_float("dropout", _F.dropout, "Dropout after fc6.")
  flags.DEFINE_integer("num_classes", _F.num_classes, "Classes; 0 = 1 + the largest label.")
  flags.DEFINE_float("crop_scale_min", _F.crop_scale_min, "RandomResizedCrop minimum area.")
  flags.DEFINE_integer("shuffle_buffer", _F.shuffle_buffer, "Shuffle buffer (examples).")
  flags.DEFINE_integer("seed", _F.seed, "New layers' init, data order, augmentation.")
  # running
  flags.DEFINE_integer("steps_per_loop", _F.steps_per_loop, "Steps per tf.function call.")
  flags.DEFINE_integer("checkpoint_every", _F.checkpoint_every, "Steps between checkpoints "
                       "(also at every epoch end).")
  flags.DEFINE_integer("keep_checkpoints", _F.keep_checkpoints, "Checkpoints kept.")
  flags.DEFINE_integer("cpu_replicas", _F.cpu_replicas, "Testing aid: replicas on logical CPUs.")
  flags.DEFINE_bool("mixed_precision", _F.mixed_precision, "Compute in bfloat16 (GPU/TPU), "
                    "float32 variables and logits.")
  flags.DEFINE_bool("jit_compile", _F.jit_compile, "XLA-compile forward and backward (one "
                    "replica).")
  flags.DEFINE_integer("max_steps", _F.max_steps, "Stop (resumably) at this global step; 0 = "
                       "the end.")
  flags.DEFINE_float("max_minutes", 0.0, "Stop (resumably) after this many minutes.")
  flags.DEFINE_enum("cluster", "tf_config", ["tf_config", "slurm"], "Where this process "
                    "learns its place in a multi-worker job (as train.py).")
  flags.DEFINE_integer("slurm_port_base", 8888, "--cluster=slurm: first task's port.")


def config_from_flags() -> FinetuneConfig:
  """The only reader of FLAGS."""
  f = FLAGS
  model = ModelConfig(image_size=f.image_size, width=f.width, fc_dim=f.fc_dim, sobel=f.sobel,
                      input_pad=f.input_pad)
  return FinetuneConfig(
      source=f["from"].value or "", output_dir=f.output_dir or "",
      train_pattern=f.train_pattern or "", val_pattern=f.val_pattern or "", model=model,
      sobel2rgb=f.sobel2rgb, epochs=f.epochs, global_batch=f.global_batch, lr=f.lr,
      lr_decay=f.lr_decay, lr_decay_every=f.lr_decay_every, momentum=f.momentum,
      weight_decay=f.weight_decay, dropout=f.dropout, num_classes=f.num_classes,
      crop_scale_min=f.crop_scale_min, shuffle_buffer=f.shuffle_buffer, seed=f.seed,
      steps_per_loop=f.steps_per_loop, checkpoint_every=f.checkpoint_every,
      keep_checkpoints=f.keep_checkpoints, cpu_replicas=f.cpu_replicas,
      mixed_precision=f.mixed_precision, jit_compile=f.jit_compile,
      max_steps=f.max_steps, trust_model=f.trust_model).validate()


def main(argv):
  del argv
  config = config_from_flags()     # a bad flag value is one line before TensorFlow loads
  from dc_tf import distribute
  from dc_tf.finetune import run

  distribute.set_up_cluster(FLAGS.cluster, FLAGS.slurm_port_base)
  strategy = distribute.make_strategy(config.cpu_replicas)
  finetuner = run.Finetuner(config, strategy)
  logging.info("fine-tuning %s -> %s (%s, %d replicas, %d classes, %d steps an epoch)",
               config.source, config.output_dir, type(strategy).__name__,
               strategy.num_replicas_in_sync, finetuner.num_classes, finetuner.steps_per_epoch)
  signal.signal(signal.SIGTERM, lambda *_: finetuner.request_preemption())
  finetuner.fit(max_seconds=FLAGS.max_minutes * 60)
  if finetuner.history:
    last = finetuner.history[-1]
    logging.info("epoch %d: val top-1 %.2f, top-5 %.2f", last["epoch"], last["val_top1"],
                 last["val_top5"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
