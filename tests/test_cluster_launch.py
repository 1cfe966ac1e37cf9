"""Launching as users do (issue 28): TF_CONFIG from TFJob / Vertex AI as is, and --cluster=slurm
building it from the SLURM job step with TF's SlurmClusterResolver."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from dc_tf import distribute as dist
from dc_tf.config import UserError


def unset(monkeypatch, name):
  """Deletes an environment variable, restoring its state at the end even when the code under
  test sets it (monkeypatch.delenv of an absent name records nothing to undo)."""
  monkeypatch.setenv(name, "")
  monkeypatch.delenv(name)


def slurm_step(monkeypatch, procid, nodelist, tasks_per_node, ntasks, node=None):
  """The variables srun sets for task `procid` of a job step (and none of a parent job's)."""
  for name in list(os.environ):
    if name.startswith(("SLURM_", "SLURMD_")):
      monkeypatch.delenv(name)
  unset(monkeypatch, "TF_CONFIG")
  env = {"SLURM_PROCID": procid, "SLURM_NTASKS": ntasks, "SLURM_STEP_NUM_TASKS": ntasks,
         "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
         "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_TASKS_PER_NODE": tasks_per_node}
  if node:
    env["SLURMD_NODENAME"] = node
  for name, value in env.items():
    monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize("nodelist,tasks_per_node,procid,workers", [
    ("node[1-2]", "1(x2)", 1, ["node1:9000", "node2:9000"]),               # 2 nodes x 1 task
    ("node1", "2", 1, ["node1:9000", "node1:9001"]),                       # 1 node x 2 tasks
    ("gpu[07-08]", "2(x2)", 2, ["gpu07:9000", "gpu07:9001", "gpu08:9000", "gpu08:9001"]),
])
def test_slurm_step_becomes_tf_config(monkeypatch, nodelist, tasks_per_node, procid, workers):
  slurm_step(monkeypatch, procid, nodelist, tasks_per_node, len(workers),
             node=workers[procid].split(":")[0])
  unset(monkeypatch, "CUDA_VISIBLE_DEVICES")
  got = dist.tf_config_from_slurm(port_base=9000, gpus_per_node=0)
  assert got == {"cluster": {"worker": workers}, "task": {"type": "worker", "index": procid}}
  assert "CUDA_VISIBLE_DEVICES" not in os.environ   # a CPU node: no devices assigned


def test_gpus_of_a_node_are_split_between_its_tasks(monkeypatch):
  slurm_step(monkeypatch, 1, "node1", "2", 2)
  unset(monkeypatch, "CUDA_VISIBLE_DEVICES")
  assert dist.tf_config_from_slurm(gpus_per_node=8)["task"]["index"] == 1
  assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
  slurm_step(monkeypatch, 0, "node1", "2", 2)
  with pytest.raises(UserError, match=r"1 GPU\(s\) on this node for 2 tasks"):
    dist.tf_config_from_slurm(gpus_per_node=1)


def test_gpus_per_node_come_from_nvidia_smi_or_are_none(monkeypatch, tmp_path):
  unset(monkeypatch, "CUDA_VISIBLE_DEVICES")
  monkeypatch.setenv("PATH", str(tmp_path))
  assert dist.slurm_gpus_per_node() == 0                       # no nvidia-smi: a CPU node
  smi = tmp_path / "nvidia-smi"
  smi.write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: a)'\necho 'GPU 1: H100 (UUID: b)'\n")
  smi.chmod(0o755)
  assert dist.slurm_gpus_per_node() == 2
  smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
  assert dist.slurm_gpus_per_node() == 0                       # a broken driver: no crash
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")              # bound by SLURM: kept as is
  assert dist.slurm_gpus_per_node() is None


def test_slurm_outside_a_job_step_names_the_flag_and_the_variables(monkeypatch):
  slurm_step(monkeypatch, 0, "node1", "1", 1)
  monkeypatch.delenv("SLURM_STEP_NODELIST")
  monkeypatch.delenv("SLURM_STEP_TASKS_PER_NODE")
  with pytest.raises(UserError, match=r"^--cluster=slurm: SLURM_STEP_NODELIST, "
                                      r"SLURM_STEP_TASKS_PER_NODE not set"):
    dist.set_up_cluster("slurm")


def test_slurm_refuses_a_tf_config_already_set(monkeypatch):
  slurm_step(monkeypatch, 0, "node1", "1", 1)
  monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}}))
  with pytest.raises(UserError, match="TF_CONFIG is already set"):
    dist.set_up_cluster("slurm")


def test_tf_config_mode_refuses_several_slurm_tasks_without_tf_config(monkeypatch):
  slurm_step(monkeypatch, 0, "node[1-2]", "1(x2)", 2)
  with pytest.raises(UserError, match="each would train alone.*--cluster=slurm"):
    dist.set_up_cluster("tf_config")
  tfjob = {"cluster": {"worker": ["w0:2222", "w1:2222"]}, "task": {"type": "worker", "index": 1}}
  monkeypatch.setenv("TF_CONFIG", json.dumps(tfjob))
  dist.set_up_cluster("tf_config")                             # as TFJob / Vertex AI set it
  assert json.loads(os.environ["TF_CONFIG"]) == tfjob


def test_nodes_the_resolver_misorders_are_refused(monkeypatch):
  """SLURM's rank 1 runs on node10 (after node9); the resolver sorts node10 first."""
  slurm_step(monkeypatch, 1, "node[9-10]", "1(x2)", 2, node="node10")
  with pytest.raises(UserError, match="puts task 1 on node9, but it runs on node10"):
    dist.tf_config_from_slurm(gpus_per_node=0)


def test_set_up_cluster_writes_tf_config(monkeypatch):
  slurm_step(monkeypatch, 1, "node[1-2]", "1(x2)", 2, node="node2")
  monkeypatch.setattr(dist, "slurm_gpus_per_node", lambda: 0)
  dist.set_up_cluster("slurm", slurm_port_base=7000)
  assert json.loads(os.environ["TF_CONFIG"]) == {
      "cluster": {"worker": ["node1:7000", "node2:7000"]}, "task": {"type": "worker", "index": 1}}
  assert dist.num_workers_in_tf_config() == 2


@pytest.mark.slow
def test_cluster_slurm_outside_a_job_is_one_line():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k != "TF_CONFIG"}
  out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--cluster=slurm"],
                       capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and lines[0].startswith(
      "error: --cluster=slurm: SLURM_PROCID, SLURM_STEP_NUM_TASKS"), out.stderr[-2000:]


@pytest.mark.slow
def test_two_slurm_tasks_train_in_step_as_mwms_workers(slurm_two_worker_run):
  """conftest's slurm_two_worker_run: two train.py processes given what srun sets for a
  1-node, 2-task step (no TF_CONFIG). --cluster=slurm makes them the 2 workers of one MWMS
  job. That they end on the same step with the same weights is asserted on this same run
  by tests/test_multiworker.py (test_two_worker_training_ends_with_identical_weights...)."""
  run, base = slurm_two_worker_run, slurm_two_worker_run["port_base"]
  outs = run["outputs"]
  assert f"--cluster=slurm: worker 1 of 2, cluster {{'worker': ['127.0.0.1:{base}', " \
         f"'127.0.0.1:{base + 1}']}}" in outs[1], outs[1][-3000:]
  assert "(CollectiveAllReduceStrategy, 2 replicas;" in outs[0], outs[0][-3000:]  # MWMS
