"""Decoder, parsers, reader and bad-input handling (the writer: test_make_shards.py)."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import jpeg_bytes, write_records
from dc_tf.data import decoder, preprocess, reader, schema


def _all(ds):
  return [b for b in ds]


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


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_rotation_matches_np_rot90_eagerly_and_in_tf_data(dtype):
  img = np.arange(2 * 3 * 3).reshape(2, 3, 3).astype(dtype) * 13
  for k in range(4):
    eager = preprocess.rotate(tf.constant(img), tf.constant(k)).numpy()
    in_data = next(iter(tf.data.Dataset.from_tensors(img).map(
        lambda x, k=k: preprocess.rotate(x, tf.constant(k))))).numpy()
    np.testing.assert_array_equal(eager, np.rot90(img, k))
    assert eager.dtype == dtype
    np.testing.assert_array_equal(in_data, eager)
  square = img[:, :2]                                             # --all_rotations: stacked
  stacked = preprocess.rotations(tf.constant(square), 4).numpy()
  assert stacked.dtype == dtype
  np.testing.assert_array_equal(stacked, np.stack([np.rot90(square, k) for k in range(4)]))


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
  assert summary["records"] >= 2500 and len(summary["labels"]) >= 10


def _undecodable_shard(tmp_path, example):
  """Ids 0..2 good; id 99 has a JPEG's SOI and EOI markers (the byte checks pass) but no
  decodable body, as make_shards' "corrupt jpeg" case."""
  good = jpeg_bytes(5)
  bad = good[:20] + b"\x00" * 200 + good[-2:]
  assert int(decoder.byte_status(tf.constant(bad), tf.constant("jpeg"))) == decoder.OK
  records = [example(image_id=i) for i in range(3)]
  records.insert(1, example(data=bad, image_id=99))
  return write_records(str(tmp_path / "cj-00000-of-00001.tfrecord"), records)


def test_a_jpeg_that_passes_the_byte_checks_but_does_not_decode_is_dropped(tmp_path, example):
  """Issue 29: dropped by both pipelines, not a crash; the training epoch still has all its
  steps, drawn from the images that decode."""
  path = _undecodable_shard(tmp_path, example)
  batches = _all(reader.build_extraction_dataset(path, image_size=16, batch_size=8))
  assert list(np.concatenate([b["image_id"].numpy() for b in batches])) == [0, 1, 2]
  train = _all(reader.build_train_dataset(path, image_size=16, batch_size=2, steps=5, plan=None,
                                          num_rotations=4, all_rotations=False, seed=0, epoch=0,
                                          shuffle_buffer=8))
  ids = np.concatenate([b["image_id"].numpy() for b in train])
  assert len(train) == 5 and set(ids) == {0, 1, 2}


def test_a_jpeg_that_does_not_decode_is_counted_as_skipped(tmp_path, example):
  path = _undecodable_shard(tmp_path, example)
  batches = _all(reader.build_extraction_dataset(path, image_size=16, batch_size=8))
  assert max(int(b["skipped"].numpy().max()) for b in batches) == 1


def test_a_pool_where_no_jpeg_decodes_ends_instead_of_hanging(tmp_path, example):
  """Every record passes the byte checks and none decodes: the training pipeline's repeats
  are bounded, so it ends (short of its steps) instead of searching forever."""
  good = jpeg_bytes(5)
  bad = good[:20] + b"\x00" * 200 + good[-2:]
  path = write_records(str(tmp_path / "nd-00000-of-00001.tfrecord"),
                       [example(data=bad, image_id=i) for i in range(2)])
  train = _all(reader.build_train_dataset(path, image_size=16, batch_size=2, steps=2, plan=None,
                                          num_rotations=4, all_rotations=False, seed=0, epoch=0,
                                          shuffle_buffer=8))
  assert train == []
