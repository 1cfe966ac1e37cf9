"""`.pth` files from strangers (issue 37): each is refused in one line and in bounded memory.

Most cases load in this process through `torch_pickle.load`, their peak allocation measured
with tracemalloc (numpy reports its buffers to it); a few run `python -m dc_tf.convert` as a
subprocess (it refuses them before importing TensorFlow, ~1 s each) and bound its peak RSS by
a baseline, the same command refusing a 16-byte garbage file, plus 100 MB: a hostile file
may cost the reader no more than a small fraction of a state dict (0.55 GB) over nothing.
Torch writes the valid files; the hostile ones are pickled by hand with torch's own rebuild
functions, so only the numbers in them are crafted.
"""

import collections
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="pip install -r requirements-test.txt")

from dc_tf import convert, torch_pickle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MB = 1 << 20
CAP = 64 * MB             # the cap the in-process cases load under
BOMB = 512 * MB           # zeros a bomb inflates to: 8x CAP, ~0.5 MB deflated
SMALL_PEAK = 16 * MB      # what refusing a small file may allocate in process
CLI_MARGIN = 100 * MB
PEAKS = {}                # case -> peak bytes allocated (printed at the end, pytest -s)


# --- hand-pickled files ----------------------------------------------------------------------

class Storage:
  """A storage reference; `view` is the legacy (view_key, offset, size)."""

  def __init__(self, key, numel, view=None, kind=None):
    self.key, self.numel, self.view = key, numel, view
    self.kind = kind or torch.FloatStorage


