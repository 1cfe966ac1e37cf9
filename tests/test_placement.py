"""Which replica holds which sub-head columns (dc_tf.placement)."""

import numpy as np
import pytest

from dc_tf.placement import HeadPlacement, Piece


@pytest.mark.parametrize("heads,k,replicas", [(16, 80, 1), (16, 80, 4), (16, 80, 6), (16, 80, 16),
                                              (16, 80, 64), (8, 40, 12), (1, 7, 4), (4, 5, 3)])
def test_every_column_of_every_head_has_exactly_one_owner(heads, k, replicas):
  placement = HeadPlacement(heads, k, replicas)
  owners = np.zeros([heads, k], int)
  for r in range(replicas):
    for p in placement.pieces(r):
      owners[p.head, p.start:p.stop] += 1
  assert (owners == 1).all()
  per_replica = placement.columns_per_replica()
  if replicas <= heads:   # at most ceil(S/R) whole heads
    assert max(len(placement.pieces(r)) for r in range(replicas)) == -(-heads // replicas)
    assert all(p.width == k for p in placement.all_pieces())
  else:                   # one head, a 1/(R/S) shard of it
    assert all(len(placement.pieces(r)) == 1 for r in range(replicas))
    assert per_replica.max() <= -(-k // (replicas // heads))
  assert placement.sharded == (replicas > heads)


def test_paper_preset_layout():
  placement = HeadPlacement(16, 80_000, 64)
  assert placement.pieces(0) == (Piece(0, 0, 20_000),)
  assert placement.pieces(17) == (Piece(1, 20_000, 40_000),)
  assert placement.group(3) == [3, 19, 35, 51]


def test_piece_names_round_trip_and_too_many_replicas_is_refused():
  p = Piece(3, 10, 25)
  assert Piece.from_name(p.name) == p and p.width == 15
  with pytest.raises(ValueError, match="k >= 4"):
    HeadPlacement(1, 3, 4)
  assert HeadPlacement(4, 0, 2).pieces(0) == ()   # RotNet: no sub-heads
