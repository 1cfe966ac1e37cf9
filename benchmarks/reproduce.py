r"""The paper's comparison (Caron et al. 2019, Tables 3 and 7) at laptop scale.

One architecture (the demo preset's VGG-16-BN layout: 32 px, width 0.25), one training pool
(Tiny ImageNet `train_250per_class.zip`, 50,000 images of 200 classes, labels dropped), one
compute budget (the same number of optimizer steps and of images through the trunk per step)
for every method:

  random             no training (the floor)
  rotnet             --mode=rotnet
  deepcluster        --mode=deepcluster, 80 clusters, no rotations (so 4x the images per epoch:
                     equal examples per step and equal steps)
  deepercluster      the demo preset (m=2 x k=40, rotation warm-up, Sobel)
  deepercluster_rgb  the same on raw RGB (--sobel=false)

Each trunk is then scored by `evaluate.py` with one protocol: linear probes per layer and
kNN, fit on a labelled train split (50 images per class of the same zip, 10,000 images) and
scored on `val.zip` (10,000 images), plus NMI of k-means (k=200) on val fc7 features against
the labels.

Shards (written once, under the ignored folder shards/):
  Z=../shared/datasets/tiny-imagenet-200
  python -m dc_tf.data.make_shards --source=tiny_imagenet --input=$Z/train_250per_class.zip \
    --split=train --drop_labels --output_dir=shards/tiny --name=pool --num_shards=16
  python -m dc_tf.data.make_shards --source=tiny_imagenet --input=$Z/train_250per_class.zip \
    --split=train --per_class=50 --output_dir=shards/tiny --name=probe --num_shards=4
  python -m dc_tf.data.make_shards --source=tiny_imagenet --input=$Z/val.zip \
    --split=val --output_dir=shards/tiny --name=val --num_shards=4

Then:
  python benchmarks/reproduce.py                       # all methods, seed 0
  python benchmarks/reproduce.py --methods=rotnet      # one at a time (resumable)

Every step resumes: a finished training run (its export exists) is not retrained, a killed one
restarts from its last checkpoint, and a finished evaluation is read back. Rows are merged into
benchmarks/results/reproduce.json; the table goes to benchmarks/results/reproduce.md and the
per-layer plot to benchmarks/results/reproduce_layers.png.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LAYERS = "conv2,conv4,conv7,conv10,conv13,fc7"
TITLES = {"random": "Random init", "rotnet": "RotNet", "deepcluster": "DeepCluster",
          "deepercluster": "DeeperCluster (Sobel)", "deepercluster_rgb": "DeeperCluster (RGB)"}
EPOCH_IMAGES = 5000  # images per epoch with 4 rotations each: 312 steps of 64 examples

# method -> flags on top of flags/demo.cfg (the CPU recipe of issue 10).
METHODS = {
    "rotnet": ["--mode=rotnet"],
    "deepcluster": ["--mode=deepcluster", "--m=1", "--k=80", "--rotnet_warmup_epochs=0",
                    f"--epoch_size={4 * EPOCH_IMAGES}"],
    "deepercluster": [],
    "deepercluster_rgb": ["--sobel=false"],
}


def run(cmd, log):
  """Runs `cmd` from the repository root, appending its output to `log`; returns seconds."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  t0 = time.time()
  with open(log, "a") as f:
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  return time.time() - t0


def train_flags(method, args, model_dir):
  return ["--flagfile=flags/demo.cfg", f"--data_pattern={args.shards}/pool-*.tfrecord",
          f"--model_dir={model_dir}", f"--seed={args.seed}", f"--epoch_size={EPOCH_IMAGES}",
          *METHODS[method]]


def evaluate_flags(args, checkpoint, output_dir, baseline):
  return [f"--checkpoint={checkpoint}", f"--train_data={args.shards}/probe-*.tfrecord",
          f"--test_data={args.shards}/val-*.tfrecord", f"--output_dir={output_dir}",
          f"--baseline={baseline}", f"--layers={LAYERS}", "--cluster_k=200",
          f"--probe_epochs={args.probe_epochs}", f"--seed={args.seed}"]


