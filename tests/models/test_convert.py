"""The original's released checkpoints, converted: equal to PyTorch endpoint by endpoint (issue 26).

The PyTorch side is built as the original's code builds it (tests/models/torch_original.py),
at width 1/8 and 64 px so fc6 sees a 2x2 map (at 32 px the C,H,W -> H,W,C reorder of fc6
is never exercised), saved in each layout and both PyTorch containers, converted by
`dc_tf.convert`, and loaded back through the run dir as evaluate.py and export load it.
Torch is a test dependency (requirements-test.txt); the converter itself does not need it.
torchvision's `vgg16_bn` (issue 35) is built the same way by hand (tests/models/torch_vgg16_bn.py)
at 224 px (its 7x7 adaptive pool the identity) and at 64 and 288 px (the pool folded into fc6).
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

torch = pytest.importorskip("torch", reason="pip install -r requirements-test.txt")

import torch_original  # noqa: E402  (tests/models, next to this file)
import torch_vgg16_bn  # noqa: E402
from dc_tf import convert, torch_pickle  # noqa: E402
from dc_tf.models import vgg  # noqa: E402
from dc_tf.training import checkpointing  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDTH, FC_DIM, SIZE = 0.125, 32, 64
CHANNELS = [vgg.channels(c, WIDTH) for c in convert.VGG16_CHANNELS]
FRONTS = [("deepercluster", True), ("deepercluster", False), ("deepcluster", True),
          ("deepcluster", False)]
TOLERANCE = 1e-4   # of each endpoint's largest magnitude
MAX_ERRORS = {}    # measured, printed at the end of the module (pytest -s)


def save(tmp_path, layout, sobel, zipped, **extra):
  model, endpoints = torch_original.build(layout, sobel, CHANNELS, FC_DIM, SIZE)
  path = str(tmp_path / f"{layout}-{'sobel' if sobel else 'rgb'}-{'zip' if zipped else 'legacy'}.pth")
  torch.save({"epoch": 7, "state_dict": model.state_dict(), **extra}, path,
             _use_new_zipfile_serialization=zipped)
  return path, model, endpoints


def relative_errors(keras_out, torch_out):
  return {name: rel for name, (rel, _) in relative_and_absolute_errors(keras_out, torch_out).items()}


def images(n=3, seed=0):
  return np.random.RandomState(seed).randn(n, SIZE, SIZE, 3).astype(np.float32)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("layout,sobel", FRONTS, ids=[f"{l}-{'sobel' if s else 'rgb'}" for l, s in FRONTS])
def test_every_endpoint_equals_pytorch(tmp_path, layout, sobel, zipped):
  path, _, endpoints = save(tmp_path, layout, sobel, zipped, optimizer={"state": {}, "param_groups": [
      {"lr": 0.1, "momentum": 0.9, "nesterov": False, "foreach": None, "params": [0, 1]}]})
  run = str(tmp_path / "run")
  config = convert.convert_file(path, run, image_size=SIZE)
  assert (config.model.sobel, config.model.pad) == (sobel, convert.FRONT_PAD[(layout, sobel)])
  trunk, loaded, step = checkpointing.load_trunk(run)      # what evaluate.py and export read
  assert step == 7 and loaded == config
  x = images()
  ref = endpoints(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  fc7 = ref["fc7"].numpy()     # a guard: features that ignore the image would prove nothing
  assert np.abs(fc7 - fc7.mean(0)).max() > 0.1 * np.abs(fc7).max()
  errors = relative_errors(trunk(x, training=False), ref)
  assert set(errors) == set(vgg.ENDPOINTS)
  MAX_ERRORS[(layout, sobel, zipped)] = max(errors.values())
  assert max(errors.values()) < TOLERANCE, errors
  meta = json.load(open(os.path.join(run, "converted_from.json")))
  head = "pred_layer" if layout == "deepercluster" else "top_layer"
  assert {f"{head}.weight", f"{head}.bias"} <= set(meta["dropped_keys"])
  assert meta["other_entries_ignored"] == ["epoch", "optimizer"]


def test_the_front_matters_so_it_is_part_of_the_config(tmp_path):
  """The same weights on DeeperCluster's 2-pixel Sobel pad instead of deepcluster's 1 fit
  (conv maps 66 instead of 64 px pool to the same 2x2 fc6 input) and give other features:
  what `--init_checkpoint` must refuse."""
  path, _, endpoints = save(tmp_path, "deepcluster", True, True)
  converted = convert.convert_state(torch_pickle.load(path)["state_dict"], image_size=SIZE)
  wrong = vgg.build_trunk(SIZE, WIDTH, FC_DIM, sobel=True, input_pad=2)
  for name, arrays in converted.weights.items():
    wrong.get_layer(name).set_weights(arrays)
  x = images()
  got = wrong(x, training=False)["fc7"].numpy()
  want = endpoints(torch.from_numpy(x.transpose(0, 3, 1, 2)))["fc7"].numpy()
  assert np.abs(got - want).max() / np.abs(want).max() > 1e-2


def test_both_containers_read_the_same_arrays_as_torch(tmp_path):
  model, _ = torch_original.build("deepercluster", True, CHANNELS, FC_DIM, SIZE)
  state = model.state_dict()
  state["module.strided"] = torch.arange(12.).reshape(3, 4).t()     # a non-contiguous view
  state["module.half"] = torch.randn(5).half()
  for zipped in (True, False):
    path = str(tmp_path / f"{zipped}.pth")
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=zipped)
    read = torch_pickle.load(path)["state_dict"]
    assert list(read) == list(state)
    for key, value in state.items():
      np.testing.assert_array_equal(read[key], value.numpy(), err_msg=key)


def test_pickled_code_is_refused_before_it_runs(tmp_path):
  marker = tmp_path / "ran"

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  for zipped in (True, False):
    path = str(tmp_path / f"evil-{zipped}.pth")
    torch.save({"state_dict": {"features.0.weight": torch.zeros(1)}, "x": Payload()}, path,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(torch_pickle.UnsafePickleError,
                       match=rf"{path}: refusing to unpickle global (posix|os)\.system"):
      torch_pickle.load(path)
  assert not marker.exists()


def test_a_tensor_that_reads_past_its_storage_is_refused(tmp_path):
  path = str(tmp_path / "t.pth")
  torch.save({"w": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
  data = open(path, "rb").read()
  # the pickled size (4,) becomes (9,): protocol 2 writes it as BININT1 4, TUPLE1
  at = data.index(b"K\x04\x85")
  open(path, "wb").write(data[:at] + b"K\x09\x85" + data[at + 3:])
  with pytest.raises(torch_pickle.TorchFileError, match="does not fit its storage of 4"):
    torch_pickle.load(path)


@pytest.mark.slow
def test_the_serving_export_of_a_converted_file_matches_pytorch_on_jpeg_bytes(tmp_path):
  """JPEG bytes through the SavedModel, against PyTorch fed the pixels the export itself
  prepares (decoders and resizers differ between libraries, so PyTorch gets ours)."""
  from dc_tf import export
  from dc_tf.data import preprocess
  path, _, endpoints = save(tmp_path, "deepercluster", True, False)
  run = str(tmp_path / "run")
  convert.convert_file(path, run, image_size=SIZE)
  trunk, config, step = checkpointing.load_trunk(run)
  out_dir = str(tmp_path / "export")
  export.export(trunk, out_dir, image_size=SIZE, config=config.to_dict(), step=step, epoch=step)
  rng = np.random.RandomState(1)
  jpegs = [tf.io.encode_jpeg(rng.randint(0, 255, [h, w, 3]).astype(np.uint8)).numpy()
           for h, w in ((90, 120), (64, 64), (150, 80))]
  served = export.load(out_dir).signatures["serving_default"](tf.constant(jpegs))
  pixels = np.stack([preprocess.eval_transform(tf.io.decode_image(b, channels=3), SIZE).numpy()
                     for b in jpegs])
  ref = endpoints(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  for name in ("fc7",) + export.DEFAULT_CONV_ENDPOINTS:
    want = ref[name].numpy()
    want = want.mean(axis=(2, 3)) if want.ndim == 4 else want
    err = np.abs(served[name].numpy() - want).max() / np.abs(want).max()
    MAX_ERRORS[("serving", name)] = float(err)
    assert err < TOLERANCE, (name, err)


def zeros_state(layout, sobel, width=1.0, fc_dim=4096, size=224):
  """A full-size state dict of read-only zero views (no memory, no torch): keys and shapes only."""
  channels = [vgg.channels(c, width) for c in convert.VGG16_CHANNELS]
  pad = convert.FRONT_PAD[(layout, sobel)]
  side = vgg.front_size(size, sobel, pad) // 32
  z = lambda *shape: np.broadcast_to(np.float32(0), shape)  # noqa: E731
  top = "module.body." if layout == "deepercluster" else ""
  feats = top + ("features." if layout == "deepercluster" else "features.module.")
  state, c_in = {}, 2 if sobel else 3
  for at, c in zip(convert.torch_feature_indices(), channels):
    state[f"{feats}{at}.weight"], state[f"{feats}{at}.bias"] = z(c, c_in, 3, 3), z(c)
    for p in ("weight", "bias", "running_mean", "running_var"):
      state[f"{feats}{at + 1}.{p}"] = z(c)
    state[f"{feats}{at + 1}.num_batches_tracked"] = np.zeros((), np.int64)
    c_in = c
  state[f"{top}classifier.0.weight"] = z(fc_dim, channels[-1] * side * side)
  state[f"{top}classifier.0.bias"] = z(fc_dim)
  state[f"{top}classifier.3.weight"], state[f"{top}classifier.3.bias"] = z(fc_dim, fc_dim), z(fc_dim)
  head = "module.pred_layer." if layout == "deepercluster" else "top_layer."
  state[head + "weight"], state[head + "bias"] = z(64, fc_dim), z(64)
  if sobel:
    sob = "module.sobel." if layout == "deepercluster" else "sobel."
    _, sobel_k = vgg.sobel_kernels()
    state[sob + "0.weight"], state[sob + "0.bias"] = np.full([1, 3, 1, 1], 1 / 3, np.float32), z(1)
    state[sob + "1.weight"], state[sob + "1.bias"] = sobel_k.transpose(3, 2, 0, 1), z(2)
  return state


@pytest.mark.parametrize("layout,sobel", FRONTS)
def test_full_width_state_dict_maps_onto_the_paper_trunk(layout, sobel):
  """Width 1, 224 px, fc 4096: every key is used and every shape fits the Keras trunk that
  vgg.py builds for the converted config (taken from a width-1/8 twin, whose layer list and
  shape formulas are the same, plus the full-size fc6 that holds the 7x7 map)."""
  state = zeros_state(layout, sobel)
  converted = convert.convert_state(state)
  m = converted.model
  assert (m.image_size, m.width, m.fc_units, m.sobel) == (224, 1.0, 4096, sobel)
  assert vgg.front_size(224, sobel, m.pad) // 32 == 7
  assert converted.weights["fc6_dense"][0].shape == (7 * 7 * 512, 4096)
  assert converted.weights["fc7"][0].shape == (4096, 4096)
  assert converted.weights["conv1_conv"][0].shape == (3, 3, 2 if sobel else 3, 64)
  assert converted.weights["conv13_bn"][3].shape == (512,)
  assert len(converted.weights) == 2 * 13 + 2
  assert len(converted.dropped) == 13 + 2       # BN step counters and the head
  # shape formulas equal Keras's at a width where building the trunk is cheap
  small = convert.convert_state(zeros_state(layout, sobel, WIDTH, FC_DIM, SIZE), image_size=SIZE)
  keras_trunk = vgg.trunk_from_config(small.model)
  for name, arrays in small.weights.items():
    assert [a.shape for a in arrays] == [tuple(w.shape) for w in keras_trunk.get_layer(name).weights]
  assert {w.path.split("/")[0] for w in keras_trunk.trainable_weights} == \
      {n for n in small.weights}


def test_missing_extra_and_misshapen_keys_are_named():
  state = zeros_state("deepercluster", True)
  del state["module.body.features.0.bias"]
  with pytest.raises(convert.ConversionError, match=r"missing key features\.0\.bias \(conv1\)"):
    convert.convert_state(state)
  state = zeros_state("deepercluster", True)
  for key in [k for k in state if k.endswith("num_batches_tracked")]:
    del state[key]                       # older files lack them: optional
  convert.convert_state(state)
  state["module.body.features.44.weight"] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError, match=r"unexpected key features\.44\.weight"):
    convert.convert_state(state)
  state = zeros_state("deepcluster", False)
  state["features.module.7.weight"] = np.zeros([128, 64, 5, 5], np.float32)
  with pytest.raises(convert.ConversionError, match=r"features\.7\.weight has shape \[128, 64, 5, 5\]"):
    convert.convert_state(state)
  state = zeros_state("deepcluster", True)
  state["sobel.1.weight"] = state["sobel.1.weight"] * 2
  with pytest.raises(convert.ConversionError, match=r"sobel\.1\.weight is not the fixed"):
    convert.convert_state(state)
  with pytest.raises(convert.ConversionError, match=r"classifier\.0\.weight has 25088 inputs.*--image_size=64"):
    convert.convert_state(zeros_state("deepcluster", True), image_size=64)
  with pytest.raises(convert.ConversionError, match="cannot tell the layout"):
    convert.convert_state({"features.0.weight": np.zeros([64, 3, 3, 3], np.float32)})


def cli(*args):
  return subprocess.run([sys.executable, "-m", "dc_tf.convert", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
  subhead = str(tmp_path / "0-pred_layer.pth.tar")
  torch.save({"epoch": 1, "state_dict": torch.nn.Linear(4, 3).state_dict()}, subhead)
  bad_key = str(tmp_path / "bad.pth")
  model, _ = torch_original.build("deepcluster", True, CHANNELS, FC_DIM, SIZE)
  state = model.state_dict()
  state["classifier.6.weight"] = torch.zeros(2)
  torch.save({"state_dict": state}, bad_key, _use_new_zipfile_serialization=False)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a checkpoint")
  for path, message in ((subhead, "a DeeperCluster sub-head file"),
                        (bad_key, "unexpected key classifier.6.weight"),
                        (str(garbage), "not a"),
                        (str(tmp_path / "absent.pth"), "cannot read")):
    run = tmp_path / "run"
    out = cli(f"--from_pytorch={path}", f"--model_dir={run}", f"--image_size={SIZE}")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], out.stderr
    assert path in lines[-1] and "Traceback" not in out.stderr
    assert not run.exists() and not (tmp_path / "run.converting").exists()


@pytest.mark.slow
def test_cli_converts_and_init_checkpoint_follows_only_the_same_front(tmp_path):
  path, _, _ = save(tmp_path, "deepercluster", False, True)       # RGB, padded by 1
  run = tmp_path / "rgb_pad1"
  out = cli(f"--from_pytorch={path}", f"--model_dir={run}", f"--image_size={SIZE}")
  assert out.returncode == 0, out.stderr
  assert "--sobel=false --input_pad=1" in out.stdout
  assert sorted(os.listdir(run)) == ["ckpt", "config.json", "converted_from.json"]
  again = cli(f"--from_pytorch={path}", f"--model_dir={run}", f"--image_size={SIZE}")
  assert again.returncode == 2 and "is not empty" in again.stderr
  cfg = checkpointing.read_config(str(run)).model
  ours = vgg.build_trunk(SIZE, WIDTH, FC_DIM, sobel=False)         # our RGB: no pad
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"front --sobel=false --input_pad=1, this run's is --sobel=false "
                           r"--input_pad=0.*Pass --sobel=false --input_pad=1"):
    checkpointing.restore_trunk(ours, str(run), dataclasses.replace(cfg, input_pad=-1))
  same = vgg.trunk_from_config(cfg)
  assert checkpointing.restore_trunk(same, str(run), cfg) == 7
  assert checkpointing.restore_trunk(same, os.path.join(str(run), "ckpt"), cfg) == 7


# --- torchvision's vgg16_bn (issue 35: the supervised row of Fig. 2) -------------------------


def relative_and_absolute_errors(keras_out, torch_out):
  errors = {}
  for name, ref in torch_out.items():
    ref = ref.numpy()
    ref = ref.transpose(0, 2, 3, 1) if ref.ndim == 4 else ref
    got = np.asarray(keras_out[name])
    assert got.shape == ref.shape, name
    diff = np.abs(got - ref).max()
    errors[name] = (float(diff / np.abs(ref).max()), float(diff))
  return errors


# 224 px: pool5 is 7x7 and the adaptive pool the identity; 64 px: a 2x2 map that the pool
# repeats; 288 px: a 9x9 map pooled by overlapping bins. The last two fold it into fc6.
@pytest.mark.parametrize("size", [224, 64, 288])
def test_torchvision_vgg16_bn_every_endpoint_equals_pytorch(tmp_path, size):
  model, endpoints = torch_vgg16_bn.build(CHANNELS, FC_DIM, size)
  path = str(tmp_path / "vgg16_bn.pth")
  torch.save(model.state_dict(), path)         # torchvision's files: the bare state dict
  run = str(tmp_path / "run")
  config = convert.convert_file(path, run, image_size=size)
  assert (config.model.sobel, config.model.pad, config.model.image_size) == (False, 0, size)
  trunk, _, step = checkpointing.load_trunk(run)
  assert step == 0
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  ref = endpoints(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  fc7 = ref["fc7"].numpy()     # a guard: features that ignore the image would prove nothing
  assert np.abs(fc7[0] - fc7[1]).max() > 0.1 * np.abs(fc7).max()
  out = dict(trunk(x, training=False))
  head = np.load(os.path.join(run, convert.SUPERVISED_HEAD_FILE))
  out["logits"] = np.maximum(out["fc7"], 0) @ head["kernel"] + head["bias"]
  errors = relative_and_absolute_errors(out, ref)
  assert set(errors) == set(vgg.ENDPOINTS) | {"logits"}
  MAX_ERRORS.update({("torchvision", size, k): v for k, v in errors.items()})
  assert max(rel for rel, _ in errors.values()) < TOLERANCE, errors
  meta = json.load(open(os.path.join(run, "converted_from.json")))
  assert meta["layout"] == "torchvision" and meta["front"] == "--sobel=false --input_pad=0"
  assert len(meta["dropped_keys"]) == 13 and all(
      k.endswith("num_batches_tracked") for k in meta["dropped_keys"])
  folded = "identity" if size == 224 else "folded into fc6"
  assert any(folded in n for n in meta["notes"]), meta["notes"]
  assert any(convert.SUPERVISED_HEAD_FILE in n for n in meta["notes"]), meta["notes"]


def test_adaptive_pool_matrix_is_pytorchs():
  for side in (1, 2, 7, 9, 14):
    x = torch.randn(1, 1, side, side, dtype=torch.float64)
    want = torch.nn.functional.adaptive_avg_pool2d(x, 7)[0, 0].numpy()
    a = convert.adaptive_pool_matrix(side)
    np.testing.assert_allclose(a @ x[0, 0].numpy() @ a.T, want, rtol=1e-12, err_msg=side)
  np.testing.assert_array_equal(convert.adaptive_pool_matrix(7), np.eye(7))


def torchvision_state(width=1.0, fc_dim=4096, classes=1000, prefix=""):
  """torchvision's vgg16_bn keys, in zero views (no memory, no torch): keys and shapes only."""
  channels = [vgg.channels(c, width) for c in convert.VGG16_CHANNELS]
  z = lambda *shape: np.broadcast_to(np.float32(0), shape)  # noqa: E731
  state, c_in = {}, 3
  for at, c in zip(convert.torch_feature_indices(), channels):
    state[f"{prefix}features.{at}.weight"], state[f"{prefix}features.{at}.bias"] = \
        z(c, c_in, 3, 3), z(c)
    for p in ("weight", "bias", "running_mean", "running_var"):
      state[f"{prefix}features.{at + 1}.{p}"] = z(c)
    state[f"{prefix}features.{at + 1}.num_batches_tracked"] = np.zeros((), np.int64)
    c_in = c
  for i, (n_out, n_in) in enumerate([(fc_dim, channels[-1] * 49), (fc_dim, fc_dim),
                                     (classes, fc_dim)]):
    state[f"{prefix}classifier.{3 * i}.weight"] = z(n_out, n_in)
    state[f"{prefix}classifier.{3 * i}.bias"] = z(n_out)
  return state


