"""Every command starts quietly (issue 36 item 4): its first screen holds no TensorFlow, absl
or Beam start-up lines (oneDNN notes, absl's InitializeLog warning, Beam's "apitools not
found") unless --verbosity asks, and a bad input is one `error:` line. Each command runs as a
user starts it (no TF_CPP_MIN_LOG_LEVEL), on a quick error path that imports what its real
run imports (the command's module, TensorFlow, Keras, Beam)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, jpeg_bytes, write_records

pytestmark = pytest.mark.slow

# TF's C++ log lines and absl's note before them, Beam's import warnings, a root logger that
# logging.basicConfig set up (WARNING:root:...), Beam's INFO lines through absl's handler.
NOISE = re.compile(r"^[IW]\d{4} [\d:.]+\s+\d+ \S+\.(cc|h):\d+\]|absl::InitializeLog|oneDNN|"
                   r"rebuild TensorFlow|apitools|^WARNING:root:|^INFO:|native_type_compat")


def command(args, verbose=False):
  env = dict(os.environ)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)    # as a user's shell has it
  return subprocess.run([sys.executable, *args, *(["--verbosity=1"] if verbose else [])],
                        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
                        stdin=subprocess.DEVNULL)


def assert_quiet_one_error(out, message):
  first = out.stderr.splitlines()[:20]
  assert not [l for l in first if NOISE.search(l)], "\n".join(first)
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert len(errors) == 1 and message in errors[0], out.stderr[-3000:]


def test_embed_starts_quietly_and_a_clustering_refusal_is_one_line(tiny_export, example,
                                                                   tmp_path):
  """A real run (TFRecord input, the model, the clusters) whose input holds one image id
  twice, with other bytes: the hierarchy refuses the ambiguous id table (a ClusteringError,
  a UserError) in one line."""
  shard = write_records(str(tmp_path / "dup.tfrecord"), [
      example(data=jpeg_bytes(100), image_id=5), example(data=jpeg_bytes(101), image_id=5),
      example(image_id=6), example(image_id=7)])
  args = ["-m", "dc_tf.embed", f"--input={shard}", f"--model={tiny_export}",
          f"--output={tmp_path / 'out'}", "--layers=fc7", "--clusters=2"]
  assert_quiet_one_error(command(args), "duplicate image ids")


@pytest.mark.parametrize("args,message", [
    (["-m", "dc_tf.data.make_shards", "--source=folder", "--input=/nonexistent/photos",
      "--output_dir={tmp}/shards"], "--input folder not found"),
    (["-m", "dc_tf.export", "--model_dir=/nonexistent/run"], "/nonexistent/run"),
    (["-m", "dc_tf.neighbours", "--features={tmp}", "--query={jpg}"], "{tmp}"),
    (["-m", "dc_tf.convert", "--from_pytorch={tmp}/garbage.pth", "--model_dir={tmp}/run"],
     "garbage.pth"),
    (["evaluate.py", "--checkpoint=/nonexistent/run"], "/nonexistent/run"),
])
def test_each_command_starts_quietly(args, message, tmp_path):
  (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
  (tmp_path / "q.jpg").write_bytes(jpeg_bytes(1))
  fill = lambda s: s.format(tmp=tmp_path, jpg=tmp_path / "q.jpg")  # noqa: E731
  assert_quiet_one_error(command([fill(a) for a in args]), fill(message))


def test_verbosity_brings_the_start_up_lines_back():
  out = command(["-m", "dc_tf.export", "--model_dir=/nonexistent/run"], verbose=True)
  assert out.returncode == 2
  assert [l for l in out.stderr.splitlines() if NOISE.search(l)], out.stderr[-3000:]
