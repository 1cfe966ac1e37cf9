r"""Does the CPU recipe learn? Each sweep point trains the demo preset with some flags
changed, for a fixed wall-clock budget, then scores the trunk against its random-init twin
(linear probe per layer + kNN; Tiny ImageNet images, labels used for scoring only). Rows are
merged into benchmarks/results/learning_sweep.json by name, so a sweep can be split across
sessions.

Which set chooses: `--probe_set=selection` (the default) fits and scores the probes on the
selection split of benchmarks/heldout.py (40 classes outside the embedded 20, train images
held back from every other view), so data/val and the 200-class val stay report-only. The rows
of 2026-11-25 (no `probe_set` field) were scored with `--probe_set=data` (fit on data/train,
scored on data/val): the current demo preset was chosen on data/val, and the README says so.

  python benchmarks/learning_sweep.py --points=base,size48,T2 --budget_minutes=4.5
  python benchmarks/learning_sweep.py --list
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heldout  # noqa: E402  (the views and the shards they read are defined once, there)
RESULTS = os.path.join(ROOT, "benchmarks", "results", "learning_sweep.json")
LAYERS = "conv4,conv7,conv10,conv13,fc7"

# name -> flag overrides of flags/demo.cfg. The screening rows (no "base" flags) changed the
# first preset; the lever rows start from the demo preset compressed to the budget (BASE: one
# rotation-only epoch, then clustering every epoch) and change one lever each.
# m and k are pinned to the values these rows ran with (demo.cfg moved to m=1 x k=80 after
# this sweep and back to m=2 x k=40 after the 5-epoch check, README), so the rows stay
# reproducible whatever demo.cfg holds.
OLD_BASE = ["--epochs=3", "--rotnet_warmup_epochs=1", "--reassign_every=1"]
BASE = OLD_BASE + ["--m=2", "--k=40"]
POINTS = {
    "rotnet": ["--mode=rotnet"],
    "crop0.3_nodrop_lr0.1": ["--crop_scale_min=0.3", "--dropout=0", "--lr=0.1"],
    "rotnet_crop0.3_nodrop_lr0.1": ["--mode=rotnet", "--crop_scale_min=0.3", "--dropout=0", "--lr=0.1"],
    "base": BASE,
    # The same flags again on another day: the machine's speed drifts (examples seen in the
    # budget), so the rows of one day are compared with that day's base.
    "base_rerun": BASE,
    "base_rotnet": BASE + ["--mode=rotnet"],
    "size48": BASE + ["--image_size=48"],
    "size64": BASE + ["--image_size=64"],
    "width0.5": BASE + ["--width=0.5"],
    "batch128": BASE + ["--batch_per_replica=128"],
    "lr0.05_constant": BASE + ["--lr=0.05", "--schedule=constant", "--warmup_epochs=0"],
    "m1k80": BASE + ["--m=1", "--k=80"],
    "m2k10": BASE + ["--k=10"],
    "T2": BASE + ["--reassign_every=2"],
    "rgb": BASE + ["--sobel=false"],
    "no_reinit": BASE + ["--reinit_heads=false"],
    "no_uniform_sampler": BASE + ["--uniform_sampler=false"],
    "pool50k": BASE + ["--data_pattern=shards/tiny/pool-*.tfrecord", "--epoch_size=5000"],
}
ARCH_FLAGS = ("--image_size", "--width", "--sobel", "--fc_dim")
# probe set -> (fit on, score on, k for cluster NMI)
PROBE_SETS = {"selection": heldout.VIEWS["selection"], "data": heldout.VIEWS["20-class"]}


def run(cmd, log):
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, "w") as f:
    subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def log_stats(model_dir) -> dict:
  """Training statistics from the run's log: the last epoch that ran steps (a run stopped by
  the budget right after a reassignment logs an empty epoch), and the reassignments."""
  log = [json.loads(l) for l in open(os.path.join(model_dir, "log.jsonl"))]
  epochs_done = [r for r in log if r["event"] == "epoch" and r["loss"] > 0]
  reassigns = [r for r in log if r["event"] == "reassign"]
  last = epochs_done[-1] if epochs_done else {}
  return {"examples_seen": max([r["examples_seen"] for r in log if r["event"] == "epoch"] or [0]),
          "super_accuracy": last.get("super_accuracy"), "sub_accuracy": last.get("sub_accuracy"),
          "nmi_previous": reassigns[-1].get("nmi_previous") if reassigns else None,
          "knn_monitor": [r.get("knn_top1") for r in reassigns]}


def sweep_point(name, extra, budget_min, epochs, seed, out_root, probe_set):
  model_dir = os.path.join(out_root, f"{name}-s{seed}")
  fit, test, k = PROBE_SETS[probe_set]
  # before training: a probe set that cannot be written fails now, not after the budget is spent
  heldout.ensure_shards([fit, test], os.path.join(out_root, "shards.log"))
  t0 = time.time()
  run([sys.executable, "train.py", f"--model_dir={model_dir}", f"--max_minutes={budget_min}",
       f"--epochs={epochs}", f"--seed={seed}", *extra], model_dir + ".train.log")
  train_s = time.time() - t0
  probes = [f"--train_data={fit}", f"--test_data={test}", f"--cluster_k={k}",
            f"--layers={LAYERS}", "--probe_epochs=30", f"--seed={seed}"]
  run([sys.executable, "evaluate.py", f"--checkpoint={model_dir}", *probes,
       f"--output_dir={model_dir}/eval", "--baseline=none"], model_dir + ".eval.log")
  # The random-init twin depends only on the architecture and the seed: scored once each.
  arch = [f for f in extra if f.split("=")[0] in ARCH_FLAGS]
  twin_dir = os.path.join(out_root, "twins" if probe_set == "data" else f"twins_{probe_set}",
                          "_".join(a.lstrip("-") for a in arch) or "demo", f"s{seed}")
  if not os.path.exists(os.path.join(twin_dir, "report.json")):
    run([sys.executable, "evaluate.py", f"--checkpoint={model_dir}", *probes,
         f"--output_dir={twin_dir}", "--baseline=random"], twin_dir + ".log")
  trained = json.load(open(os.path.join(model_dir, "eval", "report.json")))["results"]["trained"]
  twin = json.load(open(os.path.join(twin_dir, "report.json")))["results"]["random"]
  margin = {l: trained["probe"][l]["top1"] - twin["probe"][l]["top1"] for l in trained["probe"]}
  best = max(margin, key=margin.get)
  report = {"margin_top1": margin, "best_layer": {"layer": best, "margin_top1": margin[best]},
            "margin_knn": {l: trained["knn"][l] - twin["knn"][l] for l in trained["knn"]},
            "results": {"trained": trained, "random": twin}}
  return {
      "name": name, "flags": extra, "seed": seed, "budget_minutes": budget_min,
      "probe_set": probe_set,
      "epochs_scheduled": int([f for f in [f"--epochs={epochs}", *extra]
                               if f.startswith("--epochs=")][-1].split("=")[1]),
      "train_wall_seconds": round(train_s, 1),
      **log_stats(model_dir),
      "margin_top1": report["margin_top1"], "margin_knn": report["margin_knn"],
      "best_layer": report["best_layer"],
      "trained_top1": {l: v["top1"] for l, v in report["results"]["trained"]["probe"].items()},
      "random_top1": {l: v["top1"] for l, v in report["results"]["random"]["probe"].items()},
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }


def table(rows) -> str:
  """The markdown table of benchmarks/README.md, from the JSON rows."""
  def pct(v):
    return "—" if v is None else f"{100 * v:.1f}%"
  lines = ["| point | flags changed | scored on | budget | train wall | examples seen | rotation / super acc. "
           "| cluster (sub) acc. | NMI t-1/t | best layer: margin | kNN margin (conv13) "
           "| margins conv4 / conv7 / conv10 / conv13 / fc7 |", "|" + "---|" * 12]
  for r in rows:
    m = r["margin_top1"]
    flags = " ".join(f for f in r["flags"] if f not in BASE) if r["flags"][:len(BASE)] == BASE \
        else "(screening) " + " ".join(r["flags"])
    seed = f" (seed {r['seed']})" if r["seed"] else ""
    nmi = "—" if r.get("nmi_previous") is None else f"{r['nmi_previous']:.2f}"
    lines.append(
        f"| {r['name']}{seed} | {flags or '(the compressed demo preset)'} "
        f"| {r.get('probe_set', 'data')} | {r['budget_minutes']:g} min "
        f"| {r['train_wall_seconds'] / 60:.1f} min | {r['examples_seen'] / 1000:.1f}k "
        f"| {pct(r['super_accuracy'])} | {pct(r['sub_accuracy']) if r.get('sub_accuracy') else '—'} "
        f"| {nmi} | {r['best_layer']['layer']}: {r['best_layer']['margin_top1']:+.1f} "
        f"| {r['margin_knn'].get('conv13', float('nan')):+.1f} "
        f"| {' / '.join(f'{m[l]:+.1f}' for l in ('conv4', 'conv7', 'conv10', 'conv13', 'fc7'))} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--points", default="base")
  p.add_argument("--budget_minutes", type=float, default=3.0)
  p.add_argument("--epochs", type=int, default=0, help="schedule length; 0 = from the budget")
  p.add_argument("--seeds", default="0")
  p.add_argument("--probe_set", default="selection", choices=sorted(PROBE_SETS),
                 help="where probes are fit and scored: the set that chooses")
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "sweep"))
  p.add_argument("--list", action="store_true")
  p.add_argument("--table", action="store_true", help="print the markdown table of the results")
  p.add_argument("--rescan", action="store_true", help="recompute log statistics from --out")
  args = p.parse_args()
  if args.rescan:  # recompute the log statistics of existing rows from their run folders
    rows = json.load(open(RESULTS))
    for r in rows:
      model_dir = os.path.join(args.out, f"{r['name']}-s{r['seed']}")
      if os.path.exists(os.path.join(model_dir, "log.jsonl")):
        r.update(log_stats(model_dir))
    json.dump(rows, open(RESULTS, "w"), indent=1)
  if args.table:
    print(table(json.load(open(RESULTS))))
    return
  if args.list:
    print("\n".join(f"{k}: {' '.join(v)}" for k, v in POINTS.items()))
    return
  # ~220 rotated examples/s at the demo size on 2 cores: one epoch of 5,000 images x 4 rotations
  # takes ~90 s; the cosine schedule is sized to end with the budget.
  epochs = args.epochs or max(1, round(args.budget_minutes * 60 / 90))
  rows = json.load(open(RESULTS)) if os.path.exists(RESULTS) else []
  for name in args.points.split(","):
    for seed in [int(s) for s in args.seeds.split(",")]:
      row = sweep_point(name, POINTS[name], args.budget_minutes, epochs, seed, args.out,
                        args.probe_set)
      rows = [r for r in rows if not (r["name"] == name and r["seed"] == seed
                                      and r["budget_minutes"] == args.budget_minutes
                                      and r.get("probe_set", "data") == args.probe_set)] + [row]
      os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
      json.dump(rows, open(RESULTS, "w"), indent=1)
      print(json.dumps({k: row[k] for k in ("name", "seed", "examples_seen", "super_accuracy",
                                             "best_layer", "margin_knn")}), flush=True)


if __name__ == "__main__":
  main()
