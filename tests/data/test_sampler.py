import numpy as np

from dc_tf.data import sampler


def test_uniform_over_labels_and_deterministic():
  labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
  idx = sampler.uniform_epoch_sample(labels, 300, seed=0, epoch=0)
  assert len(idx) == 300
  per_label = np.bincount(labels[idx], minlength=3)
  assert per_label.min() >= 99  # 300 // 3 + 1 = 101 drawn each, truncated to 300
  np.testing.assert_array_equal(idx, sampler.uniform_epoch_sample(labels, 300, 0, 0))
  assert not np.array_equal(idx, sampler.uniform_epoch_sample(labels, 300, 0, 1))


def test_replacement_only_for_small_clusters():
  labels = np.array([0] * 200 + [1] * 3)
  idx = sampler.uniform_epoch_sample(labels, 100, seed=1, epoch=0)
  big = idx[labels[idx] == 0]
  assert len(np.unique(big)) == len(big)  # 51 draws from 200: no repeats


def test_multiplicity_sums_to_epoch_size():
  labels = np.arange(50) % 7
  m = sampler.epoch_multiplicity(labels, 123, 0, 0)
  assert m.sum() == 123 and m.shape == (50,)
  plain = sampler.epoch_multiplicity(labels, 100, 0, 0, uniform=False)
  assert (plain == 2).all()
