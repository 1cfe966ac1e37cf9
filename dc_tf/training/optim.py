"""SGD with momentum and coupled L2 weight decay, as torch.optim.SGD in the original:

  d = g + wd * w;   v = mu * v + d;   w = w - lr * v

Ours rather than Keras': the Keras 3 optimizer's cross-replica gradient reduction fails
under MultiWorkerMirroredStrategy (keras-team/keras#20585), so replicas all-reduce their
gradients themselves (`sum_gradients`) and `apply` updates every copy of each variable
through `strategy.extended.update`. Momentum slots are plain (mirrored) variables, so they
are checkpointed and can be reset for re-initialised heads.
"""

from __future__ import annotations

import tensorflow as tf


def _tf_var(v):
  """The tf.Variable (possibly a MirroredVariable) behind a Keras variable."""
  return getattr(v, "value", v) if not isinstance(v, tf.Variable) else v


class SGD(tf.Module):
  """Create under `strategy.scope()`, call `apply` in cross-replica context.

  Args:
    variables: the trainable variables (Keras or tf).
    lr, momentum, weight_decay: as torch.optim.SGD.
  """

  def __init__(self, variables, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    super().__init__(name="sgd")
    self.variables_ = [_tf_var(v) for v in variables]
    self.learning_rate = tf.Variable(lr, dtype=tf.float32, trainable=False, name="lr")
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
    self.momentum, self.weight_decay = momentum, weight_decay
    self.slots = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                              name=v.name.split(":")[0].replace("/", "_") + "_momentum")
                  for v in self.variables_]

  def apply(self, grads):
    """One update from summed gradients (cross-replica context)."""
    strategy = tf.distribute.get_strategy()
    lr, mu, wd = self.learning_rate, self.momentum, self.weight_decay

    def update(var, grad, slot):
      grad = tf.cast(grad, var.dtype)
      d = grad + wd * var if wd else grad
      new_slot = slot.assign(mu * slot + d)
      return var.assign_sub(tf.cast(lr, var.dtype) * new_slot)

    for var, grad, slot in zip(self.variables_, grads, self.slots):
      if grad is not None:
        strategy.extended.update(var, update, args=(grad, slot), group=False)
    self.iterations.assign_add(1)

  def reset_slots(self, variables) -> None:
    wanted = {id(_tf_var(v)) for v in variables}
    for var, slot in zip(self.variables_, self.slots):
      if id(var) in wanted:
        slot.assign(tf.zeros_like(slot))


def sum_gradients(grads):
  """All-reduce (sum) per-replica gradients in replica context."""
  ctx = tf.distribute.get_replica_context()
  present = [g for g in grads if g is not None]
  reduced = iter(ctx.all_reduce(tf.distribute.ReduceOp.SUM, present)) if present else iter(())
  return [next(reduced) if g is not None else None for g in grads]
