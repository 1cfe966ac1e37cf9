"""Features and clusters for a folder of photos (issue 27): `python -m dc_tf.embed`.

  inputs.py    folder / list / TFRecord shards -> checked, de-duplicated rows in order
  features.py  rows -> the serving export -> `.npy` shards + index.csv, resumable (one box)
  on_beam.py   the same shards through Beam's RunInference (DirectRunner, Dataflow, ...)
  clusters.py  --clusters=K [--super=M]: hierarchy.cluster, tables, grids, index.html
"""
