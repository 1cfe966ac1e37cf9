"""Instance retrieval (issue 35 item 3): AP / mP@k by hand, the R-MAC grid by hand, the
fully convolutional trunk against the trunk, the ground-truth readers (text, pkl, mat) and
their errors, and end-to-end runs on a generated miniature whose mAP is known by hand."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image
from scipy import io as sio

from dc_tf.config import ModelConfig, UserError
from dc_tf.evaluation import evaluator, retrieval
from dc_tf.evaluation import retrieval_data as rd
from dc_tf.models import vgg

SIDE = 96          # the miniature's max_side: 128 x 96 images give conv13 maps of 6 x 4
# Query boxes of the end-to-end miniature: whole images. With a random trunk the R-MAC of a
# cropped query is not reliably nearest its own landmark (measured: a 88% box scores 10-100
# per query), so crops are tested on the pixels (test_query_crops) and not through ranks.
FULL = (0.0, 0.0, 128.0, 96.0)


def test_average_precision_by_hand():
  # One positive at rank 2: recall step 1 x (precision 0 before it + 1/2 at it) / 2.
  assert rd.average_precision([0, 1], 1) == pytest.approx(0.25)
  from sklearn.metrics import average_precision_score
  assert average_precision_score([0, 1], [1, 0]) == pytest.approx(0.5)   # not the protocol's
  # Ranks 1 and 3 of 2 positives: 1/2 x (1 + 1)/2 + 1/2 x (1/2 + 2/3)/2.
  assert rd.average_precision([1, 0, 1, 0], 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
  # Junk is skipped, wherever it sits.
  assert rd.average_precision([1, -1, 1, 0], 2) == pytest.approx(1.0)
  assert rd.average_precision([-1, -1, 0, 1], 1) == pytest.approx(0.25)
  # Listed positives never ranked (e.g. blacklisted) still divide the recall: 2 of 3 found.
  assert rd.average_precision([1, 1, 0], 3) == pytest.approx(2 / 3)
  assert rd.average_precision([0, 0, 0], 1) == 0.0


def test_precision_at_k_by_hand():
  """revisitop compute_map: k capped at the last positive's position, junk removed first."""
  assert rd.precision_at([1, 1, 0, 0, 0, 0], (1, 5)) == pytest.approx([1.0, 1.0])  # 2/min(2,5)
  assert rd.precision_at([0, 1, 0, 0, 0, 0, 1], (1, 5)) == pytest.approx([0.0, 1 / 5])
  assert rd.precision_at([-1, -1, 1, 0], (1,)) == pytest.approx([1.0])


def test_revisited_setups_by_hand():
  """easy [0], hard [2], junk [1]; ranking 3, 2, 1, 0. Medium (easy+hard, junk skipped):
  positives at ranks 2, 3 -> 1/2 (0 + 1/2)/2 + 1/2 (1/2 + 2/3)/2. Hard (easy is junk): the
  hard positive at rank 2 -> 0.25. Easy (hard is junk): the easy one at rank 2 -> 0.25."""
  q = rd.Query("q", "q.jpg", np.zeros(4), positive=np.array([0]), junk=np.array([1]),
               hard=np.array([2]))
  data = rd.RetrievalSet("mini", "revisited", ["a", "b", "c", "d"], [q])
  s = rd.score(data, np.array([[3, 2, 1, 0]]))
  assert s["medium"]["map"] == pytest.approx(100 * (0.125 + (0.5 + 2 / 3) / 4))
  assert s["hard"]["map"] == pytest.approx(25.0)
  assert s["easy"]["map"] == pytest.approx(25.0)
  assert s["medium"]["mp@1"] == 0.0 and s["medium"]["mp@5"] == pytest.approx(100 * 2 / 3)
  # A query with no hard positive is left out of Hard's mean (compute_map's nempty).
  q2 = rd.Query("q2", "q.jpg", np.zeros(4), positive=np.array([3]), junk=np.array([], int))
  s = rd.score(rd.RetrievalSet("mini", "revisited", list("abcd"), [q, q2]),
               np.array([[3, 2, 1, 0], [3, 2, 1, 0]]))
  assert s["hard"]["n_queries"] == 1 and s["hard"]["map"] == pytest.approx(25.0)
  assert s["easy"]["map"] == pytest.approx((25.0 + 100.0) / 2)


