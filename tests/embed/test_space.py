"""dc_tf/embed/space.py: each space's rows against a computation by hand (pca_l2 against the
project's own clustering whitening), the fit saved and reused only for the same rows and
export, block-by-block neighbours equal to the whole matrix's, precision@k on planted
labels, and neighbours' queries through the saved fit."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from dc_tf.clustering import pca
from dc_tf.embed import space
from dc_tf.embed.inputs import Row


def rows_of(n, tag=""):
  return [Row(image_id=i, key=f"{i}", path=f"{tag}{i}.jpg", sha1=f"{i:040x}", format="jpeg",
              height=8, width=8) for i in range(n)]


def gram(y):
  return y @ y.T


@pytest.mark.parametrize("n,d", [(30, 50), (80, 6)])   # the SVD branch (n <= d), the covariance one
def test_spaces_by_hand(n, d):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(n, d)) * np.linspace(3, 0.5, d) + 5).astype(np.float32)
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(space.fit("raw", "l", x).apply(x), unit(x), atol=1e-6)
  np.testing.assert_allclose(space.fit("centred_l2", "l", x).apply(x),
                             unit(x - x.mean(0)), atol=1e-5)
  s = space.fit("pca_l2", "l", x, dim=5)
  y = s.apply(x)
  assert y.shape == (n, 5) and s.dims == 5
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
  # whitened before the L2: unit variance in each kept direction, uncorrelated
  w = (x - s.mean) @ s.projection
  np.testing.assert_allclose(np.cov(w.T, bias=True), np.eye(5), atol=1e-3)
  # the same rows (up to each axis' sign) as the clustering's whitening of the same dims
  want = pca.fit_whitening(tf.distribute.get_strategy(), [x], 5).apply(x)
  np.testing.assert_allclose(gram(y), gram(want), atol=1e-3)
  assert space.fit_dim(x.shape) == min(256, d, n // 4)   # never a simplex of the rows


def test_bad_space_is_a_user_error_naming_the_flag():
  with pytest.raises(space.SpaceError, match="--space must be one of raw, centred_l2, pca_l2"):
    space.fit("cosine", "l", np.ones((3, 2)))
  with pytest.raises(space.SpaceError, match="shape"):
    space.fit("raw", "l", np.ones((3, 2))).apply(np.ones((3, 4)))


def test_fit_is_saved_and_reused_only_for_the_same_rows_and_export(tmp_path):
  out = str(tmp_path)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 12)).astype(np.float32)
  rows, manifest = rows_of(40), {"model_sha256": "aaa"}
  s = space.load_or_fit(out, rows, x, manifest, "probe_conv4", "pca_l2")
  assert os.path.exists(os.path.join(out, "space-probe_conv4.npz"))
  entry = json.load(open(os.path.join(out, space.INDEX)))["probe_conv4"]
  assert entry["space"] == "pca_l2" and entry["model_sha256"] == "aaa" and entry["dims"] == 10
  # reused: other rows x2 under the same index give the saved projection, not a new fit
  x2 = x + rng.normal(size=x.shape).astype(np.float32)
  again = space.load_or_fit(out, rows, x2, manifest, "probe_conv4", "pca_l2")
  np.testing.assert_array_equal(again.projection, s.projection)
  # refitted: other rows, another export, another space
  for r, m, name in ((rows_of(40, "b"), manifest, "pca_l2"), (rows, {"model_sha256": "b"},
                     "pca_l2"), (rows, manifest, "centred_l2")):
    new = space.load_or_fit(out, r, x2, m, "probe_conv4", name)
    assert new.name == name and not np.array_equal(new.mean, s.mean)
  with open(os.path.join(out, "space-probe_conv4.npz"), "wb") as f:
    f.write(b"junk")
  with pytest.raises(space.SpaceError, match="space-probe_conv4.npz"):
    space.load(out, "probe_conv4")


def test_top_k_by_blocks_excludes_self_and_equals_the_whole_matrix():
  rng = np.random.default_rng(2)
  y = space.unit(rng.normal(size=(23, 4)))
  idx, sc = space.top_k(y, 5, block=4)
  s = y @ y.T
  np.fill_diagonal(s, -np.inf)
  np.testing.assert_array_equal(idx, np.argsort(-s, axis=1, kind="stable")[:, :5])
  np.testing.assert_allclose(sc, np.sort(s, axis=1)[:, ::-1][:, :5], atol=1e-6)
  assert not (idx == np.arange(23)[:, None]).any()
  q_idx, _ = space.top_k(y, 3, queries=[4, 7], block=1)
  np.testing.assert_array_equal(q_idx, idx[[4, 7], :3])


def test_precision_at_k_on_planted_labels():
  rng = np.random.default_rng(3)
  labels = np.repeat(np.arange(4), 12)
  centres = rng.normal(size=(4, 6)) * 10
  y = space.unit(centres[labels] + rng.normal(size=(48, 6)))
  assert space.precision_at(y, labels) == {5: 1.0, 10: 1.0}
  # 11 others share a label: at k = 10 a random order finds about 11/47 of them
  shuffled = space.precision_at(y, rng.permutation(labels))
  assert shuffled[5] < 0.5 and shuffled[10] < 0.5
  # by hand for one row: the share of its 5 nearest others with its label
  idx, _ = space.top_k(y, 5)
  mixed = labels.copy()
  mixed[idx[0, :2]] = (labels[0] + 1) % 4
  hand = np.mean([(mixed[idx[i]] == mixed[i]).mean() for i in range(48)])
  assert space.precision_at(y, mixed, ks=(5,))[5] == pytest.approx(hand)


def test_clustering_in_principal_axes_is_the_clustering_of_the_rows():
  """cluster_rows rotates wide rows into their top pca_dim axes before hierarchy.cluster's
  own whitening: the same clusters and the same whitened rows (up to each axis' sign) as
  whitening the rows themselves."""
  from dc_tf.clustering import hierarchy
  from dc_tf.embed import clusters
  rng = np.random.default_rng(4)
  labels = np.repeat(np.arange(3), 10)
  y = space.unit(rng.normal(size=(3, 40))[labels] * 3 + rng.normal(size=(30, 40)))
  ids = np.arange(100, 130)
  flat, _, _, z = clusters.cluster_rows(y, ids, 1, 3, 4, seed=0)
  a = hierarchy.cluster(tf.distribute.get_strategy(), [y], [ids], m=1, k=3, pca_dim=4, seed=0)
  np.testing.assert_array_equal(flat, a.flat_labels)
  want = pca.fit_whitening(tf.distribute.get_strategy(), [y], 4).apply(y)
  np.testing.assert_allclose(gram(z), gram(want), atol=1e-4)