def test_torchvision_layout_is_detected_and_maps_onto_the_paper_trunk():
  converted = convert.convert_state(torchvision_state())
  m = converted.model
  assert converted.layout == "torchvision"
  assert (m.image_size, m.width, m.fc_units, m.sobel, m.pad) == (224, 1.0, 4096, False, 0)
  assert converted.weights["conv1_conv"][0].shape == (3, 3, 3, 64)
  assert converted.weights["fc6_dense"][0].shape == (7 * 7 * 512, 4096)
  assert converted.weights["fc7"][0].shape == (4096, 4096)
  assert len(converted.weights) == 2 * 13 + 2 and len(converted.dropped) == 13
  head = converted.kept[convert.SUPERVISED_HEAD_FILE]
  assert head["kernel"].shape == (4096, 1000) and head["bias"].shape == (1000,)
  # a DataParallel-saved file, and the explicit flag, give the same layout
  small = convert.convert_state(torchvision_state(WIDTH, FC_DIM, 10, prefix="module."),
                                image_size=SIZE)
  assert small.layout == "torchvision"
  keras_trunk = vgg.trunk_from_config(small.model)
  for name, arrays in small.weights.items():
    want = [tuple(w.shape) for w in keras_trunk.get_layer(name).weights]
    assert [a.shape for a in arrays] == want, name
  headless = torchvision_state(WIDTH, FC_DIM, 10)
  del headless["classifier.6.weight"], headless["classifier.6.bias"]
  with pytest.raises(convert.ConversionError, match="cannot tell the layout.*--layout=.*torchvision"):
    convert.convert_state(headless, image_size=SIZE)
  with pytest.raises(convert.ConversionError, match=r"missing key classifier\.6\.weight"):
    convert.convert_state(headless, image_size=SIZE, layout="torchvision")
  state = torchvision_state(WIDTH, FC_DIM, 10)
  state["classifier.6.weight"] = state["classifier.6.weight"][:, :5]
  with pytest.raises(convert.ConversionError, match=r"classifier\.6\.weight has shape \[10, 5\]"):
    convert.convert_state(state, image_size=SIZE)
  state = torchvision_state(WIDTH, FC_DIM, 10)
  state["classifier.0.weight"] = state["classifier.0.weight"][:, :CHANNELS[-1] * 4]
  with pytest.raises(convert.ConversionError, match=r"classifier\.0\.weight has 256 inputs.*7x7"):
    convert.convert_state(state, image_size=SIZE)
  state = torchvision_state(WIDTH, FC_DIM, 10)
  state["features.0.weight"] = state["features.0.weight"][:, :2]
  with pytest.raises(convert.ConversionError, match="2 input channels: torchvision"):
    convert.convert_state(state, image_size=SIZE)


