"""Transfer evaluation of a trunk: linear probes per layer, kNN, cluster quality, pictures.

Every report carries its floor: the random-init twin (the same architecture, never
trained) is scored with the same protocol in the same run, and the margin per layer is
reported (issue 10). Probes follow the paper: conv maps average-pooled until under 10k
dimensions (pool sizes reported), a linear classifier on top.

Memory does not grow with the number of images (issue 35): `evaluate` extracts each set once
per subject into `feature_store` files (one float32 file per layer, under --feature_dir,
deleted after the subject unless kept); the fast probe and kNN read them back a minibatch or
a block at a time, and the test-set clustering and its picture use a seeded sample of at
most `cluster_sample` images. What runs where:
  - extraction (the trunk's forward passes): every local replica of `strategy`, one batch
    each a round (`extract.stream`); with the default strategy, one device;
  - pooling, the feature files, the fast probe (Adam on the host's default device), kNN and
    the cluster picture: the host;
  - the cluster sample's PCA whitening and k-means: the local replicas of `strategy`, the
    sample split between them (`dist.split_local`);
  - --probe=original: `linear_original.probe`, which reads the shards itself, on the default
    device; so do the VOC07 protocols and instance retrieval (`--voc_dir`, `--retrieval`):
    they are separate jobs in the original too, one GPU each.
Only ids and labels (16 bytes an image) are held for the whole set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from dc_tf.clustering import extract
from dc_tf.clustering import kmeans as km
from dc_tf.clustering import pca
from dc_tf import distribute as dist
from dc_tf.analysis.metadata import gps_cells, least_frequent_tag  # noqa: F401 (evaluator's names)
from dc_tf.config import ModelConfig, UserError
from dc_tf.evaluation import feature_store, metrics, probes
from dc_tf.models import vgg
from dc_tf.training import checkpointing

DEFAULT_LAYERS = ("conv2", "conv4", "conv7", "conv10", "conv13", "fc6", "fc7")


@dataclasses.dataclass
class LoadedTrunk:
  """A callable trunk (images -> endpoint dict) and what it was built with."""
  fn: object
  model_config: ModelConfig
  source: str
  step: int = -1
  trust: bool = False        # --trust_model: the export's trunk.keras is loaded as trusted

  def __call__(self, images, training=False):
    return self.fn(images, training=False)


class _ExportedEndpoints:
  def __init__(self, module):
    self.module = module

  def __call__(self, images, training=False):
    return self.module.endpoints(images)


def load(path: str, trust: bool = False) -> LoadedTrunk:
  """A training run dir / checkpoint, or an export dir (its trunk/ SavedModel, checked before
  it loads by `export.check_model`: card, sha256, op scan; `trust` loads one it refuses)."""
  if not path:
    raise checkpointing.CheckpointError("no --checkpoint given (a run dir or an export dir)")
  if not tf.io.gfile.exists(path) and not tf.io.gfile.exists(path + ".index"):
    raise checkpointing.CheckpointError(f"checkpoint or export not found: {path}")
  card = os.path.join(path, "model_card.json")
  trunk_dir = os.path.join(path, "trunk")
  if tf.io.gfile.exists(card) or tf.io.gfile.exists(os.path.join(trunk_dir, "saved_model.pb")):
    from dc_tf import export as export_lib
    if not tf.io.gfile.exists(card):
      export_lib.check_model(trunk_dir, trust)     # refused here unless trusted
      raise export_lib.ExportError(f"{path} has no model_card.json, which holds the model "
                                   "config the trunk needs to be evaluated")
    with tf.io.gfile.GFile(card) as f:
      info = json.load(f)
    module = export_lib.load(trunk_dir, trust=trust)
    model_cfg = ModelConfig(**{k: v for k, v in info["config"].get("model", {}).items()})
    return LoadedTrunk(_ExportedEndpoints(module), model_cfg, path, info.get("step", -1),
                       trust)
  run_dir = path if tf.io.gfile.isdir(path) else os.path.dirname(os.path.dirname(path))
  config = checkpointing.read_config(run_dir)
  trunk = vgg.trunk_from_config(config.model)
  step = checkpointing.restore_trunk(trunk, path)
  return LoadedTrunk(trunk, config.model, path, step)


def random_twin(model_config: ModelConfig, seed: int = 0) -> LoadedTrunk:
  """The same architecture, randomly initialised (the floor every report carries)."""
  keras.utils.set_random_seed(seed)
  return LoadedTrunk(vgg.trunk_from_config(model_config), model_config, f"random-init (seed {seed})")


def features(trunk: LoadedTrunk, pattern: str, layers, batch_size: int = 256,
             max_images: int = 0) -> tuple[dict, dict]:
  """({layer: pooled features, plus labels/metadata}, {layer: pool size}), all in memory:
  for small sets (tests, notebooks); `evaluate` streams through `feature_store` instead."""
  image_size = trunk.model_config.image_size
  strides: dict[str, int] = {}

  def pool(name, value):
    pooled, s = metrics.pool_until(value)
    strides[name] = s
    return pooled

  out = extract.extract(trunk, pattern, image_size=image_size, batch_size=batch_size,
                        endpoints=tuple(layers), progress=True, postprocess=pool,
                        max_images=max_images)
  return out, strides


def cluster_quality(feats: np.ndarray, meta: dict, k: int, seed: int = 0,
                    strategy=None) -> tuple[dict, np.ndarray]:
  """k-means on whitened features; NMI / ARI / purity against labels and metadata.

  The rows are split between the local replicas of `strategy` (default: the current one),
  which whiten and cluster them as training does; assignments come back in row order."""
  strategy = strategy or tf.distribute.get_strategy()
  parts = dist.split_local(strategy, np.asarray(feats))
  whitening = pca.fit_whitening(strategy, parts, dim=min(128, feats.shape[1]))
  result = km.DistributedKMeans(strategy).fit([whitening.apply(p) for p in parts], k, iters=30,
                                               seed=seed)
  assign = np.concatenate(result.assignments)
  report = {"k": k}
  targets = {"label": meta["label"]}
  for field in ("user_id", "device"):
    if (meta[field] != b"").any():
      targets[field] = meta[field]
  if (meta["tags"] != b"").any():
    targets["tag"] = least_frequent_tag(meta["tags"])
  if np.isfinite(meta["lat"]).any():
    targets["gps"] = gps_cells(meta["lat"], meta["lon"])
  for name, values in targets.items():
    present = values != -1 if values.dtype.kind in "iu" else values != b""
    if present.sum() > 1:
      report[name] = metrics.cluster_scores(values[present], assign[present])
  return report, assign


class LabelError(UserError, ValueError):
  """The probe's or kNN's shards carry no labels."""


def pool_sizes(trunk: LoadedTrunk, layers) -> dict:
  """{layer: the pool window of the probe protocol} (`metrics.pool_stride`), from one
  forward pass on a blank image."""
  size = trunk.model_config.image_size
  out = trunk(tf.zeros([1, size, size, 3]), training=False)
  return {l: metrics.pool_stride(*out[l].shape[1:]) if len(out[l].shape) == 4 else 1
          for l in layers}


def _feature_root(feature_dir: str, output_dir: str) -> str:
  """--feature_dir, else <output_dir>/features when the output dir is local (feature files
  are read back with positioned reads: a gs:// path cannot hold them), else a temp dir."""
  if feature_dir:
    if "://" in feature_dir:
      raise feature_store.FeatureDirError(
          f"--feature_dir must be a local folder, not {feature_dir}")
    return feature_dir
  if "://" in output_dir:
    return tempfile.mkdtemp(prefix="dc_tf_features_")
  return os.path.join(output_dir, "features")


def evaluate(trained: LoadedTrunk | None, *, train_pattern: str, test_pattern: str,
             output_dir: str, layers=DEFAULT_LAYERS, twin: bool = True, seed: int = 0,
             probe_epochs: int = 60, max_train_images: int = 0, cluster_k: int = 0,
             run_dir: str = "", voc_dir: str = "", voc_fc6_8_steps: int = 0,
             voc_all_steps: int = 0, model_config: ModelConfig | None = None,
             probe: str = "fast", original_probe=None, cluster_sample: int = 20_000,
             feature_dir: str = "", keep_features: bool = False, batch_size: int = 256,
             strategy=None, voc_split: str = "", voc_conv13_epochs: int = 0,
             retrieval: "RetrievalOptions | None" = None) -> dict:
  """Scores `trained` (None: the random twin alone) and writes report.json / report.md /
  probe_layers.png / clusters.png in `output_dir`.

  probe: 'fast' (`probes.linear_probe` on fixed centre-crop features) or 'original'
  (`linear_original.probe`, eval_linear.py's protocol; `original_probe` its
  `OriginalProbeConfig`). `layers` None: the protocol's (fast DEFAULT_LAYERS, original
  conv1..conv13).

  Streams (module docstring): per subject, the train set's `layers` (original: only the kNN
  layers fc7/conv13, or the cluster layer for the label check) and the test set's go
  to feature files under `feature_dir` (removed after the subject unless `keep_features`);
  memory is batch x pooled dims plus 16 bytes an image. The test-set clustering and its
  picture use the `cluster_sample` images of the smallest `feature_store.sample_keys`
  (a seeded uniform sample, all of them when fewer), in shard order."""
  from dc_tf.evaluation import linear_original
  if probe not in ("fast", "original"):
    raise ValueError(f"probe must be 'fast' or 'original', not {probe!r}")
  if cluster_sample < 2:
    raise UserError(f"--cluster_sample must be at least 2, not {cluster_sample}")
  layers = tuple(layers or (DEFAULT_LAYERS if probe == "fast" else linear_original.LAYERS))
  if cluster_k > cluster_sample:
    raise UserError(f"--cluster_k={cluster_k} is more than --cluster_sample={cluster_sample} "
                    "images can make")
  tf.io.gfile.makedirs(output_dir)
  model_config = trained.model_config if trained else model_config
  subjects = {}
  if trained is not None:
    subjects["trained"] = trained
  if twin or trained is None:
    if model_config is None:
      raise ValueError("--baseline=random needs a model config: pass --checkpoint of the "
                       "architecture to copy")
    with (strategy or tf.distribute.get_strategy()).scope():
      subjects["random"] = random_twin(model_config, seed)
  report = {"train_data": train_pattern, "test_data": test_pattern, "layers": list(layers),
            "probe_protocol": probe,
            "subjects": {k: v.source for k, v in subjects.items()}, "results": {}}
  knn_layers = [l for l in ("fc7", "conv13") if l in layers]
  cluster_layer = "fc7" if "fc7" in layers else layers[-1]
  train_layers = layers if probe == "fast" else tuple(knn_layers or [cluster_layer])
  test_layers = tuple(dict.fromkeys([*train_layers, cluster_layer]))
  root = _feature_root(feature_dir, output_dir)
  taken = [n for n in subjects if os.path.exists(os.path.join(root, n))]
  if taken:   # another evaluation's files, or kept ones: never overwritten, never deleted
    raise feature_store.FeatureDirError(
        f"{os.path.join(root, taken[0])} exists (kept features, or an evaluation running with "
        "the same --feature_dir): remove it or pass another --feature_dir")
  for name, subject in subjects.items():
    store = lambda pattern, split, layers_, **kw: feature_store.write(  # noqa: E731
        subject, pattern, layers_, os.path.join(root, name, split),
        image_size=subject.model_config.image_size, batch_size=batch_size, strategy=strategy,
        seed=seed, **kw)
    train = test = None
    try:
      train = store(train_pattern, "train", train_layers, max_images=max_train_images)
      if (train.label < 0).all():
        raise LabelError(f"accuracy needs labels, but {train_pattern} has none (shards "
                         "written with --drop_labels?)")
      test = store(test_pattern, "test", test_layers, sample=cluster_sample)
      if (test.label < 0).all():
        raise LabelError(f"accuracy needs labels, but {test_pattern} has none (shards "
                         "written with --drop_labels?)")
      k = cluster_k or len(np.unique(test.label))
      if k > len(test.sample_rows):   # before the probes, not after them
        raise UserError(f"{k} clusters cannot be made of the {len(test.sample_rows)} images "
                        "of the cluster sample: raise --cluster_sample or lower --cluster_k")
      res = {"pool_sizes": pool_sizes(subject, layers), "probe": {}, "knn": {},
             "computed_on": test.computed_on}
      if probe == "original":
        res["probe"] = linear_original.probe(
            subject, train_pattern, test_pattern, layers,
            original_probe or linear_original.OriginalProbeConfig())
      for layer in layers if probe == "fast" else ():
        res["probe"][layer] = probes.linear_probe(train[layer], train.label, test[layer],
                                                  test.label, epochs=probe_epochs, seed=seed,
                                                  train_ids=train.image_id)
      for layer in knn_layers:
        res["knn"][layer] = 100 * metrics.knn_top1(train[layer], train.label, test[layer],
                                                   test.label)
      meta = test.sample_meta
      res["cluster_sample"] = len(test.sample_rows)
      res["clusters"], assign = cluster_quality(test[cluster_layer][test.sample_rows], meta, k,
                                                seed, strategy)
      if name == list(subjects)[0]:
        from dc_tf.evaluation import pictures
        pictures.cluster_grid(test_pattern, model_config.image_size, meta["image_id"], assign,
                              meta["label"], os.path.join(output_dir, f"clusters_{name}.png"))
    finally:
      for done in (train, test):
        if done is not None and not keep_features:
          done.remove()
      if not keep_features:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    report["results"][name] = res
  if not keep_features and os.path.isdir(root) and not os.listdir(root):
    os.rmdir(root)
  if len(subjects) == 2:
    t, r = report["results"]["trained"], report["results"]["random"]
    report["margin_top1"] = {l: t["probe"][l]["top1"] - r["probe"][l]["top1"] for l in layers}
    report["margin_knn"] = {l: t["knn"][l] - r["knn"][l] for l in t["knn"]}
    best = max(report["margin_top1"], key=report["margin_top1"].get)
    report["best_layer"] = {"layer": best, "margin_top1": report["margin_top1"][best]}
  if run_dir:
    report["training_nmi_previous"] = training_nmi(run_dir)
  if voc_dir:
    report["voc07_split"] = voc_split or "the protocol's own"
    report.update(voc_reports(subjects, voc_dir, seed=seed, split=voc_split,
                              fc6_8_steps=voc_fc6_8_steps, all_steps=voc_all_steps,
                              conv13_epochs=voc_conv13_epochs))
  if retrieval and retrieval.datasets:
    from dc_tf.evaluation import retrieval as retrieval_lib
    report["retrieval"] = {n: retrieval_lib.evaluate_retrieval(
        s, datasets=retrieval.datasets, root=retrieval.root, max_side=retrieval.max_side,
        pca_dim=retrieval.pca_dim, blacklist=retrieval.blacklist or None, progress=True)
        for n, s in subjects.items()}
  write_report(report, output_dir)
  return report


@dataclasses.dataclass(frozen=True)
class RetrievalOptions:
  """evaluate.py's --retrieval* flags (`retrieval.evaluate_retrieval`, the paper's Table 6)."""
  datasets: tuple = ()
  root: str = ""
  max_side: int = 1024
  pca_dim: int = 512
  blacklist: str = ""


def voc_reports(subjects: dict, voc_dir: str, *, seed: int, split: str, fc6_8_steps: int,
                all_steps: int, conv13_epochs: int) -> dict:
  """The VOC07 protocols asked for, per subject (mAP %). `split` '' keeps each protocol's
  original partition: trainval/test for the probe, fc6-8 and all (eval_voc_classif.py
  --split trainval, the README's commands), train/val for conv13 (conv13.sh passes no
  --split: eval_linear.py's default)."""
  from dc_tf.evaluation import linear_original, voc
  own = lambda default: split or default  # noqa: E731
  out = {"voc07": {n: voc.evaluate_voc(s, voc_dir, seed=seed, splits=own("trainval/test"))
                   for n, s in subjects.items()}}
  if fc6_8_steps:
    out["voc07_fc6_8"] = {n: voc.fc6_8(s, voc_dir, steps=fc6_8_steps, seed=seed,
                                       splits=own("trainval/test"))["map"]
                          for n, s in subjects.items()}
  if all_steps:
    out["voc07_all"] = {n: voc.fc6_8(s, voc_dir, steps=all_steps, seed=seed, all_layers=True,
                                     splits=own("trainval/test"))["map"]
                        for n, s in subjects.items()}
  if conv13_epochs:
    cfg = linear_original.VocProbeConfig(epochs=conv13_epochs, seed=seed)
    out["voc07_conv13"] = {n: linear_original.voc_probe(s, voc_dir, cfg, splits=own("train/val"))["map"]
                           for n, s in subjects.items()}
  return out


def training_nmi(run_dir: str) -> list[dict]:
  """NMI between consecutive assignments, as logged by the training run."""
  path = os.path.join(run_dir, "log.jsonl")
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  return [{"epoch": r["epoch"], "nmi": r["nmi_previous"]} for r in rows
          if r.get("event") == "reassign" and "nmi_previous" in r]


def write_report(report: dict, output_dir: str) -> None:
  with tf.io.gfile.GFile(os.path.join(output_dir, "report.json"), "w") as f:
    f.write(json.dumps(report, indent=1, default=float))
  lines = ["# dc_tf evaluation", "", f"train: `{report['train_data']}`  test: `{report['test_data']}`", ""]
  names = list(report["results"])
  header = "| layer | " + " | ".join(f"{n} top-1 | {n} top-5" for n in names)
  header += " | margin top-1 |" if "margin_top1" in report else " |"
  lines += [header, "|" + "---|" * (1 + 2 * len(names) + ("margin_top1" in report))]
  for layer in report["layers"]:
    row = f"| {layer} (pool {report['results'][names[0]]['pool_sizes'].get(layer, 1)}) | "
    row += " | ".join(f"{report['results'][n]['probe'][layer]['top1']:.1f} | "
                      f"{report['results'][n]['probe'][layer]['top5']:.1f}" for n in names)
    if "margin_top1" in report:
      row += f" | {report['margin_top1'][layer]:+.1f}"
    lines.append(row + " |")
  lines += ["", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for layer in report["results"][names[0]]["knn"]:
    lines.append(f"| kNN top-1 {layer} | " + " | ".join(
        f"{report['results'][n]['knn'][layer]:.1f}" for n in names) + " |")
  for field, scores in report["results"][names[0]]["clusters"].items():
    if isinstance(scores, dict):
      lines.append(f"| NMI vs {field} | " + " | ".join(
          f"{report['results'][n]['clusters'][field]['nmi']:.3f}" for n in names) + " |")
  lines += paper_lines(report, names)
  with tf.io.gfile.GFile(os.path.join(output_dir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot_layers(report, os.path.join(output_dir, "probe_layers.png"))


def paper_lines(report: dict, names: list) -> list[str]:
  """report.md rows for the VOC07 protocols and instance retrieval that ran (mAP %)."""
  rows = []
  for key, what in (("voc07_fc6_8", "VOC07 fc6-8"), ("voc07_all", "VOC07 all layers"),
                    ("voc07_conv13", "VOC07 conv13 (Table 3)")):
    if key in report:
      rows.append(f"| {what} mAP | " + " | ".join(f"{report[key][n]:.1f}" for n in names)
                  + " |")
  for name in sorted(report.get("retrieval", {}).get(names[0], {})):
    for setup in ("map", "medium", "hard"):
      if setup not in report["retrieval"][names[0]][name]:
        continue
      values = [report["retrieval"][n][name][setup] for n in names]
      values = [v if setup == "map" else v["map"] for v in values]
      label = name if setup == "map" else f"{name} {setup}"
      rows.append(f"| {label} mAP | " + " | ".join(f"{v:.1f}" for v in values) + " |")
  return rows


def plot_layers(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, res in report["results"].items():
    ax.plot(report["layers"], [res["probe"][l]["top1"] for l in report["layers"]], marker="o",
            label=name)
  ax.set_xlabel("layer")
  ax.set_ylabel("linear probe top-1 (%)")
  ax.set_title("Linear probe per layer")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)