def test_rmac_regions_by_hand():
  """eval_retrieval.py's grid. 6 x 8: w = 6, b = 2 / (steps - 1), overlap 1 - b/6 nearest 0.4
  at steps = 2 -> one extra region along W. l=1: side 6, x 0, 2. l=2: side 4, x 0, 2, 4,
  y 0, 2. l=3: side 3, x floor(5/3 k) = 0, 1, 3, 5, y floor(1.5 k) = 0, 1, 3."""
  r = retrieval.rmac_regions(6, 8, 3)
  want = [[x, 0, 6, 6] for x in (0, 2)]
  want += [[x, y, 4, 4] for y in (0, 2) for x in (0, 2, 4)]
  want += [[x, y, 3, 3] for y in (0, 1, 3) for x in (0, 1, 3, 5)]
  assert r.tolist() == want
  transposed = retrieval.rmac_regions(8, 6, 3)[:, [1, 0, 2, 3]]
  assert sorted(transposed.tolist()) == sorted(want)
  # Square 5 x 5: no extra region; sides 5, floor(10/3) = 3, floor(10/4) = 2.
  sq = retrieval.rmac_regions(5, 5, 3)
  assert sq.tolist() == ([[0, 0, 5, 5]] + [[x, y, 3, 3] for y in (0, 2) for x in (0, 2)]
                         + [[x, y, 2, 2] for y in (0, 1, 3) for x in (0, 1, 3)])
  assert (sq[:, 0] + sq[:, 2] <= 5).all() and (sq[:, 1] + sq[:, 3] <= 5).all()


def _tiny(sobel=True, input_pad=-1, seed=0):
  import keras
  keras.utils.set_random_seed(seed)
  return vgg.trunk_from_config(ModelConfig(image_size=32, width=0.125, fc_dim=16, sobel=sobel,
                                           input_pad=input_pad))


@pytest.mark.parametrize("sobel,pad", [(True, -1), (False, 1)])
def test_fully_convolutional_is_the_trunk(sobel, pad):
  """At the training size its conv13 equals the trunk's (same layers: the Sobel front or RGB
  pad included, BN in inference); at another size it still runs, at stride 16."""
  trunk = _tiny(sobel, pad)
  fcn = retrieval.fully_convolutional(trunk)
  x = np.random.default_rng(0).normal(size=[2, 32, 32, 3]).astype(np.float32)
  np.testing.assert_allclose(fcn(x, training=False).numpy(),
                             trunk(x, training=False)["conv13"].numpy(), atol=1e-5)
  assert fcn(np.zeros([1, 48, 80, 3], np.float32)).shape[1:3] == (3, 5)


def test_export_without_keras_file_is_refused(tmp_path):
  """An export's trunk/ SavedModel is traced at one size: its trunk.keras is used, or a
  one-line refusal names the folder."""
  trunk = _tiny()
  loaded = evaluator.LoadedTrunk(fn=object(), model_config=ModelConfig(), source=str(tmp_path))
  with pytest.raises(retrieval.RetrievalError, match="trunk.keras") as e:
    retrieval.fully_convolutional(loaded)
  assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
  trunk.save(str(tmp_path / "trunk.keras"))
  fcn = retrieval.fully_convolutional(loaded)
  x = np.ones([1, 40, 56, 3], np.float32)
  np.testing.assert_allclose(fcn(x).numpy(), retrieval.fully_convolutional(trunk)(x).numpy(),
                             atol=1e-5)


def test_whitening_whitens_and_floors():
  rng = np.random.default_rng(0)
  x = rng.normal(size=[200, 6]) * [5, 3, 2, 1, 0.5, 0.1]
  w = retrieval.Whitening(x, dim=6)
  y = w(x.astype(np.float32))
  np.testing.assert_allclose(y.T @ y, np.eye(6), atol=1e-3)     # X^T X, not divided by n
  # Rank 2 in 4 dims: the null eigenvalues are raised to 1e-5 x the largest.
  low = rng.normal(size=[50, 2]) @ rng.normal(size=[2, 4])
  w = retrieval.Whitening(low, dim=4)
  d = np.linalg.eigvalsh((low - low.mean(0)).T @ (low - low.mean(0)))
  assert 1 / np.linalg.norm(w.projection[:, -1]) ** 2 == pytest.approx(d.max() * 1e-5, rel=1e-3)


