r"""The demo budget scored where no recipe was chosen: `python train.py` (flags/demo.cfg, as a
newcomer runs it) per method and seed, each trunk and its random-init twin scored twice by
`evaluate.py` (the same figures a client gets from the serving export's `probe_<layer>`
outputs, tests/evaluation/test_evaluation.py):
  20-class   probe fit on data/train, scored on data/val: the set the preset and the
             learning sweep were chosen on (reported, not held out);
  200-class  probe fit on 50 images per class of train_250per_class.zip (10,000 images; the
             20 embedded classes' images among them were in the unlabelled training pool),
             scored on Tiny ImageNet val.zip (10,000 images, 200 classes): chose nothing.

Shards for the 200-class view (as in reproduce.py, under the ignored shards/):
  Z=../shared/datasets/tiny-imagenet-200
  python -m dc_tf.data.make_shards --source=tiny_imagenet --input=$Z/train_250per_class.zip \
    --split=train --per_class=50 --output_dir=shards/tiny --name=probe --num_shards=4
  python -m dc_tf.data.make_shards --source=tiny_imagenet --input=$Z/val.zip \
    --split=val --output_dir=shards/tiny --name=val --num_shards=4

  python benchmarks/heldout.py --methods=deepercluster,rotnet --seeds=0,1,2

Resumable (a finished run or report is read back). Rows go to benchmarks/results/heldout.json,
the table to benchmarks/results/heldout.md.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402

ROOT, RESULTS = reproduce.ROOT, reproduce.RESULTS
LAYERS = "conv2,conv4,conv7,conv10,conv13,fc7"
METHODS = {"deepercluster": [], "rotnet": ["--mode=rotnet"],
           "deepcluster": ["--mode=deepcluster", "--m=1", "--k=80", "--rotnet_warmup_epochs=0",
                           f"--epoch_size={4 * reproduce.EPOCH_IMAGES}"]}
VIEWS = {"20-class": ("data/train-*.tfrecord", "data/val-*.tfrecord", 20),
         "200-class": ("shards/tiny/probe-*.tfrecord", "shards/tiny/val-*.tfrecord", 200)}


def score(run_dir, view, probe_epochs, seed):
  train, test, k = VIEWS[view]
  out = os.path.join(run_dir, f"eval_{view}")
  if not os.path.exists(os.path.join(out, "report.json")):
    reproduce.run([sys.executable, "evaluate.py", f"--checkpoint={run_dir}",
                   f"--train_data={train}", f"--test_data={test}", f"--output_dir={out}",
                   "--baseline=twin", f"--layers={LAYERS}", f"--cluster_k={k}",
                   f"--probe_epochs={probe_epochs}", f"--seed={seed}"], run_dir + ".eval.log")
  report = json.load(open(os.path.join(out, "report.json")))
  return {"margin": report["margin_top1"], "best_layer": report["best_layer"],
          "trained": {l: v["top1"] for l, v in report["results"]["trained"]["probe"].items()},
          "random": {l: v["top1"] for l, v in report["results"]["random"]["probe"].items()}}


def one(method, seed, args):
  run_dir = os.path.join(args.out, f"{method}-s{seed}")
  row = {"method": method, "seed": seed}
  if not os.path.exists(os.path.join(run_dir, "export", "model_card.json")):
    cmd = [sys.executable, "train.py", "--flagfile=flags/demo.cfg", f"--model_dir={run_dir}",
           f"--seed={seed}", *METHODS[method]]
    row["train_wall_seconds"] = round(reproduce.run(cmd, run_dir + ".train.log"), 1)
  for view in VIEWS:
    row[view] = score(run_dir, view, args.probe_epochs, seed)
  row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  return row


def table(rows) -> str:
  lines = ["| method | seed | 20-class best (layer) | 200-class best (layer) |", "|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
    cells = [f"{r[v]['best_layer']['margin_top1']:+.1f} ({r[v]['best_layer']['layer']})"
             for v in VIEWS]
    lines.append(f"| {r['method']} | {r['seed']} | " + " | ".join(cells) + " |")
  for method in sorted({r["method"] for r in rows}):
    for v in VIEWS:
      best = [r[v]["best_layer"]["margin_top1"] for r in rows if r["method"] == method]
      if len(best) > 1:
        lines.append(f"| {method} | mean ± sd ({len(best)}) | {v}: {np.mean(best):+.1f} ± "
                     f"{np.std(best, ddof=1):.1f} | |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default="deepercluster,rotnet")
  p.add_argument("--seeds", default="0")
  p.add_argument("--probe_epochs", type=int, default=30)
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "heldout"))
  args = p.parse_args()
  for _, (_, test, _) in VIEWS.items():
    if not any(os.path.basename(f).startswith(os.path.basename(test).split("-")[0])
               for f in os.listdir(os.path.join(ROOT, os.path.dirname(test)))):
      raise SystemExit(f"no {test}: write the shards first (commands in this file's docstring)")
  path = os.path.join(RESULTS, "heldout.json")
  rows = {(r["method"], r["seed"]): r for r in (json.load(open(path)) if os.path.exists(path) else [])}
  for method in args.methods.split(","):
    for seed in (int(s) for s in args.seeds.split(",")):
      rows[(method, seed)] = one(method, seed, args)
      json.dump(list(rows.values()), open(path, "w"), indent=1)
      md = table(list(rows.values()))
      open(os.path.join(RESULTS, "heldout.md"), "w").write(md + "\n")
      print(md, flush=True)


if __name__ == "__main__":
  main()
