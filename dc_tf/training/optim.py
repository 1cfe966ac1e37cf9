"""SGD with momentum and coupled L2 weight decay, as torch.optim.SGD in the original:

  d = g + wd * w;   v = mu * v + d;   w = w - lr * v

Ours rather than Keras': the Keras 3 optimizer's cross-replica gradient reduction fails
under MultiWorkerMirroredStrategy (keras-team/keras#20585), so replicas all-reduce their
gradients themselves (`sum_gradients`) and `apply` updates every copy of each variable
through `strategy.extended.update`. Momentum slots are plain (mirrored) variables, so they
are checkpointed and can be reset for re-initialised heads.

Sub-head pieces live on one replica each (`dc_tf.placement`): `LocalSGD` keeps their
momentum beside them and updates them in replica context, with the same rule (`sgd_update`).
"""

from __future__ import annotations

import tensorflow as tf


def _tf_var(v):
  """The tf.Variable (possibly a MirroredVariable) behind a Keras variable."""
  return getattr(v, "value", v) if not isinstance(v, tf.Variable) else v


def sgd_update(var, grad, slot, lr, momentum: float, weight_decay: float):
  """torch.optim.SGD's rule, applied in place: d = g + wd*w; v = mu*v + d; w -= lr*v."""
  grad = tf.cast(grad, var.dtype)
  d = grad + weight_decay * var if weight_decay else grad
  new_slot = slot.assign(momentum * slot + d)
  return var.assign_sub(tf.cast(lr, var.dtype) * new_slot)


def _slot_for(v):
  return tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                     name=v.name.split(":")[0].replace("/", "_") + "_momentum")


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
    self.slots = [_slot_for(v) for v in self.variables_]

  def apply(self, grads):
    """One update from summed gradients (cross-replica context)."""
    strategy = tf.distribute.get_strategy()
    lr, mu, wd = self.learning_rate, self.momentum, self.weight_decay

    def update(var, grad, slot):
      return sgd_update(var, grad, slot, lr, mu, wd)

    for var, grad, slot in zip(self.variables_, grads, self.slots):
      if grad is not None:
        strategy.extended.update(var, update, args=(grad, slot), group=False)
    self.iterations.assign_add(1)

  def reset_slots(self, variables) -> None:
    wanted = {id(_tf_var(v)) for v in variables}
    for var, slot in zip(self.variables_, self.slots):
      if id(var) in wanted:
        slot.assign(tf.zeros_like(slot))


class LocalSGD(tf.Module):
  """SGD for variables that live on one replica (sub-head pieces): each slot sits on its
  variable's device, and `apply` runs in that replica's context, with no collective.

  Args:
    variables: plain tf.Variables, each placed on its replica's device.
    momentum, weight_decay: as SGD (the learning rate is passed per step).
  """

  def __init__(self, variables, momentum: float = 0.9, weight_decay: float = 0.0):
    super().__init__(name="local_sgd")
    self.momentum, self.weight_decay = momentum, weight_decay
    self.slots = {}
    for v in variables:
      with tf.device(v.device):
        self.slots[id(v)] = _slot_for(v)

  def slot(self, var) -> tf.Variable:
    return self.slots[id(var)]

  def apply(self, grads_and_vars, lr) -> None:
    for grad, var in grads_and_vars:
      if grad is not None:
        sgd_update(var, grad, self.slots[id(var)], lr, self.momentum, self.weight_decay)

  def reset_slots(self, variables) -> None:
    for v in variables:
      self.slots[id(v)].assign(tf.zeros_like(v))


def sum_gradients(grads):
  """All-reduce (sum) per-replica gradients in replica context."""
  ctx = tf.distribute.get_replica_context()
  present = [g for g in grads if g is not None]
  reduced = iter(ctx.all_reduce(tf.distribute.ReduceOp.SUM, present)) if present else iter(())
  return [next(reduced) if g is not None else None for g in grads]
