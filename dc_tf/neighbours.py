r"""The photos most like a query photo, from features written by `python -m dc_tf.embed`.

  python -m dc_tf.neighbours --features=out/ --query=photo.jpg -n 10 \
      [--layer=probe_conv4] [--space=pca_l2]

The query goes through the same serving export the features came from (its sha256 is checked
against embed.json's), then through the same space as the rows (`dc_tf/embed/space.py`: the
fit saved in OUT/space-<layer>.npz by the clusters page, or made now on the embedded rows and
saved), then a brute-force cosine scan over the layer's rows prints the top n: rank, cosine
score in the space, image id, path. Defaults (layer, space): `space.DEFAULT_LAYER`,
`space.DEFAULT_SPACE`, chosen by benchmarks/photo_clusters.py (issue 36).

The scan reads every row: fine for a folder (100k rows x 4096 dims is 1.6 GB, a second or two).
At 100M rows use a vector index built once over the same shards instead: faiss
(`IndexIVFPQ` or `IndexHNSWFlat` on L2-normalised rows, whose inner product is the cosine;
the `.npy` shards memory-map with `np.load(mmap_mode="r")` and are added shard by shard,
`index.csv`'s row number is the faiss id), or ScaNN; or the clusters as a coarse index:
scan only the rows of the query's nearest centroids.
"""

from __future__ import annotations

import os

import numpy as np

from dc_tf.config import UserError


def search(features_dir: str, query: bytes, n: int = 10, layer: str = "", space: str = "",
           trust: bool = False):
  """[(rank, score, row)] of the n rows nearest `query`'s bytes in `space` (default
  space.DEFAULT_SPACE), best first. The model embed.json names is checked before it loads
  (`export.check_model`; `trust` loads one it refuses)."""
  from dc_tf.data import make_shards
  from dc_tf.embed import clusters, features, space as spaces
  name = spaces.check_name(space or spaces.DEFAULT_SPACE)
  rows, x, manifest, layer = clusters.load_features(features_dir, layer)
  why = make_shards.check_image(query)[0]
  if why:
    raise UserError(f"--query is not a usable image: {why}")
  model_dir = manifest["model"]
  if not os.path.isabs(model_dir) and not os.path.exists(model_dir):
    model_dir = os.path.join(features_dir, model_dir)
  model = features.Model(model_dir, trust=trust)
  if model.sha256 != manifest["model_sha256"]:
    raise UserError(f"the export at {model_dir} is not the one {features_dir} was embedded "
                    f"with (sha256 {model.sha256[:12]}..., embed.json says "
                    f"{manifest['model_sha256'][:12]}...)")
  fitted = spaces.load_or_fit(features_dir, rows, x, manifest, layer, name)
  y = fitted.apply(x)
  q = fitted.apply(model([query], [layer])[layer])
  scores = (q @ y.T)[0]
  top = np.argsort(-scores, kind="stable")[:min(n, len(x))]
  return [(r + 1, float(scores[i]), rows[i]) for r, i in enumerate(top)]


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  if not os.path.isfile(f.query):
    raise UserError(f"--query not found: {f.query}")
  with open(f.query, "rb") as fh:
    query = fh.read()
  for rank, score, row in search(f.features, query, f.n, f.layer, f.space, f.trust_model):
    print(f"{rank:3d}  {score:.4f}  {row.image_id}  {row.path}")


if __name__ == "__main__":
  from absl import flags
  from dc_tf import cli
  flags.DEFINE_string("features", None, "An output folder of python -m dc_tf.embed.",
                      required=True)
  flags.DEFINE_string("query", None, "The query photo.", required=True)
  flags.DEFINE_integer("n", 10, "Matches to print.")
  flags.DEFINE_string("layer", "", "Embedded layer to compare (default probe_conv4, else "
                      "probe_fc7, else the first).")
  from dc_tf.embed import space
  flags.DEFINE_enum("space", space.DEFAULT_SPACE, space.SPACES, "The space the query and the "
                    "rows are compared in (dc_tf/embed/space.py).")
  flags.DEFINE_bool("trust_model", False, "Load the model embed.json names even if its model "
                    "card is missing or does not match, or it holds ops our exports do not.")
  cli.run(main)
