r"""Stuck-peer guard over a long run: 2 MultiWorkerMirroredStrategy workers on 127.0.0.1 train
one RotNet epoch of the embedded data (1,250 steps, one step per loop, so as many collective
calls as possible) with --collective_timeout=60; records the exit codes, the steps done and
each worker's peak thread count (TF's per-collective timeout, used before, started a thread
per collective call: 16,083 threads and an abort after ~92 steps). Writes
benchmarks/results/collective_soak.json.

  python benchmarks/collective_soak.py
"""

import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from workers import output, start_workers  # noqa: E402


def threads(pid: int) -> int:
  with open(f"/proc/{pid}/status") as f:
    return int(next(line for line in f if line.startswith("Threads")).split()[1])


def main():
  model_dir = tempfile.mkdtemp()
  cmd = [os.path.join(REPO, "train.py"), f"--data_pattern={REPO}/data/train-*.tfrecord",
         f"--model_dir={model_dir}", "--mode=rotnet", "--image_size=32", "--width=0.125",
         "--fc_dim=32", "--batch_per_replica=8", "--steps_per_loop=1", "--epochs=1",
         "--knn_monitor=false", "--collective_timeout=60", "--checkpoint_every=0"]
  start = time.time()
  procs = start_workers(lambda i: cmd)
  peak = [0] * len(procs)
  while any(p.poll() is None for p in procs):
    for i, p in enumerate(procs):
      try:
        peak[i] = max(peak[i], threads(p.pid))
      except (OSError, StopIteration):
        pass
    time.sleep(1)
  log = os.path.join(model_dir, "log.jsonl")
  steps = max((json.loads(line).get("step", 0) for line in open(log)), default=0) \
      if os.path.exists(log) else 0
  result = {"workers": len(procs), "collective_timeout_s": 60, "steps": steps,
            "exit_codes": [p.returncode for p in procs], "peak_threads": peak,
            "seconds": round(time.time() - start, 1)}
  if any(p.returncode for p in procs):
    result["tail"] = [output(p)[-1500:] for p in procs]
  print(common.write("collective_soak", result))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
