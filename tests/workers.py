"""Local MultiWorkerMirroredStrategy jobs for tests: N processes, TF_CONFIG on 127.0.0.1."""

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


def tf_config(addresses, i, chief=False):
  """TF_CONFIG of process i: all workers, or (chief=True) process 0 as the chief."""
  if not chief:
    return {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}}
  task = {"type": "chief", "index": 0} if i == 0 else {"type": "worker", "index": i - 1}
  return {"cluster": {"chief": addresses[:1], "worker": addresses[1:]}, "task": task}


def start_workers(args, n=2, chief=False):
  """Starts n worker processes running `python args(i)`; output goes to a temp file each.
  With chief=True, process 0 is TF_CONFIG's chief and the others its workers."""
  workers = [f"127.0.0.1:{p}" for p in free_ports(n)]
  procs = []
  for i in range(n):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               TF_CONFIG=json.dumps(tf_config(workers, i, chief)))
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"worker-{os.getpid()}-{time.time_ns()}-{i}.log"), "w+")
    p = subprocess.Popen([sys.executable, *args(i)], env=env, stdout=log, stderr=subprocess.STDOUT)
    p.log = log
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
