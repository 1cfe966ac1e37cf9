r"""The demo-sized cluster analyses (issue 38's "done when"): Figs. 4-7 of the paper from a CPU
run on shards written by `make_shards --source=yfcc`, against its RotNet counterpart.

  python benchmarks/cluster_analyses.py                       # full size: 20 classes x 250
  python benchmarks/cluster_analyses.py --classes=2 --per_class=20 --work=/tmp/ca_smoke \
      --output=cluster_analyses_smoke --train_args="--epochs=3 --rotnet_warmup_epochs=1 \
      --reassign_every=1 --m=1 --k=5"                          # a smoke run, a few minutes

Stages (each skipped where its record under --work/stages/ exists, so a rerun continues; a
killed training resumes from its checkpoint):

 1. dataset  real photos with generated YFCC100M metadata, written as the official dataset
    file (headerless, bzip2, 25 tab-separated fields, '+'/%-escaped text) and a folder tree of
    <photo_id>.jpg files. Photos: Tiny ImageNet's train_250per_class.zip, read in place; the
    classes: the 200 wnids of wnids.txt, sorted, less the demo's 20 (data/classes.txt), then
    numpy.random.default_rng(38).choice(180, 20, replace=False), sorted (--classes first of
    them); per class its first --per_class images by file name. Labels go to labels.tsv under
    --work only (for the "class" row of the extras, never to the shards). Metadata, seeded
    (--seed): users: 3 per class (60), user u's home class u % classes; each photo goes with
    probability --home_share (0.8) to one of its class's 3 home users, else to one of the
    other users, uniformly (so ~79% of a user's photos are of its home class); tags: with
    probability 0.7 a non-empty random subset of the class's words.txt names (lower case, one
    tag each), plus 0-3 common tags from COMMON_TAGS (10% of photos have no tag at all);
    GPS: each user a home point (lat U(-50, 60), lon U(-180, 180)), each photo that point
    + N(0, 0.3 deg) per axis, 30% of photos without GPS; device: uniform among DEVICES, 5%
    empty, independent of user, class and image (the control: its NMI should be ~0).
 2. shards   python -m dc_tf.data.make_shards --source=yfcc (no labels in the yfcc source).
 3. train_deepercluster, train_rotnet   python train.py --flagfile=flags/demo.cfg
    --data_pattern=<shards> --eval_pattern=data/val-*.tfrecord (the kNN monitor only) and
    --mode=rotnet for the reference: same recipe and seed; --export=false; --train_args are
    added to both. The DeeperCluster run keeps all its assignment tables (default).
 4. nmi, colour, page   python -m dc_tf.analysis {nmi,colour} <dc> --reference=<rotnet>,
    python -m dc_tf.analysis page <dc>; outputs under <work>/deepercluster/analysis.
 5. extras   in-process, the same streamed NMI (dc_tf.analysis.nmi.score) with the hidden
    class as one more field, for every kept table, the RotNet reference clusters, a seeded
    uniform random partition into the same m x k clusters (the finite-size floor of NMI at
    this scale; its mean and sd over 10 seeds too) and the true classes themselves (the ceiling a class-perfect clustering
    would reach on the metadata fields); and colour.colour_std's median sigma of the random
    and the class partitions (what "no colour grouping" and "grouped by class" give here).

Results: benchmarks/results/<--output>.json; pictures stay under --work (not in git).
"""

import argparse
import bz2
import csv
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import urllib.parse
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ZIP = "/work/shared/datasets/tiny-imagenet-200/train_250per_class.zip"
CLASS_SEED = 38
USERS_PER_CLASS = 3
COMMON_TAGS = ["travel", "vacation", "summer", "winter", "family", "friends", "nature", "city",
               "2010", "2011", "2012", "2013", "canon", "nikon", "iphone", "holiday", "trip",
               "me", "photo", "love", "beautiful", "light", "art", "street", "home", "park",
               "blue", "green", "red", "white"]
