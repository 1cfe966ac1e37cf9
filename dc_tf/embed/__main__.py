r"""Features (and clusters) of your own photos through a serving export.

  python -m dc_tf.embed --input=photos/ --model=runs/demo/export --output=out/ \
      [--layers=probe_fc7,fc7] [--clusters=20 [--super=2]] [--runner=DirectRunner]

--input: a folder, a list file (`path[<TAB>label]` lines) or a glob of make_shards' TFRecord
shards. --model: an export dir (python -m dc_tf.export) or a run dir (exported once into
OUTPUT/export). Without --runner the one-box path runs; with it, the same shards are written by
a Beam pipeline (RunInference), on any runner Beam's own options name.
"""

from __future__ import annotations

import json
import logging

from absl import flags

from dc_tf.embed import duplicates, features, space

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("input", None, "Folder, list file, or glob of .tfrecord shards.",
                      required=True)
  flags.DEFINE_enum("input_format", "auto", ["auto", "folder", "list", "yfcc_list", "tfrecord"],
                    "auto: a folder, a .tfrecord glob, else a path[<TAB>label] list; "
                    "yfcc_list: YFCC100M's photo_id<TAB>path image list.")
  flags.DEFINE_string("model", None, "Export dir or run dir.", required=True)
  flags.DEFINE_bool("trust_model", False, "Load the model even if its model card is missing "
                    "or does not match, or it holds ops our exports do not (issue 37).")
  flags.DEFINE_string("output", None, "Output folder.", required=True)
  flags.DEFINE_list("layers", [], "Export outputs to write (default: every probe_<layer>).")
  flags.DEFINE_integer("shard_size", 1024, "Rows per output shard.")
  flags.DEFINE_integer("batch_size", 32, "Images per call of the model.")
  flags.DEFINE_bool("dedupe", True, "Skip byte-identical copies (the smallest id is kept).")
  flags.DEFINE_string("runner", "", "Run on Beam with this runner (DirectRunner here; "
                      "DataflowRunner/FlinkRunner/SparkRunner with --beam_options).")
  flags.DEFINE_string("beam_options", "", "Beam's pipeline options for --runner, as one "
                      "string: '--project=P --region=R --temp_location=gs://...'.")
  flags.DEFINE_integer("clusters", 0, "Cluster the features into K (sub-)clusters and write "
                       "OUTPUT/clusters/index.html; 0 = no clustering.")
  flags.DEFINE_integer("super", 1, "Super-clusters M (the hierarchy: M x K clusters).")
  flags.DEFINE_string("cluster_layer", "", "Layer clustered (default: probe_conv4, else "
                      "probe_fc7, else the first).")
  flags.DEFINE_enum("space", space.DEFAULT_SPACE, space.SPACES, "The space the page "
                    "clusters and compares in (dc_tf/embed/space.py).")
  flags.DEFINE_bool("duplicates", False, "Near-duplicate pairs and outliers on the page and "
                    "in OUTPUT/clusters/{duplicates,outliers}.csv.")
  flags.DEFINE_float("duplicate_threshold", duplicates.DEFAULT_THRESHOLD, "Cosine at or "
                     "above which two photos are near-duplicates (benchmarks/photo_clusters.py).",
                     lower_bound=-1, upper_bound=1)
  flags.DEFINE_integer("pca_dim", 0, "PCA dimension before k-means (whitened); 0 = "
                       "min(256, dims, rows // 4).")
  flags.DEFINE_integer("queries", 4, "Query images shown with their nearest neighbours.")


def main(argv):
  del argv
  opts = features.EmbedOptions(
      input=FLAGS.input, model=FLAGS.model, output=FLAGS.output, layers=tuple(FLAGS.layers),
      shard_size=FLAGS.shard_size, batch_size=FLAGS.batch_size, dedupe=FLAGS.dedupe,
      input_format=FLAGS.input_format, trust_model=FLAGS.trust_model).validate()
  if FLAGS.runner:
    from dc_tf.embed import on_beam
    import shlex
    manifest = on_beam.run(opts, ["--runner=" + FLAGS.runner, *shlex.split(FLAGS.beam_options)])
  else:
    manifest = features.run(opts)
  print(json.dumps({k: manifest[k] for k in ("rows", "images_in", "dropped", "layers",
                                             "resumed_shards", "images_per_s")}, indent=1))
  if FLAGS.clusters:
    from dc_tf.embed import clusters
    page = clusters.make_page(FLAGS.output, k=FLAGS.clusters, m=FLAGS.super,
                              layer=FLAGS.cluster_layer, pca_dim=FLAGS.pca_dim,
                              queries=FLAGS.queries, space=FLAGS.space,
                              duplicates=FLAGS.duplicates, threshold=FLAGS.duplicate_threshold)
    print(f"clusters page: {page}")


if __name__ == "__main__":
  from dc_tf import cli
  # Beam pickles what __main__ defines; the pipeline's code lives in dc_tf.embed.on_beam.
  define_flags()
  logging.getLogger().setLevel(logging.INFO)
  cli.run(main)
