r"""Does uint8 input slow the train step? The training pipeline hands the trunk uint8 pixels
(normalised on the replica's device); this times the demo trunk's forward + backward fed
uint8 against the same step fed float32 pixels normalised beforehand, alternating rounds in
one process, and reports whether TF logged oneDNN's "supports DT_UINT8 only on platforms
with AVX-512" fallback line while doing it (the child runs with C++ logging on).
Writes benchmarks/results/uint8_input.json.

  python benchmarks/uint8_input.py [--steps=10] [--rounds=5]
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(steps: int, rounds: int) -> dict:
  import numpy as np
  import tensorflow as tf
  from dc_tf.data import preprocess
  from dc_tf.models import vgg
  trunk = vgg.build_trunk(32, 0.25, 512)
  pixels = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.uint8)
  as_uint8 = tf.constant(pixels)
  as_float = preprocess.normalize(tf.constant(pixels))

  def step_fn(normalise):
    @tf.function
    def step(x):
      with tf.GradientTape() as tape:
        h = trunk(normalise(x), training=True)["fc7"]
        loss = tf.reduce_mean(tf.square(h))
      return tape.gradient(loss, trunk.trainable_variables)
    return step
  runs = {"uint8": (step_fn(preprocess.normalize), as_uint8),
          "float32": (step_fn(tf.identity), as_float)}
  for fn, x in runs.values():   # trace and warm up
    fn(x)
  times = {k: [] for k in runs}
  for _ in range(rounds):
    for name, (fn, x) in runs.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        out = fn(x)
      float(out[0][0, 0, 0, 0])   # wait for the last step
      times[name].append((time.perf_counter() - t0) / steps)
  med = {k: float(np.median(v)) for k, v in times.items()}
  result = {"seconds_per_step_median": med, "seconds_per_step_rounds": times,
            "uint8_over_float32": med["uint8"] / med["float32"]}
  result.update(pipeline_rotation(rounds))
  return result


def pipeline_rotation(rounds: int, images: int = 20000) -> dict:
  """The input pipeline's rotation of uint8 crops: preprocess.rotate (through a float32 view)
  against a plain uint8 rot90 (a uint8 transpose: oneDNN's fallback line on CPUs without
  AVX-512 support for it), each a tf.data map over the same 32 px images, alternating rounds.
  The plain one runs last, so a fallback line in the log is its own."""
  import numpy as np
  import tensorflow as tf
  from dc_tf.data import preprocess
  image = tf.constant(np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8))
  maps = {"project_rotate": lambda x: preprocess.rotate(x, 1),
          "plain_uint8_rot90": lambda x: tf.image.rot90(x, k=1)}
  times = {k: [] for k in maps}
  for r in range(rounds):
    for name, fn in maps.items():
      if r == 0 and name == "plain_uint8_rot90":
        print("PLAIN uint8 rot90 from here", file=sys.stderr, flush=True)
      ds = tf.data.Dataset.from_tensors(image).repeat(images).map(fn)
      t0 = time.perf_counter()
      for _ in ds:
        pass
      times[name].append((time.perf_counter() - t0) / images)
  med = {k: float(np.median(v)) for k, v in times.items()}
  return {"rotation_seconds_per_image_median": med,
          "rotation_project_over_plain_uint8": med["project_rotate"] / med["plain_uint8_rot90"]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--child", action="store_true")
  args = ap.parse_args()
  if args.child:
    print("RESULT " + json.dumps(child(args.steps, args.rounds)))
    return
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                        f"--steps={args.steps}", f"--rounds={args.rounds}"],
                       capture_output=True, text=True, env=env, check=True)
  result = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
  # Logged once per process, at the plain uint8 rot90 (run after everything of the project's)
  # when this CPU lacks oneDNN's uint8 support; the project's lines come before it.
  lines = out.stderr.splitlines()
  result["onednn_uint8_fallback_logged"] = any("DT_UINT8" in l for l in lines)
  result["onednn_uint8_fallback_logged_by_project_code"] = any(
      "DT_UINT8" in l for l in lines[:next((i for i, l in enumerate(lines) if "PLAIN" in l),
                                           len(lines))])
  result["cxx_log_lines"] = sum(1 for l in out.stderr.splitlines() if l[:1] in "IWEF"
                                and l[1:5].isdigit())
  import common
  path = common.write("uint8_input", result)
  print(json.dumps(result, indent=1))
  print("wrote", path)


if __name__ == "__main__":
  main()
