"""--clusters: what the page shows is what it means (issue 36 item 1). Planted clusters: each
one colour, features written so k-means must find them, a known core of members at each
centroid and known labels. The grids show exactly the core as the nearest members and a
seeded sample of the cluster's own members; the dominant label and purity are the planted
ones; a hostile file name is text; the page in headless Chromium (Debian's package, installed
by .ci/run) loads with no console error and its DOM carries the planted labels."""

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from conftest import jpeg_bytes, write_photos
from dc_tf.config import UserError
from dc_tf.embed import clusters, features, inputs
from dc_tf.evaluation import pictures

K, PER, CORE, D = 3, 16, 4, 8
COLOURS = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}
NAMES = list(COLOURS)
DOMINANT = (12, 10, 9)      # members of planted cluster c labelled NAMES[c]; the rest the next
HOSTILE = "<img src=x onerror=alert(1)>.jpg"


def planted_output(root, layer="probe_conv4"):
  """An embed output folder written by hand: row j is in planted cluster j % K (so row order
  mixes the clusters), member i of a cluster is a core (its last CORE members: exactly at
  the centre) or one of a +/- pair around it; photos are the cluster's colour. Returns (out, cluster of
  each row, label of each row, core rows of each cluster)."""
  rng = np.random.default_rng(0)
  out, photos = os.path.join(root, "out"), os.path.join(root, "photos")
  os.makedirs(out)
  os.makedirs(photos)
  n = K * PER
  planted = np.arange(n) % K
  member = np.arange(n) // K                      # i-th member of its cluster
  x = np.zeros((n, D), np.float32)
  # offsets of length 2 in the plane of the centred centres (the 2 dims the page keeps,
  # pca_dim=2): every non-core member is 2 from its centre there, in +/- pairs
  plane = np.linalg.qr(np.array([[1, -1, 0], [1, 1, -2]], np.float64).T)[0]   # [K, 2]
  angle = rng.uniform(0, 2 * np.pi, (K, (PER - CORE) // 2))
  offsets = np.zeros((K, (PER - CORE) // 2, D))
  offsets[..., :K] = 2 * (np.cos(angle)[..., None] * plane[:, 0] +
                          np.sin(angle)[..., None] * plane[:, 1])
  rows, labels = [], []
  for j in range(n):
    c, i = planted[j], member[j]
    x[j, c] = 10
    if i < PER - CORE:      # the core is the last members in row order, not the first
      pair, sign = divmod(i, 2)
      x[j] += (1 - 2 * sign) * offsets[c, pair]
    label = NAMES[c] if i < DOMINANT[c] else NAMES[(c + 1) % K]
    labels.append(label)
    name = HOSTILE if j == n - K + 1 else f"p{j:02d}.jpg"   # a core of planted cluster 1
    path = os.path.join(photos, name)
    data = jpeg_bytes(j, size=(24, 24), label_color=COLOURS[NAMES[c]])
    with open(path, "wb") as f:
      f.write(data)
    rows.append(inputs.Row(image_id=1000 + j, key=name, path=path,
                           sha1=hashlib.sha1(data).hexdigest(), format="jpeg", height=24,
                           width=24, label_text=label))
  np.save(os.path.join(out, f"{layer}-00000.npy"), x)
  features.write_index(out, [rows])
  with open(os.path.join(out, features.MANIFEST), "w") as f:
    json.dump({"layers": [layer], "shards": [{"shard": 0, "rows": n}], "rows": n,
               "model": "planted", "model_sha256": "planted"}, f)
  cores = {c: set(np.flatnonzero((planted == c) & (member >= PER - CORE)).tolist())
           for c in range(K)}
  return out, planted, labels, cores


def read_csv(out, name):
  with open(os.path.join(out, "clusters", name)) as f:
    return list(csv.DictReader(f))


def shown(out):
  """{cluster: {"nearest": [rows], "sample": [rows]}} from shown.csv, in tile order."""
  grids = {}
  for r in read_csv(out, "shown.csv"):
    grids.setdefault(int(r["cluster"]), {"nearest": [], "sample": []})[r["grid"]].append(
        int(r["row"]))
  return grids


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  out, planted, labels, cores = planted_output(str(tmp_path_factory.mktemp("planted")))
  page = clusters.make_page(out, k=K, pca_dim=2, queries=3, per_grid=CORE, seed=0)
  return out, page, planted, labels, cores


def test_clusters_are_the_planted_ones_and_cluster_is_super_times_k_plus_sub(planted):
  out, _, truth, _, _ = planted
  table = read_csv(out, "assignments.csv")
  flat = np.array([int(r["cluster"]) for r in table])
  assert all(int(r["cluster"]) == int(r["super_cluster"]) * K + int(r["sub_cluster"])
             for r in table)
  for c in range(K):   # each found cluster is one planted cluster, whole
    assert len(set(truth[flat == c])) == 1 and (flat == c).sum() == PER


def test_grids_show_the_core_nearest_and_a_seeded_sample_of_the_cluster(planted, tmp_path):
  out, _, truth, _, cores = planted
  flat = np.array([int(r["cluster"]) for r in read_csv(out, "assignments.csv")])
  grids = shown(out)
  assert sorted(grids) == list(range(K))
  for c, g in grids.items():
    p = truth[flat == c][0]
    assert set(g["nearest"]) == cores[p], (c, g)
    assert len(g["sample"]) == CORE and not set(g["sample"]) & set(g["nearest"])
    assert all(flat[j] == c for j in g["nearest"] + g["sample"])
    # the grid PNG shows those photos: every tile is the planted cluster's colour
    for grid in ("nearest", "sample"):
      png = tf.io.decode_png(open(os.path.join(out, "clusters", "grids",
                                               f"cluster-{c:05d}-{grid}.png"), "rb").read())
      tiles = [np.asarray(png)[:, t * 66:t * 66 + 64].reshape(-1, 3).mean(0) for t in range(CORE)]
      want = np.array(COLOURS[NAMES[p]])
      assert all(np.abs(t - want).max() < 40 for t in tiles), (c, grid, tiles)
  # the sample is the seed's: the same seed gives the same, another seed another
  copy = str(tmp_path / "copy")
  shutil.copytree(out, copy)
  clusters.make_page(copy, k=K, pca_dim=2, queries=3, per_grid=CORE, seed=0)
  assert shown(copy) == grids
  clusters.make_page(copy, k=K, pca_dim=2, queries=3, per_grid=CORE, seed=7)
  other = shown(copy)     # k-means may number the clusters otherwise: key them by the core
  by_core = lambda gs: {frozenset(g["nearest"]): g["sample"] for g in gs.values()}  # noqa: E731
  assert by_core(other).keys() == by_core(grids).keys()
  assert all(by_core(other)[c] != by_core(grids)[c] for c in by_core(grids))


def test_random_sample_is_seeded_and_of_the_members():
  members = np.arange(10, 60, 2)
  a = clusters.random_sample(members, members[:3], 8, seed=1, cluster=4)
  assert set(a) <= set(members[3:]) and len(set(a)) == 8
  assert (a == clusters.random_sample(members, members[:3], 8, seed=1, cluster=4)).all()
  assert (a != clusters.random_sample(members, members[:3], 8, seed=2, cluster=4)).any()
  assert len(clusters.random_sample(members[:2], members[:2], 8, 0, 0)) == 0


def test_dominant_label_and_purity_in_sizes_csv(planted):
  out, _, truth, labels, _ = planted
  flat = np.array([int(r["cluster"]) for r in read_csv(out, "assignments.csv")])
  for r in read_csv(out, "sizes.csv"):
    c = int(r["cluster"])
    p = truth[flat == c][0]
    assert r["label"] == NAMES[p] and int(r["label_count"]) == DOMINANT[p]
    assert float(r["purity"]) == pytest.approx(DOMINANT[p] / PER, abs=1e-4)
  assert clusters.dominant(["b", "a", "b", "a", "c"]) == ("a", 2, 0.4)   # a tie: sorted first
  assert clusters.purity(flat, labels) == pytest.approx(sum(DOMINANT) / (K * PER))


def test_no_query_is_its_own_neighbour_and_names_are_text(planted):
  _, page, _, _, _ = planted
  text = open(page).read()
  for q, items in re.findall(r'<section class="query" data-row="(\d+)">.*?<ol class='
                             r'"neighbours">(.*?)</ol>', text):
    rows = re.findall(r'<li data-row="(\d+)">', items)
    assert len(rows) == 5 and q not in rows
  assert HOSTILE not in text and "<img src=x" not in text
  assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in text


def chromium(*args, timeout=120):
  exe = shutil.which("chromium") or shutil.which("chromium-browser")
  assert exe, "chromium is missing: .ci/run installs Debian's package (apt-get install chromium)"
  return subprocess.run(
      [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
       "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args],
      capture_output=True, text=True, timeout=timeout)


def console_messages(stderr: str) -> list[str]:
  """Every console message Chromium logged (`:CONSOLE:` lines; its own severity tag says
  nothing of the message's level). The page logs nothing when well: an uncaught error or the
  page's own check of its images (console.error) would show here."""
  return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.slow
def test_page_in_headless_chromium(planted):
  out, path, truth, _, _ = planted
  r = chromium("--dump-dom", "file://" + os.path.abspath(path))
  assert r.returncode == 0, r.stderr[-2000:]
  dom = r.stdout
  assert len(re.findall(r'<section class="cluster"', dom)) == K
  assert len(re.findall(r'<section class="query"', dom)) == 3
  images = 2 * K + 3
  assert f'data-loaded="{images}"' in dom, "the page's images did not all load"
  assert len(re.findall(r"<img ", dom)) == images, "an element was injected"
  assert "onerror" not in re.sub(r"&lt;.*?&gt;", "", dom)
  assert console_messages(r.stderr) == [], console_messages(r.stderr)
  flat = np.array([int(r["cluster"]) for r in read_csv(out, "assignments.csv")])
  shown_labels = dict(re.findall(r'data-cluster="(\d+)"[^>]*data-label="(\w+)"', dom))
  assert {int(c): l for c, l in shown_labels.items()} == \
         {c: NAMES[truth[flat == c][0]] for c in range(K)}
  assert sorted(re.findall(r'<span class="label">(\w+)</span>', dom)) == sorted(NAMES)
  # the check itself sees a broken page: a missing grid is a console error
  broken = os.path.join(os.path.dirname(path), "broken.html")
  with open(path) as f, open(broken, "w") as g:
    g.write(f.read().replace("grids/cluster-00000-nearest.png", "grids/missing.png"))
  r = chromium("--dump-dom", "file://" + broken)
  os.remove(broken)
  assert any("missing.png" in m for m in console_messages(r.stderr)), r.stderr[-2000:]
  assert f'data-loaded="{images - 1}"' in r.stdout


@pytest.mark.slow
def test_real_export_tables_and_grids(tmp_path, tiny_export):
  photos = write_photos(str(tmp_path / "photos"), n=15)
  out = str(tmp_path / "out")
  features.run(features.EmbedOptions(input=photos, model=tiny_export, output=out))
  clusters.make_page(out, k=2, m=2, queries=2, duplicates=True)
  table = read_csv(out, "assignments.csv")
  sizes = {int(r["cluster"]): int(r["size"]) for r in read_csv(out, "sizes.csv")}
  assert len(table) == 15 and sum(sizes.values()) == 15
  assert all(int(r["cluster"]) == int(r["super_cluster"]) * 2 + int(r["sub_cluster"])
             for r in table)
  counts = np.bincount([int(r["cluster"]) for r in table], minlength=4)
  assert [sizes.get(c, 0) for c in range(4)] == counts.tolist()
  for r in read_csv(out, "sizes.csv"):     # the folders home/ and trip/ are the labels
    members = [t for t in table if t["cluster"] == r["cluster"]]
    folders = [os.path.basename(os.path.dirname(t["path"])) for t in members]
    assert int(r["label_count"]) == max(folders.count(f) for f in set(folders))
  assert os.path.exists(os.path.join(out, "space-probe_conv4.npz"))
  assert len(read_csv(out, "outliers.csv")) == 10
  with pytest.raises(UserError, match="cannot make"):
    clusters.make_page(out, k=16)
  with pytest.raises(UserError, match="--space"):
    clusters.make_page(out, k=2, space="cosine")


def test_thumbnails_keep_the_aspect_on_grey_and_tile():
  wide = tf.io.encode_png(np.full((20, 40, 3), 200, np.uint8)).numpy()
  t = pictures.thumbnail(wide, 32)
  assert t.shape == (32, 32, 3) and (t[:8] == 128).all() and (t[-8:] == 128).all()
  assert (t[8:24] == 200).all()
  grid = pictures.tile([t] * 5, per_row=4, gap=2)
  assert grid.shape == (2 * 34 - 2, 4 * 34 - 2, 3) and (grid[34:, 34:] == 255).all()
