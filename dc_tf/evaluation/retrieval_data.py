"""Ground truth of the instance-retrieval benchmarks (the paper's Table 6), in their published
formats, and the average precision they are scored with.

Two protocols:
  classic    Oxford5k / Paris6k as facebookresearch/deepcluster's eval_retrieval.py reads them
             (`Dataset.load`, lines 176-222): `<root>/<name>/jpg/*.jpg` and `<root>/<name>/lab/` holding
             `<query>_{query,good,ok,junk}.txt` per query. The database is every file in jpg/,
             sorted, less Paris's 20 corrupted images (`PARIS_BLACKLIST`); the query images are
             in it. A query line reads `oxc1_<image> x0 y0 x1 y1` (the `oxc1_` prefix dropped).
  revisited  ROxford5k / RParis6k (Radenovic et al., CVPR 2018), as revisitop's
             python/dataset.py:15-17, 32 reads them: `<root>/<name>/jpg/*.jpg` and
             `<root>/<name>/gnd_<name>.pkl` (or the MATLAB `gnd_<name>.mat`) holding `imlist`
             (database), `qimlist` (70 queries, not in the database) and per query `bbx`
             (x0, y0, x1, y1, 0-based) and the `easy`, `hard`, `junk` database indices.

Where the data comes from: the images are the VGG pages' archives,
https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz and
https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_{1,2}-v1.tgz (revisitop
python/download.py:30-34; Paris extracts into one folder per landmark: put all files flat in
jpg/, as download.py does); the classic ground truth is the ground-truth archive on the same
pages, its text files unpacked into lab/; the revisited one is
http://cmp.felk.cvut.cz/revisitop/data/datasets/<name>/gnd_<name>.{pkl,mat} (download.py:61-64,
matlab/download_datasets.m:58-62).
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np

from dc_tf.config import UserError

CLASSIC = ("oxford5k", "paris6k")
REVISITED = ("roxford5k", "rparis6k")
# eval_retrieval.py:152-174, Dataset.__init__: "Some images from the Paris dataset are corrupted.
# Standard practice is to ignore them." Applied to whichever dataset is read, as there.
PARIS_BLACKLIST = (
    "paris_louvre_000136", "paris_louvre_000146", "paris_moulinrouge_000422",
    "paris_museedorsay_001059", "paris_notredame_000188", "paris_pantheon_000284",
    "paris_pantheon_000960", "paris_pantheon_000974", "paris_pompidou_000195",
    "paris_pompidou_000196", "paris_pompidou_000201", "paris_pompidou_000467",
    "paris_pompidou_000640", "paris_sacrecoeur_000299", "paris_sacrecoeur_000330",
    "paris_sacrecoeur_000353", "paris_triomphe_000662", "paris_triomphe_000833",
    "paris_triomphe_000863", "paris_triomphe_000867")


class RetrievalDataError(UserError, ValueError):
  """A missing folder, missing or malformed ground-truth file; the message names it."""


class UnsafePickleError(RetrievalDataError):
  """A ground-truth pickle asks for a global that such files never need."""


@dataclasses.dataclass
class Query:
  """One query: its image file, its box (x0, y0, x1, y1 in the original image's pixels) and
  its labels over the database, as index arrays into `RetrievalSet.images`.

  classic: `positive` = good + ok, `junk` = junk; `n_positive` counts the names the gt files
  list (compute_ap divides by that, so a positive missing from the database counts as never
  retrieved). revisited: `positive` = easy, `hard` = hard, `junk` = junk."""
  name: str
  path: str
  box: np.ndarray
  positive: np.ndarray
  junk: np.ndarray
  hard: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros([0], np.int64))
  n_positive: int = -1


@dataclasses.dataclass
class RetrievalSet:
  name: str
  protocol: str                 # 'classic' or 'revisited'
  images: list                  # database image paths, in database order
  queries: list                 # [Query]
  missing: tuple = ()           # gt names neither in jpg/ nor blacklisted (classic): counted
                                # as never retrieved, as compute_ap would; reported


def dataset_dir(root: str, name: str) -> str:
  path = os.path.join(root, name)
  if not os.path.isdir(path):
    raise RetrievalDataError(f"retrieval dataset folder not found: {path} (expected "
                             f"{path}/jpg/ and its ground truth; see dc_tf/evaluation/retrieval_data.py)")
  return path


def read_blacklist(blacklist) -> frozenset:
  """None: eval_retrieval.py's PARIS_BLACKLIST; a str: a file of image names (no extension),
  one a line; else an iterable of names."""
  if blacklist is None:
    return frozenset(PARIS_BLACKLIST)
  if isinstance(blacklist, str):
    if not os.path.isfile(blacklist):
      raise RetrievalDataError(f"blacklist file not found: {blacklist}")
    with open(blacklist) as f:
      return frozenset(l.strip() for l in f if l.strip())
  return frozenset(blacklist)


def _read_lines(path: str) -> list:
  if not os.path.isfile(path):
    raise RetrievalDataError(f"ground-truth file not found: {path}")
  with open(path) as f:
    return [l.strip() for l in f if l.strip()]


def read_classic(root: str, name: str, blacklist=None) -> RetrievalSet:
  """eval_retrieval.py `Dataset.load`: database = jpg/ sorted (`e[:-4]`), less the blacklist
  (lines 178-183); one query per lab/*_query.txt in sorted order, `oxc1_` dropped (199-202);
  good + ok positive, junk ignored (205-207)."""
  path = dataset_dir(root, name)
  img_dir, lab_dir = os.path.join(path, "jpg"), os.path.join(path, "lab")
  for d in (img_dir, lab_dir):
    if not os.path.isdir(d):
      raise RetrievalDataError(f"{name}: folder not found: {d}")
  black = read_blacklist(blacklist)
  names = [f[:-4] for f in sorted(os.listdir(img_dir))
           if f.lower().endswith(".jpg") and f[:-4] not in black]
  index = {n: i for i, n in enumerate(names)}
  queries, missing = [], set()
  for f in sorted(os.listdir(lab_dir)):
    if not f.endswith("_query.txt"):
      continue
    q = f[:-len("_query.txt")]
    line = _read_lines(os.path.join(lab_dir, f))
    fields = line[0].split() if line else []
    if len(fields) != 5:
      raise RetrievalDataError(f"{os.path.join(lab_dir, f)}: expected 'image x0 y0 x1 y1', "
                               f"got {line[:1]}")
    image = fields[0][5:] if fields[0].startswith("oxc1_") else fields[0]
    if image not in index:
      raise RetrievalDataError(f"{os.path.join(lab_dir, f)}: query image {image}.jpg is not in "
                               f"{img_dir} (or is blacklisted)")
    good = set(_read_lines(os.path.join(lab_dir, f"{q}_good.txt")))
    good |= set(_read_lines(os.path.join(lab_dir, f"{q}_ok.txt")))
    junk = set(_read_lines(os.path.join(lab_dir, f"{q}_junk.txt")))
    missing |= {n for n in good | junk if n not in index and n not in black}
    queries.append(Query(
        q, os.path.join(img_dir, image + ".jpg"), np.array(fields[1:], np.float32),
        positive=np.array(sorted(index[n] for n in good if n in index), np.int64),
        junk=np.array(sorted(index[n] for n in junk if n in index), np.int64),
        n_positive=len(good)))
  if not queries:
    raise RetrievalDataError(f"{name}: no *_query.txt in {lab_dir}")
  return RetrievalSet(name, "classic", [os.path.join(img_dir, n + ".jpg") for n in names],
                      queries, tuple(sorted(missing)))


class _GroundTruthUnpickler(pickle._Unpickler):  # noqa: SLF001  (its memo is a dict: a
  # huge PUT index costs nothing, where the C unpickler allocates 2x the index first)
  """Resolves only what a gnd_*.pkl can hold besides dicts, lists, strings and numbers:
  numpy arrays and scalars (their reconstructor, ndarray, dtype) and `_codecs.encode`, which
  Python 3 writes for bytes (an array's buffer) at protocol 2. Anything else, e.g. os.system
  behind a __reduce__, is refused before it is imported."""

  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

  def __init__(self, file, path: str):
    super().__init__(file, encoding="latin1")     # arrays pickled by Python 2
    self.path = path

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise UnsafePickleError(f"refusing {self.path}: it asks for {module}.{name}, which a "
                              "ground-truth file never needs (dicts, lists, numpy arrays only)")
    return super().find_class(module, name)


def load_gnd_pickle(path: str) -> dict:
  if not os.path.isfile(path):
    raise RetrievalDataError(f"ground-truth file not found: {path}")
  with open(path, "rb") as f:
    try:
      cfg = _GroundTruthUnpickler(f, path).load()
    except UnsafePickleError:
      raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
      raise RetrievalDataError(f"cannot read {path}: {type(e).__name__}: {e}") from e
  if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
    raise RetrievalDataError(f"{path}: expected a dict with imlist, qimlist and gnd")
  return cfg


def load_gnd_mat(path: str) -> dict:
  """The MATLAB twin (matlab/configdataset.m `load`): the same fields, but easy/hard/junk
  1-based (compute_map.m: "ranks starts from 1"); bbx stays 0-based (crop_qim.m adds 1)."""
  from scipy import io as sio
  try:
    mat = sio.loadmat(path, squeeze_me=True, struct_as_record=False)
  except (NotImplementedError, ValueError, OSError) as e:
    raise RetrievalDataError(f"cannot read {path}: {type(e).__name__}: {e} (a MATLAB v7.3 "
                             "file needs the .pkl instead)") from e
  def field(g, k):
    return np.atleast_1d(getattr(g, k) if hasattr(g, k) else g[k])
  gnd = [{k: field(g, k) - (1 if k != "bbx" else 0) for k in ("bbx", "easy", "hard", "junk")}
         for g in np.atleast_1d(mat["gnd"])]
  return {"imlist": [str(s) for s in np.atleast_1d(mat["imlist"])],
          "qimlist": [str(s) for s in np.atleast_1d(mat["qimlist"])], "gnd": gnd}


def read_revisited(root: str, name: str) -> RetrievalSet:
  """revisitop python/dataset.py `configdataset`: gnd_<name>.pkl (or .mat) next to jpg/."""
  path = dataset_dir(root, name)
  pkl, mat = (os.path.join(path, f"gnd_{name}.{e}") for e in ("pkl", "mat"))
  if os.path.isfile(pkl):
    cfg, gt = load_gnd_pickle(pkl), pkl
  elif os.path.isfile(mat):
    cfg, gt = load_gnd_mat(mat), mat
  else:
    raise RetrievalDataError(f"{name}: ground truth not found: {pkl} (or {mat})")
  img_dir = os.path.join(path, "jpg")
  if len(cfg["gnd"]) != len(cfg["qimlist"]):
    raise RetrievalDataError(f"{gt}: {len(cfg['gnd'])} gnd entries for "
                             f"{len(cfg['qimlist'])} queries")
  n = len(cfg["imlist"])
  queries = []
  for q, g in zip(cfg["qimlist"], cfg["gnd"]):
    labels = {k: np.asarray(g.get(k, []), np.int64).reshape(-1) for k in ("easy", "hard", "junk")}
    for k, v in labels.items():
      if v.size and (v.min() < 0 or v.max() >= n):
        raise RetrievalDataError(f"{gt}: query {q}: {k} index out of the {n} database images")
    queries.append(Query(q, os.path.join(img_dir, q + ".jpg"),
                         np.asarray(g["bbx"], np.float64).reshape(4), positive=labels["easy"],
                         junk=labels["junk"], hard=labels["hard"]))
  return RetrievalSet(name, "revisited", [os.path.join(img_dir, i + ".jpg") for i in cfg["imlist"]],
                      queries)


def read_dataset(root: str, name: str, blacklist=None) -> RetrievalSet:
  if name in CLASSIC:
    return read_classic(root, name, blacklist)
  if name in REVISITED:
    return read_revisited(root, name)
  raise RetrievalDataError(f"unknown retrieval dataset {name!r}: one of {CLASSIC + REVISITED}")


def average_precision(labels: np.ndarray, n_positive: int) -> float:
  """AP of one ranking, labels in rank order: 1 positive, 0 negative, -1 junk (skipped).

  The trapezoid rule of the Oxford compute_ap binary that eval_retrieval.py runs per query
  (`score_rnk_partial`, lines 235-243), the same as revisitop python/evaluate.py:3-37
  `compute_ap`: each positive
  adds recall step x (precision just before it + precision at it) / 2, the precision before
  the first rank being 1. One positive at rank 2 of 1 scores 1 x (0 + 1/2) / 2 = 0.25."""
  labels = np.asarray(labels)
  hits = np.cumsum(labels[labels >= 0] == 1)
  if n_positive <= 0:
    return float("nan")
  precision = hits / np.arange(1, hits.size + 1)
  recall = hits / n_positive
  before = np.concatenate([[1.0], precision[:-1]])
  step = np.diff(np.concatenate([[0.0], recall]))
  return float(np.sum(step * (before + precision) / 2))


def precision_at(labels: np.ndarray, kappas=(1, 5, 10)) -> np.ndarray:
  """revisitop python/evaluate.py `compute_map`'s precision @ k: positions of the positives
  after junk is removed (lines 86-94, 1-based), k capped at the last positive's position
  (line 104)."""
  labels = np.asarray(labels)
  pos = np.flatnonzero(labels[labels >= 0] == 1) + 1
  if not pos.size:
    return np.full(len(kappas), np.nan)
  return np.array([(pos <= min(pos.max(), k)).sum() / min(pos.max(), k) for k in kappas])


def revisited_setups(query: Query) -> dict:
  """{setup: (positive, junk)}, revisitop python/example_evaluate.py:58-82: Easy = easy with hard as
  junk, Medium = easy + hard, Hard = hard with easy as junk; junk always junk."""
  e, h, j = query.positive, query.hard, query.junk
  return {"easy": (e, np.concatenate([j, h])), "medium": (np.concatenate([e, h]), j),
          "hard": (h, np.concatenate([j, e]))}


def rank_labels(ranking: np.ndarray, positive: np.ndarray, junk: np.ndarray) -> np.ndarray:
  """1 / 0 / -1 per ranked database index; an index in both lists counts as positive (the
  classic caller removes junk from the positives first, as compute_ap tests junk first)."""
  labels = np.zeros(ranking.size, np.int64)
  labels[np.isin(ranking, junk)] = -1
  labels[np.isin(ranking, positive)] = 1
  return labels


def score(dataset: RetrievalSet, rankings: np.ndarray, kappas=(1, 5, 10)) -> dict:
  """rankings [n_queries, n_images] of database indices, best first. Percentages, as the
  original prints them. classic: {'map', 'aps': {query: ap}}; revisited: per setup
  {'map', 'mp@k'...}, queries with no positive left out of the means (evaluate.py:66-71,
  108-109)."""
  if dataset.protocol == "classic":
    aps = {}
    for q, r in zip(dataset.queries, rankings):
      # compute_ap.cpp tests junk first: a name in both lists is skipped.
      labels = rank_labels(r, np.setdiff1d(q.positive, q.junk), q.junk)
      aps[q.name] = 100 * average_precision(labels, q.n_positive)
    return {"map": float(np.mean(list(aps.values()))), "aps": aps}
  out = {}
  for setup in ("easy", "medium", "hard"):
    aps, prs = [], []
    for q, r in zip(dataset.queries, rankings):
      positive, junk = revisited_setups(q)[setup]
      if not positive.size:
        continue
      labels = rank_labels(r, positive, junk)
      aps.append(average_precision(labels, np.unique(positive).size))
      prs.append(precision_at(labels, kappas))
    res = {"map": 100 * float(np.mean(aps)) if aps else float("nan"), "n_queries": len(aps)}
    for k, p in zip(kappas, np.mean(prs, 0) if prs else [np.nan] * len(kappas)):
      res[f"mp@{k}"] = 100 * float(p)
    out[setup] = res
  return out
