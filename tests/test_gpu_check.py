"""benchmarks/gpu_check.py's logic at tiny shapes on the CPU (issue 25, item 10): the GPU
check is run by users with GPUs, so its sections, keys and reference are checked here."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow   # one subprocess: three train-step traces, one XLA compile


def test_the_tiny_gpu_check_writes_every_section(tmp_path):
  out = tmp_path / "gpu_check.json"
  run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"),
                        "--tiny", f"--out={out}"], capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path))          # not the repo: paths must not rely on it
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["tiny"] and result["machine"]["tensorflow"]
  assert "gpus" in result and "tf32_enabled_by_default" in result
  sections = result["sections"]
  assert set(sections) == {"train_step", "kmeans", "extraction", "input_pipeline"}
  for name, section in sections.items():
    assert "error" not in section, (name, section.get("traceback", section))
  rates = {"train_step": ["float32_examples_per_s", "mixed_precision_examples_per_s",
                          "jit_compile_examples_per_s"],
           "kmeans": ["tflops"], "extraction": ["images_per_s"],
           "input_pipeline": ["images_per_s"]}
  for name, keys in rates.items():
    for key in keys:
      assert sections[name][key] > 0, (name, key, sections[name])
  km = sections["kmeans"]
  assert km["tf32_enabled_in_kmeans"] is False and km["rows_used"] == km["rows"]
  assert km["seconds_per_pass"] > 0 and km["reference_rows"] >= km["k"]
  # The TF pass's assignment against the float64 argmin over the same centroids.
  assert 0 <= km["sample_inertia_relative_error"] < 1e-6
  assert km["sample_assignment_optimal_share"] > 0.99
  assert km["inertia_per_row"] == pytest.approx(km["reference_inertia_per_row_sample"], rel=0.2)
