"""Fig. 5: the page of sampled clusters and their dominant metadata (issue 38 item 3)."""

import os
import re
import shutil
import subprocess

import pytest

from analysis_planted import GROUPS, make_planted
from dc_tf.analysis import metadata, nmi, page

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  return make_planted(tmp_path_factory.mktemp("planted"))


def chromium_dom(path):
  exe = shutil.which("chromium") or shutil.which("chromium-browser")
  assert exe, "chromium is missing: apt-get install chromium"
  r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                      "--disable-dev-shm-usage", "--virtual-time-budget=3000", "--dump-dom",
                      "file://" + os.path.abspath(path)], capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  return r.stdout


def test_page_shows_the_planted_dominant_metadata(planted, tmp_path):
  pattern, run, groups, _, colours = planted
  rows = page.write_page(nmi.kept_tables(run)[0], pattern, str(tmp_path), clusters=GROUPS,
                         members=9, seed=0, chunk=64)
  assert [r["shown"] for r in rows] == [9] * GROUPS
  dom = chromium_dom(tmp_path / "index.html")
  sections = re.findall(r'<section class="cluster" data-cluster="(\d+)"[^>]*'
                        r'data-user="(\w+)" data-tag="(\w+)" data-gps="([-:\w]+)" '
                        r'data-device="(\w+)"', dom)
  assert len(sections) == GROUPS
  for c, user, tag, gps, device in sections:
    g = int(c)
    assert (user, tag, gps, device) == (f"user{g}", f"tag{g}", f"{g * 10}:{-4 - g}", f"cam{g}")
  assert len(re.findall(r'<img src="cluster-\d+\.png"', dom)) == GROUPS
  assert dom.count('data-purity="1.0000"') == GROUPS * len(metadata.FIELDS)
  # the other table mixes the groups: its dominant tag holds far fewer of its images
  mixed = page.write_page(nmi.kept_tables(run)[1], pattern, str(tmp_path / "mixed"),
                          clusters=GROUPS, seed=0)
  assert max(r["tag_purity"] for r in mixed) < 0.6
