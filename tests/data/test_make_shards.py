"""The Beam shard writer on the DirectRunner: sources, drops and counts, layout, reruns."""

import bz2
import collections
import glob
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, jpeg_bytes, write_image_folder
from dc_tf.data import make_shards, reader, sources

TINY = os.path.join(REPO, "..", "shared", "datasets", "tiny-imagenet-200")


def _records(pattern):
  return [r.numpy() for f in sorted(glob.glob(pattern)) for r in tf.data.TFRecordDataset(f)]


def _examples(pattern):
  return [tf.train.Example.FromString(r) for r in _records(pattern)]


def _value(ex, key):
  f = ex.features.feature[key]
  return (f.int64_list.value or f.float_list.value or f.bytes_list.value)[0]


def _files(d):
  return {os.path.basename(f): open(f, "rb").read() for f in sorted(glob.glob(f"{d}/*.tfrecord"))}


def test_folder_labels_balance_resume_and_identical_rerun(tmp_path):
  images = write_image_folder(str(tmp_path / "img"), classes=2, per_class=10)
  out = str(tmp_path / "out")
  m = make_shards.write_shards("folder", images, out, "train", 3, seed=1)
  assert sorted(_files(out)) == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
  assert m["records"] == 20 and m["dropped"] == {} and m["images_in"] == 20
  assert m["labels"] == [[0, "class0"], [1, "class1"]]
  sizes = [s["records"] for s in m["shards"]]
  assert sum(sizes) == 20 and max(sizes) - min(sizes) <= 1  # balanced to one record
  before = _files(out)
  os.remove(os.path.join(out, "train-00001-of-00003.tfrecord"))
  again = make_shards.write_shards("folder", images, out, "train", 3, seed=1)
  assert again["resumed_shards"] == 2 and _files(out) == before
  fresh = make_shards.write_shards("folder", images, str(tmp_path / "fresh"), "train", 3, seed=1)
  assert _files(str(tmp_path / "fresh")) == before and fresh["records"] == 20
  other = str(tmp_path / "seed2")
  make_shards.write_shards("folder", images, other, "train", 3, seed=2)
  assert _files(other) != before and sorted(_records(f"{other}/*.tfrecord")) == sorted(_records(f"{out}/*.tfrecord"))


def test_a_rerun_with_other_layout_options_is_refused_not_mixed(tmp_path, monkeypatch):
  """Issue 29: existing shards are kept only when the options that lay them out match, so
  another --seed cannot mix two orders in one set, nor another --shard_size leave two sets
  under one glob; also when the first run died before its manifest was written."""
  images = write_image_folder(str(tmp_path / "img"), classes=2, per_class=4)
  out = str(tmp_path / "out")

  def interrupted(*args, **kw):
    raise RuntimeError("killed before the manifest")
  with monkeypatch.context() as m:
    m.setattr(make_shards, "write_manifest", interrupted)
    with pytest.raises(Exception, match="killed before the manifest"):
      make_shards.write_shards("folder", images, out, "train", seed=1, shard_size=4)
  before = _files(out)
  assert sorted(before) == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  assert sorted(os.listdir(out)) == sorted(before) + ["train.layout.json"]  # no manifest yet
  with pytest.raises(ValueError, match=r"--seed=1 .*--seed=2.*--output_dir.*--overwrite"):
    make_shards.write_shards("folder", images, out, "train", seed=2, shard_size=4)
  with pytest.raises(ValueError, match=r"--shard_size=4 .*--shard_size=3"):
    make_shards.write_shards("folder", images, out, "train", seed=1, shard_size=3)
  assert _files(out) == before
  # The same options resume (every shard kept), --overwrite replaces the whole set.
  m = make_shards.write_shards("folder", images, out, "train", seed=1, shard_size=4)
  assert m["resumed_shards"] == 2 and _files(out) == before
  assert sorted(os.listdir(out)) == sorted(before) + ["train.json"]
  m = make_shards.write_shards("folder", images, out, "train", seed=1, shard_size=3,
                               overwrite=True)
  assert m["resumed_shards"] == 0
  assert sorted(_files(out)) == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
  # The same options over an input that grew: another shard count, and the old set is named.
  write_image_folder(images, classes=3, per_class=4)
  with pytest.raises(ValueError, match=r"3 train shards of another layout.*--overwrite"):
    make_shards.write_shards("folder", images, out, "train", seed=1, shard_size=3)
  # Shards with no record of their options (another tool, or the record deleted): refused.
  os.remove(os.path.join(out, "train.json"))
  with pytest.raises(ValueError, match="no train.json"):
    make_shards.write_shards("folder", images, out, "train", seed=1, shard_size=3)