def test_torchvision_cli_detects_the_layout_and_names_a_bad_key_in_one_line(tmp_path):
  model, _ = torch_vgg16_bn.build(CHANNELS, FC_DIM, SIZE)
  good = str(tmp_path / "vgg16_bn.pth")
  torch.save(model.state_dict(), good)
  state = model.state_dict()
  state["classifier.9.weight"] = torch.zeros(2)
  bad = str(tmp_path / "extra.pth")
  torch.save(state, bad)
  run = tmp_path / "run"
  out = cli(f"--from_pytorch={bad}", f"--model_dir={run}", f"--image_size={SIZE}")
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and lines[-1].startswith("error: ") and "Traceback" not in out.stderr
  assert bad in lines[-1] and "unexpected key classifier.9.weight" in lines[-1], out.stderr
  assert "torchvision VGG-16 state dict" in lines[-1]
  assert not run.exists() and not (tmp_path / "run.converting").exists()
  out = cli(f"--from_pytorch={good}", f"--model_dir={run}", f"--image_size={SIZE}")
  assert out.returncode == 0, out.stderr
  assert "--sobel=false --input_pad=0" in out.stdout
  assert sorted(os.listdir(run)) == ["ckpt", "config.json", "converted_from.json",
                                     convert.SUPERVISED_HEAD_FILE]
  assert json.load(open(run / "converted_from.json"))["layout"] == "torchvision"