class Tensor:
  """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, self.args


class Pickler(pickle.Pickler):
  def __init__(self, f, legacy):
    super().__init__(f, protocol=2)
    self.legacy = legacy

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    pid = ("storage", obj.kind, obj.key, "cpu", obj.numel)
    return pid + (obj.view,) if self.legacy else pid


def dumps(obj, legacy=False):
  import io
  f = io.BytesIO()
  Pickler(f, legacy).dump(obj)
  return f.getvalue()


def write_zip(path, obj, storages, compression=zipfile.ZIP_STORED):
  with zipfile.ZipFile(path, "w", compression) as z:
    z.writestr("archive/data.pkl", dumps(obj))
    z.writestr("archive/version", "3\n")          # torch.load needs it; we do not
    for key, data in storages.items():
      z.writestr(f"archive/data/{key}", data)
  return str(path)


def write_legacy(path, obj, storages):
  """storages: key -> (element count written, bytes)."""
  with open(path, "wb") as f:
    for part in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL,
                 {"protocol_version": 1001, "little_endian": True}):
      pickle.dump(part, f, protocol=2)
    f.write(dumps(obj, legacy=True))
    pickle.dump(sorted(storages), f, protocol=2)
    for key in sorted(storages):
      count, data = storages[key]
      f.write(struct.pack("<q", count) + data)
  return str(path)


def floats(n):
  return np.arange(n, dtype="<f4").tobytes()


def refused(path, match, max_bytes=CAP, peak=SMALL_PEAK, case=None):
  """Loads `path`, expects one TorchFileError naming it and matching `match`, and its peak
  allocation under `peak`; returns the message."""
  tracemalloc.start()
  try:
    with pytest.raises(torch_pickle.TorchFileError, match=match) as info:
      torch_pickle.load(str(path), max_bytes)
    _, top = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  message = str(info.value)
  assert message.startswith(str(path)) and "\n" not in message, message
  PEAKS[case or os.path.basename(str(path))] = top
  assert top < peak, (top, message)
  return message


# --- tensors that do not fit their storage ----------------------------------------------------

@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_stride_0_expand_of_500m_elements_is_refused_before_it_is_copied(tmp_path, zipped):
  """The reproduction in issue 37: 1.6 kB on disk, 2 GB once copied out."""
  path = tmp_path / "expand.pth"
  torch.save({"state_dict": {"module.body.features.0.weight": torch.zeros(1).expand(500_000_000)}},
             path, _use_new_zipfile_serialization=zipped)
  assert os.path.getsize(path) < 4096
  refused(path, r"size \(500000000,\), stride \(0,\) at offset 0 does not fit its storage of 1 "
          r"elements.*stride-0 expand", max_bytes=torch_pickle.DEFAULT_MAX_BYTES,
          case=f"expand-{'zip' if zipped else 'legacy'}")


def test_a_small_stride_0_view_within_its_storage_is_read_as_torch_reads_it(tmp_path):
  """Refusal is about the element count, not stride 0 itself: 2 copies of element 2 of a
  4-element storage hold no more than the storage holds from that offset."""
  path = write_zip(tmp_path / "ok.pth", {"w": Tensor(Storage("0", 4), 2, (2,), (0,)),
                                         "v": Tensor(Storage("0", 4), 0, (2, 2), (0, 1))},
                   {"0": floats(4)})
  got, want = torch_pickle.load(path), torch.load(path, weights_only=True)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key].numpy())
  assert got["w"].tolist() == [2.0, 2.0] and got["v"].tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("offset,size,stride,match", [
    (0, (3,), (-1,), "integers >= 0"),
    (2, (3, 2), (1,), "not two sequences of the same length"),
    (0, (2, 2), (2, 1, 1), "not two sequences of the same length"),
    (0, (5,), (1,), "does not fit its storage of 4"),
    (3, (2,), (1,), "does not fit its storage of 4"),
    (0, (2, 2), (3, 1), "does not fit its storage of 4"),      # reads element 4
    (0, (3, 2), (1, 1), "does not fit its storage of 4"),      # overlapping: 6 of 4 elements
    (0, "abc", "abc", "not two sequences"),
    (-1, (), (), "integers >= 0"),
], ids=["negative-stride", "short-stride", "long-stride", "past-end", "offset-past-end",
        "stride-past-end", "overlap", "string-size", "negative-offset"])
def test_sizes_and_strides_that_do_not_fit_are_refused(tmp_path, offset, size, stride, match):
  for name, write in (("zip", lambda p, o: write_zip(p, o, {"0": floats(4)})),
                      ("legacy", lambda p, o: write_legacy(p, o, {"0": (4, floats(4))}))):
    path = write(tmp_path / f"{name}.pth", {"w": Tensor(Storage("0", 4), offset, size, stride)})
    refused(path, match, case=f"stride-{name}-{size}-{stride}")


@pytest.mark.parametrize("not_a_storage", [7, {"a": 1}, "bytes", None],
                         ids=["int", "dict", "str", "none"])
def test_a_non_storage_where_a_storage_belongs_is_refused(tmp_path, not_a_storage):
  class Bad:
    def __reduce__(self):
      return torch._utils._rebuild_tensor_v2, (not_a_storage, 0, (1,), (1,), False,
                                               collections.OrderedDict())
  path = write_zip(tmp_path / "bad.pth", {"w": Bad()}, {})
  refused(path, "a tensor's storage is a .*, not a storage")


def test_crafted_calls_and_persistent_ids_are_one_line_errors(tmp_path):
  class TooFewArgs:
    def __reduce__(self):
      return torch._utils._rebuild_tensor_v2, (1,)
  refused(write_zip(tmp_path / "args.pth", {"w": TooFewArgs()}, {}), r"TypeError")

  class OddPid(pickle.Pickler):
    def persistent_id(self, obj):
      return ("storage",) if obj == "x" else None
  import io
  f = io.BytesIO()
  OddPid(f, protocol=2).dump({"w": "x"})
  path = tmp_path / "pid.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", f.getvalue())
  refused(path, "unknown persistent id")
  # a storage whose bytes are not whole elements
  refused(write_zip(tmp_path / "odd.pth", {"w": Tensor(Storage("0", 1), 0, (1,), (1,))},
                    {"0": b"\0" * 5}), "not a whole number of 4-byte elements")
  # lists nested 5000 deep (a legacy object is walked to build its tensors)
  deep = write_legacy(tmp_path / "deep.pth", [], {})
  data = open(deep, "rb").read()
  at = data.index(dumps([], legacy=True))
  body = b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b"."
  open(deep, "wb").write(data[:at] + body + data[at + len(dumps([], legacy=True)):])
  refused(deep, r"RecursionError")
  # a member flagged encrypted: zipfile asks for a password (RuntimeError)
  path = write_zip(tmp_path / "locked.pth", {"w": Tensor(Storage("0", 4), 0, (4,), (1,))},
                   {"0": floats(4)})
  data = bytearray(open(path, "rb").read())
  at = data.find(b"PK\x01\x02")
  while at >= 0:
    data[at + 8] |= 1
    at = data.find(b"PK\x01\x02", at + 4)
  open(path, "wb").write(bytes(data))
  refused(path, r"RuntimeError: File .* is encrypted")


def test_copies_of_one_storage_are_charged_against_the_cap(tmp_path):
  """Each transposed (non-contiguous) view is copied out: 24 copies of a 4 MiB storage take
  past a 64 MiB cap, though each fits its storage."""
  n = 1024
  storage = Storage("0", n * n)
  obj = {f"w{i}": Tensor(storage, 0, (n, n), (1, n)) for i in range(24)}
  path = write_zip(tmp_path / "copies.pth", obj, {"0": floats(n * n)})
  refused(path, rf"a tensor of size \({n}, {n}\) copied from its storage takes {4 * n * n:,} "
          rf"bytes, past the load cap of {CAP:,}", peak=CAP + 8 * MB)
  few = {k: obj[k] for k in list(obj)[:2]}         # two copies fit, and equal torch's
  path = write_zip(tmp_path / "two.pth", few, {"0": floats(n * n)})
  got = torch_pickle.load(path, CAP)
  want = torch.load(path, weights_only=True)
  assert got.keys() == want.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], want[k].numpy())


def test_the_cap_fits_the_released_files_and_refuses_a_valid_file_larger_than_it(tmp_path):
  # torchvision's vgg16_bn, the largest released file: convs (3 input channels), 4 BN
  # vectors each, fc6 over the 7x7x512 map, fc7, the 1000-way classifier (float32).
  c_in, params = 3, 0
  for c in convert.VGG16_CHANNELS:
    params += c * c_in * 9 + c + 4 * c
    c_in = c
  params += (7 * 7 * 512 + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * 1000
  released = 4 * params
  # room for the state dict and as much again (an optimizer's momentum buffers)
  assert torch_pickle.DEFAULT_MAX_BYTES > 2 * released
  path = tmp_path / "valid.pth"
  torch.save({"state_dict": {"a": torch.randn(1000), "b": torch.randn(3000)}}, path)
  with zipfile.ZipFile(path) as z:
    pkl = [i.file_size for i in z.infolist() if i.filename.endswith("data.pkl")][0]
  # the reader's whole charge: the zip's central directory, the pickle at PICKLE_EXPANSION
  # bytes a byte, both storages (the tensors are contiguous: views, not copies)
  with open(path, "rb") as f:
    directory = torch_pickle._central_directory_bytes(f)  # noqa: SLF001
  assert 0 < directory < 10_000     # a few members: small beside the storages
  needed = directory + pkl * torch_pickle.PICKLE_EXPANSION + 4 * (1000 + 3000)
  assert torch_pickle.load(str(path), needed)["state_dict"]["b"].shape == (3000,)
  # a's 4,000 bytes fit; b's 12,000 are one byte over what is left
  refused(path, r"storage \d+ \(its declared uncompressed size\) takes 12,000 bytes, past the "
          rf"load cap of {needed - 1:,} bytes \({12_000 - 1:,} left", max_bytes=needed - 1)


# --- legacy storage views ---------------------------------------------------------------------

def test_legacy_storage_views_are_read_as_root_slices(tmp_path):
  """torch < 0.4 saved views of a storage: (view_key, offset, size) in elements."""
  root = Storage("r", 10)
  view = Storage("r", 10, view=("v", 2, 5))
  obj = {"whole": Tensor(root, 1, (3,), (1,)), "view": Tensor(view, 1, (2, 2), (2, 1))}
  path = write_legacy(tmp_path / "views.pth", obj, {"r": (10, floats(10))})
  got = torch_pickle.load(path)
  np.testing.assert_array_equal(got["whole"], [1, 2, 3])
  # the view is elements 2..6 of the root; the tensor reads 4 of them from its offset 1
  np.testing.assert_array_equal(got["view"], [[3, 4], [5, 6]])
  past = Storage("r", 10, view=("v", 8, 5))
  path = write_legacy(tmp_path / "past.pth", {"w": Tensor(past, 0, (1,), (1,))},
                      {"r": (10, floats(10))})
  refused(path, "a view of 5 elements at offset 8 of storage r ends past its 10 elements")
  bad = Storage("r", 10, view=("v", -1))
  path = write_legacy(tmp_path / "bad.pth", {"w": Tensor(bad, 0, (1,), (1,))},
                      {"r": (10, floats(10))})
  refused(path, r"malformed view")


def test_a_pickle_that_nests_one_list_60_times_resolves_in_linear_time(tmp_path):
  x = [Tensor(Storage("0", 4), 0, (4,), (1,))]
  for _ in range(60):
    x = [x, x]
  path = write_legacy(tmp_path / "laughs.pth", {"w": x}, {"0": (4, floats(4))})
  got = torch_pickle.load(path)["w"]
  for _ in range(60):
    assert got[0] is got[1]
    got = got[0]
  np.testing.assert_array_equal(got[0], [0, 1, 2, 3])


# --- truncated and inflated containers ---------------------------------------------------------

@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_every_truncation_of_a_file_is_refused(tmp_path, zipped):
  path = tmp_path / "whole.pth"
  torch.save({"state_dict": {"a": torch.randn(64), "b": torch.arange(8)}}, path,
             _use_new_zipfile_serialization=zipped)
  data = path.read_bytes()
  cut = tmp_path / "cut.pth"
  for at in sorted({1, 8, 40, 100, len(data) // 3, len(data) // 2, len(data) - 200,
                    len(data) - 30, len(data) - 1}):
    cut.write_bytes(data[:at])
    refused(cut, ".", case=f"truncated-{'zip' if zipped else 'legacy'}")


@pytest.fixture(scope="module")
def bomb_file(tmp_path_factory):
  """A zip whose storage 0 inflates to BOMB zeros (ZIP_DEFLATED level 1: ~2.3 MB on disk,
  a ratio over 200), written in chunks; built once, copied by `bomb`."""
  path = str(tmp_path_factory.mktemp("bomb") / "bomb.pth")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
    z.writestr("archive/data.pkl",
               dumps({"w": Tensor(Storage("0", BOMB // 4), 0, (BOMB // 4,), (1,))}))
    with z.open("archive/data/0", "w") as f:
      for _ in range(BOMB // (4 * MB)):
        f.write(bytes(4 * MB))
  assert os.path.getsize(path) < BOMB // 200
  return path


def bomb(bomb_file, path, declared=None):
  """A copy of the bomb; with `declared`, its headers say storage 0 holds that many bytes."""
  shutil.copy(bomb_file, path)
  if declared is not None:
    declare(path, "archive/data/0", declared)
  return str(path)


def declare(path, member, size):
  """Rewrites `member`'s uncompressed size in its local and central headers (a lie)."""
  data = bytearray(open(path, "rb").read())
  with zipfile.ZipFile(path) as z:
    local = z.getinfo(member).header_offset
  struct.pack_into("<I", data, local + 22, size)
  at = data.find(b"PK\x01\x02")
  while at >= 0:
    name_len = struct.unpack_from("<H", data, at + 28)[0]
    if data[at + 46:at + 46 + name_len] == member.encode():
      struct.pack_into("<I", data, at + 24, size)
    at = data.find(b"PK\x01\x02", at + 4)
  open(path, "wb").write(bytes(data))
  with zipfile.ZipFile(path) as z:
    assert z.getinfo(member).file_size == size


