"""Issue 25: the pool size without reading the pool, shards cut short, and the spreading of
an over-sampled image's copies over the epoch."""

import collections
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import copy_shards, insert_records
from dc_tf.data import reader


def _no_reading(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the records were read")
  monkeypatch.setattr(tf.data, "TFRecordDataset", refuse)
  monkeypatch.setattr(reader, "read_image_ids", refuse)


def test_pool_size_comes_from_the_manifest_without_reading_a_record(tiny_shards, monkeypatch):
  _no_reading(monkeypatch)
  assert reader.pool_size(tiny_shards) == 48
  # A pattern that matches part of the set sums those files' counts only.
  subset = os.path.join(os.path.dirname(tiny_shards), "train-0000[01]-of-*.tfrecord")
  assert reader.pool_size(subset) == 24


def test_without_a_manifest_the_pool_is_counted_once_and_cached(tiny_shards, tmp_path,
                                                                monkeypatch, caplog):
  pattern = copy_shards(tiny_shards, tmp_path / "s")  # the shards only, not train.json
  run = str(tmp_path / "run")
  with caplog.at_level(logging.INFO):
    assert reader.pool_size(pattern, cache_dir=run) == 48
    said = [r.getMessage() for r in caplog.records if "no manifest for" in r.getMessage()]
    assert len(said) == 1 and "counted 48 records" in said[0] and run in said[0]
    with monkeypatch.context() as m:
      _no_reading(m)
      assert reader.pool_size(pattern, cache_dir=run) == 48  # from the cache
    assert sum("no manifest for" in r.getMessage() for r in caplog.records) == 1
  # A changed shard is counted again.
  first = str(tmp_path / "s" / "train-00000-of-00004.tfrecord")
  insert_records(first, [r.numpy() for r in tf.data.TFRecordDataset(first).take(2)])
  os.utime(first, ns=(1, 1))  # a new mtime even on a coarse clock
  assert reader.pool_size(pattern, cache_dir=run) == 50


def test_a_shard_cut_short_is_named_once_and_its_loss_counted_as_skipped(tiny_shards, tmp_path,
                                                                         caplog):
  folder = os.path.dirname(tiny_shards)
  pattern = copy_shards(tiny_shards, tmp_path / "s")
  shutil.copy(os.path.join(folder, "train.json"), tmp_path / "s")
  short = str(tmp_path / "s" / "train-00001-of-00004.tfrecord")
  data = open(short, "rb").read()
  open(short, "wb").write(data[:len(data) * 4 // 10])
  read = sum(1 for _ in tf.data.TFRecordDataset(short).ignore_errors())
  lost = 12 - read
  assert 0 < read < 12

  with caplog.at_level(logging.WARNING):
    batches = list(reader.build_extraction_dataset(pattern, image_size=16, batch_size=64))
    assert sum(len(b["image_id"]) for b in batches) == 48 - lost
    assert max(int(b["skipped"].numpy().max()) for b in batches) == lost
    # The training pipeline, two rounds over the shards: the loss is counted once.
    steps = 2 * (48 - lost) // 8
    train = list(reader.build_train_dataset(
        pattern, image_size=16, batch_size=8, steps=steps, plan=None, num_rotations=4,
        all_rotations=False, seed=0, epoch=0, shuffle_buffer=8))
    assert len(train) == steps
    assert max(int(b["skipped"].numpy().max()) for b in train) == lost
  named = [r.getMessage() for r in caplog.records if short in r.getMessage()]
  assert len(named) == 1, named
  assert f"says 12 records, {read} were read" in named[0]
  assert reader.pool_size(pattern) == 48  # the manifest's count: the epoch keeps its size


def test_draws_in_pass_spread_the_copies_and_sum_to_the_multiplicity():
  for passes in range(1, 10):
    for m in range(0, 21):
      r = np.arange(max(m * passes, 1))
      per_pass = np.stack([reader.draws_in_pass(tf.constant(m, tf.int64), tf.constant(r), p,
                                                passes).numpy() for p in range(passes)])
      assert (per_pass.sum(0) == m).all()
      assert (per_pass >= m // passes).all() and (per_pass <= -(-m // passes)).all()


def _pairs_within(ids: np.ndarray, window: int) -> int:
  """Pairs of draws of one image less than `window` places apart."""
  pairs = 0
  for i in np.unique(ids):
    at = np.flatnonzero(ids == i)
    pairs += int((np.abs(at[:, None] - at[None, :]) < window).sum() - len(at)) // 2
  return pairs


def _uniform_pairs(ids: np.ndarray, window: int) -> float:
  """The same count expected over a uniform random permutation of the same draws."""
  n = len(ids)
  counts = np.unique(ids, return_counts=True)[1]
  near = 1 - (n - window) * (n - window + 1) / (n * (n - 1))
  return float((counts * (counts - 1) / 2).sum() * near)


@pytest.fixture(scope="module")
def pool_ids(tiny_shards):
  return reader.read_image_ids(tiny_shards)


def _skewed_plan(ids, high: int, low: int):
  """6 images of small clusters drawn `high` times each, the others `low` times."""
  mult = np.full(len(ids), low, np.int64)
  mult[:6] = high
  zeros = np.zeros(len(ids), np.int32)
  return reader.EpochPlan(ids, mult, zeros, zeros - 1)


def _epoch(pattern, plan, steps, **kw):
  kw = dict(image_size=16, batch_size=8, steps=steps, plan=plan, num_rotations=4,
            all_rotations=False, seed=1, epoch=2, shuffle_buffer=16, **kw)
  batches = list(reader.build_train_dataset(pattern, **kw))
  return np.concatenate([b["image_id"].numpy() for b in batches]), batches


def test_copies_of_an_image_are_spread_over_the_epoch(tiny_shards, pool_ids):
  """Draws, not rotated views: all_rotations=False. Window = one batch of 8 draws; a
  16-example shuffle buffer for 132 draws, as 4,096 is small next to a worker's epoch."""
  plan = _skewed_plan(pool_ids, high=8, low=2)   # 6 x 8 + 42 x 2 = 132 draws, P = 8
  ids, _ = _epoch(tiny_shards, plan, steps=16)
  assert len(ids) == 128
  got, uniform = _pairs_within(ids, 8), _uniform_pairs(ids, 8)
  assert got <= 1.5 * uniform, (got, uniform)
  # The copies side by side (one pass) put many in one buffer, so in one batch.
  side_by_side, _ = _epoch(tiny_shards, plan, steps=16, max_passes=1)
  assert _pairs_within(side_by_side, 8) > 1.5 * _uniform_pairs(side_by_side, 8)


def test_spread_epoch_resumes_exactly(tiny_shards, pool_ids):
  """The same seed and epoch give the same stream, whose first batches `skip_steps` drops."""
  plan = _skewed_plan(pool_ids, high=3, low=1)   # 60 draws over P = 3 passes
  _, full = _epoch(tiny_shards, plan, steps=7)
  _, resumed = _epoch(tiny_shards, plan, steps=7, skip_steps=3)
  assert len(resumed) == 4
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a["image_id"].numpy(), b["image_id"].numpy())
    np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())


def _draws(pattern, plan, draws, epoch=2, input_context=None, batch_size=1):
  """The first `draws` draws of the epoch (one round when it is all of them), in order."""
  ds = reader.build_train_dataset(pattern, image_size=16, batch_size=batch_size,
                                  steps=draws // batch_size, plan=plan, num_rotations=4,
                                  all_rotations=False, seed=1, epoch=epoch, shuffle_buffer=256,
                                  input_context=input_context)
  return np.concatenate([b["image_id"].numpy() for b in ds])


def test_a_plan_split_between_two_workers_draws_the_plan_once(tiny_shards, pool_ids):
  """Issue 29: each worker reads its own shard files and draws, of the global plan, the
  copies of the images those hold; the two workers' draws together are the plan's."""
  mult = np.random.default_rng(0).integers(0, 4, len(pool_ids))   # 0..3 copies, P = 3
  zeros = np.zeros(len(pool_ids), np.int32)
  plan = reader.EpochPlan(pool_ids, mult, zeros, zeros - 1)
  want = dict(zip(pool_ids, mult))
  drawn = []
  for w in (0, 1):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=w,
                                     num_replicas_in_sync=2)
    mine = reader.read_image_ids(tiny_shards, ctx)
    drawn.append(_draws(tiny_shards, plan, int(sum(want[i] for i in mine)), input_context=ctx))
    assert set(drawn[-1]) <= set(mine)
  assert not set(drawn[0]) & set(drawn[1])
  got = collections.Counter(np.concatenate(drawn).tolist())
  assert got == {i: m for i, m in want.items() if m}


def test_the_shuffle_changes_with_the_epoch(tiny_shards, pool_ids):
  """Issue 29: epochs 0 and 1 draw the same images in other orders; one epoch's order is
  the same every time it is built (a resumed run relies on it)."""
  n = len(pool_ids)
  first, second, again = (_draws(tiny_shards, None, n, epoch=e, batch_size=8)
                           for e in (0, 1, 1))
  assert sorted(first) == sorted(second) == sorted(pool_ids)
  assert list(second) == list(again) and list(first) != list(second)
