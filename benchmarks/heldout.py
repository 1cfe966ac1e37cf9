r"""The demo budget scored where no recipe was chosen: `python train.py` (flags/demo.cfg, as a
newcomer runs it) per method, seed and pool, each trunk and its random-init twin scored three
times by `evaluate.py` (the same figures a client gets from the serving export's `probe_<layer>`
outputs, tests/evaluation/test_evaluation.py):
  selection  40 Tiny ImageNet classes outside the embedded 20 (a seeded draw); probe fit on
             train images 50-149 of each class (4,000), scored on images 150-199 (2,000):
             the split recipes are chosen on from now on. These images are in neither demo
             pool (balanced, long-tailed), no other view's probe and no report.
  20-class   probe fit on data/train, scored on data/val: the set the current preset and the
             learning sweep of 2026-11-25 were chosen on (reported, not held out);
  200-class  probe fit on train images 0-49 of each of the 200 classes (10,000; the 20
             embedded classes' images among them were in the unlabelled training pool),
             scored on Tiny ImageNet val.zip (10,000 images, 200 classes): chose nothing.

Pools (--pools): `balanced` is data/train (5,000 images, 250 of each of the 20 classes);
`longtail` is the same 20 classes' 5,000 train images resampled to Zipf class sizes
(exponent 1, --long_tail_size=5000, half of the extra copies near duplicates, kept: --nodedupe),
so the two pools have the same size and classes and differ only in balance and duplication.

Missing shards are written first, under the ignored shards/tiny/ (make_shards, as the commands
printed to the log). Then, e.g.:
  python benchmarks/heldout.py --methods=deepercluster,rotnet --seeds=0,1,2
  python benchmarks/heldout.py --methods=deepercluster,rotnet --seeds=0 --pools=longtail

Resumable (a finished run or report is read back). Rows go to benchmarks/results/heldout.json,
the table to benchmarks/results/heldout.md.
"""

import argparse
import json
import os
import random
import sys
import time
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402

ROOT, RESULTS = reproduce.ROOT, reproduce.RESULTS
LAYERS = "conv2,conv4,conv7,conv10,conv13,fc7"
METHODS = {"deepercluster": [], "rotnet": ["--mode=rotnet"],
           "deepcluster": ["--mode=deepcluster", "--m=1", "--k=80", "--rotnet_warmup_epochs=0",
                           f"--epoch_size={4 * reproduce.EPOCH_IMAGES}"]}
VIEWS = {"selection": ("shards/tiny/sel_probe-*.tfrecord", "shards/tiny/sel_val-*.tfrecord", 40),
         "20-class": ("data/train-*.tfrecord", "data/val-*.tfrecord", 20),
         "200-class": ("shards/tiny/probe-*.tfrecord", "shards/tiny/val-*.tfrecord", 200)}
POOLS = {"balanced": "data/train-*.tfrecord", "longtail": "shards/tiny/longtail-*.tfrecord"}
TINY = os.path.join(ROOT, "..", "shared", "datasets", "tiny-imagenet-200")
SELECTION_CLASSES = 40


def embedded_classes() -> list[str]:
  return open(os.path.join(ROOT, "data", "classes.txt")).read().split()


def selection_classes() -> list[str]:
  """A seeded draw of classes outside the embedded 20 (fixed: seed 0, sorted)."""
  with zipfile.ZipFile(os.path.join(TINY, "train_250per_class.zip")) as z:
    wnids = z.read("tiny-imagenet-200/wnids.txt").decode().split()
  others = sorted(set(wnids) - set(embedded_classes()))
  return sorted(random.Random(0).sample(others, SELECTION_CLASSES))


def shard_commands() -> dict[str, list[str]]:
  """shard name -> the make_shards command, for every shard set a view or pool reads."""
  train, val = (os.path.join(TINY, z) for z in ("train_250per_class.zip", "val.zip"))
  sel, embedded = ",".join(selection_classes()), ",".join(embedded_classes())
  args = {
      "probe": [f"--input={train}", "--split=train", "--per_class=50", "--num_shards=4"],
      "val": [f"--input={val}", "--split=val", "--num_shards=4"],
      "pool": [f"--input={train}", "--split=train", "--drop_labels", "--num_shards=16"],
      "sel_probe": [f"--input={train}", "--split=train", f"--classes={sel}",
                    "--skip_per_class=50", "--per_class=100", "--num_shards=2"],
      "sel_val": [f"--input={train}", "--split=train", f"--classes={sel}",
                  "--skip_per_class=150", "--per_class=50", "--num_shards=1"],
      "longtail": [f"--input={train}", "--split=train", f"--classes={embedded}",
                   "--long_tail_exponent=1.0", "--long_tail_size=5000", "--nodedupe",
                   "--drop_labels", "--num_shards=4"]}
  return {name: [sys.executable, "-m", "dc_tf.data.make_shards", "--source=tiny_imagenet",
                 "--output_dir=shards/tiny", f"--name={name}", *a] for name, a in args.items()}