def one_method(method, args, rows):
  out = os.path.join(args.out, f"{method}-s{args.seed}")
  row = dict(rows.get((method, args.seed), {}), method=method, seed=args.seed)
  if method == "random":
    # The floor: the random-init trunk of the Sobel architecture, from the DeeperCluster run's
    # config (or the demo preset's when that run does not exist yet).
    source = os.path.join(args.out, f"deepercluster-s{args.seed}")
    if not os.path.exists(os.path.join(source, "config.json")):
      raise SystemExit(f"random needs {source}/config.json: run --methods=deepercluster first")
    train_s, baseline, checkpoint = 0.0, "random", source
  else:
    cmd = [sys.executable, "train.py", *train_flags(method, args, out)]
    row["train_command"] = "python train.py " + " ".join(cmd[2:])
    if not os.path.exists(os.path.join(out, "export", "model_card.json")):
      row["train_wall_seconds"] = round(run(cmd, out + ".train.log") +
                                        row.get("train_wall_seconds", 0.0), 1)
    train_s, baseline, checkpoint = row.get("train_wall_seconds", 0.0), "none", out
  eval_dir = os.path.join(out, "eval")
  cmd = [sys.executable, "evaluate.py", *evaluate_flags(args, checkpoint, eval_dir, baseline)]
  row["eval_command"] = "python evaluate.py " + " ".join(cmd[2:])
  if not os.path.exists(os.path.join(eval_dir, "report.json")):
    row["eval_wall_seconds"] = round(run(cmd, out + ".eval.log"), 1)
  report = json.load(open(os.path.join(eval_dir, "report.json")))
  res = report["results"]["random" if method == "random" else "trained"]
  # A second view, more sensitive at this scale: the demo protocol (20 classes of the
  # embedded set, data/train -> data/val, chance 5%).
  eval20 = os.path.join(out, "eval_20class")
  cmd = [sys.executable, "evaluate.py", f"--checkpoint={checkpoint}", f"--output_dir={eval20}",
         f"--baseline={baseline}", f"--layers={LAYERS}", f"--probe_epochs={args.probe_epochs}",
         f"--seed={args.seed}"]
  row["eval_20class_command"] = "python evaluate.py " + " ".join(cmd[2:])
  if not os.path.exists(os.path.join(eval20, "report.json")):
    run(cmd, out + ".eval20.log")
  res20 = json.load(open(os.path.join(eval20, "report.json")))["results"][
      "random" if method == "random" else "trained"]
  row["probe_top1_20class"] = {l: v["top1"] for l, v in res20["probe"].items()}
  row["nmi_20class"] = res20["clusters"]["label"]["nmi"]
  row.update(
      train_wall_seconds=train_s,
      probe_top1={l: v["top1"] for l, v in res["probe"].items()},
      knn_top1=res["knn"], nmi_val_k200=res["clusters"]["label"]["nmi"],
      machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  if method != "random":
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    epochs = [r for r in log if r["event"] == "epoch"]
    reassigns = [r for r in log if r["event"] == "reassign"]
    row.update(examples_seen=epochs[-1]["examples_seen"] if epochs else 0,
               steps=epochs[-1].get("step") if epochs else 0,
               super_accuracy=epochs[-1].get("super_accuracy") if epochs else None,
               sub_accuracy=epochs[-1].get("sub_accuracy") if epochs else None,
               nmi_previous=[r.get("nmi_previous") for r in reassigns])
  return row


def write_table(rows):
  rows = sorted(rows, key=lambda r: (list(TITLES).index(r["method"]), r["seed"]))
  layers = LAYERS.split(",")
  head = ("| method | seed | train wall | " + " | ".join(layers) + " | kNN fc7 | NMI val (k=200) |")
  lines = [head, "|" + "---|" * (5 + len(layers))]
  for r in rows:
    wall = f"{r['train_wall_seconds'] / 60:.1f} min" if r["train_wall_seconds"] else "—"
    probe = " | ".join(f"{r['probe_top1'][l]:.1f}" for l in layers)
    lines.append(f"| {TITLES[r['method']]} | {r['seed']} | {wall} | {probe} | "
                 f"{r['knn_top1'].get('fc7', float('nan')):.1f} | {r['nmi_val_k200']:.3f} |")
  lines20 = ["| method | seed | " + " | ".join(layers) + " | NMI val (k=20) |",
             "|" + "---|" * (3 + len(layers))]
  for r in rows:
    if "probe_top1_20class" in r:
      lines20.append(f"| {TITLES[r['method']]} | {r['seed']} | "
                     + " | ".join(f"{r['probe_top1_20class'][l]:.1f}" for l in layers)
                     + f" | {r['nmi_20class']:.3f} |")
  with open(os.path.join(RESULTS, "reproduce.md"), "w") as f:
    f.write("Linear probe top-1 (%) on Tiny ImageNet val (200 classes, chance 0.5%), per layer.\n\n")
    f.write("\n".join(lines) + "\n\nThe demo protocol (20 classes: data/train -> data/val, "
            "chance 5%):\n\n" + "\n".join(lines20) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for r in rows:
    ax.plot(layers, [r["probe_top1"][l] for l in layers], marker="o",
            label=f"{TITLES[r['method']]} (seed {r['seed']})",
            linestyle="--" if r["method"] == "random" else "-")
  ax.set_ylabel("linear probe top-1 on val (%)")
  ax.set_title("Tiny ImageNet pool (50k, labels dropped), equal steps")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(RESULTS, "reproduce_layers.png"), dpi=120)
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default="deepercluster,random,rotnet,deepcluster,deepercluster_rgb")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--shards", default="shards/tiny")
  p.add_argument("--probe_epochs", type=int, default=30)
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "reproduce"))
  args = p.parse_args()
  shard_dir = os.path.join(ROOT, args.shards)
  names = os.listdir(shard_dir) if os.path.isdir(shard_dir) else []
  for pattern in ("pool", "probe", "val"):
    if not any(n.startswith(pattern + "-") for n in names):
      raise SystemExit(f"no {args.shards}/{pattern}-*.tfrecord: write the shards first "
                       "(commands in this file's docstring)")
  path = os.path.join(RESULTS, "reproduce.json")
  rows = {(r["method"], r["seed"]): r for r in (json.load(open(path)) if os.path.exists(path) else [])}
  for method in args.methods.split(","):
    if method not in TITLES:
      raise SystemExit(f"--methods: unknown method {method!r} (choose from {', '.join(TITLES)})")
    rows[(method, args.seed)] = one_method(method, args, rows)
    json.dump(list(rows.values()), open(path, "w"), indent=1)
    print(write_table(list(rows.values())), flush=True)



if __name__ == "__main__":
  main()
