"""Local MultiWorkerMirroredStrategy jobs for tests: N processes on 127.0.0.1, given TF_CONFIG
or (slurm=True) the variables srun sets for the tasks of a 1-node job step."""

import json
import os
import socket
import subprocess
import sys
import time


def free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def consecutive_free_ports(n):
  """A port p with p .. p+n-1 free on 127.0.0.1 (the resolver numbers a node's tasks so)."""
  for _ in range(100):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      base = s.getsockname()[1]
    socks = []
    try:
      for p in range(base, base + n):
        socks.append(socket.socket())
        socks[-1].bind(("127.0.0.1", p))
      return base
    except OSError:
      continue
    finally:
      for s in socks:
        s.close()
  raise RuntimeError(f"no {n} consecutive free ports")


def slurm_env(rank, n):
  """What srun sets for task `rank` of a 1-node, n-task job step on 127.0.0.1 (and no
  TF_CONFIG, no GPUs: PATH holds no nvidia-smi)."""
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM", "TF_CONFIG", "CUDA_VISIBLE_DEVICES"))}
  return dict(clean, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
              SLURM_NTASKS=str(n), SLURM_NNODES="1", SLURM_STEP_NUM_TASKS=str(n),
              SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="127.0.0.1",
              SLURM_JOB_NODELIST="127.0.0.1", SLURM_STEP_TASKS_PER_NODE=str(n),
              SLURM_TASKS_PER_NODE=str(n), SLURMD_NODENAME="127.0.0.1",
              PATH=os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin")


def tf_config(addresses, i, chief=False):
  """TF_CONFIG of process i: all workers, or (chief=True) process 0 as the chief."""
  if not chief:
    return {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}}
  task = {"type": "chief", "index": 0} if i == 0 else {"type": "worker", "index": i - 1}
  return {"cluster": {"chief": addresses[:1], "worker": addresses[1:]}, "task": task}


def start_workers(args, n=2, chief=False, slurm=False):
  """Starts n worker processes running `python args(i)`; output goes to a temp file each.
  With chief=True, process 0 is TF_CONFIG's chief and the others its workers. With
  slurm=True, train.py's args get --cluster=slurm and the processes srun's variables
  (slurm_env) instead of TF_CONFIG; each process's slurm_port_base says which ports."""
  base = consecutive_free_ports(n) if slurm else None
  workers = None if slurm else [f"127.0.0.1:{p}" for p in free_ports(n)]
  procs = []
  for i in range(n):
    if slurm:
      env = dict(slurm_env(i, n), TF_CPP_MIN_LOG_LEVEL="2")
      argv = [*args(i), "--cluster=slurm", f"--slurm_port_base={base}"]
    else:
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                 TF_CONFIG=json.dumps(tf_config(workers, i, chief)))
      argv = args(i)
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"worker-{os.getpid()}-{time.time_ns()}-{i}.log"), "w+")
    p = subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    p.log, p.slurm_port_base = log, base
    procs.append(p)
  return procs


def output(proc):
  proc.log.flush()
  proc.log.seek(0)
  return proc.log.read()


def wait_all(procs, timeout=420):
  """Waits for every process; returns (return codes, outputs). Kills all on timeout."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise
  return [p.returncode for p in procs], [output(p) for p in procs]


def run_workers(args, timeout=420, n=2, chief=False):
  codes, outs = wait_all(start_workers(args, n, chief), timeout)
  for code, out in zip(codes, outs):
    assert code == 0, out[-3000:]
  return outs


def wait_for(predicate, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.05)
  raise TimeoutError(f"waited {timeout} s for {what}")
