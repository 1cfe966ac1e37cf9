r"""Which layer and space make the clusters page and its neighbours trustworthy, and which
cosine marks a near-duplicate? (issue 36 items 2 and 3) Measured on labelled images that
chose nothing else: Tiny ImageNet's 200-class val (val.zip, read in place, 10,000 images,
labels from val_annotations.txt).

  python benchmarks/photo_clusters.py \
      --exports=demo:/tmp/photo_runs/demo/export,rotnet:/tmp/photo_runs/rotnet/export --twin=demo

Split, fixed: the classes sorted by wnid, those at even positions CHOOSE (the defaults are
set from them), those at odd positions REPORT (the numbers a user may expect). Each half is
written as a class-folder tree under --work (not in the repo) and embedded with
`python -m dc_tf.embed`'s own code (features.run), through each export and the random-init
twin (`--twin=NAME`: NAME's architecture from its model card, random weights). Then, for
every probe_* layer and every space (space.py: raw, centred_l2, pca_l2, fitted on the half's
rows as the page fits them on a user's):

  nmi, purity   of the page's clusters (clusters.cluster_rows: hierarchy.cluster with m = 1,
                k = the half's classes) against the labels
  p@5, p@10     the neighbours' leave-one-out precision: the share of each image's k nearest
                other images of its class (chance: about 1 / classes)
  duplicates    planted copies of every --dup_every-th image (re-encoded at JPEG quality 40,
                resized to 3/4, centre-cropped to 90% and resized back), embedded with the
                half: recall and precision of the planted pairs (an original and its copy,
                two copies of one original) among all pairs above each threshold; copies are
                left out of the three measures above

The choice (first export, CHOOSE half): the (layer, space) with the best p@10, and the
threshold with the best F1 of the planted pairs in that space (the middle of a tie); the
REPORT half's numbers at that choice are printed beside it, and the same for the module's
current defaults (space.DEFAULT_LAYER, space.DEFAULT_SPACE: "defaults"). Results:
benchmarks/results/photo_clusters.json. A smoke run (--classes=4 --max_per_class=10) takes
about a minute on 2 cores.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from dc_tf.embed import clusters, duplicates as dups, features, space  # noqa: E402

ZIP = "/work/shared/datasets/tiny-imagenet-200/val.zip"
THRESHOLDS = np.round(np.arange(0.50, 1.0001, 0.01), 2)


def split_classes(annotations: dict, classes: int) -> dict:
  """{"choose": [wnids at even positions], "report": [odd]}, sorted by wnid, the first
  `classes` of each (0 = all)."""
  wnids = sorted(set(annotations.values()))
  halves = {"choose": wnids[0::2], "report": wnids[1::2]}
  return {h: (w[:classes] if classes else w) for h, w in halves.items()}


def read_annotations(z: zipfile.ZipFile) -> dict:
  name = next(n for n in z.namelist() if n.endswith("val_annotations.txt"))
  return {line.split("\t")[0]: line.split("\t")[1]
          for line in z.read(name).decode().splitlines() if line.strip()}


def write_half(z, annotations, wnids, folder, max_per_class, dup_every) -> dict:
  """The half as folder/<wnid>/<file> plus the copies as folder/<wnid>/<stem>.<kind>.jpg;
  returns {copy key: original key} (keys as embed's: the path below the folder)."""
  prefix = next(n for n in z.namelist() if n.endswith("val_annotations.txt"))
  prefix = prefix.rsplit("/", 1)[0] + "/images/"
  by_class = {w: sorted(f for f, c in annotations.items() if c == w) for w in wnids}
  planted = {}
  for w, files in by_class.items():
    os.makedirs(os.path.join(folder, w), exist_ok=True)
    for i, f in enumerate(files[:max_per_class] if max_per_class else files):
      key = f"{w}/{f}"
      path = os.path.join(folder, key)
      data = z.read(prefix + f)
      if not os.path.exists(path):
        with open(path, "wb") as fh:
          fh.write(data)
      if dup_every and i % dup_every == 0:
        for kind, copy in dups.planted_copies(data).items():
          ckey = f"{w}/{f.rsplit('.', 1)[0]}.{kind}.jpg"
          planted[ckey] = key
          if not os.path.exists(os.path.join(folder, ckey)):
            with open(os.path.join(folder, ckey), "wb") as fh:
              fh.write(copy)
  return planted


def twin_export(of: str, work: str) -> str:
  """A random-init export of `of`'s architecture (its model card's config), made once."""
  from dc_tf import export
  from dc_tf.config import ModelConfig
  from dc_tf.models import vgg
  with open(os.path.join(of, export.CARD_FILE)) as f:
    card = json.load(f)
  model = card["config"].get("model")
  if not model:
    raise SystemExit(f"error: {of}'s model card has no model config: give the twin as an "
                     "export in --exports instead of --twin")
  config = ModelConfig(**model)
  target = os.path.join(work, "twin-" + card["sha256"]["serving"][:12])
  if not os.path.exists(os.path.join(target, export.CARD_FILE)):
    import keras
    keras.utils.set_random_seed(0)
    export.export(vgg.trunk_from_config(config), target, image_size=config.image_size,
                  config={"model": dataclasses.asdict(config)})
  return target


def duplicate_curve(y, rows, planted) -> list[dict]:
  """Recall and precision of the planted pairs at each of THRESHOLDS, and recall by kind of
  copy. All pairs are counted block by block (duplicates.count_above), never listed: in a
  raw space nearly every pair is above 0.5."""
  index = {r.key: i for i, r in enumerate(rows)}
  groups = {}
  for ckey, okey in planted.items():
    groups.setdefault(index[okey], []).append(index[ckey])
  truth, kind = [], []
  for o, cs in groups.items():
    members = [o] + cs
    for a in range(len(members)):
      for b in range(a + 1, len(members)):
        truth.append((members[a], members[b]))
        kind.append(rows[members[b]].key.rsplit(".", 2)[1] if a == 0 else "copy-copy")
  truth, kind = np.array(truth), np.array(kind)
  cos = np.einsum("ij,ij->i", y[truth[:, 0]], y[truth[:, 1]])
  above = dups.count_above(y, THRESHOLDS)
  curve = []
  for t, n in zip(THRESHOLDS, above):
    found = int((cos >= t).sum())
    recall, precision = found / len(truth), (found / n if n else float("nan"))
    curve.append({"threshold": float(t), "pairs": int(n), "planted": len(truth), "found": found,
                  "recall": recall, "precision": precision,
                  "f1": 2 * recall * precision / (recall + precision) if found else 0.0,
                  "recall_by_copy": {k: float(np.mean(cos[kind == k] >= t))
                                     for k in dups.COPIES}})
  return curve


def summary(curve) -> dict:
  """What the results keep of a curve: the best-F1 threshold's numbers and the default's."""
  best, default = best_threshold(curve), at(curve, dups.DEFAULT_THRESHOLD)
  return {"best": best, "at_default": default}


def measure(out, planted, k, seed) -> dict:
  """{layer: {space: {nmi, purity, p@5, p@10, duplicates: curve}}} of one embedded half."""
  from sklearn.metrics import normalized_mutual_info_score
  result = {}
  with open(os.path.join(out, features.MANIFEST)) as f:
    layers = json.load(f)["layers"]
  for layer in layers:
    rows, x, _, _ = clusters.load_features(out, layer)
    copy = np.array([r.key in planted for r in rows])
    clean = np.flatnonzero(~copy)
    labels = np.array([r.label_text for r in rows])[clean]
    ids = np.array([r.image_id for r in rows], np.int64)[clean]
    result[layer] = {}
    for name in space.SPACES:
      t = time.perf_counter()
      fitted = space.fit(name, layer, x[clean])
      y_all = fitted.apply(x)
      y = y_all[clean]
      flat, _, _, _ = clusters.cluster_rows(y, ids, 1, k, space.fit_dim(y.shape), seed)
      p = space.precision_at(y, labels, (5, 10))
      result[layer][name] = {
          "nmi": round(float(normalized_mutual_info_score(labels, flat)), 4),
          "purity": round(clusters.purity(flat, labels), 4),
          "p@5": round(p[5], 4), "p@10": round(p[10], 4), "dims": int(y.shape[1]),
          "duplicates": duplicate_curve(y_all, rows, planted),   # summarised on writing
          "seconds": round(time.perf_counter() - t, 2)}
      r = result[layer][name]
      print(f"  {layer:12s} {name:10s} nmi {r['nmi']:.3f} purity {r['purity']:.3f} "
            f"p@5 {r['p@5']:.3f} p@10 {r['p@10']:.3f}", flush=True)
  return result


def best_threshold(curve) -> dict:
  """The threshold of the best F1 of the planted pairs; of several, the middle one (not an
  edge of the plateau, where recall or precision starts to fall)."""
  best = max(s["f1"] for s in curve)
  ties = [s for s in curve if s["f1"] == best]
  return ties[len(ties) // 2]


def at(curve, threshold) -> dict:
  return next(s for s in curve if abs(s["threshold"] - threshold) < 1e-9)


def pick(result, layer, name) -> dict:
  """A (layer, space)'s numbers on both halves, at the threshold its CHOOSE half picks."""
  threshold = best_threshold(result["choose"][layer][name]["duplicates"])["threshold"]
  out = {"layer": layer, "space": name, "threshold": threshold}
  for half in ("choose", "report"):
    r = result[half][layer][name]
    out[half] = {k: r[k] for k in ("nmi", "purity", "p@5", "p@10")}
    d = at(r["duplicates"], threshold)
    out[half]["duplicates"] = {k: d[k] for k in ("pairs", "planted", "found", "recall",
                                                 "precision", "recall_by_copy")}
  return out


def table(results) -> str:
  """One line per export, half, layer and space; the duplicates at that row's own best-F1
  threshold on the CHOOSE half."""
  lines = ["| export | half | layer | space | NMI | purity | p@5 | p@10 | duplicates: "
           "threshold, recall / precision |", "|---|---|---|---|---:|---:|---:|---:|---|"]
  for name, halves in results.items():
    for half, layers in halves.items():
      for layer, spaces in layers.items():
        for s, r in spaces.items():
          t = best_threshold(halves["choose"][layer][s]["duplicates"])["threshold"]
          d = at(r["duplicates"], t)
          lines.append(f"| {name} | {half} | {layer} | {s} | {r['nmi']:.3f} | "
                       f"{r['purity']:.3f} | {r['p@5']:.3f} | {r['p@10']:.3f} | "
                       f"{t:.2f}: {d['recall']:.2f} / {d['precision']:.2f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--exports", required=True, help="name:export_dir,... (the first chooses)")
  p.add_argument("--twin", default="", help="also a random-init twin of this named export")
  p.add_argument("--zip", default=ZIP)
  p.add_argument("--classes", type=int, default=0, help="classes per half (0 = all 100)")
  p.add_argument("--max_per_class", type=int, default=0, help="images per class (0 = all 50)")
  p.add_argument("--dup_every", type=int, default=10, help="plant copies of every n-th image")
  p.add_argument("--work", default="/tmp/photo_clusters", help="images and embeddings")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default="photo_clusters", help="results/<output>.json")
  args = p.parse_args()
  exports = dict(e.split(":", 1) for e in args.exports.split(","))
  if args.twin:
    if args.twin not in exports:
      raise SystemExit(f"error: --twin={args.twin} is not a name in --exports")
    exports["random-init twin"] = twin_export(exports[args.twin], args.work)
  z = zipfile.ZipFile(args.zip)
  annotations = read_annotations(z)
  halves = split_classes(annotations, args.classes)
  start = time.perf_counter()
  results, planted = {}, {}
  for half, wnids in halves.items():
    folder = os.path.join(args.work, f"{half}-c{args.classes}-m{args.max_per_class}"
                          f"-d{args.dup_every}")
    planted[half] = write_half(z, annotations, wnids, folder, args.max_per_class,
                               args.dup_every)
    for name, path in exports.items():
      out = os.path.join(folder + "-embed", name.replace(" ", "_"))
      print(f"{name} / {half}: embedding {folder}", flush=True)
      features.run(features.EmbedOptions(input=folder, model=path, output=out))
      results.setdefault(name, {})[half] = measure(out, planted[half], len(wnids), args.seed)
  first = next(iter(exports))
  chosen = results[first]["choose"]
  best = max(((l, s) for l in chosen for s in chosen[l]),
             key=lambda ls: chosen[ls[0]][ls[1]]["p@10"])
  choice = {"export": first, "best": pick(results[first], *best),
            "defaults": (pick(results[first], space.DEFAULT_LAYER, space.DEFAULT_SPACE)
                         if space.DEFAULT_LAYER in chosen else None)}
  text = table(results)
  for halves_ in results.values():
    for layers_ in halves_.values():
      for spaces_ in layers_.values():
        for r in spaces_.values():
          r["duplicates"] = summary(r["duplicates"])
  payload = {"command": " ".join(sys.argv), "zip": args.zip, "split": "classes sorted by "
             "wnid: even positions choose, odd positions report",
             "classes": {h: len(w) for h, w in halves.items()},
             "max_per_class": args.max_per_class, "dup_every": args.dup_every,
             "planted_copies": {h: len(v) for h, v in planted.items()},
             "exports": exports, "choice": choice, "results": results,
             "seconds": round(time.perf_counter() - start, 1)}
  path = common.write(args.output, payload)
  print(text)
  print(json.dumps(choice, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
