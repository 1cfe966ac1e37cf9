"""Instance retrieval on Oxford5k / Paris6k and their revisited versions (the paper's Table 6),
following facebookresearch/deepcluster's eval_retrieval.py (DeeperCluster ships none).

  image      the longer side resized to `max_side` (--S 1024, line 305), PIL bilinear, then
             ImageNet mean/std (`load_and_prepare_image` 31-45, `transforms_comp` 351-355).
  feature    conv13 after BN+ReLU, the last max-pool dropped (`features_layers[:-1]`, 349),
             behind the trunk's Sobel front if it has one (`net.sobel`, 432-433): the trunk's
             own layers, rebuilt on an input of any size (`fully_convolutional`).
  R-MAC      L = 3 levels (307) of square regions with 0.4 overlap (`get_rmac_region_coordinates`
             54-104, Tolias et al.'s grid), each max-pooled and L2-normalised (`rmac` 268-285),
             PCA-whitened to 512 dimensions (309) and L2-normalised, summed and L2-normalised
             (286-300).
  whitening  PCA fitted on the region vectors of the *other* dataset's database, Oxford <->
             Paris (416-417: "for tests on Paris, use Oxford PCA, and vice-versa"; the regions
             are every database image's, 371-387); eigenvalues floored at 1e-5 x the largest
             (`PCA.fit` 115-135).
  queries    classic: the whole image resized, then its box (scaled, rounded) cropped from the
             resized *image*, not from the feature map (46-51); the query image stays in the
             database (182). revisited: the box cropped from the original image first, then
             resized; queries are not in the database (revisitop
             python/example_process_images.py:2, 49).
  score      inner products, best first (478, `score` 227); AP by compute_ap's trapezoid
             rule, junk skipped (`retrieval_data.average_precision`); revisited: Easy / Medium
             / Hard mAP and mP@1, 5, 10 (revisitop python/example_evaluate.py:50-82).
Line numbers are eval_retrieval.py's unless said otherwise.

Folder layout (`root`; details and download addresses in retrieval_data's docstring):
  <root>/oxford5k/jpg/*.jpg   <root>/oxford5k/lab/<query>_{query,good,ok,junk}.txt
  <root>/paris6k/jpg/*.jpg    <root>/paris6k/lab/...           (flat jpg/, 20 files blacklisted)
  <root>/roxford5k/jpg/*.jpg  <root>/roxford5k/gnd_roxford5k.pkl (or .mat)
  <root>/rparis6k/jpg/*.jpg   <root>/rparis6k/gnd_rparis6k.pkl (or .mat)
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from dc_tf.config import UserError
from dc_tf.data import preprocess
from dc_tf.evaluation import retrieval_data as rd

WHITEN_ON = {"oxford5k": "paris6k", "paris6k": "oxford5k",
             "roxford5k": "rparis6k", "rparis6k": "roxford5k"}
# Layers the conv part of a dc_tf trunk is made of; anything else (a folded trunk's fixed-size
# border correction) cannot run at another size.
_CONV_PART = (keras.layers.InputLayer, keras.layers.Conv2D, keras.layers.BatchNormalization,
              keras.layers.ReLU, keras.layers.MaxPooling2D, keras.layers.ZeroPadding2D)
OVERLAP = 0.4


class RetrievalError(UserError, ValueError):
  """A trunk or an image retrieval cannot use; the message names it."""


def keras_trunk(trunk) -> keras.Model:
  """The Keras model behind `trunk`: a keras.Model, or an `evaluator.LoadedTrunk` whose fn is
  one, or, for an export (fn = the trunk/ SavedModel, traced at one fixed size), the
  `trunk.keras` written next to it (dc_tf/export.py)."""
  if isinstance(trunk, keras.Model):
    return trunk
  fn = getattr(trunk, "fn", None)
  if isinstance(fn, keras.Model):
    return fn
  source = getattr(trunk, "source", "")
  from dc_tf import export as export_lib
  if source and os.path.isfile(os.path.join(source, export_lib.KERAS_FILE)):
    return export_lib.load_keras(source, trust=getattr(trunk, "trust", False))
  raise RetrievalError(
      "retrieval runs the trunk fully convolutionally at any image size, which the trunk/ "
      f"SavedModel of {source or trunk!r} cannot (it is traced at its training size) and no "
      f"{export_lib.KERAS_FILE} is next to it: re-export with python -m dc_tf.export, or pass "
      "the training run dir")


def fully_convolutional(trunk) -> keras.Model:
  """images [1, H, W, 3] of any H, W -> conv13 [1, H', W', C]: the trunk's own layers (shared
  weights: its Sobel front and input pad included) up to conv13, without pool5 and the fc
  layers, which fix the input size (eval_retrieval.py keeps `net.sobel` and
  `net.features` less its last max-pool)."""
  model = keras_trunk(trunk)
  inputs = keras.Input([None, None, 3], name="images")
  x = inputs
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    if not isinstance(layer, _CONV_PART):
      raise RetrievalError(f"retrieval: layer {layer.name} ({type(layer).__name__}) of "
                           f"{model.name} cannot run at another input size (a folded trunk?)")
    x = layer(x)
    if layer.name == "conv13":
      return keras.Model(inputs, x, name=model.name + "_conv13")
  raise RetrievalError(f"retrieval: {model.name} has no layer named conv13")


def load_image(path: str, max_side: int, box=None, crop_first: bool = False) -> np.ndarray:
  """Normalised float32 [H, W, 3], the longer side `max_side`.

  box (x0, y0, x1, y1): crop_first False (classic): eval_retrieval.py resizes the whole image,
  then crops `np.round(box * ratio)` from it; True (revisited): PIL's crop of the original
  first (revisitop `pil_loader(...).crop(bbx)`), then the resize."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise RetrievalError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
  if box is not None and crop_first:
    im = im.crop(tuple(float(v) for v in box))
  hw = np.array([im.size[1], im.size[0]])
  ratio = float(max_side) / hw.max()
  new = np.round(hw * ratio).astype(np.int32)
  pixels = np.asarray(im.resize((int(new[1]), int(new[0])), Image.BILINEAR), np.float32)
  if box is not None and not crop_first:
    x0, y0, x1, y1 = np.round(np.asarray(box, np.float32) * ratio).astype(np.int32)
    pixels = pixels[y0:y1, x0:x1]
  if min(pixels.shape[:2]) < 1:
    raise RetrievalError(f"{path}: the query box {list(box)} is empty at {max_side} px")
  return preprocess.normalize(pixels).numpy()