def test_a_zip_bomb_is_refused_on_its_declared_size(tmp_path, bomb_file):
  refused(bomb(bomb_file, tmp_path / "bomb.pth"), r"storage 0 \(its declared uncompressed "
          rf"size\) takes {BOMB:,} bytes, past the load cap of {CAP:,}", case="bomb")


# zipfile reads a member no further than its declared size, then checks its CRC
LIE = r"not a readable PyTorch file \(BadZipFile: Bad CRC-32 for file 'archive/data/0'\)"


def test_a_zip_bomb_whose_header_lies_is_read_no_further_than_it_says(tmp_path, bomb_file):
  # says 4 kB, inflates to 512 MB: the stream stops at 4 kB and its CRC fails
  small = bomb(bomb_file, tmp_path / "small.pth", declared=4096)
  refused(small, LIE, case="bomb-header-4kB")
  # says 60 MB (under the cap), inflates to 512 MB: read no further than 60 MB
  under = bomb(bomb_file, tmp_path / "under.pth", declared=60 * MB)
  refused(under, LIE, peak=CAP + 8 * MB, case="bomb-header-60MB")
  # says 3.5 GB over the default cap: refused before a byte is inflated
  huge = bomb(bomb_file, tmp_path / "huge.pth", declared=3_500_000_000)
  refused(huge, rf"\(its declared uncompressed size\) takes {3_500_000_000:,} bytes, past the "
          "load cap", max_bytes=torch_pickle.DEFAULT_MAX_BYTES, case="bomb-header-3.5GB")


