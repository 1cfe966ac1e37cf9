r"""Trains DeeperCluster (or RotNet / DeepCluster) and exports the trunk.

  python train.py                                    # the CPU demo on the embedded data
  python train.py --flagfile=flags/deepercluster_yfcc100m.cfg --data_pattern=gs://...
  TF_CONFIG='{"cluster": {"worker": [...]}, "task": {...}}' python train.py ...
  srun python train.py --cluster=slurm ...            # docs/launching-on-a-cluster.md

Re-running the same command resumes from the last checkpoint in --model_dir.
"""

import os
import signal
import sys

from absl import flags, logging

from dc_tf import cli

cli.define_train_flags()
DEFAULT_FLAGFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags", "demo.cfg")


def print_plan(config):
  from dc_tf import plan
  from dc_tf.data import reader
  f = flags.FLAGS
  images = f.num_images or reader.pool_size(config.data.data_pattern,
                                            cache_dir=config.train.model_dir)
  print(plan.format_plan(plan.memory_plan(config, f.num_replicas, f.replicas_per_worker, images),
                         f.device_gb))
  print()
  print(plan.format_reassignment(plan.reassignment_plan(
      config, f.num_replicas, f.replicas_per_worker, images, f.host_gb)))


def main(argv):
  del argv
  config = cli.config_from_flags()   # a bad flag value is one line before TensorFlow loads
  if flags.FLAGS.plan:
    print_plan(config)
    return
  import tensorflow as tf
  from dc_tf import distribute
  from dc_tf.data import reader
  from dc_tf.training import checkpointing, trainer

  # TF_CONFIG from TFJob / Vertex AI as is, or from the SLURM job step: before any device use
  distribute.set_up_cluster(flags.FLAGS.cluster, flags.FLAGS.slurm_port_base)
  reader.list_shards(config.data.data_pattern)  # fail fast, naming the pattern
  strategy = distribute.make_strategy(config.train.cpu_replicas)
  checkpointing.write_config(config.train.model_dir, config)
  logging.info("%s (%s, %d replicas; full config in %s)", config.summary(),
               type(strategy).__name__, strategy.num_replicas_in_sync,
               os.path.join(config.train.model_dir, "config.json"))
  run = trainer.Trainer(config, strategy)

  def on_sigterm(signum, frame):  # preemption: finish the current loop, save, exit cleanly
    del signum, frame
    run.request_preemption()
  signal.signal(signal.SIGTERM, on_sigterm)
  try:
    run.fit(max_seconds=flags.FLAGS.max_minutes * 60)
  except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
          tf.errors.CancelledError) as e:
    raise SystemExit(
        f"worker {distribute.worker_index(strategy)} of {distribute.num_workers_in_tf_config()}: "
        f"a collective failed: a peer worker is stopped, dead, crashed or unreachable "
        f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Restart every worker with the "
        "same command: training resumes from the last checkpoint in --model_dir.") from e
  if run.preempted:
    logging.warning("preempted: checkpoint saved at step %d; re-run the same command to resume",
                    int(run.step.numpy()))
    return
  if not flags.FLAGS.export:
    return
  export_dir = config.train.export_dir or os.path.join(config.train.model_dir, "export")
  card = run.export(export_dir)
  if card:
    logging.info("exported to %s (%d parameters)", export_dir, card["parameters"])


if __name__ == "__main__":
  # With no flagfile given, the demo preset (embedded data, CPU-sized model) is used.
  if not any(a.startswith(("--flagfile", "-flagfile")) for a in sys.argv[1:]):
    sys.argv.insert(1, f"--flagfile={DEFAULT_FLAGFILE}")
  cli.run(main)
