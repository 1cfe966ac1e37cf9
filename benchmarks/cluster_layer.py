r"""Which layer's features give k-means clusters that carry class signal? A diagnostic for the
clustering lever of the held-out issue: the trunks `benchmarks/heldout.py` trained (and the
random-init twin), on the selection split (40 classes outside the embedded 20, 4,000
held-back train images: the split that chooses), each layer's features as the reassignment
treats them (PCA-whitened to --pca_dim, L2-normalised), k-means with k = 40, NMI against the
labels. Training clusters fc7 (the paper); a layer whose clusters score far higher is a
candidate target for the sub-class loss on this small trunk.

  python benchmarks/cluster_layer.py --runs=runs/heldout/deepercluster-s0,runs/heldout/rotnet-s0

Rows are merged by trunk into benchmarks/results/cluster_layer.json.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import normalized_mutual_info_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dc_tf.evaluation import evaluator  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "cluster_layer.json")


def cluster_nmi(x: np.ndarray, labels: np.ndarray, k: int, pca_dim: int, seed: int) -> float:
  x = PCA(n_components=min(pca_dim, x.shape[1]), whiten=True, random_state=seed).fit_transform(x)
  x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
  assign = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
  return float(normalized_mutual_info_score(labels, assign))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", required=True, help="comma-separated run dirs")
  p.add_argument("--data", default="shards/tiny/sel_probe-*.tfrecord")
  p.add_argument("--layers", default="conv4,conv7,conv10,conv13,fc6,fc7")
  p.add_argument("--k", type=int, default=40)
  p.add_argument("--pca_dim", type=int, default=64)
  p.add_argument("--seeds", default="0,1")
  args = p.parse_args()
  layers = args.layers.split(",")
  rows = {r["trunk"]: r for r in (json.load(open(RESULTS)) if os.path.exists(RESULTS) else [])}
  twin_done = False
  for run in args.runs.split(","):
    trunk = evaluator.load(os.path.join(ROOT, run))
    subjects = [(run, trunk)]
    if not twin_done:
      subjects.append(("random-init twin", evaluator.random_twin(trunk.model_config, 0)))
      twin_done = True
    for name, t in subjects:
      feats, pools = evaluator.features(t, os.path.join(ROOT, args.data), layers)
      labels = feats["label"]
      row = {"trunk": name, "data": args.data, "images": int(len(labels)), "k": args.k,
             "pca_dim": args.pca_dim, "nmi": {}}
      for layer in layers:
        nmis = [cluster_nmi(feats[layer], labels, args.k, args.pca_dim, int(s))
                for s in args.seeds.split(",")]
        row["nmi"][layer] = {"mean": round(float(np.mean(nmis)), 4),
                             "per_seed": [round(v, 4) for v in nmis],
                             "dims": int(feats[layer].shape[1]), "pool": pools[layer]}
      row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
      print(json.dumps({"trunk": name, **{l: v["mean"] for l, v in row["nmi"].items()}}),
            flush=True)
      rows[name] = row
      json.dump(list(rows.values()), open(RESULTS, "w"), indent=1)


if __name__ == "__main__":
  main()
