r"""The paper's protocol in miniature (issue 39): does clustering add to a RotNet trunk?

Caron et al. (2019), Sec. 4, start DeeperCluster from a RotNet trunk; Table 3 (conv13, ImageNet
linear) has it at 45.6 against RotNet's 33.0, and Fig. 3 has it gaining with more images and
clusters. Here, on flags/continuation.cfg (its header says which set chose what):
  1. start     RotNet from random init for one phase (6 epochs, 1,872 steps), one per seed;
  2. from that trunk (`--init_checkpoint`: the trunk only; heads and optimizer start fresh and
     alike), one more phase of the same steps and lr schedule of each of
       rotnet         RotNet continued,
       deepercluster  DeeperCluster continued (m = 2 x k = 40, T = 2, clustering from epoch 0),
       deepcluster    DeepCluster continued (m = 1 x k = 80, no rotations: 4x the images an
                      epoch, so the same examples a step and the same steps);
     and, with --arms=deepercluster_4k, DeeperCluster continued with 4x the clusters (k = 160);
  3. every trunk, the start and the random-init twin of its seed scored per layer (conv13
     included) by `evaluate.py`'s fast probe (PROBE below) on two views of
     benchmarks/heldout.py: the selection split (40 classes outside the pool's 20; fit on 4,000
     images, scored on 2,000) and the 200-class val (fit on train images 0-49 of every class,
     scored on the 10,000 val.zip images; chose nothing);
  4. a small Fig. 3 (seed 0): DeeperCluster continued on 1/4 and 1/2 of the pool (one and two of
     its four shards, same steps) and with k/4 and 4k clusters; `all` and `k` are seed 0's arm.

The paired difference of two arms (same seed, same start) at a layer is "beyond the seed spread"
when its mean over seeds exceeds twice its standard error (sd / sqrt(seeds)).

Resumable in pieces: each piece (a training phase, or the scoring of one trunk on one view) is
read back when done, a killed training resumes from its checkpoint, and `--max_minutes` stops
before a piece that would not fit (training is handed the time left as train.py's own
--max_minutes, which stops it resumably). Commit benchmarks/results/continuation.{json,md} between
pieces. Missing shards are written first under the ignored shards/tiny/. E.g.:
  python benchmarks/continuation.py --seeds=0,1,2 --max_minutes=150
  python benchmarks/continuation.py --table     # rewrite the table from the JSON only
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heldout  # noqa: E402
import reproduce  # noqa: E402

ROOT, RESULTS = reproduce.ROOT, reproduce.RESULTS
PRESET = "flags/continuation.cfg"
LAYERS = heldout.LAYERS.split(",")
VIEWS = ("selection", "200-class")
PROBE_EPOCHS = 30
PROBE = ("evaluate.py --probe=fast: Adam logistic regression on frozen, average-pooled "
         f"centre-crop features, {PROBE_EPOCHS} epochs, per layer")
ARMS = {"rotnet": ["--mode=rotnet"],
        "deepercluster": [],
        "deepcluster": ["--mode=deepcluster", "--m=1", "--k=80", "--epoch_size=20000"],
        # not in the default --arms: the one lever the small Fig. 3 moved (4x the clusters)
        "deepercluster_4k": ["--k=160"]}
DEFAULT_ARMS = "rotnet,deepercluster,deepcluster"
FIG3 = {"pool 1/4": ["--data_pattern=data/train-00000-of-00004.tfrecord"],
        "pool 1/2": ["--data_pattern=data/train-0000[0-1]-of-00004.tfrecord"],
        "k/4": ["--k=10"],
        "4k": ["--k=160"]}
MINUTES_A_SCORING = {"selection": 2.0, "200-class": 5.0}   # a piece starts only if this is left
MINUTES_A_PHASE = 4.0


class OutOfTime(Exception):
  pass


class Study:
  def __init__(self, args):
    self.args = args
    self.deadline = time.time() + 60 * args.max_minutes if args.max_minutes else float("inf")
    self.path = os.path.join(RESULTS, "continuation.json")
    self.record = json.load(open(self.path)) if os.path.exists(self.path) else {
        "pieces": {}, "preset": PRESET, "probe": PROBE}

  def left(self) -> float:
    return (self.deadline - time.time()) / 60

  def save(self):
    self.record["probe_code"] = probe_code()
    os.makedirs(RESULTS, exist_ok=True)
    with open(self.path + ".tmp", "w") as f:
      json.dump(self.record, f, indent=1, sort_keys=True)
    os.replace(self.path + ".tmp", self.path)
    with open(os.path.join(RESULTS, "continuation.md"), "w") as f:
      f.write(table(self.record) + "\n")
    plot(self.record, os.path.join(RESULTS, "continuation.png"))

  def piece(self, name, minutes, fn):
    """Runs fn() once: its result (with wall and CPU seconds) is kept under `name`."""
    if name in self.record["pieces"]:
      return self.record["pieces"][name]
    if self.left() < minutes:
      raise OutOfTime(name)
    print(f"[{time.strftime('%H:%M:%S')}] {name} ({self.left():.0f} min left)", flush=True)
    cpu0, t0 = children_cpu(), time.time()
    out = fn()
    if out is None:    # stopped by --max_minutes, resumable
      raise OutOfTime(name)
    out.update(wall_seconds=round(time.time() - t0, 1),
               cpu_seconds=round(children_cpu() - cpu0, 1),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               commit=git("rev-parse", "--short", "HEAD"))
    self.record["pieces"][name] = out
    self.save()
    return out

  def train(self, run, seed, extra):
    run_dir = os.path.join(self.args.out, run)

    def go():
      budget = max(self.left(), 0.5) if self.args.max_minutes else 0
      cmd = [sys.executable, "train.py", f"--flagfile={PRESET}", f"--model_dir={run_dir}",
             f"--seed={seed}", f"--max_minutes={budget:.2f}", *extra]
      reproduce.run(cmd, run_dir + ".train.log")
      if not os.path.exists(os.path.join(run_dir, "export", "model_card.json")):
        return None
      return {"run": run, "seed": seed, "flags": extra, "steps": steps_logged(run_dir),
              "train_stats": last_epoch(run_dir)}

    return self.piece(f"train {run}", MINUTES_A_PHASE, go)

  def score(self, run, seed, view, baseline="none"):
    run_dir = os.path.join(self.args.out, run)
    train_data, test_data, k = heldout.VIEWS[view]
    subject = "random" if baseline == "random" else run
    out = os.path.join(self.args.out, "eval", f"{subject}-s{seed}-{view}")

    def go():
      if os.path.exists(out):   # a killed scoring: start it again
        subprocess.run(["rm", "-rf", out], check=True)
      reproduce.run([sys.executable, "evaluate.py", f"--checkpoint={run_dir}",
                     f"--train_data={train_data}", f"--test_data={test_data}",
                     f"--output_dir={out}", f"--baseline={baseline}",
                     f"--layers={','.join(LAYERS)}", f"--cluster_k={k}",
                     f"--probe_epochs={PROBE_EPOCHS}", f"--seed={seed}"], out + ".log")
      report = json.load(open(os.path.join(out, "report.json")))
      (res,) = report["results"].values()
      return {"top1": {l: res["probe"][l]["top1"] for l in LAYERS},
              "knn": res.get("knn", {}), "clusters": res.get("clusters", {})}

    name = f"score {'random-s%d' % seed if baseline == 'random' else run} {view}"
    return self.piece(name, MINUTES_A_SCORING[view], go)

  def start(self, seed) -> str:
    """The seed's RotNet start (trained once) and its random twin's scores: the init flag."""
    start = f"start-s{seed}"
    self.train(start, seed, ["--mode=rotnet", "--require_init_checkpoint=false"])
    for view in VIEWS:
      self.score(start, seed, view, baseline="random")
    return f"--init_checkpoint={os.path.join(self.args.out, start)}"

  def seed(self, seed):
    start, init = f"start-s{seed}", self.start(seed)
    for arm in self.args.arms.split(","):
      self.train(f"{arm}-s{seed}", seed, [init, *ARMS[arm]])
      for view in VIEWS:
        self.score(f"{arm}-s{seed}", seed, view)
    for view in VIEWS:
      self.score(start, seed, view)

  def fig3(self):
    init = self.start(0)
    for name, extra in FIG3.items():
      run = "fig3-" + name.replace(" ", "").replace("/", "of")
      self.train(run, 0, [init, *extra])
      for view in VIEWS:
        self.score(run, 0, view)


def children_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def git(*a) -> str:
  return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def probe_code() -> str:
  """The last commit that changed the fast probe's code: the probe's version."""
  return git("log", "-1", "--format=%h %ad", "--date=short", "--", "evaluate.py",
             "dc_tf/evaluation/probes.py", "dc_tf/evaluation/evaluator.py",
             "dc_tf/evaluation/feature_store.py")


def steps_logged(run_dir) -> int:
  last = 0
  for line in open(os.path.join(run_dir, "log.jsonl")):
    last = max(last, json.loads(line).get("step", 0))
  return last


def last_epoch(run_dir) -> dict:
  """The last epoch's losses and training accuracies (super-class: rotation for RotNet,
  cluster for DeepCluster; sub-class), and its images a second, as train.py logged them."""
  rows = [json.loads(l) for l in open(os.path.join(run_dir, "log.jsonl"))]
  rows = [r for r in rows if r.get("event") == "epoch"]
  keep = ("loss", "super_accuracy", "sub_accuracy", "images_per_second", "epoch")
  return {k: rows[-1][k] for k in keep if k in rows[-1]} if rows else {}


# ---- the tables ----

def margins(record, run, seed, view):
  """Per layer: top-1 of `run` minus its seed's random twin, or None if either is missing."""
  p = record["pieces"]
  a, b = p.get(f"score {run} {view}"), p.get(f"score random-s{seed} {view}")
  return {l: a["top1"][l] - b["top1"][l] for l in LAYERS} if a and b else None