# --- issue 37: the converter deletes nothing it did not write ---------------------------------

def test_a_staging_folder_or_full_run_dir_it_did_not_write_is_kept_unless_overwrite(tmp_path):
  path, _, _ = save(tmp_path, "deepercluster", False, True)
  run = tmp_path / "run"
  staging = tmp_path / "run.converting"
  staging.mkdir()
  (staging / "notes.txt").write_text("someone's")
  with pytest.raises(convert.ConversionError,
                     match=rf"{staging} exists .*remove it or pass --overwrite"):
    convert.convert_file(path, str(run), image_size=SIZE)
  assert (staging / "notes.txt").read_text() == "someone's" and not run.exists()
  run.mkdir()
  (run / "mine.txt").write_text("a run")
  with pytest.raises(convert.ConversionError, match=rf"--model_dir={run} is not empty.*pass "
                     "--overwrite"):
    convert.convert_file(path, str(run), image_size=SIZE)
  assert (run / "mine.txt").exists() and staging.exists()
  # with --overwrite both go: the run is replaced whole, the staging folder reused and removed
  config = convert.convert_file(path, str(run), image_size=SIZE, overwrite=True)
  assert sorted(os.listdir(run)) == ["ckpt", "config.json", "converted_from.json"]
  assert checkpointing.read_config(str(run)) == config
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path), "run"])
  (tmp_path / "file").write_text("")
  with pytest.raises(convert.ConversionError, match="is a file, not a directory"):
    convert.convert_file(path, str(tmp_path / "file"), image_size=SIZE, overwrite=True)


def test_cli_refuses_a_staging_folder_in_one_line_without_reading_stdin(tmp_path):
  path, _, _ = save(tmp_path, "deepcluster", True, False)
  run = tmp_path / "run"
  (tmp_path / "run.converting").mkdir()
  out = subprocess.run([sys.executable, "-m", "dc_tf.convert", f"--from_pytorch={path}",
                        f"--model_dir={run}", f"--image_size={SIZE}"], cwd=ROOT,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
  assert lines[0].startswith(f"error: {run}.converting exists") and "--overwrite" in lines[0]
  assert (tmp_path / "run.converting").is_dir() and not run.exists()


def teardown_module(module):
  del module
  if MAX_ERRORS:
    print("\nmax relative error per case:", json.dumps(
        {str(k): f"{v[0]:.1e} (abs {v[1]:.1e})" if isinstance(v, tuple) else f"{v:.1e}"
         for k, v in MAX_ERRORS.items()}))
