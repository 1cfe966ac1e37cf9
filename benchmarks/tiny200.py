r"""The three methods at equal steps on the longer CPU preset (flags/tiny200.cfg, issue 18 item 5):
RotNet, DeepCluster and DeeperCluster trained on Tiny ImageNet's 50,000 training images of 200
classes (labels dropped), 5,000 steps of 64 examples each, then scored by `evaluate.py` against
the random-init twin on the 200-class view of benchmarks/heldout.py: probe fit on train images
0-49 of each class (10,000; they were in the unlabelled pool, as ImageNet's train set is for the
paper's probes), scored on Tiny ImageNet val.zip (10,000 images, never in the pool, chose nothing).

Missing shards (the pool, the probe and val sets) are written first, under the ignored shards/tiny/.
  Z=../shared/datasets/tiny-imagenet-200
  python -m dc_tf.data.make_shards --source=tiny_imagenet --input=$Z/train_250per_class.zip \
    --split=train --drop_labels --output_dir=shards/tiny --name=pool --num_shards=16
Then:
  python benchmarks/tiny200.py                                   # all three methods, seed 0
  python benchmarks/tiny200.py --methods=rotnet --seeds=1        # more seeds where gaps are close

Resumable (a finished run or report is read back; a killed run resumes from its checkpoint).
Rows go to benchmarks/results/tiny200.json, the table to benchmarks/results/tiny200.md.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heldout  # noqa: E402
import reproduce  # noqa: E402

ROOT, RESULTS = reproduce.ROOT, reproduce.RESULTS
PRESET = "flags/tiny200.cfg"
POOL = "shards/tiny/pool-*.tfrecord"


def preset_value(name: str) -> str:
  """The value the preset gives --name (one `--name=value` line)."""
  for line in open(os.path.join(ROOT, PRESET)):
    if line.startswith(f"--{name}="):
      return line.strip().split("=", 1)[1]
  raise SystemExit(f"{PRESET} sets no --{name}")


def methods() -> dict[str, list[str]]:
  """method -> flags on top of the preset: equal steps and examples per step for all three."""
  clusters = int(preset_value("m")) * int(preset_value("k"))
  return {"deepercluster": [], "rotnet": ["--mode=rotnet"],
          "deepcluster": ["--mode=deepcluster", "--m=1", f"--k={clusters}",
                          "--rotnet_warmup_epochs=0",
                          f"--epoch_size={4 * int(preset_value('epoch_size'))}"]}


def steps_logged(run_dir: str) -> int:
  """The last optimizer step train.py logged (log.jsonl), to show the budgets are equal."""
  last = 0
  for line in open(os.path.join(run_dir, "log.jsonl")):
    last = max(last, json.loads(line).get("step", 0))
  return last


def one(method, seed, args):
  run_dir = os.path.join(args.out, f"{method}-s{seed}")
  row = {"method": method, "seed": seed, "preset": PRESET}
  if not os.path.exists(os.path.join(run_dir, "export", "model_card.json")):
    cmd = [sys.executable, "train.py", f"--flagfile={PRESET}", f"--model_dir={run_dir}",
           f"--seed={seed}", f"--data_pattern={POOL}", *methods()[method]]
    row["train_wall_seconds"] = round(reproduce.run(cmd, run_dir + ".train.log"), 1)
  row["steps"] = steps_logged(run_dir)
  for view in args.views.split(","):
    row[view] = heldout.score(run_dir, view, args.probe_epochs, seed)
  row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  return row


def table(rows, views) -> str:
  """Per run: wall, steps, best-layer margin over the twin and each layer's trained top-1."""
  layers = heldout.LAYERS.split(",")
  lines = []
  for view in views:
    lines += [f"{view} view: linear-probe top-1 (%), trained trunk (random-init twin)", "",
              "| method | seed | train wall | steps | best margin (layer) | "
              + " | ".join(layers) + " |", "|" + "---|" * (5 + len(layers))]
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
      if view not in r:
        continue
      v = r[view]
      wall = f"{r['train_wall_seconds'] / 60:.1f} min" if "train_wall_seconds" in r else "—"
      cells = [f"{v['trained'][l]:.1f} ({v['random'][l]:.1f})" for l in layers]
      lines.append(f"| {r['method']} | {r['seed']} | {wall} | {r['steps']} | "
                   f"{v['best_layer']['margin_top1']:+.1f} ({v['best_layer']['layer']}) | "
                   + " | ".join(cells) + " |")
    lines.append("")
    for method in sorted({r["method"] for r in rows}):
      margins = [heldout.best(r, view) for r in rows if r["method"] == method and view in r]
      lines.append(f"- {method}: {heldout.mean_sd(margins)}")
    lines.append("")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default="rotnet,deepcluster,deepercluster")
  p.add_argument("--seeds", default="0")
  p.add_argument("--views", default="200-class",
                 help=f"comma-separated, of {list(heldout.VIEWS)}")
  p.add_argument("--probe_epochs", type=int, default=30)
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "tiny200"))
  args = p.parse_args()
  views = args.views.split(",")
  if set(views) - set(heldout.VIEWS):
    raise SystemExit(f"--views: unknown {sorted(set(views) - set(heldout.VIEWS))}")
  if set(args.methods.split(",")) - set(methods()):
    raise SystemExit(f"--methods: known {sorted(methods())}")
  heldout.ensure_shards([POOL] + [p for v in views for p in heldout.VIEWS[v][:2]],
                        os.path.join(args.out, "shards.log"))
  path = os.path.join(RESULTS, "tiny200.json")
  rows = {(r["method"], r["seed"]): r for r in (json.load(open(path)) if os.path.exists(path) else [])}
  for seed in (int(s) for s in args.seeds.split(",")):
    for method in args.methods.split(","):
      row = one(method, seed, args)
      k = (method, seed)
      rows[k] = {**rows.get(k, {}), **row}
      json.dump(sorted(rows.values(), key=lambda r: (r["method"], r["seed"])), open(path, "w"),
                indent=1)
      md = table(list(rows.values()), views)
      open(os.path.join(RESULTS, "tiny200.md"), "w").write(md)
      print(md, flush=True)


if __name__ == "__main__":
  main()
