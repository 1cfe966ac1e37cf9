"""--runner=DirectRunner: Beam's RunInference with our handler writes what the one-box path
writes (the same index, features within 1e-5; batches differ, so the last bits may)."""

import glob
import os

import numpy as np
import pytest

from dc_tf.embed import features, on_beam


@pytest.mark.slow
def test_direct_runner_equals_one_box(photos, tiny_export, tmp_path):
  box, beam_out = str(tmp_path / "box"), str(tmp_path / "beam")
  opts = dict(input=photos, model=tiny_export, shard_size=5, batch_size=4,
              layers=("probe_fc7", "probe_conv4"))
  a = features.run(features.EmbedOptions(output=box, **opts))
  b = on_beam.run(features.EmbedOptions(output=beam_out, **opts), ["--runner=DirectRunner"])
  assert b["runner"] == "beam:DirectRunner" and b["rows"] == a["rows"] == 12
  for key in ("dropped", "dims", "shards", "model_sha256", "layers"):
    assert a[key] == b[key], key
  assert open(f"{box}/index.csv").read() == open(f"{beam_out}/index.csv").read()
  for f in sorted(glob.glob(f"{box}/*.npy")):
    np.testing.assert_allclose(np.load(f), np.load(f"{beam_out}/{os.path.basename(f)}"),
                               atol=1e-5, rtol=0)
  # shard metadata is the same, so each path resumes the other's output
  c = on_beam.run(features.EmbedOptions(output=box, **opts), ["--runner=DirectRunner"])
  assert c["resumed_shards"] == 3