DEVICES = ["Canon EOS 400D DIGITAL", "NIKON D90", "Apple iPhone 4", "SONY DSC-W55",
           "Canon PowerShot SD1000", "Panasonic DMC-FZ8"]
FIELDS = ["user", "tag", "gps", "device"]


# ----------------------------------------------------------------------------- stages
class Stages:
  """Stage records under WORK/stages/<name>.json: a stage whose record exists is skipped."""

  def __init__(self, work: str):
    self.dir = os.path.join(work, "stages")
    os.makedirs(self.dir, exist_ok=True)

  def path(self, name):
    return os.path.join(self.dir, f"{name}.json")

  def done(self, name):
    return os.path.exists(self.path(name))

  def read(self, name):
    with open(self.path(name)) as f:
      return json.load(f)

  def run(self, name, fn):
    if self.done(name):
      rec = self.read(name)
      print(f"[{name}] done before ({rec['seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} s "
            "CPU): skipped", flush=True)
      return rec
    print(f"[{name}] ...", flush=True)
    t, c0 = time.time(), _cpu()
    out = fn() or {}
    rec = {"seconds": round(time.time() - t, 1), "cpu_seconds": round(_cpu() - c0, 1),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **out}
    with open(self.path(name) + ".tmp", "w") as f:
      json.dump(rec, f, indent=1, default=float)
    os.replace(self.path(name) + ".tmp", self.path(name))
    print(f"[{name}] {rec['seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} s CPU", flush=True)
    return rec


