"""--clusters: the tables, the grids, and index.html in headless Chromium (Debian's package,
installed by .ci/run): it loads with no console error and shows K grids."""

import csv
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import write_photos
from dc_tf.config import UserError
from dc_tf.embed import clusters, features
from dc_tf.evaluation import pictures

K = 3


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


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_export):
  root = tmp_path_factory.mktemp("page")
  photos = write_photos(str(root / "photos"), n=15)
  out = str(root / "out")
  features.run(features.EmbedOptions(input=photos, model=tiny_export, output=out))
  return out, clusters.make_page(out, k=K, queries=2)


def test_nearest_is_cosine_best_first():
  x = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)
  idx, sc = clusters.nearest(x, np.array([[2, 0.1]], np.float32), 3)
  assert idx.tolist() == [[0, 2, 1]]
  np.testing.assert_allclose(sc[0, 0], 2 / np.hypot(2, 0.1), rtol=1e-6)


@pytest.mark.slow
def test_tables_and_grids(page):
  out, path = page
  with open(os.path.join(out, "clusters", "assignments.csv")) as f:
    table = list(csv.DictReader(f))
  with open(os.path.join(out, "clusters", "sizes.csv")) as f:
    sizes = {int(r["cluster"]): int(r["size"]) for r in csv.DictReader(f)}
  assert len(table) == 15 and sum(sizes.values()) == 15 and sorted(sizes) == list(range(K))
  counts = np.bincount([int(r["cluster"]) for r in table], minlength=K)
  assert [sizes[c] for c in range(K)] == counts.tolist()
  grids = sorted(os.listdir(os.path.join(out, "clusters", "grids")))
  assert [g for g in grids if g.startswith("cluster-")] == [f"cluster-{c:05d}.png" for c in range(K)]
  with pytest.raises(UserError, match="cannot make"):
    clusters.make_page(out, k=16)


@pytest.mark.slow
def test_page_in_headless_chromium(page):
  _, path = page
  url = "file://" + os.path.abspath(path)
  r = chromium("--dump-dom", url)
  assert r.returncode == 0, r.stderr[-2000:]
  dom = r.stdout
  assert len(re.findall(r'<section class="cluster"', dom)) == K
  assert len(re.findall(r'<section class="query"', dom)) == 2
  assert f'data-loaded="{K + 2}"' in dom, "the page's images did not all load"
  assert console_messages(r.stderr) == [], console_messages(r.stderr)
  # the check itself sees a broken page: a missing grid is a console error
  broken = os.path.join(os.path.dirname(path), "broken.html")
  with open(path) as f, open(broken, "w") as g:
    g.write(f.read().replace("grids/cluster-00000.png", "grids/missing.png"))
  r = chromium("--dump-dom", "file://" + broken)
  os.remove(broken)
  assert any("missing.png" in m for m in console_messages(r.stderr)), r.stderr[-2000:]
  assert f'data-loaded="{K + 1}"' in r.stdout


def test_thumbnails_keep_the_aspect_on_grey_and_tile():
  import tensorflow as tf
  wide = tf.io.encode_png(np.full((20, 40, 3), 200, np.uint8)).numpy()
  t = pictures.thumbnail(wide, 32)
  assert t.shape == (32, 32, 3) and (t[:8] == 128).all() and (t[-8:] == 128).all()
  assert (t[8:24] == 200).all()
  grid = pictures.tile([t] * 5, per_row=4, gap=2)
  assert grid.shape == (2 * 34 - 2, 4 * 34 - 2, 3) and (grid[34:, 34:] == 255).all()