def test_shard_of_an_image_depends_on_its_id_not_on_the_input_order(tmp_path):
  """Listing the same images in another order (a list file, reversed) gives the same shards."""
  images = write_image_folder(str(tmp_path / "img"), classes=2, per_class=6)
  rel = sorted(os.path.relpath(p, images) for p in glob.glob(f"{images}/*/*.jpg"))
  for name, order in (("fwd", rel), ("rev", rel[::-1])):
    (tmp_path / f"{name}.txt").write_text("".join(f"{r}\t0\n" for r in order))
    make_shards.write_shards("list", str(tmp_path / f"{name}.txt"), str(tmp_path / name), "x", 2,
                             image_dir=images)
  assert _files(str(tmp_path / "fwd")) == _files(str(tmp_path / "rev"))


def test_bad_files_duplicates_and_placeholders_are_dropped_and_counted(tmp_path):
  d = tmp_path / "img"
  d.mkdir()
  good = jpeg_bytes(0)
  (d / "good.jpg").write_bytes(good)
  (d / "good_copy.jpg").write_bytes(good)            # exact duplicate
  (d / "other.png").write_bytes(tf.io.encode_png(np.full((8, 8, 3), 7, np.uint8)).numpy())
  for i in range(3):                                  # "photo no longer available", 3 times
    (d / f"gone{i}.jpg").write_bytes(jpeg_bytes(99))
  (d / "zero.jpg").write_bytes(b"")
  (d / "text.jpg").write_bytes(b"hello, not an image")
  (d / "trunc.jpg").write_bytes(good[: len(good) // 2])
  (d / "corrupt.jpg").write_bytes(good[:20] + b"\x00" * 200 + good[-2:])
  m = make_shards.write_shards("folder", str(d), str(tmp_path / "o"), "x", 1,
                               placeholder_min_copies=3)
  want = {"zero bytes": 1, "not an image": 1, "truncated jpeg": 1, "corrupt jpeg": 1,
          "duplicate": 1, "placeholder": 3}
  assert m["dropped"] == want and m["records"] == 2 and m["images_in"] == 10
  # The same counts as Beam counters (namespace make_shards), so a cluster's UI shows them.
  assert {k.replace("_", " "): v for k, v in m["beam_counters"].items()
          if k.replace("_", " ") in want} == want
  assert m["beam_counters"]["written"] == 2
  kept = sorted(_value(ex, "image/format") for ex in _examples(str(tmp_path / "o/x-*")))
  assert kept == [b"jpeg", b"png"]
  # A listed placeholder hash is dropped even when it occurs once.
  import hashlib
  m = make_shards.write_shards("folder", str(d), str(tmp_path / "o2"), "x", 1,
                               placeholder_sha1=(hashlib.sha1(good).hexdigest(),))
  assert m["dropped"] == {**want, "placeholder": 2, "duplicate": 2} and m["records"] == 2


def test_no_images_is_a_clear_error(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no images written"):
    make_shards.write_shards("folder", str(tmp_path / "empty"), str(tmp_path / "o"), "x", 1)
  with pytest.raises(FileNotFoundError, match="--input folder"):
    make_shards.write_shards("folder", str(tmp_path / "nope"), str(tmp_path / "o"), "x", 1)


def test_list_source_labels_and_bad_lines(tmp_path):
  d = tmp_path / "img"
  d.mkdir()
  for pid in (101, 102):
    (d / f"{pid}.jpg").write_bytes(jpeg_bytes(pid))
  (tmp_path / "list.txt").write_text("# a comment\nimg/101.jpg\t3\nimg/102.jpg\t4\nimg/x.jpg\tcat\n")
  m = make_shards.write_shards("list", str(tmp_path / "list.txt"), str(tmp_path / "o"), "l", 1)
  assert m["dropped"] == {"bad list line": 1}
  assert sorted(_value(ex, "label") for ex in _examples(str(tmp_path / "o/l-*"))) == [3, 4]


# ----------------------------------------------------------------------------- YFCC100M
def _yfcc_line(photo_id, marker="0", tags="", machine="", lon="", lat="", device="",
               fields=25):
  row = dict.fromkeys(sources.YFCC_FIELDS, "")
  row.update(line_number="0", photo_id=str(photo_id), photo_hash="ab" * 16,
             user_nsid=f"{photo_id % 7}@N00", date_taken="2012-02-16 09:56:37.0",
             capture_device=device, user_tags=tags, machine_tags=machine, longitude=lon,
             latitude=lat, download_url=f"http://farm8.example/{photo_id}_x.jpg", marker=marker)
  names = sources.YFCC_FIELDS if fields == 25 else sources.YFCC_FIELDS_2014
  return "\t".join(row[n] for n in names) + "\n"


def _yfcc_fixture(root):
  """Images for photo ids 101..109 and metadata lines that exercise every drop reason."""
  images = root / "images"
  for sub in ("a/b", "c"):
    (images / sub).mkdir(parents=True)
  files = {101: ("a/b", jpeg_bytes(101)), 102: ("c", jpeg_bytes(102)),
           105: ("c", jpeg_bytes(101)),                        # the same bytes as 101
           109: ("a/b", b"GIF87a... not really")}              # non-JPEG, undecodable
  files.update({pid: ("a", jpeg_bytes(7)) for pid in (106, 107, 108)})  # a placeholder
  files[110] = ("c", jpeg_bytes(110))                           # listed in the 2014 format
  for pid, (sub, data) in files.items():
    (images / sub / f"{pid}.jpg").write_bytes(data)
  (images / "c" / "555.jpg").write_bytes(jpeg_bytes(555))       # no metadata: ignored
  lines = [_yfcc_line(101, tags="cat,sofa+bed", machine="uploaded:by=flickr", lon="2.35",
                      lat="48.85", device="Canon+EOS+400D"),
           _yfcc_line(102, device="Nikon"),
           _yfcc_line(103, marker="1"),                         # a video
           "not\ta\tmetadata\tline\n",                          # wrong field count
           _yfcc_line(104),                                      # no image file
           _yfcc_line(105), _yfcc_line(106), _yfcc_line(107), _yfcc_line(108), _yfcc_line(109),
           _yfcc_line(110, fields=23)]
  return images, files, lines


YFCC_DROPPED = {"video": 1, "bad metadata line": 1, "missing image": 1, "duplicate": 1,
                "placeholder": 3, "corrupt gif": 1}


def test_yfcc_official_format_with_a_folder_tree(tmp_path):
  images, _, lines = _yfcc_fixture(tmp_path)
  header = "\t".join(sources.YFCC_FIELDS) + "\n"
  (tmp_path / "yfcc100m_dataset.tsv").write_text(header + "".join(lines))
  m = make_shards.write_shards("yfcc", str(tmp_path / "yfcc100m_dataset.tsv"),
                               str(tmp_path / "o"), "yfcc", 1, seed=-1, image_dir=str(images),
                               placeholder_min_copies=3)
  assert m["dropped"] == {**YFCC_DROPPED, "metadata header": 1}
  assert m["beam_counters"]["image_without_metadata"] == 1
  batch = next(iter(reader.build_extraction_dataset(str(tmp_path / "o/yfcc-*"), image_size=32,
                                                    batch_size=8)))
  assert list(batch["image_id"].numpy()) == [101, 102, 110]  # seed < 0: ordered by id
  assert batch["tags"][0].numpy() == b"cat,sofa bed" and batch["device"][0].numpy() == b"Canon EOS 400D"
  assert batch["user_id"][1].numpy() == b"4@N00"
  assert abs(batch["lat"][0].numpy() - 48.85) < 1e-4 and np.isnan(batch["lat"][1].numpy())
  first = _examples(str(tmp_path / "o/yfcc-*"))[0]
  assert _value(first, "meta/machine_tags") == b"uploaded:by=flickr"
  assert _value(first, "meta/date_taken") == b"2012-02-16 09:56:37.0"
  assert _value(first, "meta/url") == b"http://farm8.example/101_x.jpg"


def test_yfcc_headerless_bzip2_with_an_image_list(tmp_path):
  images, files, lines = _yfcc_fixture(tmp_path)
  # The official file: bzip2, no header, and in some mirrors no .bz2 extension either.
  (tmp_path / "yfcc100m_dataset").write_bytes(bz2.compress("".join(lines).encode()))
  (tmp_path / "ids.txt").write_text(
      "".join(f"{pid}\timages/{sub}/{pid}.jpg\n" for pid, (sub, _) in files.items())
      + "junk line\n")
  m = make_shards.write_shards("yfcc", str(tmp_path / "yfcc100m_dataset"), str(tmp_path / "o"),
                               "yfcc", 2, image_list=str(tmp_path / "ids.txt"),
                               placeholder_min_copies=3)
  assert m["dropped"] == {**YFCC_DROPPED, "bad image list line": 1}
  ids = sorted(_value(ex, "image/id") for ex in _examples(str(tmp_path / "o/yfcc-*")))
  assert ids == [101, 102, 110] and m["num_shards"] == 2


def test_yfcc_missing_inputs_name_the_flag(tmp_path):
  with pytest.raises(FileNotFoundError, match="YFCC100M metadata"):
    make_shards.write_shards("yfcc", str(tmp_path / "nope"), str(tmp_path / "o"), image_dir=".")
  (tmp_path / "m").write_text(_yfcc_line(1))
  with pytest.raises(FileNotFoundError, match="--image_dir"):
    make_shards.write_shards("yfcc", str(tmp_path / "m"), str(tmp_path / "o"))


def test_yfcc_lines_escapes_and_markers_parse_as_documented():
  """Issue 29: %-escaped and '+'-spaced text fields decoded tag by tag; a marker other than
  0 (photo) or 1 (video) is a bad line; both field counts parse alike."""
  (pid, item), = sources.parse_yfcc_line(_yfcc_line(
      7, tags="caf%C3%A9,new+york,100%25,,x", machine="geo%3Alat%3D1", device="Sony%2FDSC"))
  assert (pid, item.image_id, item.key) == (7, 7, "7")
  assert item.tags == "café,new york,100%,x" and item.machine_tags == "geo:lat=1"
  assert item.device == "Sony/DSC" and np.isnan(item.lat)
  (_, old), = sources.parse_yfcc_line(_yfcc_line(7, tags="caf%C3%A9", fields=23))
  assert old.tags == "café"

  def reason(line):
    (out,) = sources.parse_yfcc_line(line)
    return out.value[0]
  assert reason(_yfcc_line(8, marker="2")) == "bad metadata line"
  assert reason(_yfcc_line(8, marker="")) == "bad metadata line"
  assert reason(_yfcc_line(8, marker="1")) == "video"


def test_yfcc_join_keeps_one_line_and_one_file_whatever_the_shuffle_order():
  """Issue 29: a photo id with two metadata lines keeps one, the other counted as repeated;
  with two files, the first path in sorted order, the other counted. Neither choice may depend on the order the
  shuffle delivers them in, or a rerun writes other bytes."""
  (_, a), = sources.parse_yfcc_line(_yfcc_line(5, tags="old"))
  (_, b), = sources.parse_yfcc_line(_yfcc_line(5, tags="new"))
  paths = ["/img/z/5.jpg", "/img/a/5.jpg"]
  kept = []
  for metas in ([a, b], [b, a]):
    for order in (paths, paths[::-1]):
      out = list(sources._join_photo((5, {"meta": metas, "path": order})))  # noqa: SLF001
      assert [o.value for o in out[:-1]] == [("repeated metadata line", 1),
                                             ("second image file", 1)]
      kept.append(out[-1])
  assert {(k.path, k.tags) for k in kept} == {("/img/a/5.jpg", kept[0].tags)}


def test_yfcc_gzip_metadata_repeated_lines_and_two_files_for_one_photo(tmp_path):
  """Gzip metadata (sniffed, no extension), a line given twice, a photo with two files and a
  marker that is neither photo nor video, through the pipeline."""
  import gzip
  images = tmp_path / "images"
  for sub in ("a", "b"):
    (images / sub).mkdir(parents=True)
  (images / "a" / "201.jpg").write_bytes(jpeg_bytes(201))
  (images / "b" / "201.jpg").write_bytes(jpeg_bytes(1201))    # a second file for 201
  (images / "a" / "202.jpg").write_bytes(jpeg_bytes(202))
  (images / "a" / "203.jpg").write_bytes(jpeg_bytes(203))
  lines = [_yfcc_line(201), _yfcc_line(202, tags="x"), _yfcc_line(202, tags="x"),
           _yfcc_line(203, marker="3")]
  (tmp_path / "meta").write_bytes(gzip.compress("".join(lines).encode()))
  m = make_shards.write_shards("yfcc", str(tmp_path / "meta"), str(tmp_path / "o"), "y", 1,
                               image_dir=str(images))
  assert m["dropped"] == {"repeated metadata line": 1, "bad metadata line": 1,
                          "second image file": 1}
  exs = {_value(ex, "image/id"): ex for ex in _examples(str(tmp_path / "o/y-*"))}
  assert sorted(exs) == [201, 202] and _value(exs[202], "meta/tags") == b"x"
  assert _value(exs[201], "image/encoded") == jpeg_bytes(201)   # a/ sorts before b/


# ----------------------------------------------------------------------------- long tail
def test_zipf_counts():
  counts = sources.zipf_counts(5, 100, 1.0)
  assert sum(counts) == 100 and counts == sorted(counts, reverse=True)
  assert abs(counts[0] / counts[4] - 5) < 0.3
  assert sources.zipf_counts(4, 10, 0.0) == [3, 3, 2, 2]


def test_long_tailed_pool_has_zipf_classes_and_duplicates(tmp_path):
  images = write_image_folder(str(tmp_path / "img"), classes=3, per_class=4)
  kw = dict(long_tail_exponent=2.0, long_tail_size=12, near_duplicate_fraction=0.5)
  m = make_shards.write_shards("folder", images, str(tmp_path / "o"), "lt", 1, dedupe=False, **kw)
  exs = _examples(str(tmp_path / "o/lt-*"))
  per_class = sorted(collections.Counter(_value(ex, "label") for ex in exs).values(), reverse=True)
  assert m["records"] == 12 and per_class == sources.zipf_counts(3, 12, 2.0) == [9, 2, 1]
  encoded = [_value(ex, "image/encoded") for ex in exs]
  originals = {open(p, "rb").read() for p in glob.glob(f"{images}/*/*.jpg")}
  exact = sum(e in originals for e in encoded) - len(set(encoded) & originals)
  near = sum(e not in originals for e in encoded)
  assert exact >= 1 and near >= 1 and exact + near == 5  # 9 wanted from a class of 4
  # With dedupe on, the exact copies are dropped and counted.
  m2 = make_shards.write_shards("folder", images, str(tmp_path / "o2"), "lt", 1, **kw)
  assert m2["dropped"] == {"duplicate": exact} and m2["records"] == 12 - exact


# ----------------------------------------------------------------------------- embedded data
@pytest.mark.skipif(not os.path.isdir(TINY), reason="../shared/datasets not present")
def test_embedded_data_rebuilds_byte_for_byte(tmp_path):
  classes = tuple(open(os.path.join(REPO, "data", "classes.txt")).read().split())
  for split, name, shards, zip_name in (("train", "train", 4, "train_250per_class.zip"),
                                        ("val", "val", 1, "val.zip")):
    m = make_shards.write_shards("tiny_imagenet", os.path.join(TINY, zip_name), str(tmp_path),
                                 name, shards, split=split, classes=classes)
    assert m["dropped"] == {}
  assert _files(str(tmp_path)) == _files(os.path.join(REPO, "data"))
  shutil.rmtree(tmp_path)


@pytest.mark.skipif(not os.path.isdir(TINY), reason="../shared/datasets not present")
def test_tiny_imagenet_windows_per_class_are_disjoint():
  """--skip_per_class holds a split back from --per_class: adjacent windows share no image."""
  zip_path = os.path.join(TINY, "train_250per_class.zip")
  classes = ("n01443537", "n09193705")
  first = sources.tiny_imagenet_items(zip_path, "train", classes, per_class=50)
  held = sources.tiny_imagenet_items(zip_path, "train", classes, per_class=30, skip_per_class=50)
  rest = sources.tiny_imagenet_items(zip_path, "train", classes, skip_per_class=50)
  assert collections.Counter(i.label for i in first) == {0: 50, 1: 50}
  assert collections.Counter(i.label for i in held) == {0: 30, 1: 30}
  assert len(rest) == 2 * 200 and not {i.key for i in first} & {i.key for i in rest}
  assert [i.key for i in held] == [i.key for i in rest if i.label == 0][:30] + \
      [i.key for i in rest if i.label == 1][:30]
  with pytest.raises(ValueError, match="skip_per_class"):
    make_shards.ShardOptions("tiny_imagenet", zip_path, "/tmp/x", skip_per_class=-1).validate()


def test_command_line_passes_beam_options_through(tmp_path):
  """The CLI as the README runs it: our flags, then Beam's own (here two worker processes)."""
  import subprocess
  import sys
  images = write_image_folder(str(tmp_path / "img"), classes=2, per_class=3)
  cmd = [sys.executable, "-m", "dc_tf.data.make_shards", "--source=folder", f"--input={images}",
         f"--output_dir={tmp_path / 'o'}", "--name=cli", "--num_shards=2",
         "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert done.returncode == 0, done.stderr[-2000:]
  manifest = __import__("json").load(open(tmp_path / "o" / "cli.json"))
  assert manifest["records"] == 6 and manifest["pipeline_options"]["direct_num_workers"] == 2
  bad = subprocess.run([*cmd[:3], "--source=folder", f"--input={tmp_path / 'none'}",
                        f"--output_dir={tmp_path / 'o2'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "--input folder not found" in bad.stderr
