"""dc_tf/embed/duplicates.py: pairs and isolation by blocks equal to the whole matrix's, and
on a tiny export, planted copies (re-encoded, resized, cropped 90%) of unrelated pictures
found at the default threshold in the default space, with no pair of unrelated pictures."""

import csv
import os

import numpy as np
import pytest
import tensorflow as tf

from dc_tf import neighbours
from dc_tf.embed import clusters, duplicates, features, space


def test_pairs_and_isolation_by_blocks_equal_the_whole_matrix():
  rng = np.random.default_rng(0)
  y = space.unit(rng.normal(size=(37, 3)))
  s = y @ y.T
  t = float(np.quantile(s[np.triu_indices(37, 1)], 0.9))
  want = sorted(((i, j, s[i, j]) for i in range(37) for j in range(i + 1, 37) if s[i, j] >= t),
                key=lambda p: (-p[2], p[0], p[1]))
  got = duplicates.pairs(y, t, block=5)
  assert [(i, j) for i, j, _ in got] == [(i, j) for i, j, _ in want] and len(got) > 10
  np.testing.assert_allclose([v for *_, v in got], [v for *_, v in want], atol=1e-6)
  np.fill_diagonal(s, -np.inf)
  nearest, score = duplicates.isolation(y, block=4)
  np.testing.assert_array_equal(nearest, s.argmax(1))
  np.testing.assert_allclose(score, s.max(1), atol=1e-6)
  lonely = duplicates.outliers(y, 3, block=4)
  assert [i for i, _, _ in lonely] == np.argsort(s.max(1), kind="stable")[:3].tolist()
  with pytest.raises(ValueError, match="threshold"):
    duplicates.pairs(y, 1.5)
  with pytest.raises(duplicates.TooManyPairs, match="--duplicate_threshold"):
    duplicates.pairs(y, t, block=5, max_pairs=len(want) - 1)
  upper = (y @ y.T)[np.triu_indices(37, 1)]
  ts = [-1.0, 0.0, t, 0.99]
  np.testing.assert_array_equal(duplicates.count_above(y, ts, block=5),
                                [(upper >= v).sum() for v in ts])


def test_planted_scores_by_hand():
  found = [(0, 1, 0.99), (2, 3, 0.95), (0, 4, 0.9), (1, 4, 0.8)]
  s = duplicates.planted_scores(found, {(0, 1), (0, 4), (5, 6)}, 0.9)
  assert (s["pairs"], s["found"], s["recall"], s["precision"]) == (3, 2, 2 / 3, 2 / 3)


def pattern(seed, size=48):
  """An unrelated picture: smooth random colour blobs (8 x 8 noise, upsampled)."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, (1, 8, 8, 3)).astype(np.float32)
  img = tf.image.resize(small, [size, size], method="bicubic")[0]
  return tf.io.encode_jpeg(tf.cast(tf.clip_by_value(img, 0, 255), tf.uint8), quality=95).numpy()


ORIGINALS, WITH_COPIES = 60, 4


@pytest.mark.slow
def test_planted_copies_found_and_no_unrelated_pair(tmp_path, tiny_export):
  folder = tmp_path / "photos"
  folder.mkdir()
  for i in range(ORIGINALS):
    data = pattern(i)
    (folder / f"img{i:02d}.jpg").write_bytes(data)
    if i < WITH_COPIES:
      for kind, copy in duplicates.planted_copies(data).items():
        (folder / f"img{i:02d}.{kind}.jpg").write_bytes(copy)
  out = str(tmp_path / "out")
  features.run(features.EmbedOptions(input=str(folder), model=tiny_export, output=out))
  clusters.make_page(out, k=3, queries=2, duplicates=True)
  rows, x, _, layer = clusters.load_features(out)
  assert layer == space.DEFAULT_LAYER
  group = [int(os.path.basename(r.path)[3:5]) for r in rows]   # the original's number
  planted = {(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))
             if group[i] == group[j]}
  assert len(planted) == WITH_COPIES * 6        # 4 pictures of each: 6 pairs
  with open(os.path.join(out, "clusters", "duplicates.csv")) as f:
    found = [(int(r["row_a"]), int(r["row_b"]), float(r["cosine"])) for r in csv.DictReader(f)]
  s = duplicates.planted_scores(found, planted, duplicates.DEFAULT_THRESHOLD)
  # The default space and threshold were set on real photos (benchmarks/photo_clusters.py);
  # on this set and the unseeded tiny trunk, precision at the default was 1 in 5 of 5 inits
  # (centred_l2, 0.73) and recall varies with the init (0.67 to 1.0 in pca_l2 at 0.93), so
  # recall at the default is the benchmark's to measure, not this test's.
  assert s["precision"] == 1.0 and s["recall"] > 0, s
  fitted, _ = space.load(out, layer)
  y = fitted.apply(x)
  sim = y @ y.T
  iu = np.triu_indices(len(y), 1)
  same = np.array([(i, j) in planted for i, j in zip(*iu)])
  assert sim[iu][same].min() > sim[iu][~same].max()    # a threshold separates them all
  # The CSV lists exactly the pairs at or above the threshold, with their cosines.
  above = {(int(i), int(j)) for i, j in zip(*iu) if sim[i, j] >= duplicates.DEFAULT_THRESHOLD}
  assert {(a, b) for a, b, _ in found} == above
  np.testing.assert_allclose([c for *_, c in found], [sim[a, b] for a, b, _ in found], atol=1e-4)
  with open(os.path.join(out, "clusters", "outliers.csv")) as f:
    lonely = [int(r["row"]) for r in csv.DictReader(f)]
  assert not {group[j] for j in lonely} & set(range(WITH_COPIES))   # a copied one is never alone
  # python -m dc_tf.neighbours goes through the page's saved fit
  hits = neighbours.search(out, open(rows[3].path, "rb").read(), n=4)
  assert hits[0][2].path == rows[3].path
  np.testing.assert_allclose([h[1] for h in hits], np.sort(y @ y[3])[::-1][:4], atol=1e-4)
