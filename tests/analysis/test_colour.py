"""Figs. 6-7: the colour spread of clusters (issue 38 item 4)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from analysis_planted import GROUPS, SPREAD, make_planted
from dc_tf.analysis import colour, nmi

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  return make_planted(tmp_path_factory.mktemp("planted"))


def test_colour_std_orders_the_planted_clusters(planted, tmp_path):
  pattern, run, groups, _, colours = planted
  planted_table, independent = nmi.kept_tables(run)
  clusters = colour.sample_clusters(planted_table, 10, seed=0)
  assert list(clusters) == list(range(GROUPS))
  stds = colour.colour_std(planted_table, clusters, pattern)
  assert sorted(stds, key=stds.get) == list(np.argsort(SPREAD))
  # sigma of a group ~ sqrt(3) x its spread / 255 (three channels)
  for g in range(GROUPS):
    assert stds[g] == pytest.approx(np.sqrt(3) * SPREAD[g] / 255, rel=0.3), g
  mixed = colour.colour_std(independent, colour.sample_clusters(independent, 10, 0), pattern)
  assert min(mixed.values()) > max(stds.values())     # mixed colours: far wider
  paths = colour.write(stds, mixed, str(tmp_path))
  rows = open(paths["csv"]).read().splitlines()
  assert rows[1].startswith(f"ours,{np.argmin(SPREAD)},") and len(rows) == 1 + 2 * GROUPS
  low = colour.lowest_grid(planted_table, stds, pattern, str(tmp_path / "low.png"), clusters=2)
  assert low == list(np.argsort(SPREAD)[:2]) and tf.io.decode_png(open(tmp_path / "low.png", "rb").read()).shape[0] > 16
