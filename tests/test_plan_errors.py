"""The plan's refusal of a layout whose replicas do not divide into workers (issue 29)."""

import pytest

from dc_tf import plan
from dc_tf.config import ExperimentConfig, UserError

CFG = ExperimentConfig().replace(clustering={"m": 2, "k": 12}).validate()


@pytest.mark.parametrize("fn", [plan.memory_plan, plan.reassignment_plan])
def test_replicas_that_do_not_divide_into_workers_are_refused_naming_both_flags(fn):
  with pytest.raises(ValueError, match=r"--num_replicas=6 is not a multiple of "
                                       r"--replicas_per_worker=4"):
    fn(CFG, 6, 4, 1000)
  assert fn(CFG, 8, 4, 1000)["workers"] == 2            # a layout that divides is planned


@pytest.mark.parametrize("fn", [plan.memory_plan, plan.reassignment_plan])
def test_a_bad_layout_is_a_user_error_one_line_on_the_command_line(fn):
  for replicas, per_worker in ((6, 4), (4, 0), (0, 1)):
    with pytest.raises(UserError, match="--replicas_per_worker|--num_replicas"):
      fn(CFG, replicas, per_worker, 1000)
