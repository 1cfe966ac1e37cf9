"""The sharded sub-class loss during the rotation warm-up (issue 29): no example has a
sub-class yet (sub_class = -1), so the term is 0 and the sub-heads get no gradient."""

import numpy as np
import tensorflow as tf

from conftest import cpu_strategy
from dc_tf.placement import HeadPlacement
from dc_tf.training import losses

K, D, N = 4, 6, 6


def _sharded(h, sup, sub, w, b):
  """Each of 2 replicas holds half of the one head's K columns (sharded), with the trainer's
  collectives; returns per replica (its sub_loss, its pieces' gradients, flattened)."""
  strategy = cpu_strategy(2)
  placement = HeadPlacement(1, K, 2)
  assert placement.sharded

  def replica_fn():
    ctx = tf.distribute.get_replica_context()
    replica = int(tf.get_static_value(ctx.replica_id_in_sync_group))
    pieces = [(p, tf.constant(w[:, p.start:p.stop]), tf.constant(b[p.start:p.stop]))
              for p in placement.pieces(replica)]
    weights = [v for _, kernel, bias in pieces for v in (kernel, bias)]
    with tf.GradientTape() as tape:
      tape.watch(weights)
      out = losses.partitioned_sub_loss(
          tf.constant(h), tf.constant(sup), tf.constant(sub), pieces, global_batch_size=N,
          sharded=True,
          cross_replica_max=lambda x: tf.reduce_max(ctx.all_gather(tf.identity(x[None]), 0), 0),
          cross_replica_sum=lambda x: ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(x)))
    grads = tape.gradient(out["sub_loss"], weights)
    return out["sub_loss"], tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

  loss, grads = tf.function(lambda: strategy.run(replica_fn))()
  return ([float(v) for v in strategy.experimental_local_results(loss)],
          [g.numpy() for g in strategy.experimental_local_results(grads)])


def test_sharded_sub_loss_is_zero_with_zero_gradient_before_the_first_clustering():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(N, D)).astype(np.float32)
  w = rng.normal(size=(D, K)).astype(np.float32)
  b = rng.normal(size=K).astype(np.float32)
  sup = np.zeros(N, np.int32)
  loss, grads = _sharded(h, sup, np.full(N, -1, np.int32), w, b)
  assert loss == [0.0, 0.0]
  for g in grads:
    assert g.size == (D + 1) * K // 2 and np.isfinite(g).all() and not g.any()
  # The same machinery with sub-classes: the cross-entropy of the labelled rows only.
  sub = np.array([2, -1, 0, 3, -1, 1], np.int32)
  loss, grads = _sharded(h, sup, sub, w, b)
  logits = (h @ w + b).astype(np.float64)
  ce = np.log(np.exp(logits).sum(1)) - logits[np.arange(N), np.maximum(sub, 0)]
  np.testing.assert_allclose(sum(loss), ce[sub >= 0].sum() / N, rtol=1e-5)
  assert all(np.isfinite(g).all() and g.any() for g in grads)