def test_a_header_that_claims_more_than_the_member_holds_costs_what_it_holds(tmp_path):
  path = write_zip(tmp_path / "short.pth", {"w": Tensor(Storage("0", 4), 0, (4,), (1,))},
                   {"0": floats(4)})
  declare(path, "archive/data/0", 50 * MB)
  refused(path, rf"storage 0 holds 16 bytes, its header declares {50 * MB:,}: truncated")


def test_a_pickle_of_empty_sets_is_charged_for_its_objects(tmp_path):
  """EMPTY_SET is one byte of pickle and a 216-byte set: pickles are charged 256 bytes a
  byte, so a 64 kB one is refused under a 1 MB cap before it is unpickled."""
  body = b"\x80\x02" + b"\x8f" * (64 * 1024) + b"."
  path = tmp_path / "sets.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", body)
  refused(path, r"data.pkl's objects", max_bytes=MB)
  legacy = tmp_path / "sets-legacy.pth"
  with open(legacy, "wb") as f:
    pickle.dump(torch_pickle.LEGACY_MAGIC, f, protocol=2)
    f.write(body)
  refused(legacy, r"pickle runs past 4,096 bytes", max_bytes=MB)


def test_a_huge_memo_index_costs_nothing(tmp_path):
  """LONG_BINPUT 2**26 in a 10-byte pickle: the C unpickler grows its memo array to twice the
  index (512 MiB here, 4 GiB at 2**28) before any check runs; the reader's memo is a dict."""
  body = b"\x80\x02}r\x00\x00\x00\x04."
  path = tmp_path / "memo.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", body)
  legacy = tmp_path / "memo-legacy.pth"
  with open(legacy, "wb") as f:
    f.write(body)                    # the magic number's pickle is the first one read
  tracemalloc.start()
  try:
    assert torch_pickle.load(str(path)) == {}
    with pytest.raises(torch_pickle.TorchFileError, match="legacy magic number"):
      torch_pickle.load(str(legacy))
    _, top = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert top < SMALL_PEAK, top


