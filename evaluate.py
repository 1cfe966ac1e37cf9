r"""Scores a trained trunk against its random-init twin (linear probes per layer, kNN,
cluster NMI/ARI/purity, cluster pictures; optionally Pascal VOC 2007).

  python evaluate.py --checkpoint=runs/demo --train_data='data/train-*.tfrecord' \
      --test_data='data/val-*.tfrecord' --output_dir=runs/demo/eval
  python evaluate.py --checkpoint=runs/demo/export ...    # an exported trunk works too
  python evaluate.py --checkpoint=runs/demo --baseline=random ...   # the floor alone
"""

import json
import os

from absl import flags

from dc_tf import cli

flags.DEFINE_string("checkpoint", "runs/demo", "Training run dir, checkpoint prefix or export dir.")
flags.DEFINE_string("train_data", "data/train-*.tfrecord", "Labelled shards to fit probes on.")
flags.DEFINE_string("test_data", "data/val-*.tfrecord", "Labelled shards to score on.")
flags.DEFINE_string("output_dir", "", "Report folder (default CHECKPOINT/eval).")
flags.DEFINE_enum("baseline", "twin", ["twin", "none", "random"],
                  "twin: trained and random-init side by side; none: trained only; "
                  "random: the random-init trunk alone.")
flags.DEFINE_list("layers", "conv2,conv4,conv7,conv10,conv13,fc6,fc7", "Layers to probe.")
flags.DEFINE_integer("probe_epochs", 60, "Epochs of the linear probe.")
flags.DEFINE_integer("max_train_images", 0, "Cap on probe training images (0 = all).")
flags.DEFINE_integer("cluster_k", 0, "k for cluster NMI (0 = number of labels).")
flags.DEFINE_integer("seed", 0, "Seed of the twin and the probes.")
flags.DEFINE_string("voc_dir", "", "A VOC2007 folder for the VOC classification probes.")
flags.DEFINE_integer("voc_fc6_8_steps", 0, "Also run VOC's fc6-8 protocol for this many steps "
                     "(the original: 150000; 0 = linear probe only).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from dc_tf.evaluation import evaluator
  loaded = evaluator.load(FLAGS.checkpoint)
  output_dir = FLAGS.output_dir or os.path.join(
      FLAGS.checkpoint if os.path.isdir(FLAGS.checkpoint) else os.path.dirname(FLAGS.checkpoint),
      "eval")
  run_dir = FLAGS.checkpoint if os.path.isfile(os.path.join(FLAGS.checkpoint, "log.jsonl")) else ""
  report = evaluator.evaluate(
      None if FLAGS.baseline == "random" else loaded,
      train_pattern=FLAGS.train_data, test_pattern=FLAGS.test_data, output_dir=output_dir,
      layers=FLAGS.layers, twin=FLAGS.baseline != "none", seed=FLAGS.seed,
      probe_epochs=FLAGS.probe_epochs, max_train_images=FLAGS.max_train_images,
      cluster_k=FLAGS.cluster_k, run_dir=run_dir, voc_dir=FLAGS.voc_dir,
      voc_fc6_8_steps=FLAGS.voc_fc6_8_steps,
      model_config=loaded.model_config)
  print(open(os.path.join(output_dir, "report.md")).read())
  print(json.dumps(report.get("best_layer", {})))


if __name__ == "__main__":
  cli.run(main)
