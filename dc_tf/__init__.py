"""dc_tf: DeeperCluster (Caron et al., ICCV 2019) in TensorFlow 2 / Keras 3."""

import sys as _sys

# `python -m dc_tf.<command>`: while Python locates the command it imports this package, with
# sys.argv[0] still "-m" (the documented placeholder), before the command's module imports
# TensorFlow or Beam at its top; this is the one place a quiet start can begin for all of
# them (dc_tf.cli.quiet_start: no TF, absl or Beam start-up lines unless --verbosity asks).
# A library user's `import dc_tf` is left alone.
if _sys.argv[:1] == ["-m"]:
  from dc_tf import cli as _cli
  _cli.quiet_start()