def test_unpickler_refuses_code(tmp_path):
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  bad = tmp_path / "gnd_roxford5k.pkl"
  bad.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Evil()]}, protocol=2))
  with pytest.raises(rd.UnsafePickleError) as e:
    rd.load_gnd_pickle(str(bad))
  message = str(e.value)
  assert "\n" not in message and str(bad) in message and "system" in message
  assert not marker.exists()
  # What such files hold loads: dicts, lists, strings, numpy arrays (protocol 2 and 4).
  good = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": np.array([1.5, 2, 3, 4]),
                                                       "easy": np.array([0]), "hard": [],
                                                       "junk": np.int64(0)}]}
  for protocol in (2, 4):
    bad.write_bytes(pickle.dumps(good, protocol=protocol))
    back = rd.load_gnd_pickle(str(bad))
    np.testing.assert_array_equal(back["gnd"][0]["bbx"], [1.5, 2, 3, 4])


# --- the miniature --------------------------------------------------------------------------

def _landmarks(seed, n=3):
  """Distinct blocky textures, one per landmark; its images are the texture plus noise."""
  rng = np.random.default_rng(seed)
  return [np.kron(rng.integers(0, 256, [6, 8, 3]), np.ones([16, 16, 1])) for _ in range(n)]


def _write(path, texture, rng):
  pixels = np.clip(texture + rng.normal(0, 4, texture.shape), 0, 255).astype(np.uint8)
  Image.fromarray(pixels).save(path, quality=95)


def _classic(root, name, prefix, seed, extra_good=()):
  """3 landmarks x 3 images; a query per landmark (box = most of image 1), with good/ok/junk
  chosen so that a ranking with each landmark's images first scores AP 1, plus a 'wrong'
  query on image a 1 whose positives are the 6 images of b and c."""
  jpg, lab = root / name / "jpg", root / name / "lab"
  jpg.mkdir(parents=True)
  lab.mkdir()
  rng = np.random.default_rng(seed)
  lm = "abc"
  for k, texture in zip(lm, _landmarks(seed)):
    for i in (1, 2, 3):
      _write(jpg / f"{prefix}_{k}_00000{i}.jpg", texture, rng)
  im = lambda k, i: f"{prefix}_{k}_00000{i}"
  gt = {"a_1": ([im("a", 1), im("a", 2)], [im("a", 3)], [im("b", 1)]),
        "b_1": ([im("b", 1), im("b", 2), im("b", 3), *extra_good], [], []),
        "c_1": ([im("c", 1), im("c", 2)], [], [im("c", 3)]),
        "wrong_1": ([im(k, i) for k in "bc" for i in (1, 2, 3)], [], [])}
  for q, (good, ok, junk) in gt.items():
    first = "a" if q == "wrong_1" else q[0]
    (lab / f"{q}_query.txt").write_text(f"oxc1_{im(first, 1)} {' '.join(map(str, FULL))}\n")
    for kind, names in (("good", good), ("ok", ok), ("junk", junk)):
      (lab / f"{q}_{kind}.txt").write_text("".join(n + "\n" for n in names))


def _revisited(root, name, seed, fmt):
  """Queries are images 1 (not in the database); database = images 2, 3 of each landmark."""
  jpg = root / name / "jpg"
  jpg.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  for k, texture in zip("abc", _landmarks(seed)):
    for i in (1, 2, 3):
      _write(jpg / f"{k}{i}.jpg", texture, rng)
  imlist = ["a2", "a3", "b2", "b3", "c2", "c3"]
  gnd = [{"bbx": list(FULL), "easy": [0], "hard": [1], "junk": [2]},
         {"bbx": list(FULL), "easy": [2, 3], "hard": [], "junk": []},
         {"bbx": list(FULL), "easy": [], "hard": [4], "junk": [5]}]
  cfg = {"imlist": imlist, "qimlist": ["a1", "b1", "c1"], "gnd": gnd}
  if fmt == "pkl":
    (root / name / f"gnd_{name}.pkl").write_bytes(pickle.dumps(cfg, protocol=2))
  else:
    rec = np.zeros(3, [("bbx", "O"), ("easy", "O"), ("hard", "O"), ("junk", "O")])
    for r, g in zip(rec, gnd):
      r["bbx"] = np.array(g["bbx"])
      for k in ("easy", "hard", "junk"):
        r[k] = np.array(g[k], np.float64) + 1                     # MATLAB's 1-based
    sio.savemat(root / name / f"gnd_{name}.mat", {"imlist": np.array(imlist, dtype=object),
                                                  "qimlist": np.array(cfg["qimlist"], dtype=object),
                                                  "gnd": rec})
  return cfg


