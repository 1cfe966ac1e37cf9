"""The embed pipeline on Apache Beam: the same rows, shards and files as the one-box path,
with Beam's RunInference and a model handler of our own on the serving SavedModel.

  rows of the unfinished shards, grouped by the file they are in -> read bytes (a TFRecord
  shard once for all its rows) -> RunInference(serving_default) -> group by shard -> write the
  shard (`features.write_shard`) -> index.csv + embed.json

Beam's own TF handler (`apache_beam.ml.inference.tensorflow_inference`) imports tensorflow_hub,
which brings Keras 2's tf_keras and needs setuptools' pkg_resources; `ServingHandler` needs
none of them (../shared/design/embedding-and-reuse.md). The DirectRunner runs here (Beam's
FnApiRunner, as make_shards runs it); `--runner=DataflowRunner|FlinkRunner|SparkRunner` with
`--beam_options` runs the same pipeline on a cluster, the workers getting dc_tf from setup.py.

Not done at scale (issue 27's note): rows are planned (listed, checked, de-duplicated) on the
launching machine, as the one-box path plans them; at 96M photos that listing belongs in the
pipeline, as make_shards does it, and the shard numbering would follow its rank layout.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference import base

from dc_tf.embed import features, inputs


class ServingHandler(base.ModelHandler):
  """JPEG bytes -> {layer: float32 vector} through the export's `serving_default`."""

  def __init__(self, path: str, layers: Sequence[str], batch_size: int, trust: bool = False):
    super().__init__()
    self._path, self._layers, self._batch = path, tuple(layers), batch_size
    self._trust = trust

  def load_model(self) -> features.Model:
    return features.Model(self._path, trust=self._trust)

  def run_inference(self, batch: Sequence[bytes], model: features.Model,
                    inference_args: dict[str, Any] | None = None) -> Iterable[base.PredictionResult]:
    out = model(list(batch), self._layers)
    for i, example in enumerate(batch):
      yield base.PredictionResult(example, {name: out[name][i] for name in self._layers},
                                  model_id=self._path)

  def batch_elements_kwargs(self):
    return {"min_batch_size": 1, "max_batch_size": self._batch}

  def get_num_bytes(self, batch: Sequence[bytes]) -> int:
    return sum(len(b) for b in batch)


class WriteShard(beam.DoFn):
  def __init__(self, output: str, layers: Sequence[str], metas: list[dict]):
    super().__init__()
    self._output, self._layers, self._metas = output, tuple(layers), metas

  def process(self, element):
    index, members = element
    members = sorted(members, key=lambda m: m[0])
    feats = {name: np.stack([m[1][name] for m in members]) for name in self._layers}
    features.write_shard(self._output, index, feats, self._metas[index])
    yield index


def by_file(todo) -> list[list]:
  """The (shard, position, row) elements as groups, one per file read: a TFRecord shard's rows
  together (Create's reshuffle would otherwise scatter them, and each worker would read the
  shard again for nearly every row), every other image alone."""
  groups: dict[str, list] = {}
  for element in todo:
    row = element[2]
    groups.setdefault(row.record_file or f"{len(groups)}:{row.path}", []).append(element)
  return list(groups.values())


def _read(group):
  for (shard, position, _), data in zip(group, inputs.read_file_rows([e[2] for e in group])):
    yield (shard, position), data


def _by_shard(element):
  (shard, position), result = element
  return shard, (position, result.inference)


def run(opts: features.EmbedOptions, beam_args: Sequence[str]) -> dict:
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  from dc_tf.data import checks
  start = time.perf_counter()
  opts = opts.validate()
  model, layers, shards, dropped, images_in, finished, metas = features.prepare(opts)
  todo = [(i, j, row) for i, rows in enumerate(shards) if i not in finished
          for j, row in enumerate(rows)]
  options = PipelineOptions(list(beam_args))
  runner = options.view_as(StandardOptions).runner or "DirectRunner"
  if todo:
    handler = base.KeyedModelHandler(
        ServingHandler(model.path, layers, opts.batch_size, model.trust))
    with beam.Pipeline(runner=checks.pipeline_runner(options), options=options) as p:
      _ = (p | "Rows by file" >> beam.Create(by_file(todo), reshuffle=True)
           | "Read" >> beam.FlatMap(_read)
           | "Embed" >> base.RunInference(handler)
           | "By shard" >> beam.Map(_by_shard)
           | "Group shards" >> beam.GroupByKey()
           | "Write" >> beam.ParDo(WriteShard(opts.output, layers, metas)))
  features.write_index(opts.output, shards)
  return features.write_manifest(opts.output, opts, model, layers,
                                 features.dims_of(opts.output, layers), shards, dropped,
                                 images_in, len(finished), f"beam:{runner}",
                                 time.perf_counter() - start)