def rmac_regions(height: int, width: int, levels: int = 3) -> np.ndarray:
  """[n, 4] regions (x, y, w, h) on a height x width map: eval_retrieval.py's
  `get_rmac_region_coordinates` ("almost verbatim from Tolias et al.'s Matlab"). Level l has
  square regions of side floor(2 min(H, W) / (l + 1)); the long side gets `extra` more
  regions, the number of steps in 2..7 whose overlap is nearest 0.4, on every level. Regions
  of side 0 (maps under 2 px a side) are dropped; the original would max over nothing."""
  w = min(height, width)
  steps = np.arange(2, 8, dtype=np.float32)
  b = (max(height, width) - w) / (steps - 1)
  extra = int(np.argmin(np.abs((w ** 2 - w * b) / w ** 2 - OVERLAP))) + 1  # Matlab's 1-based
  extra_w = extra if height < width else 0
  extra_h = extra if height > width else 0
  regions = []
  for l in range(1, levels + 1):
    wl = np.floor(2 * w / (l + 1))
    wl2 = np.floor(wl / 2 - 1)
    bw = (width - wl) / (l + extra_w - 1) if l + extra_w - 1 > 0 else 0
    bh = (height - wl) / (l + extra_h - 1) if l + extra_h - 1 > 0 else 0
    xs = np.floor(wl2 + bw * np.arange(l + extra_w)) - wl2
    ys = np.floor(wl2 + bh * np.arange(l + extra_h)) - wl2
    for y in ys:
      for x in xs:
        x, y, s = int(round(x)), int(round(y)), int(wl)
        x -= max(0, x + s - width)           # "Careful with the borders!"
        y -= max(0, y + s - height)
        if s > 0:
          regions.append([x, y, s, s])
  return np.array(regions, np.int64).reshape(-1, 4)


def l2n(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """The original's normalize_L2, with a floor so that an all-zero vector stays zero (it
  would give NaN there)."""
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def region_vectors(feature_map: np.ndarray, levels: int = 3) -> np.ndarray:
  """[n_regions, C]: each region of `rmac_regions` max-pooled over a [H, W, C] map, L2."""
  h, w, _ = feature_map.shape
  return l2n(np.stack([feature_map[y:y + s, x:x + s].max(axis=(0, 1))
                       for x, y, s, _ in rmac_regions(h, w, levels)]))


class Whitening:
  """eval_retrieval.py's `PCA`: mean removed, eigen-decomposition of X^T X, eigenvalues under
  1e-5 x the largest raised to it, the `dim` largest kept, each axis divided by sqrt(eigenvalue)."""

  def __init__(self, x: np.ndarray, dim: int = 512):
    x = np.asarray(x, np.float64)
    self.mean = x.mean(0)
    d, v = np.linalg.eigh((x - self.mean).T @ (x - self.mean))
    d = np.maximum(d, d.max() * 1e-5)
    order = np.argsort(d)[::-1][:dim]
    self.energy = float(d[order].sum() / d.sum())
    self.projection = (v[:, order] / np.sqrt(d[order])).astype(np.float32)   # (D V^T)^T

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return (x - self.mean.astype(np.float32)) @ self.projection


def rmac(regions: np.ndarray, whitening: Whitening) -> np.ndarray:
  """One descriptor from an image's region vectors: whitened, L2, summed, L2 (`rmac`)."""
  return l2n(l2n(whitening(regions)).sum(0))


class _Extractor:
  """Region vectors per image through one traced conv13 function (any H, W)."""

  def __init__(self, trunk, max_side: int, levels: int, progress: bool):
    model = fully_convolutional(trunk)
    self.fn = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)])
    self.max_side, self.levels, self.progress = max_side, levels, progress

  def __call__(self, paths, boxes=None, crop_first=False, what="") -> list:
    out = []
    for i, path in enumerate(paths):
      image = load_image(path, self.max_side, None if boxes is None else boxes[i], crop_first)
      feature_map = np.asarray(self.fn(image[None]).numpy()[0], np.float32)  # any policy
      out.append(region_vectors(feature_map, self.levels))
      if self.progress and (i + 1) % 500 == 0:
        print(f"retrieval: {what} {i + 1}/{len(paths)}", flush=True)
    return out


