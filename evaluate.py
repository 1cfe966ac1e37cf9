r"""Scores a trained trunk against its random-init twin (linear probes per layer, kNN,
cluster NMI/ARI/purity, cluster pictures; optionally Pascal VOC 2007 and instance retrieval).

  python evaluate.py --checkpoint=runs/demo --train_data='data/train-*.tfrecord' \
      --test_data='data/val-*.tfrecord' --output_dir=runs/demo/eval
  python evaluate.py --checkpoint=runs/demo/export ...    # an exported trunk works too
  python evaluate.py --checkpoint=runs/demo --baseline=random ...   # the floor alone
  python evaluate.py --checkpoint=runs/ours --probe=original ...     # eval_linear.py's probe
  python evaluate.py --checkpoint=runs/ours --retrieval=oxford5k,paris6k --retrieval_dir=DIR
"""

import json
import os

from absl import flags

from dc_tf import cli

flags.DEFINE_string("checkpoint", "runs/demo", "Training run dir, checkpoint prefix or export dir.")
flags.DEFINE_bool("trust_model", False, "Load an export even if its model card is missing or "
                  "does not match, or it holds ops our exports do not (issue 37).")
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
flags.DEFINE_enum("probe_lr_table", "imagenet",
                  ["imagenet", "places205", "imagenet_conv13", "places205_conv13"],
                  "--probe=original: per-layer learning rates of linear_classif_layers.sh "
                  "(Fig. 2 / Table 4), or conv13.sh's (Table 3; with --layers=conv13).")
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
flags.DEFINE_string("voc_split", "", "VOC train/test partition: trainval/test or train/val "
                    "(empty: each protocol's original, trainval/test for the VOC probe, fc6-8 "
                    "and all, train/val for --voc_conv13_epochs as conv13.sh runs it).")
flags.DEFINE_integer("voc_conv13_epochs", 0, "Also run Table 3's VOC column: eval_linear.py on "
                     "conv13 with a masked BCE for this many epochs (conv13.sh: 60; 0 = off).")
flags.DEFINE_list("retrieval", [], "Instance retrieval (Table 6) on these of oxford5k, "
                  "paris6k, roxford5k, rparis6k (R-MAC on conv13, eval_retrieval.py).")
flags.DEFINE_string("retrieval_dir", "", "Folder holding <dataset>/jpg and its ground truth.")
flags.DEFINE_integer("retrieval_size", 1024, "Longer image side for retrieval (the original: "
                     "1024).")
flags.DEFINE_integer("retrieval_pca", 512, "PCA-whitening dimension of the R-MAC regions.")
flags.DEFINE_string("retrieval_blacklist", "", "A file of Paris image names to drop (default: "
                    "eval_retrieval.py's 20).")
flags.DEFINE_integer("batch_size", 256, "Images a replica extracts at a time (the fast probe's "
                     "features, kNN, clustering).")
flags.DEFINE_integer("cpu_replicas", 0, "Replicas on logical CPU devices (a testing aid); "
                     "local GPUs are used as replicas without it.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from dc_tf import distribute
  from dc_tf.evaluation import evaluator, linear_original, voc
  if FLAGS.voc_split:
    voc.parse_splits(FLAGS.voc_split)           # a bad value fails before any model loads
  if FLAGS.retrieval and not FLAGS.retrieval_dir:
    raise evaluator.UserError("--retrieval needs --retrieval_dir")
  strategy = distribute.make_strategy(FLAGS.cpu_replicas, local_only=True)
  original = linear_original.OriginalProbeConfig(
      epochs=FLAGS.probe_epochs or 100, batch_size=FLAGS.probe_batch_size,
      lr_table=FLAGS.probe_lr_table, seed=FLAGS.seed)
  with strategy.scope():
    loaded = evaluator.load(FLAGS.checkpoint, trust=FLAGS.trust_model)
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
      batch_size=FLAGS.batch_size,
      model_config=loaded.model_config, strategy=strategy, voc_split=FLAGS.voc_split,
      voc_conv13_epochs=FLAGS.voc_conv13_epochs, retrieval=evaluator.RetrievalOptions(
          datasets=tuple(FLAGS.retrieval), root=FLAGS.retrieval_dir,
          max_side=FLAGS.retrieval_size, pca_dim=FLAGS.retrieval_pca,
          blacklist=FLAGS.retrieval_blacklist))
  print(open(os.path.join(output_dir, "report.md")).read())
  print(json.dumps(report.get("best_layer", {})))


if __name__ == "__main__":
  cli.run(main)
