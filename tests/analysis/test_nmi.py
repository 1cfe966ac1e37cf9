"""Fig. 4: NMI of kept tables with the metadata, streamed from counts (issue 38 item 2)."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from sklearn.metrics import normalized_mutual_info_score

from analysis_planted import GROUPS, make_planted
from dc_tf.analysis import metadata, nmi
from dc_tf.data import preprocess
from dc_tf.evaluation import metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  return make_planted(tmp_path_factory.mktemp("planted"))


def test_streamed_nmi_is_sklearns_on_the_same_labels():
  rng = np.random.default_rng(0)
  clusters = rng.integers(0, 50, 5000)
  values = np.array([f"v{x}".encode() for x in (clusters // 3 + rng.integers(0, 4, 5000))])
  c = nmi.Contingency()
  for start in range(0, 5000, 700):            # chunks, one merge in the middle
    c.add(clusters[start:start + 700], values[start:start + 700])
    if start == 2100:
      c.table()
  want = metrics.cluster_scores(values.astype(str), clusters)["nmi"]   # sklearn: no bytes
  assert c.total() == 5000
  assert c.nmi() == pytest.approx(want, abs=1e-10)
  assert want == pytest.approx(normalized_mutual_info_score(values.astype(str), clusters),
                               abs=1e-12)
  # the bound: at most one count per distinct (cluster, value) pair is held
  assert len(c.keys) == len(set(zip(clusters.tolist(), values.tolist())))


def test_nmi_is_one_on_planted_fields_and_small_when_independent(planted):
  pattern, run, groups, independent, _ = planted
  counts = collections.Counter()
  for chunk in metadata.raw_chunks(pattern, chunk=50):
    metadata.tag_counts(chunk["tags"], counts)
  scores = nmi.score(nmi.kept_tables(run), metadata.raw_chunks(pattern, chunk=50), counts)
  for field in metadata.FIELDS:
    assert scores[0][field]["nmi"] == pytest.approx(1.0, abs=1e-12), field
    assert scores[0][field]["images"] == len(groups)
  # Independent labels, k = V = 4 values, N images: 2 N MI ~ chi2((k-1)(V-1)) (G-test), so
  # with probability 0.999 MI < chi2.ppf(0.999, 9) / (2N), and NMI = MI / mean entropy.
  n = len(groups)
  h = np.mean([stats.entropy(np.bincount(groups)), stats.entropy(np.bincount(independent))])
  bound = stats.chi2.ppf(0.999, (GROUPS - 1) ** 2) / (2 * n) / h
  assert bound < 0.2
  for field in metadata.FIELDS:
    assert scores[3][field]["nmi"] < bound, field
    assert scores[3][field]["nmi"] == pytest.approx(
        normalized_mutual_info_score(groups, independent), abs=1e-12)


def test_supervised_labels_kept_above_the_confidence(planted):
  """A stand-in classifier: logits from the mean colour, confident on the red, green and blue
  groups, not on the grey one (whose images are left out)."""
  pattern, run, groups, _, colours = planted
  def classifier(images):       # the extraction's normalised pixels back to [0, 1] first
    rgb = images * preprocess.IMAGENET_STD + preprocess.IMAGENET_MEAN
    return {"logits": 8 * (tf.reduce_mean(rgb, axis=[1, 2]) - 0.5)}
  tables = nmi.kept_tables(run)
  chunks = metadata.labelled_chunks(pattern, classifier, 32, threshold=0.75)
  scores = nmi.score(tables[:1], chunks, collections.Counter())
  logits = 8 * (colours / 255 - 0.5)
  confident = (np.exp(logits).max(1) / np.exp(logits).sum(1)) > 0.75
  assert not confident[groups == 3].any() and confident.sum() > len(groups) / 2
  assert scores[0]["imagenet"]["images"] == int(confident.sum())
  assert scores[0]["imagenet"]["nmi"] == pytest.approx(1.0, abs=1e-12)
  none = nmi.score(tables[:1], metadata.labelled_chunks(pattern, classifier, 32, 0.9999999),
                   collections.Counter())
  assert "imagenet" not in none[0]              # nothing that confident
  with pytest.raises(metadata.LabelsError, match="logits"):
    next(metadata.labelled_chunks(pattern, lambda x: {"fc7": x}, 32, 0.75))


def test_the_command_scores_every_table_and_a_reference(planted, clean_run, tmp_path):
  pattern, run, groups, _, colours = planted
  out = str(tmp_path / "out")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  r = subprocess.run([sys.executable, "-m", "dc_tf.analysis", "nmi", run,
                      f"--reference={clean_run}", f"--output_dir={out}"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  paths = json.loads(r.stdout)
  rows = open(paths["csv"]).read().splitlines()
  assert rows[0].split(",")[:5] == ["epoch", *metadata.FIELDS]
  assert [x.split(",")[0] for x in rows[1:]] == ["0", "3", "reference deepercluster"]
  assert rows[1].split(",")[1:5] == ["1.000000"] * 4
  assert float(rows[3].split(",")[1]) > 0        # the reference is scored too
  assert "| 0 | 1.000 | 1.000 | 1.000 | 1.000 |" in open(paths["md"]).read()
  assert tf.io.decode_png(open(paths["png"], "rb").read()).shape[2] in (3, 4)
  bad = subprocess.run([sys.executable, "-m", "dc_tf.analysis", "nmi", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
      f"error: no config.json in {tmp_path}")