def test_a_zip_of_many_entries_is_charged_for_its_directory_before_it_opens(tmp_path):
  """150,000 empty members beside a valid data.pkl: zipfile would build a ZipInfo for each
  (~90 MB) before any member is read. The central directory's size is charged first, from the
  end record, so it is refused within the small-case peak."""
  path = tmp_path / "entries.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    for i in range(150_000):
      z.writestr(f"archive/x/{i}", b"")
  message = refused(path, "central directory")
  assert "--max_load_bytes" in message
  assert torch_pickle.load(str(path), 1 << 30) == {}      # under a cap that holds it: read


def test_a_bfloat16_storage_is_widened_as_torch_does_within_its_charge(tmp_path):
  """A bfloat16 storage of 2 MiB is read (2 MiB, charged) and widened to float32 (4 MiB,
  charged): torch's own float() values, a peak within the 6 MiB charged (the shift was once a
  second 4 MiB copy), and refused under a 6 MiB cap (the pickle and the zip's directory are
  charged too, so the widening is what no longer fits)."""
  n = 1 << 20
  t = (torch.arange(n, dtype=torch.float32) / 7).to(torch.bfloat16)
  path = tmp_path / "bf16.pth"
  torch.save({"w": t}, path)
  tracemalloc.start()
  try:
    got = torch_pickle.load(str(path))["w"]
    _, top = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert got.dtype == np.float32 and np.array_equal(got, t.float().numpy())
  assert top < 6 * MB + MB // 4, top
  message = refused(path, "bfloat16 storage widened to float32", max_bytes=6 * MB)
  assert "past the load cap" in message


