"""python -m dc_tf.embed on a folder: rows, drop reasons, numbers equal to the export's,
deterministic order, resume and its refusals, list and TFRecord inputs."""

import collections
import csv
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, jpeg_bytes, write_records
from dc_tf import export
from dc_tf.config import UserError
from dc_tf.data import make_shards
from dc_tf.embed import features, inputs, on_beam


def embed(photos, model, out, **kw):
  return features.run(features.EmbedOptions(input=photos, model=model, output=out, **kw))


def load(out, layer):
  return np.concatenate([np.load(f) for f in sorted(glob.glob(os.path.join(out, f"{layer}-*.npy")))])


def index(out):
  with open(os.path.join(out, "index.csv")) as f:
    return list(csv.DictReader(f))


def test_plan_drops_bad_files_and_duplicates_with_make_shards_reasons(photos):
  rows, dropped, seen = inputs.plan(photos)
  assert seen == 17
  assert dropped == {"duplicate": 2, "not an image": 1, "truncated jpeg": 1, "zero bytes": 1}
  assert len(rows) == 12 and [r.key for r in rows] == sorted(r.key for r in rows)
  assert {r.label_text for r in rows} == {"home", "trip"}
  # the duplicate kept is the smallest id of its copies, as make_shards keeps
  ids = {r.sha1: r.image_id for r in rows}
  assert len(ids) == 12
  rows_all, dropped_all, _ = inputs.plan(photos, dedupe=False)
  assert len(rows_all) == 14 and "duplicate" not in dropped_all


def test_a_yfcc_list_photo_with_two_files_is_one_row(photos, tmp_path):
  """As make_shards' yfcc join: the first path in sorted order, the other counted; two rows
  of one id would make the clusters' id table ambiguous (issue 36)."""
  a, b, c = sorted(glob.glob(f"{photos}/*/img0[0-2].jpg"))
  listing = tmp_path / "yfcc.txt"
  listing.write_text(f"7\t{b}\n8\t{c}\n7\t{a}\n")
  rows, dropped, seen = inputs.plan(str(listing), input_format="yfcc_list")
  assert [(r.image_id, r.path) for r in rows] == [(7, a), (8, c)]
  assert dropped == {"second image file": 1} and seen == 3
  # every row carries its own line's photo id, whatever order the list gives them in
  paths = sorted(glob.glob(f"{photos}/*/img*.jpg"))
  ids = np.random.default_rng(0).permutation(len(paths)) + 100
  listing.write_text("".join(f"{i}\t{p}\n" for i, p in zip(ids, paths)))
  rows = inputs.plan(str(listing), input_format="yfcc_list")[0]
  assert len(rows) == len(paths) == 12
  assert {r.path: r.image_id for r in rows} == dict(zip(paths, ids.tolist()))


