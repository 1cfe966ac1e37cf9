"""Shared helpers for the benchmarks: machine facts, timing, JSON output."""

import json
import os
import platform
import resource
import threading
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
  import tensorflow as tf
  return {"cpus": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "tensorflow": tf.__version__,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write(name: str, payload: dict) -> str:
  os.makedirs(RESULTS, exist_ok=True)
  path = os.path.join(RESULTS, f"{name}.json")
  with open(path, "w") as f:
    json.dump({"machine": machine(), **payload}, f, indent=1, default=float)
  return path


def timed(fn, repeat: int = 1):
  """Best wall time of `repeat` calls, and the last result."""
  best, out = float("inf"), None
  for _ in range(repeat):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


class PeakRSS:
  """Samples this process's resident memory; `peak - start` is the extra it used."""

  def __enter__(self):
    self.start = self._rss()
    self.peak = self.start
    self._stop = False
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop:
      self.peak = max(self.peak, self._rss())
      time.sleep(0.01)

  def __exit__(self, *exc):
    self._stop = True
    self._thread.join()

  @staticmethod
  def _rss() -> int:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS"):
          return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