def ensure_shards(patterns, log):
  """Writes each shard set a pattern names under shards/tiny/ that is not there yet."""
  commands = shard_commands()
  for pattern in patterns:
    folder, name = os.path.dirname(pattern), os.path.basename(pattern).split("-")[0]
    if not os.path.exists(os.path.join(ROOT, folder, f"{name}.json")):
      if name not in commands:
        raise SystemExit(f"no {pattern}, and no command here writes it")
      reproduce.run(commands[name], log)


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


def one(method, seed, pool, args):
  name = f"{method}-s{seed}" if pool == "balanced" else f"{method}-{pool}-s{seed}"
  run_dir = os.path.join(args.out, name)
  row = {"method": method, "seed": seed, "pool": pool}
  if not os.path.exists(os.path.join(run_dir, "export", "model_card.json")):
    cmd = [sys.executable, "train.py", "--flagfile=flags/demo.cfg", f"--model_dir={run_dir}",
           f"--seed={seed}", f"--data_pattern={POOLS[pool]}", *METHODS[method]]
    row["train_wall_seconds"] = round(reproduce.run(cmd, run_dir + ".train.log"), 1)
  for view in args.views.split(","):
    row[view] = score(run_dir, view, args.probe_epochs, seed)
  row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  return row


def key(r):
  return r["method"], r.get("pool", "balanced"), r["seed"]


def best(r, view):
  return r[view]["best_layer"]["margin_top1"] if view in r else None


def mean_sd(values) -> str:
  if len(values) < 2:
    return f"{values[0]:+.1f} (1 seed)" if values else "—"
  return f"{np.mean(values):+.1f} ± {np.std(values, ddof=1):.1f} ({len(values)} seeds)"


def table(rows) -> str:
  """Per run, then per method and pool: best-layer margin over the random twin, top-1 points."""
  head = "| method | pool | seed | " + " | ".join(f"{v} best (layer)" for v in VIEWS) + " |"
  lines = [head, "|" + "---|" * (3 + len(VIEWS))]
  for r in sorted(rows, key=key):
    cells = [f"{best(r, v):+.1f} ({r[v]['best_layer']['layer']})" if v in r else "—"
             for v in VIEWS]
    lines.append(f"| {r['method']} | {key(r)[1]} | {r['seed']} | " + " | ".join(cells) + " |")
  lines += ["", "| method | pool | " + " | ".join(f"{v}: mean ± sd" for v in VIEWS) + " |",
            "|" + "---|" * (2 + len(VIEWS))]
  for method, pool in sorted({key(r)[:2] for r in rows}):
    mine = [r for r in rows if key(r)[:2] == (method, pool)]
    cells = [mean_sd([best(r, v) for r in mine if v in r]) for v in VIEWS]
    lines.append(f"| {method} | {pool} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default="deepercluster,rotnet")
  p.add_argument("--seeds", default="0")
  p.add_argument("--pools", default="balanced", help=f"comma-separated, of {sorted(POOLS)}")
  p.add_argument("--views", default=",".join(VIEWS),
                 help=f"comma-separated, of {list(VIEWS)} (the 200-class one takes ~9 min a run)")
  p.add_argument("--probe_epochs", type=int, default=30)
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "heldout"))
  args = p.parse_args()
  pools, views = args.pools.split(","), args.views.split(",")
  if set(pools) - set(POOLS):
    raise SystemExit(f"--pools: unknown {sorted(set(pools) - set(POOLS))}; known {sorted(POOLS)}")
  if set(views) - set(VIEWS):
    raise SystemExit(f"--views: unknown {sorted(set(views) - set(VIEWS))}; known {list(VIEWS)}")
  ensure_shards([pattern for view in views for pattern in VIEWS[view][:2]] +
                [POOLS[pool] for pool in pools], os.path.join(args.out, "shards.log"))
  path = os.path.join(RESULTS, "heldout.json")
  rows = {key(r): r for r in (json.load(open(path)) if os.path.exists(path) else [])}
  for pool in pools:
    for method in args.methods.split(","):
      for seed in (int(s) for s in args.seeds.split(",")):
        row = one(method, seed, pool, args)
        rows[key(row)] = {**rows.get(key(row), {}), **row}
        json.dump(sorted(rows.values(), key=key), open(path, "w"), indent=1)
        md = table(list(rows.values()))
        open(os.path.join(RESULTS, "heldout.md"), "w").write(md + "\n")
        print(md, flush=True)


if __name__ == "__main__":
  main()
