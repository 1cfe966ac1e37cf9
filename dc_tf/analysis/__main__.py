r"""Cluster analyses of a training run (issue 38; the paper's Figs. 4-7).

  python -m dc_tf.analysis nmi RUN_DIR [--labels_from=EXPORT --confidence=0.75]
      [--reference=ROTNET_RUN] [--data_pattern=...] [--output_dir=RUN_DIR/analysis]
  python -m dc_tf.analysis page RUN_DIR [--epoch=-1] [--clusters=12] [--members=9]
  python -m dc_tf.analysis colour RUN_DIR [--reference=ROTNET_RUN] [--clusters=3000]

--data_pattern defaults to the run's own (config.json). Writes under --output_dir:
nmi.{csv,md,png}; page/index.html; colour_std.{csv,png} and colour_lowest.png.
"""

from __future__ import annotations

import collections
import json
import os

from absl import flags

FLAGS = flags.FLAGS
COMMANDS = ("nmi", "page", "colour")


def define_flags():
  flags.DEFINE_string("data_pattern", "", "Shards to read metadata and images from "
                      "(default: the run's --data_pattern).")
  flags.DEFINE_string("output_dir", "", "Where results go (default: RUN_DIR/analysis).")
  flags.DEFINE_string("labels_from", "", "nmi: a supervised classifier's export (an output "
                      "'logits'); its confident labels are scored as field 'imagenet'.")
  flags.DEFINE_float("confidence", 0.75, "nmi: keep a predicted label where its softmax "
                     "probability exceeds this (the paper: 75%).", lower_bound=0, upper_bound=1)
  flags.DEFINE_bool("trust_model", False, "Load --labels_from even if its model card is "
                    "missing or does not match.")
  flags.DEFINE_string("reference", "", "nmi, colour: a reference run (RotNet) whose trunk is "
                      "clustered with this run's k on the same shards.")
  flags.DEFINE_integer("epoch", -1, "page: the table of this reassignment epoch (-1: newest).")
  flags.DEFINE_integer("clusters", 0, "page: clusters shown (default 12); colour: clusters "
                       "sampled (default 3000).", lower_bound=0)
  flags.DEFINE_integer("members", 9, "page: members shown a cluster.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed of the cluster and member samples.")
  flags.DEFINE_integer("chunk", 8192, "Records per streamed chunk.", lower_bound=1)


def main(argv):
  from dc_tf.config import UserError
  from dc_tf.training import checkpointing
  args = argv[1:]
  if len(args) != 2 or args[0] not in COMMANDS:
    raise UserError(f"usage: python -m dc_tf.analysis {{{'|'.join(COMMANDS)}}} RUN_DIR [flags]; "
                    f"got {' '.join(args) or 'nothing'}")
  command, run_dir = args
  config = checkpointing.read_config(run_dir)
  pattern = FLAGS.data_pattern or config.data.data_pattern
  out = FLAGS.output_dir or os.path.join(run_dir, "analysis")
  from dc_tf.analysis import nmi
  tables = nmi.kept_tables(run_dir)
  reference = None
  if FLAGS.reference and command in ("nmi", "colour"):
    from dc_tf.analysis import reference as reference_lib
    reference = reference_lib.clusters_of(FLAGS.reference, pattern, config)
  if command == "nmi":
    result = run_nmi(tables, reference, pattern, out)
  elif command == "page":
    from dc_tf.analysis import page
    table = _table_of(tables, FLAGS.epoch, run_dir)
    rows = page.write_page(table, pattern, os.path.join(out, "page"),
                           clusters=FLAGS.clusters or 12, members=FLAGS.members,
                           seed=FLAGS.seed, chunk=FLAGS.chunk)
    result = {"page": os.path.join(out, "page", "index.html"), "epoch": table.name,
              "clusters": len(rows)}
  else:
    from dc_tf.analysis import colour
    table = _table_of(tables, FLAGS.epoch, run_dir)
    count = FLAGS.clusters or 3000
    ours = colour.colour_std(table, colour.sample_clusters(table, count, FLAGS.seed), pattern)
    ref = (colour.colour_std(reference, colour.sample_clusters(reference, count, FLAGS.seed),
                             pattern) if reference else None)
    result = colour.write(ours, ref, out)
    result["lowest"] = colour.lowest_grid(table, ours, pattern,
                                          os.path.join(out, "colour_lowest.png"))
  print(json.dumps(result, indent=1, default=str))


def run_nmi(tables, reference, pattern, out) -> dict:
  from dc_tf.analysis import metadata, nmi
  counts = collections.Counter()
  for chunk in metadata.raw_chunks(pattern, FLAGS.chunk):
    metadata.tag_counts(chunk["tags"], counts)
  if FLAGS.labels_from:
    from dc_tf.evaluation import evaluator
    classifier = evaluator.load(FLAGS.labels_from, FLAGS.trust_model)
    chunks = metadata.labelled_chunks(pattern, classifier, classifier.model_config.image_size,
                                      FLAGS.confidence)
  else:
    chunks = metadata.raw_chunks(pattern, FLAGS.chunk)
  scored = nmi.score(tables + ([reference] if reference else []), chunks, counts)
  ref = {reference.name: scored.pop(reference.name)} if reference else None
  return nmi.write(scored, ref, out)


def _table_of(tables, epoch, run_dir):
  from dc_tf.training import checkpointing
  if epoch < 0:
    return tables[-1]
  for t in tables:
    if t.name == epoch:
      return t
  raise checkpointing.CheckpointError(
      f"--epoch={epoch}: no such table in {run_dir}/assignments (kept: "
      f"{[t.name for t in tables]})")


if __name__ == "__main__":
  from dc_tf import cli
  from dc_tf.analysis import __main__ as _module
  _module.define_flags()
  cli.run(_module.main)