def paired(record, arm, other, seeds, view):
  """Per layer: mean and standard error over seeds of arm - other (same seed, same start)."""
  p = record["pieces"]
  diffs = {l: [] for l in LAYERS}
  for s in seeds:
    a, b = p.get(f"score {arm}-s{s} {view}"), p.get(f"score {other}-s{s} {view}")
    if a and b:
      for l in LAYERS:
        diffs[l].append(a["top1"][l] - b["top1"][l])
  out = {}
  for l, d in diffs.items():
    if d:
      se = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
      out[l] = {"mean": float(np.mean(d)), "se": float(se), "n": len(d),
                "beyond": bool(len(d) > 1 and abs(np.mean(d)) > 2 * se)}
  return out


def seeds_of(record):
  return sorted({int(k.split("-s")[-1]) for k in record["pieces"]
                 if k.startswith("train start-s")})


def table(record) -> str:
  seeds = seeds_of(record)
  runs = ["start", *ARMS]
  lines = [f"Probe: {record['probe']} (code of {record.get('probe_code', '?')}).",
           f"Preset: {record['preset']}. Seeds: {seeds}.", ""]
  for view in VIEWS:
    lines += [f"### {view}: top-1 margin over the random-init twin (points), mean ± sd over seeds",
              "", "| trunk | seeds | " + " | ".join(LAYERS) + " |", "|---|---|" + "---|" * len(LAYERS)]
    for run in runs:
      per = [m for s in seeds if (m := margins(record, f"{run}-s{s}", s, view))]
      if per:
        cells = [f"{np.mean([m[l] for m in per]):+.1f}"
                 + (f" ± {np.std([m[l] for m in per], ddof=1):.1f}" if len(per) > 1 else "")
                 for l in LAYERS]
        lines.append(f"| {run} | {len(per)} | " + " | ".join(cells) + " |")
    twins = [record["pieces"][f"score random-s{s} {view}"]["top1"] for s in seeds
             if f"score random-s{s} {view}" in record["pieces"]]
    if twins:
      lines.append(f"| (twin, top-1 %) | {len(twins)} | "
                   + " | ".join(f"{np.mean([t[l] for t in twins]):.1f}" for l in LAYERS) + " |")
    lines += ["", f"Paired differences, {view} (mean ± standard error over seeds; ** beyond "
              "twice the SE):", "", "| arms | seeds | " + " | ".join(LAYERS) + " |",
              "|---|---|" + "---|" * len(LAYERS)]
    for arm, other in (("deepercluster", "rotnet"), ("deepcluster", "rotnet"),
                       ("deepercluster", "deepcluster"), ("rotnet", "start"),
                       ("deepercluster", "start"), ("deepercluster_4k", "rotnet"),
                       ("deepercluster_4k", "deepercluster")):
      d = paired(record, arm, other, seeds, view)
      if d:
        n = max(v["n"] for v in d.values())
        cells = [f"{v['mean']:+.2f}" + (f" ± {v['se']:.2f}" if v["n"] > 1 else "")
                 + (" **" if v["beyond"] else "") for v in (d[l] for l in LAYERS)]
        lines.append(f"| {arm} − {other} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
  fig = [(name, "fig3-" + name.replace(" ", "").replace("/", "of")) for name in FIG3]
  fig.insert(2, ("pool all, k (the seed-0 arm)", "deepercluster-s0"))
  lines += ["### Fig. 3 in small (seed 0, DeeperCluster continued): margin over the twin", "",
            "| run | view | " + " | ".join(LAYERS) + " |", "|---|---|" + "---|" * len(LAYERS)]
  for name, run in fig:
    for view in VIEWS:
      m = margins(record, run, 0, view)
      if m:
        lines.append(f"| {name} | {view} | " + " | ".join(f"{m[l]:+.1f}" for l in LAYERS) + " |")
  walls = [p["wall_seconds"] for p in record["pieces"].values()]
  cpu = [p["cpu_seconds"] for p in record["pieces"].values()]
  lines += ["", f"Pieces: {len(walls)}; wall {sum(walls) / 3600:.2f} h, CPU {sum(cpu) / 3600:.2f} h "
            "(both cores together)."]
  return "\n".join(lines)


def plot(record, path):
  """Per view: each trunk's margin over the twin per layer (mean, bars: sd over seeds); then
  the small Fig. 3's conv13 and best-layer margins against the pool's share and the clusters."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  seeds = seeds_of(record)
  fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
  for ax, view in zip(axes, VIEWS):
    for i, run in enumerate(["start", *ARMS]):
      per = [m for s in seeds if (m := margins(record, f"{run}-s{s}", s, view))]
      if per:
        y = np.array([[m[l] for l in LAYERS] for m in per])
        x = np.arange(len(LAYERS)) + (i - 1.5) * 0.08
        ax.errorbar(x, y.mean(0), yerr=y.std(0, ddof=1) if len(per) > 1 else None, marker="o",
                    capsize=3, label=f"{run} ({len(per)} seeds)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(LAYERS)), LAYERS)
    ax.set_title(f"{view}: top-1 over the random twin")
    ax.set_ylabel("points (mean, bars: sd over seeds)")
    ax.legend(fontsize=8)
  # The small Fig. 3: one axis for the pool, one for the clusters; seed 0's arm is both middles.
  for ax, (axis, runs) in zip(axes[2:], (
      ("share of the pool", {0.25: "fig3-pool1of4", 0.5: "fig3-pool1of2", 1: "deepercluster-s0"}),
      ("clusters (x the preset's m x k)", {0.25: "fig3-kof4", 1: "deepercluster-s0", 4: "fig3-4k"}))):
    for view, marker in zip(VIEWS, "os"):
      for layer, style in (("conv13", "-"), ("best", "--")):
        xs, ys = [], []
        for x, run in runs.items():
          if (m := margins(record, run, 0, view)) is not None:
            xs.append(x)
            ys.append(max(m.values()) if layer == "best" else m[layer])
        ax.plot(xs, ys, style, marker=marker, label=f"{view}, {layer} layer")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(runs), [f"{x:g}" for x in runs])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(axis)
    ax.set_title("DeeperCluster continued, seed 0 (Fig. 3)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {list(ARMS)}")
  p.add_argument("--fig3", action=argparse.BooleanOptionalAction, default=True,
                 help="also the small Fig. 3 (seed 0), after the seeds")
  p.add_argument("--max_minutes", type=float, default=0,
                 help="start no piece that would end past this many minutes (0: no limit)")
  p.add_argument("--table", action="store_true", help="only rewrite the table from the JSON")
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "continuation"))
  args = p.parse_args()
  if not all(s.strip().isdigit() for s in args.seeds.split(",")):
    raise SystemExit(f"--seeds: comma-separated integers >= 0, got {args.seeds!r}")
  if set(args.arms.split(",")) - set(ARMS):
    raise SystemExit(f"--arms: unknown {sorted(set(args.arms.split(',')) - set(ARMS))}; "
                     f"known {list(ARMS)}")
  study = Study(args)
  if args.table:
    study.save()
    print(table(study.record))
    return
  heldout.ensure_shards([pattern for v in VIEWS for pattern in heldout.VIEWS[v][:2]],
                        os.path.join(args.out, "shards.log"))
  try:
    for seed in (int(s) for s in args.seeds.split(",")):
      study.seed(seed)
    if args.fig3:
      study.fig3()
  except OutOfTime as e:
    print(f"--max_minutes: stopped before {e}; run the same command again to go on", flush=True)
  study.save()
  print(table(study.record))


if __name__ == "__main__":
  main()