def test_query_crops(tmp_path):
  """classic: resize the whole image, then crop np.round(box * ratio) from it; revisited:
  PIL crops the original first, then the crop is resized."""
  path = tmp_path / "q.jpg"
  _write(path, _landmarks(0, 1)[0], np.random.default_rng(0))       # 128 x 96
  box = (8.0, 6.2, 120.0, 90.0)
  whole = retrieval.load_image(str(path), 96)
  classic = retrieval.load_image(str(path), 96, box)
  # ratio 96/128 = 0.75: x 6..90, y round(4.65) = 5 .. round(67.5) = 68 (half to even).
  assert classic.shape == (63, 84, 3)
  np.testing.assert_array_equal(classic, whole[5:68, 6:90])
  revisited = retrieval.load_image(str(path), 96, box, crop_first=True)
  # PIL's crop rounds the box: 112 x 84 pixels; ratio 96/112: 84 -> 72.
  assert revisited.shape == (72, 96, 3)
  with Image.open(path) as im:
    want = np.asarray(im.convert("RGB").crop((8, 6, 120, 90)).resize((96, 72), Image.BILINEAR),
                      np.float32)
  np.testing.assert_allclose(revisited, ((want / 255 - (0.485, 0.456, 0.406))
                                         / (0.229, 0.224, 0.225)), atol=1e-5)


def test_ground_truth_readers(tmp_path):
  """Text gt (oxc1_ prefix, good+ok, the blacklist), pkl and its .mat twin read alike."""
  _classic(tmp_path, "paris6k", "paris", 1, extra_good=("paris_louvre_000136",))
  (tmp_path / "paris6k" / "jpg" / "paris_louvre_000136.jpg").write_bytes(b"corrupt")
  data = rd.read_classic(str(tmp_path), "paris6k")
  assert len(data.images) == 9 and not any("louvre" in p for p in data.images)
  a = data.queries[0]
  assert a.name == "a_1" and a.path.endswith("paris_a_000001.jpg")
  assert a.positive.tolist() == [0, 1, 2] and a.junk.tolist() == [3]
  assert data.queries[1].n_positive == 4 and data.queries[1].positive.tolist() == [3, 4, 5]
  pkl = _revisited(tmp_path, "roxford5k", 2, "pkl")
  _revisited(tmp_path, "rparis6k", 2, "mat")
  p, m = rd.read_revisited(str(tmp_path), "roxford5k"), rd.read_revisited(str(tmp_path), "rparis6k")
  assert [os.path.basename(x) for x in p.images] == [i + ".jpg" for i in pkl["imlist"]]
  for qp, qm, g in zip(p.queries, m.queries, pkl["gnd"]):
    assert qp.positive.tolist() == qm.positive.tolist() == g["easy"]
    assert qp.hard.tolist() == qm.hard.tolist() == g["hard"]
    assert qp.junk.tolist() == qm.junk.tolist() == g["junk"]
    np.testing.assert_allclose(qm.box, g["bbx"])


def test_bad_inputs_are_one_line_errors(tmp_path):
  with pytest.raises(UserError, match="dataset folder not found"):
    rd.read_dataset(str(tmp_path), "oxford5k")
  _classic(tmp_path, "oxford5k", "oxford", 0)
  os.remove(tmp_path / "oxford5k" / "lab" / "c_1_ok.txt")
  with pytest.raises(UserError, match="c_1_ok.txt"):
    rd.read_classic(str(tmp_path), "oxford5k")
  (tmp_path / "roxford5k").mkdir()
  with pytest.raises(UserError, match="gnd_roxford5k.pkl"):
    rd.read_dataset(str(tmp_path), "roxford5k")
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not a jpeg")
  with pytest.raises(retrieval.RetrievalError, match="broken.jpg") as e:
    retrieval.load_image(str(bad), 64)
  assert "\n" not in str(e.value)
  (tmp_path / "oxford5k" / "lab" / "c_1_ok.txt").write_text("")
  # The other city is needed too: its database fits the whitening.
  with pytest.raises(UserError, match="whitened on paris6k.*paris6k"):
    retrieval.evaluate_retrieval(None, ("oxford5k",), str(tmp_path))
  # A user's blacklist file replaces the built-in list.
  black = tmp_path / "black.txt"
  black.write_text("oxford_a_000002\n")
  data = rd.read_classic(str(tmp_path), "oxford5k", str(black))
  assert len(data.images) == 8 and not any("a_000002" in p for p in data.images)
  assert data.queries[0].n_positive == 3 and data.queries[0].positive.tolist() == [0, 1]
  assert data.missing == ()                       # blacklisted on purpose: not missing
  # A gt image absent from jpg/ is counted (and scored as never retrieved), not dropped.
  os.remove(tmp_path / "oxford5k" / "jpg" / "oxford_c_000002.jpg")
  assert rd.read_classic(str(tmp_path), "oxford5k").missing == ("oxford_c_000002",)


