"""python -m dc_tf.neighbours: a photo's own row first at cosine 1, scores best first (raw
cosine here; the spaces are tests/embed/test_space.py's); an export other than embed.json's
is refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from dc_tf import neighbours
from dc_tf.config import UserError
from dc_tf.embed import clusters, features


@pytest.mark.slow
def test_query_finds_itself_then_the_cosine_order(photos, tiny_export, tmp_path):
  out = str(tmp_path / "out")
  features.run(features.EmbedOptions(input=photos, model=tiny_export, output=out))
  rows, x, _, _ = clusters.load_features(out)
  with open(rows[5].path, "rb") as f:
    query = f.read()
  hits = neighbours.search(out, query, n=4, space="raw")
  assert hits[0][2].path == rows[5].path and abs(hits[0][1] - 1) < 1e-5
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  want = np.sort(unit @ unit[5])[::-1][:4]
  np.testing.assert_allclose([s for _, s, _ in hits], want, atol=1e-5)
  with pytest.raises(UserError, match="not a usable image: not an image"):
    neighbours.search(out, b"hello", n=3)
  r = subprocess.run([sys.executable, "-m", "dc_tf.neighbours", f"--features={out}",
                      f"--query={rows[5].path}", "-n", "3"], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 3 and lines[0].split()[3] == rows[5].path and lines[0].split()[1] == "1.0000"
  # an export whose sha256 is not the one embed.json records is refused, both named
  path = os.path.join(out, features.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  with open(path, "w") as f:
    json.dump({**manifest, "model_sha256": "0" * 64}, f)
  with pytest.raises(UserError, match=f"is not the one {out} was embedded with .sha256 "
                                      f"{manifest['model_sha256'][:12]}.*says 000000000000"):
    neighbours.search(out, query, n=3, space="raw")
