"""Shard writer, decoder, parsers, reader and bad-input handling."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import jpeg_bytes, write_image_folder, write_records
from dc_tf.data import decoder, make_shards, preprocess, reader, schema


def _all(ds):
  return [b for b in ds]


def test_writer_folder_names_labels_and_resume(tmp_path):
  images = write_image_folder(str(tmp_path / "img"), classes=2, per_class=5)
  items = make_shards.collect_items("folder", images)
  out = str(tmp_path / "out")
  summary = make_shards.write_shards(items, out, "train", 3, seed=1, progress=False)
  files = sorted(os.path.basename(f) for f in glob.glob(out + "/*.tfrecord"))
  assert files == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
  assert summary["written"] == 10 and summary["skipped"] == 0
  assert summary["labels"] == [(0, "class0"), (1, "class1")]
  before = {f: open(os.path.join(out, f), "rb").read() for f in files}
  os.remove(os.path.join(out, files[1]))
  again = make_shards.write_shards(items, out, "train", 3, seed=1, progress=False)
  assert again["resumed_shards"] == 2 and again["written"] == len(make_shards.plan_shards(items, 3, 1)[1])
  after = {f: open(os.path.join(out, f), "rb").read() for f in files}
  assert before == after  # deterministic given the seed


def test_writer_skips_bad_files_and_counts(tmp_path):
  d = tmp_path / "img"
  d.mkdir()
  good = jpeg_bytes(0)
  (d / "good.jpg").write_bytes(good)
  (d / "zero.jpg").write_bytes(b"")
  (d / "text.jpg").write_bytes(b"hello, not an image")
  (d / "trunc.jpg").write_bytes(good[: len(good) // 2])
  (d / "corrupt.jpg").write_bytes(good[:20] + b"\x00" * 200 + good[-2:])
  items = make_shards.collect_items("folder", str(d))
  summary = make_shards.write_shards(items, str(tmp_path / "o"), "x", 1, progress=False)
  assert summary["written"] == 1
  assert summary["skipped"] == 4
  assert set(summary["skip_reasons"]) >= {"zero bytes", "not an image", "truncated jpeg"}


def test_writer_list_and_yfcc_metadata(tmp_path):
  d = tmp_path / "img"
  d.mkdir()
  for pid in (101, 102):
    (d / f"{pid}.jpg").write_bytes(jpeg_bytes(pid))
  (tmp_path / "list.txt").write_text("img/101.jpg\t3\nimg/102.jpg\t4\n")
  items = make_shards.collect_items("list", str(tmp_path / "list.txt"))
  assert [(it.label, os.path.basename(it.path)) for it in items] == [(3, "101.jpg"), (4, "102.jpg")]
  (tmp_path / "meta.tsv").write_text(
      "photo_id\tuser_id\ttags\tlat\tlon\tdevice\n"
      "101\tu1\tcat,sofa\t48.85\t2.35\tCanon EOS\n102\tu2\t\t\t\tNikon\n999\tu3\tx\t1\t2\tz\n")
  items = make_shards.collect_items("yfcc", str(tmp_path / "meta.tsv"), str(d))
  assert [it.image_id for it in items] == [101, 102]
  make_shards.write_shards(items, str(tmp_path / "o"), "yfcc", 1, seed=-1, progress=False)
  batch = next(iter(reader.build_extraction_dataset(str(tmp_path / "o/yfcc-*"), image_size=32,
                                                    batch_size=8)))
  assert list(batch["image_id"].numpy()) == [101, 102]
  assert batch["tags"][0].numpy() == b"cat,sofa" and batch["device"][1].numpy() == b"Nikon"
  assert abs(batch["lat"][0].numpy() - 48.85) < 1e-4 and np.isnan(batch["lat"][1].numpy())


def test_reader_skips_and_counts_bad_records(tmp_path, example):
  good = [example(image_id=i) for i in range(5)]
  jpeg = jpeg_bytes(9)
  bad = [example(data=b"", image_id=100), example(data=b"plain text", image_id=101),
         example(data=jpeg[: len(jpeg) // 2], image_id=102),
         example(data=b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, fmt="png", image_id=103),
         example(data=jpeg, fmt="tiff", image_id=104)]
  path = write_records(str(tmp_path / "mixed-00000-of-00001.tfrecord"), good[:2] + bad + good[2:])
  batches = _all(reader.build_extraction_dataset(path, image_size=32, batch_size=4))
  ids = np.concatenate([b["image_id"].numpy() for b in batches])
  assert list(ids) == [0, 1, 2, 3, 4]
  assert max(int(b["skipped"].numpy().max()) for b in batches) == 5


def test_all_bad_shard_is_a_clear_error_not_a_hang(tmp_path, example):
  from dc_tf.clustering import extract
  from dc_tf.models import vgg
  path = write_records(str(tmp_path / "bad-00000-of-00001.tfrecord"), [example(data=b"")])
  with pytest.raises(reader.DataError, match="no decodable image"):
    extract.extract(vgg.build_trunk(32, 0.125, 16), path, image_size=32, progress=False)


def test_missing_field_names_the_file(tmp_path):
  ex = tf.train.Example(features=tf.train.Features(feature={
      schema.ENCODED: tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg_bytes(0)]))}))
  path = write_records(str(tmp_path / "nofields-00000-of-00001.tfrecord"), [ex])
  with pytest.raises(tf.errors.InvalidArgumentError, match="nofields-00000-of-00001"):
    _all(reader.build_extraction_dataset(path, image_size=32, batch_size=2))


def test_missing_or_empty_pattern_is_a_clear_error(tmp_path):
  with pytest.raises(reader.DataError, match="no shard file matches"):
    reader.list_shards(str(tmp_path / "nothing-*.tfrecord"))
  (tmp_path / "empty-0.tfrecord").write_bytes(b"")
  with pytest.raises(reader.DataError, match="empty"):
    reader.list_shards(str(tmp_path / "empty-*.tfrecord"))


def test_grayscale_becomes_rgb_and_extraction_is_deterministic(tmp_path, example):
  gray = jpeg_bytes(3, channels=1)
  path = write_records(str(tmp_path / "g-00000-of-00001.tfrecord"),
                       [example(data=gray, image_id=7), example(image_id=8)])
  a = _all(reader.build_extraction_dataset(path, image_size=32, batch_size=2))[0]
  b = _all(reader.build_extraction_dataset(path, image_size=32, batch_size=2))[0]
  assert a["image"].shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
  img = a["image"][0].numpy()
  np.testing.assert_allclose((img[..., 0] * 0.229 + 0.485), (img[..., 1] * 0.224 + 0.456), atol=1e-5)


def test_rotation_matches_np_rot90_eagerly_and_in_tf_data():
  img = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
  for k in range(4):
    eager = preprocess.rotate(tf.constant(img), tf.constant(k)).numpy()
    in_data = next(iter(tf.data.Dataset.from_tensors(img).map(
        lambda x, k=k: preprocess.rotate(x, tf.constant(k))))).numpy()
    np.testing.assert_array_equal(eager, np.rot90(img, k))
    np.testing.assert_array_equal(in_data, eager)


def test_train_transform_eager_equals_tf_data():
  img = tf.cast(tf.random.stateless_uniform([40, 50, 3], [1, 2], 0, 255), tf.uint8)
  seed = tf.constant([3, 4], tf.int64)
  eager = preprocess.train_transform(img, 32, seed).numpy()
  in_data = next(iter(tf.data.Dataset.from_tensors(img).map(
      lambda x: preprocess.train_transform(x, 32, seed)))).numpy()
  np.testing.assert_allclose(eager, in_data, atol=1e-5)
  assert eager.shape == (32, 32, 3)


@pytest.mark.parametrize("fmt,channels", [("jpeg", 3), ("jpeg", 1), ("png", 3)])
def test_decoding_only_the_crop_window_gives_the_decoded_images_crop(fmt, channels):
  """The training pipeline decodes a JPEG's crop window only (issue 17). Window and pixels
  are those of decoding whole then cropping, eagerly and in tf.data, except that libjpeg's
  chroma upsampling has no neighbour beyond the window's first and last column (colour
  JPEGs: those two columns may differ slightly). Other formats decode whole, then crop."""
  rng = np.random.default_rng(channels)
  pixels = rng.integers(0, 255, (75, 100, channels)).astype(np.uint8)
  encoded = (tf.io.encode_jpeg(pixels, quality=95) if fmt == "jpeg"
             else tf.io.encode_png(pixels)).numpy()
  whole = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  for i in range(8):
    seed = tf.constant([5, i], tf.int64)
    y, x, h, w = preprocess.crop_window(tf.shape(whole), seed).numpy()
    want = whole.numpy()[y:y + h, x:x + w].astype(int)
    eager = preprocess.decode_random_crop(tf.constant(encoded), seed).numpy().astype(int)
    in_data = next(iter(tf.data.Dataset.from_tensors(encoded).map(
        lambda e, seed=seed: preprocess.decode_random_crop(e, seed)))).numpy().astype(int)
    np.testing.assert_array_equal(in_data, eager)
    assert eager.shape == want.shape
    np.testing.assert_array_equal(eager[:, 1:-1], want[:, 1:-1])
    edge = np.abs(eager - want).max()
    assert edge <= 40 and (fmt == "jpeg" and channels == 3 or edge == 0)
    # The whole training transform from bytes equals it from the decoded image, up to that.
    got = preprocess.train_transform_encoded(tf.constant(encoded), 48, seed, 0.08).numpy()
    ref = preprocess.train_transform(whole, 48, seed, scale_min=0.08).numpy()
    assert got.dtype == ref.dtype == np.uint8
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0


def test_train_dataset_follows_the_plan(tiny_shards):
  ids = reader.read_image_ids(tiny_shards)
  mult = np.zeros(len(ids), np.int64)
  mult[:4] = 3          # only 4 images, 3 times each
  supers = (np.arange(len(ids)) % 2).astype(np.int32)
  subs = (np.arange(len(ids)) % 5).astype(np.int32)
  plan = reader.EpochPlan(ids, mult, supers, subs)
  ds = reader.build_train_dataset(tiny_shards, image_size=32, batch_size=8, steps=6, plan=plan,
                                  num_rotations=4, all_rotations=True, seed=0, epoch=0,
                                  shuffle_buffer=64)
  batches = _all(ds)
  assert len(batches) == 6
  got = np.concatenate([b["image_id"].numpy() for b in batches])
  counts = {i: int((got == i).sum()) for i in set(got)}
  assert set(counts) == set(ids[:4]) and all(c == 12 for c in counts.values())  # 3 draws x 4 rotations
  lookup = dict(zip(ids, zip(supers, subs)))
  b = batches[0]
  for i, r, s, z in zip(b["image_id"].numpy(), b["rotation"].numpy(), b["super_class"].numpy(),
                        b["sub_class"].numpy()):
    assert s == 4 * lookup[i][0] + r and z == lookup[i][1]


def test_train_dataset_resume_skips_exactly(tiny_shards):
  kw = dict(image_size=32, batch_size=8, steps=5, plan=None, num_rotations=4,
            all_rotations=False, seed=3, epoch=1, shuffle_buffer=64)
  full = _all(reader.build_train_dataset(tiny_shards, **kw))
  resumed = _all(reader.build_train_dataset(tiny_shards, skip_steps=2, **kw))
  assert len(resumed) == 3
  for a, b in zip(full[2:], resumed):
    np.testing.assert_array_equal(a["image_id"].numpy(), b["image_id"].numpy())
    np.testing.assert_allclose(a["image"].numpy(), b["image"].numpy())


def test_file_level_sharding_by_input_context(tiny_shards):
  ids = [set(reader.read_image_ids(tiny_shards, tf.distribute.InputContext(2, w))) for w in (0, 1)]
  assert ids[0] and ids[1] and not ids[0] & ids[1]
  assert ids[0] | ids[1] == set(reader.read_image_ids(tiny_shards))
  with pytest.raises(reader.DataError, match="at least one shard per worker"):
    reader.read_image_ids(tiny_shards, tf.distribute.InputContext(8, 0))


def test_byte_status_codes():
  jpeg = jpeg_bytes(1)
  cases = {b"": decoder.ZERO_BYTES, b"nope": decoder.NOT_IMAGE, jpeg[:50]: decoder.TRUNCATED,
           jpeg: decoder.OK}
  for data, want in cases.items():
    assert int(decoder.byte_status(tf.constant(data), tf.constant("jpeg"))) == want
  assert int(decoder.byte_status(tf.constant(jpeg), tf.constant("tiff"))) == decoder.UNSUPPORTED


def test_embedded_dataset_is_present_and_small():
  from conftest import REPO
  files = glob.glob(os.path.join(REPO, "data", "*.tfrecord"))
  assert sum(os.path.getsize(f) for f in files) < 15e6
  summary = json.load(open(os.path.join(REPO, "data", "train.json")))
  assert summary["written"] >= 2500 and len(summary["labels"]) >= 10