def _cpu() -> float:
  """CPU seconds (user + system) of this process and its waited-for children."""
  s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _sh(cmd: list[str], log: str) -> dict:
  print("  $ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
  with open(log, "w") as f:
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
  if p.returncode:
    tail = open(log).read()[-3000:]
    raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{tail}\n(stderr: {log})")
  return {"command": " ".join(shlex.quote(c) for c in cmd), "stdout": p.stdout[-4000:]}


# ----------------------------------------------------------------------------- dataset
def choose_classes(z: zipfile.ZipFile, classes: int) -> list[str]:
  """Tiny ImageNet's wnids, sorted, less the demo's (data/classes.txt); a seeded draw of 20
  (CLASS_SEED), sorted; the first `classes` of them."""
  prefix = z.namelist()[0].split("/")[0]
  wnids = sorted(z.read(f"{prefix}/wnids.txt").decode().split())
  demo = set(open(os.path.join(ROOT, "data", "classes.txt")).read().split())
  pool = [w for w in wnids if w not in demo]
  drawn = np.random.default_rng(CLASS_SEED).choice(len(pool), 20, replace=False)
  return sorted(pool[i] for i in drawn)[:classes]


def class_words(z: zipfile.ZipFile, wnids) -> dict:
  prefix = z.namelist()[0].split("/")[0]
  out = {}
  for line in z.read(f"{prefix}/words.txt").decode().splitlines():
    w, _, text = line.partition("\t")
    if w in wnids:
      out[w] = [t.strip().lower() for t in text.split(",") if t.strip()]
  return out


def _q(text: str) -> str:
  return urllib.parse.quote_plus(text, safe="")


def yfcc_line(row: dict) -> str:
  from dc_tf.data import sources
  return "\t".join(str(row.get(n, "")) for n in sources.YFCC_FIELDS) + "\n"


def make_dataset(args, work: str) -> dict:
  rng = np.random.default_rng(args.seed)
  z = zipfile.ZipFile(args.zip)
  wnids = choose_classes(z, args.classes)
  words = class_words(z, set(wnids))
  names = z.namelist()
  files = {w: sorted(n for n in names if f"/train/{w}/images/" in n and n.endswith(".JPEG"))
           [:args.per_class] for w in wnids}
  n_users = USERS_PER_CLASS * len(wnids)
  home = np.arange(n_users) % len(wnids)
  user_nsid = [f"{rng.integers(10_000_000, 99_999_999)}@N0{rng.integers(0, 9)}"
               for _ in range(n_users)]
  home_lat, home_lon = rng.uniform(-50, 60, n_users), rng.uniform(-180, 180, n_users)
  images = [(c, w, f) for c, w in enumerate(wnids) for f in files[w]]
  ids = set()
  while len(ids) < len(images):
    ids.add(int(rng.integers(2_000_000_000, 9_999_999_999)))
  photo_ids = rng.permutation(sorted(ids))
  folder = os.path.join(work, "images")
  lines, labels, users_of = [], [], np.zeros(n_users, int)
  home_of, n_gps, n_tags = np.zeros(n_users, int), 0, 0
  for line_no, ((c, w, name), pid) in enumerate(zip(images, photo_ids)):
    pid = int(pid)
    homes = np.flatnonzero(home == c)
    others = np.flatnonzero(home != c)
    if rng.random() < args.home_share or not len(others):
      u = int(rng.choice(homes))
    else:
      u = int(rng.choice(others))
    users_of[u] += 1
    home_of[u] += int(home[u] == c)
    tags = []
    r = rng.random()
    if r >= 0.1:
      if rng.random() < 0.7:
        own = words[w]
        k = int(rng.integers(1, len(own) + 1))
        tags += [own[i] for i in sorted(rng.choice(len(own), k, replace=False))]
      tags += [COMMON_TAGS[i] for i in rng.choice(len(COMMON_TAGS), int(rng.integers(0, 4)),
                                                 replace=False)]
    gps = rng.random() >= 0.3
    lat = home_lat[u] + rng.normal(0, 0.3) if gps else None
    lon = home_lon[u] + rng.normal(0, 0.3) if gps else None
    n_gps, n_tags = n_gps + gps, n_tags + bool(tags)
    device = DEVICES[int(rng.integers(len(DEVICES)))] if rng.random() >= 0.05 else ""
    data = z.read(name)
    sub = os.path.join(folder, f"{pid % 100:02d}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"{pid}.jpg"), "wb") as f:
      f.write(data)
    taken = 1_160_000_000 + int(rng.integers(0, 250_000_000))
    secret = hashlib.md5(f"{pid}".encode()).hexdigest()[:10]
    server, farm = int(rng.integers(1000, 9000)), int(rng.integers(1, 10))
    lines.append(yfcc_line({
        "line_number": line_no, "photo_id": pid, "photo_hash": hashlib.md5(data).hexdigest(),
        "user_nsid": _q(user_nsid[u]), "user_nickname": f"user{u:03d}",
        "date_taken": time.strftime("%Y-%m-%d %H:%M:%S.0", time.gmtime(taken)),
        "date_uploaded": taken + int(rng.integers(0, 3_000_000)),
        "capture_device": _q(device), "title": "", "description": "",
        "user_tags": ",".join(_q(t) for t in tags), "machine_tags": "",
        "longitude": f"{lon:.6f}" if gps else "", "latitude": f"{lat:.6f}" if gps else "",
        "accuracy": "16" if gps else "",
        "page_url": f"http://www.flickr.com/photos/{user_nsid[u]}/{pid}/",
        "download_url": f"http://farm{farm}.staticflickr.com/{server}/{pid}_{secret}.jpg",
        "license_name": "Attribution-NonCommercial-ShareAlike License",
        "license_url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
        "server_id": server, "farm_id": farm, "secret": secret, "secret_original": secret,
        "extension_original": "jpg", "marker": 0}))
    labels.append(f"{pid}\t{c}\t{w}\t{user_nsid[u]}\n")
  with bz2.open(os.path.join(work, "yfcc100m_dataset.bz2"), "wt") as f:
    f.writelines(lines)
  with open(os.path.join(work, "labels.tsv"), "w") as f:
    f.writelines(labels)
  share = home_of / np.maximum(users_of, 1)
  return {"classes": {w: words[w] for w in wnids}, "images": len(images), "users": n_users,
          "photos_per_user_min_median_max": [int(users_of.min()), int(np.median(users_of)),
                                             int(users_of.max())],
          "home_class_share_of_a_users_photos_mean": float(share.mean()),
          "with_gps": float(n_gps / len(images)), "with_tags": float(n_tags / len(images))}


def read_labels(work: str) -> dict:
  out = {}
  for line in open(os.path.join(work, "labels.tsv")):
    pid, c, _, _ = line.rstrip("\n").split("\t")
    out[int(pid)] = int(c)
  return out


# ----------------------------------------------------------------------------- extras
def extras(work: str, pattern: str) -> dict:
  """Streamed NMI of every kept table, the RotNet reference, a random partition and the true
  classes against the metadata fields plus the hidden class."""
  import collections
  from dc_tf.analysis import metadata, nmi, reference
  from dc_tf.training import checkpointing
  dc, rot = os.path.join(work, "deepercluster"), os.path.join(work, "rotnet")
  config = checkpointing.read_config(dc)
  labels = read_labels(work)
  tables = nmi.kept_tables(dc)
  ref = reference.clusters_of(rot, pattern, config)
  ids = np.array(sorted(labels), np.int64)
  k = config.num_super_clusters * config.clustering.k
  rnd = nmi.Table("random", ids, np.random.default_rng(0).integers(0, k, len(ids)))
  more = [nmi.Table(f"random{s}", ids, np.random.default_rng(s).integers(0, k, len(ids)))
          for s in range(1, 10)]                       # the floor's spread over 10 seeds
  cls = nmi.Table("classes", ids, np.array([labels[i] for i in ids.tolist()]))
  counts = collections.Counter()
  for chunk in metadata.raw_chunks(pattern):
    metadata.tag_counts(chunk["tags"], counts)

  def chunks():
    for chunk in metadata.raw_chunks(pattern):
      chunk["imagenet"] = np.array([labels.get(int(i), -1) for i in chunk["image_id"]],
                                   np.int64)
      yield chunk
  scored = nmi.score(tables + [ref, rnd, cls] + more, chunks(), counts)
  floors = [scored.pop(t.name) for t in more] + [scored["random"]]
  floor = {("class" if f == "imagenet" else f): {
      "mean": float(np.mean([x[f]["nmi"] for x in floors])),
      "sd": float(np.std([x[f]["nmi"] for x in floors], ddof=1))} for f in floors[0]}
  rename = lambda s: {("class" if f == "imagenet" else f): v["nmi"] for f, v in s.items()}
  from dc_tf.analysis import colour
  spread = {}
  for t in (rnd, cls):       # the colour sigma of a random and of a class-pure partition
    stds = colour.colour_std(t, colour.sample_clusters(t, 3000, 0), pattern)
    spread[t.name] = {"clusters": len(stds), "median": float(np.median(list(stds.values())))}
  return {"k": k, "rows": {str(name): rename(s) for name, s in scored.items()},
          "random_partition_10_seeds": floor, "colour_std_median": spread,
          "reference_name": ref.name,
          "reference_sizes": _sizes(ref.labels), "last_table_sizes": _sizes(tables[-1].labels)}


def _sizes(labels) -> dict:
  _, n = np.unique(np.asarray(labels), return_counts=True)
  return {"clusters": len(n), "smallest": int(n.min()), "median": float(np.median(n)),
          "largest": int(n.max())}


# ----------------------------------------------------------------------------- summaries
def read_nmi(analysis: str) -> dict:
  out = {}
  with open(os.path.join(analysis, "nmi.csv")) as f:
    for row in csv.DictReader(f):
      out[row["epoch"]] = {k: float(v) for k, v in row.items()
                           if k != "epoch" and not k.endswith("_images") and v}
      out[row["epoch"]]["images"] = {k[:-7]: int(v) for k, v in row.items()
                                     if k.endswith("_images") and v}
  return out


def read_colour(analysis: str) -> dict:
  sets = {}
  with open(os.path.join(analysis, "colour_std.csv")) as f:
    for row in csv.DictReader(f):
      sets.setdefault(row["run"], []).append(float(row["colour_std"]))
  out = {}
  for name, v in sets.items():
    v = np.array(v)
    out[name] = {"clusters": len(v), "median": float(np.median(v)),
                 "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
                 "min": float(v.min()), "max": float(v.max())}
  if "reference" in sets:
    low = np.percentile(sets["reference"], 10)
    out["ours_below_reference_p10"] = float(np.mean(np.array(sets["ours"]) < low))
  return out


def train_log(model_dir: str) -> dict:
  rows = [json.loads(l) for l in open(os.path.join(model_dir, "log.jsonl"))]
  epochs = [r for r in rows if r.get("event") == "epoch"]
  reassign = [{k: r.get(k) for k in ("epoch", "seconds", "nonempty_clusters",
                                     "largest_cluster_share", "nmi_previous", "knn_top1")}
              for r in rows if r.get("event") == "reassign"]
  last = epochs[-1] if epochs else {}
  return {"epochs": len(epochs), "train_seconds": round(sum(r["seconds"] for r in epochs), 1),
          "last_epoch": {k: last.get(k) for k in ("epoch", "loss", "super_accuracy",
                                                  "sub_accuracy", "images_per_second")},
          "reassignments": reassign}


def table(nmi_rows: dict, extra: dict | None) -> str:
  cols = FIELDS + (["class"] if extra else [])
  lines = ["| table | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
  ex = (extra or {}).get("rows", {})
  for name, row in nmi_rows.items():
    key = extra["reference_name"] if extra and name.startswith("reference") else name
    vals = [row.get(f) for f in FIELDS] + ([ex.get(key, {}).get("class")] if extra else [])
    lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals)
                 + " |")
  for name in ("random", "classes"):
    if name in ex:
      vals = [ex[name].get(f) for f in cols]
      lines.append(f"| {name} partition | " + " | ".join("–" if v is None else f"{v:.3f}"
                                                       for v in vals) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--zip", default=ZIP)
  p.add_argument("--classes", type=int, default=20, help="classes (of the 20 drawn)")
  p.add_argument("--per_class", type=int, default=250, help="images per class")
  p.add_argument("--home_share", type=float, default=0.8,
                 help="probability a photo goes to one of its class's home users")
  p.add_argument("--seed", type=int, default=0, help="metadata seed")
  p.add_argument("--num_shards", type=int, default=4)
  p.add_argument("--shard_args", default="", help="more make_shards flags")
  p.add_argument("--train_args", default="", help="more train.py flags, given to both runs")
  p.add_argument("--eval_pattern", default="data/val-*.tfrecord",
                 help="train.py --eval_pattern (the kNN monitor only)")
  p.add_argument("--no_extras", action="store_true", help="skip the in-process extras stage")
  p.add_argument("--work", default="/tmp/cluster_analyses", help="data, runs and pictures")
  p.add_argument("--output", default="cluster_analyses", help="results/<output>.json")
  args = p.parse_args()
  work = os.path.abspath(args.work)
  os.makedirs(work, exist_ok=True)
  params = {k: getattr(args, k) for k in ("zip", "classes", "per_class", "home_share", "seed",
                                          "num_shards", "shard_args", "train_args",
                                          "eval_pattern")}
  ppath = os.path.join(work, "params.json")
  if os.path.exists(ppath):
    before = json.load(open(ppath))
    if before != params:
      diff = sorted(k for k in params if before.get(k) != params[k])
      raise SystemExit(f"{work} holds a run with other options ({diff}): choose another --work")
  else:
    json.dump(params, open(ppath, "w"), indent=1)
  st = Stages(work)
  py = sys.executable
  shards = os.path.join(work, "shards")
  pattern = os.path.join(shards, "yfcc-*.tfrecord")
  dc, rot = os.path.join(work, "deepercluster"), os.path.join(work, "rotnet")
  analysis = os.path.join(dc, "analysis")
  logs = os.path.join(work, "logs")
  os.makedirs(logs, exist_ok=True)
  rec = {}

  rec["dataset"] = st.run("dataset", lambda: make_dataset(args, work))
  rec["shards"] = st.run("shards", lambda: {
      **_sh([py, "-m", "dc_tf.data.make_shards", "--source=yfcc",
             f"--input={work}/yfcc100m_dataset.bz2", f"--image_dir={work}/images",
             f"--output_dir={shards}", "--name=yfcc", f"--num_shards={args.num_shards}",
             *shlex.split(args.shard_args)], os.path.join(logs, "shards.log")),
      "manifest": {k: v for k, v in json.load(open(os.path.join(shards, "yfcc.json"))).items()
                   if k in ("images_in", "records", "dropped", "num_shards", "shard_sizes",
                             "labels")}})
  train = [py, "train.py", "--flagfile=flags/demo.cfg", f"--data_pattern={pattern}",
           f"--eval_pattern={args.eval_pattern}", "--export=false",
           *shlex.split(args.train_args)]
  rec["train_deepercluster"] = st.run("train_deepercluster", lambda: {
      **_sh(train + [f"--model_dir={dc}"], os.path.join(logs, "train_deepercluster.log")),
      "log": train_log(dc)})
  rec["train_rotnet"] = st.run("train_rotnet", lambda: {
      **_sh(train + ["--mode=rotnet", f"--model_dir={rot}"],
            os.path.join(logs, "train_rotnet.log")), "log": train_log(rot)})
  an = [py, "-m", "dc_tf.analysis"]
  rec["nmi"] = st.run("nmi", lambda: {
      **_sh(an + ["nmi", dc, f"--reference={rot}"], os.path.join(logs, "nmi.log")),
      "table": read_nmi(analysis)})
  rec["colour"] = st.run("colour", lambda: {
      **_sh(an + ["colour", dc, f"--reference={rot}"], os.path.join(logs, "colour.log")),
      "summary": read_colour(analysis)})
  rec["page"] = st.run("page", lambda: _sh(an + ["page", dc], os.path.join(logs, "page.log")))
  if not args.no_extras:
    rec["extras"] = st.run("extras", lambda: extras(work, pattern))

  nmi_rows = rec["nmi"]["table"]
  md = table(nmi_rows, rec.get("extras"))
  colour = rec["colour"]["summary"]
  page = json.loads(rec["page"]["stdout"][rec["page"]["stdout"].index("{"):])
  stages = {k: {"seconds": v["seconds"], "cpu_seconds": v["cpu_seconds"]}
            for k, v in rec.items()}
  payload = {
      "what": "issue 38: Figs. 4-7 from a demo-recipe CPU run on make_shards --source=yfcc "
              "shards of real photos with generated YFCC100M metadata, against RotNet",
      "options": params, "dataset": rec["dataset"], "shards": rec["shards"],
      "commands": {k: v["command"] for k, v in rec.items() if "command" in v},
      "train": {"deepercluster": rec["train_deepercluster"]["log"],
                "rotnet": rec["train_rotnet"]["log"]},
      "nmi": nmi_rows, "nmi_table_md": md, "colour_std": colour,
      "extras": rec.get("extras"),
      "pictures": {"nmi": os.path.join(analysis, "nmi.png"),
                   "colour_std": os.path.join(analysis, "colour_std.png"),
                   "colour_lowest": os.path.join(analysis, "colour_lowest.png"),
                   "page": page.get("page")},
      "page": page, "stages": stages}
  path = common.write(args.output, payload)
  print()
  print(md)
  if "ours" in colour:
    ref = colour.get("reference", {})
    print(f"\ncolour sigma, median: DeeperCluster {colour['ours']['median']:.4f} "
          f"({colour['ours']['clusters']} clusters), RotNet reference "
          f"{ref.get('median', float('nan')):.4f} ({ref.get('clusters', 0)} clusters)")
    spread = (rec.get("extras") or {}).get("colour_std_median", {})
    if spread:
      print("  the same for the partitions: " + ", ".join(f"{k} {v['median']:.4f}" for k, v in spread.items()))
  print(f"page: {page.get('page')}")
  print("stages (wall s / CPU s): " + ", ".join(
      f"{k} {v['seconds']:.0f}/{v['cpu_seconds']:.0f}" for k, v in stages.items()))
  print(f"-> {path}")


if __name__ == "__main__":
  main()