def test_pickled_code_is_refused_in_both_containers(tmp_path):
  marker = tmp_path / "ran"

  class Payload:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  for name, path in (("zip", write_zip(tmp_path / "evil.pth", {"x": Payload()}, {})),
                     ("legacy", write_legacy(tmp_path / "evil-legacy.pth", {"x": Payload()}, {}))):
    with pytest.raises(torch_pickle.UnsafePickleError, match=r"global (posix|os)\.system"):
      torch_pickle.load(path)
  assert not marker.exists()


# --- the command line ---------------------------------------------------------------------

# The converter runs under a small Python that reports its children's peak RSS: Linux keeps
# a process's ru_maxrss across exec, so a child forked straight from pytest (TF loaded, ~1 GB)
# would report pytest's size, not its own.
MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def run_cli(*args):
  """(returncode, stderr, peak RSS in bytes) of `python -m dc_tf.convert`."""
  proc = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "dc_tf.convert",
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  return proc.returncode, proc.stderr, int(proc.stdout.split()[-1]) * 1024    # Linux: kB


def test_the_converter_refuses_hostile_files_in_one_line_and_bounded_memory(tmp_path, bomb_file):
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a checkpoint")
  code, err, baseline = run_cli(f"--from_pytorch={garbage}", f"--model_dir={tmp_path / 'run'}")
  assert code == 2 and err.startswith("error: "), err
  expand = tmp_path / "expand.pth"
  torch.save({"state_dict": {"module.body.features.0.weight": torch.zeros(1).expand(500_000_000)}},
             expand)
  marker = tmp_path / "ran"

  class Payload:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  evil = write_legacy(tmp_path / "evil.pth", {"state_dict": Payload()}, {})
  lying = bomb(bomb_file, tmp_path / "lying.pth", declared=60 * MB)
  cases = ((str(expand), [], "does not fit its storage of 1 elements"),
           (evil, [], "refusing to unpickle global"),
           (bomb(bomb_file, tmp_path / "bomb.pth"), [f"--max_load_bytes={CAP}"],
            "past the load cap"),
           (lying, [f"--max_load_bytes={CAP}"], LIE))
  for path, flags, message in cases:
    code, err, peak = run_cli(f"--from_pytorch={path}", f"--model_dir={tmp_path / 'run'}", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}: "), err
    assert re.search(message, lines[0]) and "Traceback" not in err, err
    PEAKS[f"cli {os.path.basename(path)}"] = peak
    assert peak < baseline + CLI_MARGIN, (path, peak, baseline)
  PEAKS["cli baseline (garbage)"] = baseline
  assert not marker.exists() and not (tmp_path / "run").exists()


def teardown_module():
  for case, peak in sorted(PEAKS.items()):
    print(f"peak {case}: {peak / MB:.1f} MB")