def test_the_beam_path_reads_each_input_shard_once_in_any_order(example, tmp_path,
                                                                monkeypatch):
  """Issue 36: a runner's shuffle (Create(reshuffle=True) on Dataflow) scatters the rows, so
  the last-shard cache of read_bytes would read a whole shard again for nearly every row; the
  rows travel grouped by the shard they are in, and each group reads it once."""
  import random
  for f in range(2):
    write_records(str(tmp_path / f"p-{f}.tfrecord"),
                  [example(data=jpeg_bytes(10 * f + i), image_id=10 * f + i) for i in range(4)])
  rows = inputs.plan(str(tmp_path / "p-*.tfrecord"))[0]
  want = {(j // 3, j % 3): inputs.read_bytes(r) for j, r in enumerate(rows)}
  todo = [(j // 3, j % 3, r) for j, r in enumerate(rows)]
  random.Random(0).shuffle(todo)
  reads, read = collections.Counter(), inputs.record_images
  monkeypatch.setattr(inputs, "record_images", lambda path: reads.update([path]) or read(path))
  read_group = on_beam._read  # noqa: SLF001 - the pipeline's Read step, outside Beam
  got = {key: data for group in on_beam.by_file(todo) for key, data in read_group(group)}
  assert got == want
  assert sorted(reads) == sorted(glob.glob(str(tmp_path / "p-*.tfrecord")))
  assert set(reads.values()) == {1}, reads


def test_one_folder_spelled_four_ways_has_one_digest(photos, tmp_path, monkeypatch):
  """--input is resolved once and the digest hashes paths relative to it: a resume may spell
  the folder another way (issue 36)."""
  os.symlink(photos, tmp_path / "link")
  monkeypatch.chdir(tmp_path)
  metas = []
  for spelling in ("photos", "./photos/", photos, "link"):
    opts = features.EmbedOptions(input=spelling, model="m", output="o").validate()
    assert opts.input == os.path.realpath(photos)
    metas.append(features.shard_meta(0, inputs.plan(opts.input)[0], "sha", ["fc7"], opts))
  assert all(m == metas[0] for m in metas[1:])


def test_a_finished_shard_beyond_the_runs_count_is_named_gap_or_not(tmp_path):
  """Indices are compared, not the sorted list's length: a gap hides nothing."""
  for left, stale in (((0, 1, 2), 2), ((0, 3), 3)):   # a leftover shard 2, and a gap
    out = tmp_path / str(stale)
    out.mkdir()
    for i in left:
      (out / f"shard-{i:05d}.json").write_text("{}")
    (out / "shard-00001.json.tmp-5").write_text("{}")   # a write that died: not a shard
    with pytest.raises(UserError, match=f"shard-{stale:05d}.json is beyond this run's 2 shards"):
      features.check_no_stale_shards(str(out), 2)
    features.check_no_stale_shards(str(out), stale + 1)


def test_a_finished_shard_of_another_model_or_an_edited_photo_is_refused(photos, tmp_path):
  """Resume compares the model's sha256 and the rows digest, which hashes each photo's SHA-1:
  a photo rewritten in place (same path, same size, other bytes) changes no id nor path."""
  opts = features.EmbedOptions(input=photos, model="m", output=str(tmp_path)).validate()
  rows = inputs.plan(opts.input)[0]
  meta = features.shard_meta(0, rows, "a" * 64, ["fc7"], opts)
  with open(features.meta_path(str(tmp_path), 0), "w") as f:
    json.dump(meta, f)
  assert features.check_finished(str(tmp_path), 0, meta)
  with pytest.raises(UserError, match="model sha256 'a{64}', this run has 'b{64}'"):
    features.check_finished(str(tmp_path), 0, {**meta, "model_sha256": "b" * 64})
  edited = os.path.join(photos, "home", "img02.jpg")
  with open(edited, "wb") as f:
    f.write(jpeg_bytes(777, size=(42, 48)))
  after = inputs.plan(opts.input)[0]
  changed = [(a, b) for a, b in zip(rows, after) if a != b]
  assert len(after) == len(rows) and len(changed) == 1
  (a, b), = changed
  assert dataclasses.replace(a, sha1=b.sha1) == b and a.sha1 != b.sha1   # only the bytes
  with pytest.raises(UserError, match="rows .the input changed"):
    features.check_finished(str(tmp_path), 0, features.shard_meta(0, after, "a" * 64, ["fc7"],
                                                                   opts))


def test_the_model_of_a_features_folder_is_found_from_anywhere(tmp_path, monkeypatch):
  def export_at(path):
    os.makedirs(path)
    open(os.path.join(path, "saved_model.pb"), "w").close()
    return str(path)
  out = tmp_path / "out"
  inside = export_at(out / "export" / "serving")
  mine = export_at(tmp_path / "models" / "mine")
  monkeypatch.chdir(tmp_path / "models")
  assert features.model_path_of("../out", {"model": mine, "model_in_output": None}) == mine
  # inside the output: found there, even when the folder moved since
  gone = str(tmp_path / "moved" / "out" / "export" / "serving")
  found = features.model_path_of("../out", {"model": gone, "model_in_output": "export/serving"})
  assert os.path.samefile(found, inside)
  # an older embed.json: the path as given, relative to where embed ran
  old = features.model_path_of("../out", {"model": "out/export/serving"})
  assert os.path.samefile(old, inside)
  with pytest.raises(UserError, match="runs/x/serving .relative to the folder embed ran in"):
    features.model_path_of("../out", {"model": "runs/x/serving"})


@pytest.mark.slow
def test_embed_folder_equals_the_serving_export_and_resumes(photos, tiny_export, tmp_path):
  out = str(tmp_path / "out")
  m = embed(photos, tiny_export, out, shard_size=5, batch_size=4)
  assert m["rows"] == 12 and m["dropped_total"] == 5 and len(m["shards"]) == 3
  assert m["layers"] == [f"probe_{n}" for n in export.PROBE_LAYERS]
  rows = index(out)
  assert [int(r["row"]) for r in rows] == list(range(12))
  # the same numbers as the serving signature on the same bytes, one image at a time
  fn = export.load(tiny_export).signatures["serving_default"]
  fc7 = load(out, "probe_fc7")
  for r, got in zip(rows, fc7):
    with open(r["path"], "rb") as f:
      want = fn(image_bytes=tf.constant([f.read()]))["probe_fc7"].numpy()[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert load(out, "probe_conv2").shape[0] == 12
  # a rerun keeps every finished shard, and writes the same bytes (at the same batch size:
  # another changes the last bits, oneDNN's kernels differ by batch)
  before = {f: open(f, "rb").read() for f in glob.glob(os.path.join(out, "*.npy"))}
  os.remove(os.path.join(out, "shard-00001.json"))   # an interrupted shard is redone
  # ... from another spelling of the same folder and model (issue 36)
  m2 = embed(os.path.relpath(photos) + "/", os.path.relpath(tiny_export), out, shard_size=5,
             batch_size=4)
  assert m2["resumed_shards"] == 2
  assert before == {f: open(f, "rb").read() for f in glob.glob(os.path.join(out, "*.npy"))}
  assert m2["model"] == os.path.join(tiny_export, "serving")   # absolute: resolves anywhere
  assert m2["model_in_output"] is None
  # a shard json of an older dc_tf (its digest of the paths as --input spelled them) is
  # checked as it was then: it resumes with that spelling, not with another
  with open(os.path.join(out, "shard-00000.json")) as f:
    old = json.load(f)
  del old["digest_paths"]
  old["rows_digest"] = features.rows_digest([inputs.row_from_index(r) for r in rows[:5]])
  with open(os.path.join(out, "shard-00000.json"), "w") as f:
    json.dump(old, f)
  assert embed(os.path.realpath(photos), tiny_export, out, shard_size=5)["resumed_shards"] == 3
  with pytest.raises(UserError, match="rows .the input changed"):
    embed(os.path.relpath(photos), tiny_export, out, shard_size=5)
  # a finished shard of another run is refused, the difference named
  with pytest.raises(UserError, match="layers"):
    embed(photos, tiny_export, out, shard_size=5, layers=("fc7",))
  with pytest.raises(UserError, match="input options"):
    embed(photos, tiny_export, out, shard_size=4)
  # another export (here one more file in serving/, its card rewritten to match) is refused
  other = str(tmp_path / "other")
  shutil.copytree(tiny_export, other)
  with open(os.path.join(other, "serving", "assets", "note.txt"), "w") as f:
    f.write("another model")
  with open(os.path.join(other, export.CARD_FILE)) as f:
    card = json.load(f)
  card["sha256"]["serving"] = export._dir_sha256(os.path.join(other, "serving"))  # noqa: SLF001
  with open(os.path.join(other, export.CARD_FILE), "w") as f:
    json.dump(card, f)
  sha = card["sha256"]["serving"]
  with pytest.raises(UserError, match=f"model sha256 .*, this run has '{sha}'"):
    embed(photos, other, out, shard_size=5)
  # the input shrank by the last shard's rows: the stale shard is named, not left for a glob
  last = {r.sha1 for r in inputs.plan(photos)[0][-2:]}
  for f in glob.glob(f"{photos}/**/*.jpg", recursive=True):
    if hashlib.sha1(open(f, "rb").read()).hexdigest() in last:
      os.remove(f)
  with pytest.raises(UserError, match="shard-00002.json is beyond this run's 2 shards"):
    embed(photos, tiny_export, out, shard_size=5)
  os.makedirs(os.path.join(photos, "new"))
  with open(os.path.join(photos, "new", "a.jpg"), "wb") as f:
    f.write(tf.io.encode_jpeg(np.full((30, 30, 3), 7, np.uint8)).numpy())
  with pytest.raises(UserError, match="rows"):
    embed(photos, tiny_export, out, shard_size=5)


@pytest.mark.slow
def test_list_and_tfrecord_inputs_give_the_folders_features(photos, tiny_export, tmp_path,
                                                            monkeypatch):
  ref_out = str(tmp_path / "ref")
  embed(photos, tiny_export, ref_out, layers=("fc7",))
  ref = {r["sha1"]: v for r, v in zip(index(ref_out), load(ref_out, "fc7"))}
  listing = tmp_path / "list.txt"
  listing.write_text("".join(f"{p}\n" for p in sorted(glob.glob(f"{photos}/**/*.jpg",
                                                               recursive=True))))
  list_out = str(tmp_path / "list_out")
  m = embed(str(listing), tiny_export, list_out, layers=("fc7",))
  assert m["rows"] == 12 and m["dropped"]["duplicate"] == 2
  # YFCC100M's image list: photo_id<TAB>path, the photo id is the image id
  yfcc = tmp_path / "yfcc_list.txt"
  yfcc.write_text("".join(f"{1000 + i}\t{p}\n" for i, p in enumerate(
      sorted(glob.glob(f"{photos}/**/*.jpg", recursive=True)))) + "not a line\n")
  yfcc_out = str(tmp_path / "yfcc_out")
  m = embed(str(yfcc), tiny_export, yfcc_out, layers=("fc7",), input_format="yfcc_list")
  assert m["rows"] == 12 and m["dropped"]["bad image list line"] == 1
  assert all(1000 <= int(r["image_id"]) < 1017 for r in index(yfcc_out))
  listed = {os.path.realpath(p): 1000 + i for i, p in enumerate(
      sorted(glob.glob(f"{photos}/**/*.jpg", recursive=True)))}
  assert all(int(r["image_id"]) == listed[os.path.realpath(r["path"])] for r in index(yfcc_out))
  shards = tmp_path / "shards"
  make_shards.write_shards("folder", photos, str(shards), "p", 2, seed=0)
  rec_out = str(tmp_path / "rec_out")
  m = embed(str(shards / "p-*.tfrecord"), tiny_export, rec_out, layers=("fc7",))
  assert m["rows"] == 12 and m["dropped_total"] == 0
  # on Beam, each input shard is read once, whatever order the rows are shuffled into
  # (issue 36: the one-shard cache of read_bytes missed on nearly every row)
  reads, read = collections.Counter(), inputs.record_images
  monkeypatch.setattr(inputs, "record_images", lambda path: reads.update([path]) or read(path))
  beam_out = str(tmp_path / "beam_out")
  m = on_beam.run(features.EmbedOptions(input=str(shards / "p-*.tfrecord"), model=tiny_export,
                                        output=beam_out, layers=("fc7",), shard_size=3),
                  ["--runner=DirectRunner"])
  assert m["rows"] == 12 and len(m["shards"]) == 4
  assert sorted(reads) == sorted(glob.glob(str(shards / "p-*.tfrecord")))
  assert set(reads.values()) == {1}, reads
  for out in (list_out, yfcc_out, rec_out, beam_out):
    for r, v in zip(index(out), load(out, "fc7")):
      np.testing.assert_allclose(v, ref[r["sha1"]], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_command_line_and_its_errors(photos, tiny_export, tmp_path):
  out = str(tmp_path / "cli")
  run = lambda *a: subprocess.run([sys.executable, "-m", "dc_tf.embed", *a], cwd=REPO,  # noqa: E731
                                  capture_output=True, text=True, timeout=300)
  r = run(f"--input={photos}", f"--model={tiny_export}", f"--output={out}", "--layers=fc7",
          "--clusters=2", "--super=2")
  assert r.returncode == 0, r.stderr[-2000:]
  summary, page = r.stdout.rsplit("}", 1)
  assert json.loads(summary + "}")["rows"] == 12 and "img/s" in r.stderr
  assert page.strip() == f"clusters page: {out}/clusters/index.html"
  with open(f"{out}/clusters/assignments.csv") as f:
    assert {line.split(",")[3] for line in list(f)[1:]} == {"0", "1"}   # two super-clusters
  r = run(f"--input={photos}", f"--model={tiny_export}", f"--output={out}", "--layers=nope")
  assert r.returncode == 2 and "error: --layers ['nope'] not returned" in r.stderr
  with pytest.raises(UserError, match="--input not found"):
    embed(f"{tmp_path}/none", tiny_export, out)
  with pytest.raises(UserError, match="neither an export"):
    embed(photos, str(tmp_path), out)


@pytest.mark.slow
def test_a_run_dir_is_exported_once_into_the_output(photos, tmp_path):
  from dc_tf.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
  from dc_tf.data import preprocess
  from dc_tf.models import vgg
  from dc_tf.training import checkpointing
  run_dir = str(tmp_path / "run")
  config = ExperimentConfig(data=DataConfig(image_size=32, data_pattern=""),
                            model=ModelConfig(image_size=32, width=0.125, fc_dim=32),
                            train=TrainConfig(model_dir=run_dir)).validate()
  trunk = vgg.trunk_from_config(config.model)
  checkpointing.write_config(run_dir, config)
  tf.train.Checkpoint(trunk=trunk, step=tf.Variable(7, dtype=tf.int64)).save(
      os.path.join(run_dir, "ckpt", "ckpt"))
  out = str(tmp_path / "out")
  m = embed(photos, run_dir, out, layers=("fc7",))
  assert m["model"] == os.path.join(out, "export", "serving")
  assert m["model_in_output"] == os.path.join("export", "serving")
  rows = index(out)
  with open(rows[0]["path"], "rb") as f:
    image = preprocess.eval_transform(tf.io.decode_jpeg(f.read(), channels=3), 32)
  want = trunk(image[None], training=False)["fc7"].numpy()[0]
  np.testing.assert_allclose(load(out, "fc7")[0], want, atol=1e-5, rtol=0)
  # a newer checkpoint of the run is not embedded with the old export
  tf.train.Checkpoint(trunk=trunk, step=tf.Variable(8, dtype=tf.int64)).save(
      os.path.join(run_dir, "ckpt", "ckpt"))
  with pytest.raises(UserError, match="was exported from"):
    embed(photos, run_dir, out, layers=("fc7",))