def evaluate_retrieval(trunk, datasets=("oxford5k", "paris6k"), root: str = "", *,
                       max_side: int = 1024, levels: int = 3, pca_dim: int = 512,
                       whiten_on: dict | None = None, blacklist=None,
                       progress: bool = False) -> dict:
  """{dataset: scores} for each of `datasets` (oxford5k, paris6k, roxford5k, rparis6k).

  Args:
    trunk: a keras.Model from `vgg.build_trunk`, an `evaluator.LoadedTrunk`, or an export dir
      path / run dir (through `evaluator.load`).
    root: the folder holding the datasets (layout in the module docstring).
    max_side: the longer image side (eval_retrieval.py's S, 1024).
    levels: R-MAC levels (L, 3). pca_dim: whitened dimensions (512; capped at the trunk's).
    whiten_on: {dataset: dataset whose database the whitening is fitted on}; default
      `WHITEN_ON` (the other city). Mapping a dataset to itself is not the protocol.
    blacklist: classic database names left out; None = `retrieval_data.PARIS_BLACKLIST`, a
      str = a file of names, one a line.
  Returns:
    classic {'map', 'aps': {query: AP}}, revisited {'easy'|'medium'|'hard': {'map', 'mp@1',
    'mp@5', 'mp@10', 'n_queries'}}, both in percent, plus 'whitened_on', 'n_images',
    'n_queries', 'n_missing' (classic gt names absent from jpg/ and the blacklist, scored as
    never retrieved) and 'energy' (the whitening's kept share of the eigenvalue sum).
  """
  if isinstance(trunk, str):
    from dc_tf.evaluation import evaluator
    trunk = evaluator.load(trunk)
  whiten_on = {**WHITEN_ON, **(whiten_on or {})}
  sets = {}
  def get(name):
    if name not in sets:
      sets[name] = rd.read_dataset(root, name, blacklist)
    return sets[name]
  for name in datasets:                      # every file checked before any image is read
    get(name)
    try:
      get(whiten_on[name])
    except rd.RetrievalDataError as e:
      raise rd.RetrievalDataError(f"{name} is whitened on {whiten_on[name]}'s database "
                                  f"(eval_retrieval.py:416-417): {e}") from e
  extract = _Extractor(trunk, max_side, levels, progress)
  database = {}
  def db_regions(name):
    if name not in database:
      database[name] = extract(get(name).images, what=f"{name} database")
    return database[name]
  report = {}
  for name in datasets:
    data = get(name)
    fit = np.concatenate(db_regions(whiten_on[name]))
    whitening = Whitening(fit, min(pca_dim, fit.shape[1]))
    db = np.stack([rmac(r, whitening) for r in db_regions(name)])
    q_regions = extract([q.path for q in data.queries], [q.box for q in data.queries],
                        crop_first=data.protocol == "revisited", what=f"{name} queries")
    q = np.stack([rmac(r, whitening) for r in q_regions])
    sim = q @ db.T
    if data.protocol == "classic":   # eval_retrieval.py `score`: argsort(sim)[:, ::-1]
      rankings = np.argsort(sim, axis=1, kind="stable")[:, ::-1]
    else:                             # revisitop example_evaluate.py: argsort(-sim)
      rankings = np.argsort(-sim, axis=1, kind="stable")
    report[name] = {**rd.score(data, rankings), "whitened_on": whiten_on[name],
                    "n_images": len(data.images), "n_queries": len(data.queries),
                    "n_missing": len(data.missing), "energy": whitening.energy}
    if data.missing:
      print(f"retrieval: {name}: {len(data.missing)} images named in the ground truth are not "
            f"in its jpg/ (e.g. {data.missing[0]}); they count as never retrieved", flush=True)
  return report