def test_end_to_end_miniature(tmp_path, monkeypatch):
  """A tiny random trunk at 96 px on two classic and two revisited miniatures. The images of a
  landmark are one texture plus noise and the queries whole images, so each landmark's images
  rank first and every AP is known by hand: 100 for a, b, c on Oxford; on Paris b lists a
  blacklisted positive, 3 of 4 found first -> 75; the 'wrong' query (image a 1, positives
  the 6 images of b and c) finds them at ranks 4..9 after a's 3 -> sum_j 1/6 ((j-1)/(j+2) +
  j/(j+3)) / 2 = 44.7. Revisited: 100 in every setup, the query with no hard (easy) positive
  left out of Hard (Easy)."""
  _classic(tmp_path, "oxford5k", "oxford", 0)
  _classic(tmp_path, "paris6k", "paris", 1, extra_good=("paris_louvre_000136",))
  (tmp_path / "paris6k" / "jpg" / "paris_louvre_000136.jpg").write_bytes(b"corrupt")
  _revisited(tmp_path, "roxford5k", 2, "pkl")
  _revisited(tmp_path, "rparis6k", 3, "mat")
  # Spies: which regions each whitening is fitted on, how each set of images is cropped.
  fits, extracted = [], {}
  class Spy(retrieval.Whitening):
    def __init__(self, x, dim=512):
      fits.append(np.array(x))
      super().__init__(x, dim)
  call = retrieval._Extractor.__call__
  def spy_call(self, paths, boxes=None, crop_first=False, what=""):
    extracted[what] = (crop_first, boxes is not None, call(self, paths, boxes, crop_first, what))
    return extracted[what][2]
  monkeypatch.setattr(retrieval, "Whitening", Spy)
  monkeypatch.setattr(retrieval._Extractor, "__call__", spy_call)
  out = retrieval.evaluate_retrieval(_tiny(), ("oxford5k", "paris6k", "roxford5k", "rparis6k"),
                                     str(tmp_path), max_side=SIDE)
  for fit, other in zip(fits, ("paris6k", "oxford5k", "rparis6k", "roxford5k")):
    np.testing.assert_array_equal(fit, np.concatenate(extracted[f"{other} database"][2]))
  assert extracted["oxford5k queries"][:2] == (False, True)       # resize, then crop
  assert extracted["roxford5k queries"][:2] == (True, True)       # crop, then resize
  assert extracted["oxford5k database"][:2] == (False, False)
  ox, pa = out["oxford5k"], out["paris6k"]
  assert ox["whitened_on"] == "paris6k" and pa["whitened_on"] == "oxford5k"
  assert pa["n_images"] == 9 and ox["n_queries"] == 4 and pa["n_missing"] == 0
  wrong = 100 * sum((j - 1) / (j + 2) + j / (j + 3) for j in range(1, 7)) / 2 / 6
  hand = {"oxford5k": {"a_1": 100, "b_1": 100, "c_1": 100, "wrong_1": wrong},
          "paris6k": {"a_1": 100, "b_1": 75, "c_1": 100, "wrong_1": wrong}}
  for name, aps in hand.items():
    assert out[name]["aps"] == pytest.approx(aps)
    assert out[name]["map"] == pytest.approx(np.mean(list(aps.values())))
  for name in ("roxford5k", "rparis6k"):
    r = out[name]
    assert r["n_images"] == 6 and r["n_queries"] == 3
    assert r["medium"]["map"] == pytest.approx(100.0) and r["medium"]["n_queries"] == 3
    assert r["hard"]["n_queries"] == 2 and r["easy"]["n_queries"] == 2
    assert r["hard"]["map"] == pytest.approx(100.0) and r["easy"]["map"] == pytest.approx(100.0)
    assert r["medium"]["mp@1"] == pytest.approx(100.0)
