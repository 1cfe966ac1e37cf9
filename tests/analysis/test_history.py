"""The assignment history (issue 38 item 1): one table per reassignment under
MODEL_DIR/assignments, written atomically by the chief, pruned to --keep_assignments, listed
in the log, and kept across a resume."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from dc_tf.config import ExperimentConfig
from dc_tf.training import checkpointing


def test_tables_are_kept_pruned_and_read_back(tmp_path):
  ids = np.arange(10, 30, dtype=np.int64)
  rng = np.random.default_rng(0)
  tables = {e: rng.integers(0, 7, len(ids)).astype(np.int32) for e in (0, 3, 6)}
  for epoch, labels in tables.items():
    kept = checkpointing.save_assignments(str(tmp_path), epoch, ids, labels, keep=2)
  assert kept == [3, 6] == checkpointing.assignment_epochs(str(tmp_path))
  for epoch in kept:
    got_ids, got = checkpointing.load_assignments(str(tmp_path), epoch)
    assert got.dtype == np.int32 and got_ids.dtype == np.int64
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got, tables[epoch])
  # no temporary file left behind: every write was renamed into place
  assert sorted(os.listdir(tmp_path / "assignments")) == ["ids.npy", "table-3.npy", "table-6.npy"]
  with pytest.raises(checkpointing.CheckpointError, match="epoch 0"):
    checkpointing.load_assignments(str(tmp_path), 0)
  # a table over other ids (records dropped) carries its own ids; the others keep theirs
  fewer = ids[::2]
  checkpointing.save_assignments(str(tmp_path), 9, fewer, np.zeros(len(fewer), np.int32))
  np.testing.assert_array_equal(checkpointing.load_assignments(str(tmp_path), 9)[0], fewer)
  np.testing.assert_array_equal(checkpointing.load_assignments(str(tmp_path), 6)[0], ids)
  # epoch 9 again (a resumed run redoing it), now over the shared ids: its old own ids go
  checkpointing.save_assignments(str(tmp_path), 9, ids, np.ones(len(ids), np.int32))
  got_ids, got = checkpointing.load_assignments(str(tmp_path), 9)
  np.testing.assert_array_equal(got_ids, ids)
  np.testing.assert_array_equal(got, np.ones(len(ids), np.int32))
  assert not os.path.exists(tmp_path / "assignments" / "ids-9.npy")


def test_a_training_run_keeps_every_reassignments_table(clean_run):
  records = [json.loads(line) for line in open(os.path.join(clean_run, "log.jsonl"))]
  reassigns = [r for r in records if r.get("event") == "reassign"]
  epochs = [r["epoch"] for r in reassigns]
  assert len(epochs) >= 2 and checkpointing.assignment_epochs(clean_run) == epochs
  assert reassigns[-1]["assignment_tables"] == epochs
  config = checkpointing.read_config(clean_run)
  reader = tf.train.load_checkpoint(checkpointing.latest_checkpoint(clean_run))
  value = lambda name: reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")  # noqa: E731
  ids, labels = checkpointing.load_assignments(clean_run, epochs[-1])
  np.testing.assert_array_equal(ids, value("table_ids"))
  np.testing.assert_array_equal(
      labels, value("table_super") * config.clustering.k + value("table_sub"))


def test_a_resumed_run_writes_a_lost_table_and_rewrites_none(clean_run, tmp_path):
  from dc_tf.training import trainer
  run_dir = str(tmp_path / "run")
  shutil.copytree(clean_run, run_dir)
  epochs = checkpointing.assignment_epochs(run_dir)
  folder = os.path.join(run_dir, "assignments")
  newest, older = (os.path.join(folder, f"table-{e}.npy") for e in (epochs[-1], epochs[0]))
  want = np.load(newest)
  os.remove(newest)                              # a crash between checkpoint and table
  os.utime(older, (1, 1))
  config = ExperimentConfig.from_dict(
      {**checkpointing.read_config(clean_run).to_dict(),
       "train": {**checkpointing.read_config(clean_run).train.__dict__, "model_dir": run_dir}})
  trainer.Trainer(config, tf.distribute.get_strategy()).restore()
  np.testing.assert_array_equal(np.load(newest), want)
  assert os.stat(older).st_mtime == 1            # the kept one untouched


def test_nmi_refuses_a_table_whose_ids_do_not_match_its_rows(tmp_path):
  """`python -m dc_tf.analysis nmi` memory-maps local tables; one whose row count is not its
  ids' is refused with the file named, as load_assignments refuses it."""
  from dc_tf.analysis import nmi
  ids = np.arange(20, dtype=np.int64)
  checkpointing.save_assignments(str(tmp_path), 0, ids, np.zeros(len(ids), np.int32))
  assert len(nmi.kept_tables(str(tmp_path))[0].labels) == 20
  np.save(tmp_path / "assignments" / "table-0.npy", np.zeros(19, np.int32))   # cut short
  with pytest.raises(checkpointing.CheckpointError, match=r"table-0\.npy has 19 rows, its ids 20"):
    nmi.kept_tables(str(tmp_path))
