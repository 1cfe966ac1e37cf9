"""The uniform-over-clusters sampler (DeepCluster's `UnifLabelSampler`), as pure functions.

An epoch draws `epoch_size // n_nonempty + 1` images from every non-empty pseudo-label
(with replacement only where a cluster has fewer images than that), shuffles, and
truncates to `epoch_size`. Seeded by (seed, epoch): every worker computes the same
sample from the same global id -> label table, so nothing is exchanged.
"""

from __future__ import annotations

import numpy as np


def uniform_epoch_sample(labels: np.ndarray, epoch_size: int, seed: int, epoch: int) -> np.ndarray:
  """Indices into `labels` for one epoch, uniformly spread over the label values.

  Args:
    labels: int array [N], the pseudo-label of each image (any integer values).
    epoch_size: number of draws in the epoch.
    seed, epoch: the draw depends on these only.
  Returns:
    int64 array [epoch_size] of indices in [0, N).
  """
  labels = np.asarray(labels)
  if labels.size == 0:
    raise ValueError("uniform_epoch_sample: empty label table")
  rng = np.random.default_rng([seed, epoch])
  order = np.argsort(labels, kind="stable")
  values, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
  per_label = epoch_size // len(values) + 1
  draws = []
  for start, count in zip(starts, counts):
    members = order[start:start + count]
    draws.append(rng.choice(members, per_label, replace=count < per_label))
  indices = np.concatenate(draws)
  rng.shuffle(indices)
  return indices[:epoch_size].astype(np.int64)


def epoch_multiplicity(labels: np.ndarray, epoch_size: int, seed: int, epoch: int,
                       uniform: bool = True) -> np.ndarray:
  """How many times each image appears in the epoch (int64 [N]).

  With `uniform=False`, every image appears once per pass over the pool (epoch_size
  draws, cycling through a seeded permutation).
  """
  n = len(labels)
  if uniform:
    indices = uniform_epoch_sample(labels, epoch_size, seed, epoch)
  else:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    indices = np.resize(perm, epoch_size)
  return np.bincount(indices, minlength=n).astype(np.int64)
