"""One replica, 4 logical CPUs in one process, and 2 MWMS processes x 2 logical CPUs train
to the same trunk, V and sub-heads (the partitioned-heads issue, deliverable 3)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, cpu_strategy
from multiworker_job import MODES, fixed_global_batch, layout_config, three_steps
from workers import run_workers
from dc_tf.training import trainer


def merged_heads(out, prefix="piece_"):
  """{head: [D, k] kernel} (prefix "piece_") or {head: [k] bias} ("bias_") from the pieces in
  one or more result dicts."""
  from dc_tf.placement import Piece
  pieces = sorted((Piece.from_name(k[len(prefix):]), v) for o in out for k, v in o.items()
                  if k.startswith(prefix))
  heads = {}
  for p, v in pieces:
    heads.setdefault(p.head, []).append(v)
  return {s: np.concatenate(parts, axis=-1) for s, parts in heads.items()}


def assert_same(a_list, b_list):
  shared_a = {k: v for k, v in a_list[0].items() if k.startswith("shared_")}
  shared_b = {k: v for o in b_list for k, v in o.items() if k.startswith("shared_")}
  assert shared_a.keys() == shared_b.keys() and len(shared_a) > 20
  for k in shared_a:
    np.testing.assert_allclose(shared_a[k], shared_b[k], rtol=2e-4, atol=2e-5, err_msg=k)
  for prefix, symbol in (("piece_", "W"), ("bias_", "b")):   # sub-head kernels and biases
    heads_a, heads_b = merged_heads(a_list, prefix), merged_heads(b_list, prefix)
    assert heads_a.keys() == heads_b.keys() and heads_a
    for s in heads_a:
      np.testing.assert_allclose(heads_a[s], heads_b[s], rtol=2e-4, atol=2e-5,
                                 err_msg=f"{symbol}_{s}")


@pytest.mark.slow
def test_one_replica_four_devices_and_two_workers_of_two_agree(tmp_path):
  single, init = {}, {}
  for mode in MODES:
    cfg = layout_config(mode, str(tmp_path / f"one-{mode}"), 1)
    run = trainer.Trainer(cfg, tf.distribute.get_strategy())
    init.update({f"{mode}_{i}": v.numpy() for i, v in enumerate(run.variables)})
    before = merged_heads([{f"piece_{n}": k.numpy() for n, (_, k, _) in run.sub_heads.by_name().items()}])
    single[mode] = three_steps(run, fixed_global_batch(cfg))
    after = merged_heads([single[mode]])
    assert all(np.abs(after[s] - before[s]).max() > 1e-4 for s in after)  # every head trained
    biases = merged_heads([single[mode]], "bias_")          # from zero: every bias trained
    assert biases.keys() == after.keys()
    assert all(np.abs(b).max() > 1e-4 for b in biases.values())
  np.savez(tmp_path / "init.npz", **init)
  # (b) one process, 4 logical CPU devices under MirroredStrategy
  for mode in MODES:
    cfg = layout_config(mode, str(tmp_path / f"four-{mode}"), 4)
    run = trainer.Trainer(cfg, cpu_strategy(4))
    held = [len(run.sub_heads.of_replica(r)) for r in range(4)]
    assert held == ([2, 2, 2, 2] if mode == "deepercluster" else [1, 1, 1, 1])
    out = three_steps(run, fixed_global_batch(cfg), [init[f"{mode}_{i}"] for i in
                                                     range(len(run.variables))])
    assert_same([single[mode]], [out])
  # (c) 2 MultiWorkerMirroredStrategy processes with 2 logical CPU devices each
  run_workers(lambda i: [os.path.join(REPO, "tests", "multiworker_job.py"), "steps",
                         str(tmp_path / "init.npz"), str(tmp_path / f"w{i}")])
  for mode in MODES:
    workers = [dict(np.load(tmp_path / f"w{i}-{mode}.npz")) for i in range(2)]
    mine = [{k for k in w if k.startswith(("piece_", "bias_"))} for w in workers]
    assert mine[0] and mine[1] and not mine[0] & mine[1]   # each worker holds only its own
    assert_same([single[mode]], [workers[0], {k: v for k, v in workers[1].items()
                                              if k.startswith(("piece_", "bias_"))}])
    for k in workers[0]:
      if k.startswith("shared_"):
        np.testing.assert_array_equal(workers[0][k], workers[1][k])
