r"""Scores a trained trunk against its random-init twin (linear probes per layer, kNN,
cluster NMI/ARI/purity, cluster pictures; optionally Pascal VOC 2007).

  python evaluate.py --checkpoint=runs/demo --train_data='data/train-*.tfrecord' \
      --test_data='data/val-*.tfrecord' --output_dir=runs/demo/eval
  python evaluate.py --checkpoint=runs/demo/export ...    # an exported trunk works too
  python evaluate.py --checkpoint=runs/demo --baseline=random ...   # the floor alone
  python evaluate.py --checkpoint=runs/ours --probe=original ...     # eval_linear.py's probe
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
flags.DEFINE_list("layers", [], "Layers to probe (default: fast conv2,conv4,conv7,conv10,"
                  "conv13,fc6,fc7; original conv1..conv13).")
flags.DEFINE_enum("probe", "fast", ["fast", "original"],
                  "fast: logistic regression (Adam) on fixed centre-crop features; original: "
                  "eval_linear.py's probe (SGD, per-layer lr and its decay, crops on the fly).")
flags.DEFINE_integer("probe_epochs", 0, "Epochs of the linear probe (0 = the protocol's: fast "
                     "60, original 100).")
flags.DEFINE_integer("probe_batch_size", 256, "Batch of --probe=original (the original: 256).")
flags.DEFINE_enum("probe_lr_table", "imagenet", ["imagenet", "places205"],
                  "--probe=original: per-layer learning rates of linear_classif_layers.sh.")
flags.DEFINE_integer("max_train_images", 0, "Cap on probe training images (0 = all).")
flags.DEFINE_integer("cluster_k", 0, "k for cluster NMI (0 = number of labels).")
flags.DEFINE_integer("cluster_sample", 20_000, "Test images the clustering scores and picture "
                     "use: those whose hashed id (seeded by --seed) is smallest; all if fewer.")
flags.DEFINE_string("feature_dir", "", "Local folder for the pooled features written during "
                    "extraction and read back by the probes (default OUTPUT_DIR/features).")
flags.DEFINE_bool("keep_features", False, "Keep the feature files (FEATURE_DIR/<subject>/"
                  "<train|test>/<layer>.f32, float32 rows in shard order) after the run.")
flags.DEFINE_integer("seed", 0, "Seed of the twin, the probes and the cluster sample.")
flags.DEFINE_string("voc_dir", "", "A VOC2007 folder for the VOC classification probes.")
flags.DEFINE_integer("voc_fc6_8_steps", 0, "Also run VOC's fc6-8 protocol for this many steps "
                     "(the original: 150000; 0 = linear probe only).")
flags.DEFINE_integer("voc_all_steps", 0, "Also run VOC's 'all layers' fine-tuning for this "
                     "many steps (the original: 150000, wd 1e-4, lr halved every 10k).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from dc_tf.evaluation import evaluator, linear_original
  original = linear_original.OriginalProbeConfig(
      epochs=FLAGS.probe_epochs or 100, batch_size=FLAGS.probe_batch_size,
      lr_table=FLAGS.probe_lr_table, seed=FLAGS.seed)
  loaded = evaluator.load(FLAGS.checkpoint)
  output_dir = FLAGS.output_dir or os.path.join(
      FLAGS.checkpoint if os.path.isdir(FLAGS.checkpoint) else os.path.dirname(FLAGS.checkpoint),
      "eval")
  run_dir = FLAGS.checkpoint if os.path.isfile(os.path.join(FLAGS.checkpoint, "log.jsonl")) else ""
  report = evaluator.evaluate(
      None if FLAGS.baseline == "random" else loaded,
      train_pattern=FLAGS.train_data, test_pattern=FLAGS.test_data, output_dir=output_dir,
      layers=FLAGS.layers, twin=FLAGS.baseline != "none", seed=FLAGS.seed,
      probe_epochs=FLAGS.probe_epochs or 60, max_train_images=FLAGS.max_train_images,
      cluster_k=FLAGS.cluster_k, run_dir=run_dir, voc_dir=FLAGS.voc_dir,
      voc_fc6_8_steps=FLAGS.voc_fc6_8_steps, voc_all_steps=FLAGS.voc_all_steps,
      probe=FLAGS.probe, original_probe=original, cluster_sample=FLAGS.cluster_sample,
      feature_dir=FLAGS.feature_dir, keep_features=FLAGS.keep_features,
      model_config=loaded.model_config)
  print(open(os.path.join(output_dir, "report.md")).read())
  print(json.dumps(report.get("best_layer", {})))


if __name__ == "__main__":
  cli.run(main)
