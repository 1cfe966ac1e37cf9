"""Reads PyTorch `.pth` files into numpy arrays without torch and without running pickled code.

A `.pth` file is a pickle whose tensors point at raw storages by "persistent id". Two
containers exist (torch/serialization.py):
  zip     (torch >= 1.6): `<name>/data.pkl` and one `<name>/data/<key>` entry per storage,
          little-endian unless `<name>/byteorder` says otherwise.
  legacy  (`_use_new_zipfile_serialization=False`, and every file saved before torch 1.6):
          five pickles back to back (magic number, protocol version, system info, the object,
          the sorted storage keys), then each storage as an int64 element count and its bytes.
          A persistent id may name a view of a storage, `(view_key, offset, size)` in elements
          (torch before 0.4 saved those): it is read as `root[offset:offset + size]`.

`load` unpickles with a restricted `find_class`: the only globals it resolves are the tensor
rebuilds, the storage classes and `collections.OrderedDict`; anything else (an optimizer
class, `argparse.Namespace`, any callable) is refused with `UnsafePickleError` naming the file
and the global found, before it is imported, so a crafted file cannot run code. This is what
`torch.load(weights_only=True)` allows, less what state dicts never hold.

A file from a stranger cannot take more memory than `max_bytes` (issue 37): every byte the
reader allocates for the file's data (the pickle, each storage, each tensor it copies) is
charged against it before it is allocated. Zip members are streamed, so neither a member that
inflates past the cap (a zip bomb) nor a header that lies about its size gets further.
Contiguous tensors are views of their storage (no copy, as torch's are); a strided tensor is
copied and charged. A tensor with more elements than its storage holds from its offset (a
stride-0 `expand`, overlapping strides) is refused: `torch.save` of a state dict never writes
one (parameters and buffers are dense), and refusing it bounds every copy by its storage. Any
malformed content ends in one `TorchFileError` naming the file.
"""

from __future__ import annotations

import collections
import io
import lzma
import math
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np

from dc_tf.config import UserError

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001
# The most bytes `load` allocates for one file's data. The largest released file, torchvision's
# vgg16_bn (conv, BN, fc6 25088x4096, fc7, its 1000-way classifier), holds 138,374,440 float32
# = 553,497,760 bytes; deepcluster's VGG-16 checkpoint adds a 10000-way top_layer (164 MB) and
# may hold SGD momentum buffers (as much again): 2 GiB leaves room above all of them.
DEFAULT_MAX_BYTES = 2 << 30
CHUNK = 1 << 20       # zip members are read this much at a time
# Bytes charged per byte of pickle: its objects can outweigh it (an EMPTY_SET opcode, one
# byte, is a 216-byte set; measured with tracemalloc, 224 bytes a byte at worst). A state
# dict's pickle is tens of KB; at the default cap a pickle may be 8 MiB.
PICKLE_EXPANSION = 256

# torch.<Name>Storage -> numpy dtype of its elements (BFloat16 is read as its top 16 bits).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# What crafted content raises inside pickle, struct, zipfile and numpy: each becomes one
# TorchFileError naming the file. MemoryError is not among them: the cap keeps it out of reach,
# and one that happens anyway is a bug to see, not a file to blame.
# RuntimeError covers zipfile's encrypted members, NotImplementedError (its unknown
# compressions) and RecursionError (a pickle nested too deep).
MALFORMED = (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, zlib.error,
             lzma.LZMAError, RuntimeError, AttributeError, TypeError, ValueError, KeyError,
             IndexError, OverflowError)


class TorchFileError(UserError, ValueError):
  """Not a PyTorch file this reader understands; the message names the file."""


class UnsafePickleError(TorchFileError):
  """The pickle asks for a global that is neither a tensor rebuild nor a plain container."""


def _itemsize(dtype) -> int:
  return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


class _Budget:
  """The bytes `load` may still allocate for one file; `charge` refuses before allocating."""

  def __init__(self, path: str, max_bytes: int):
    self.path, self.max_bytes, self.left = path, max_bytes, max_bytes

  def charge(self, nbytes: int, what: str) -> None:
    if nbytes > self.left:
      raise TorchFileError(
          f"{self.path}: {what} takes {nbytes:,} bytes, past the load cap of "
          f"{self.max_bytes:,} bytes ({self.left:,} left; raise --max_load_bytes for a file "
          "you trust)")
    self.left -= nbytes


class _Storage:
  """A storage's bytes, as numpy elements of its dtype."""

  def __init__(self, dtype, data, big_endian: bool = False, budget: _Budget | None = None):
    if len(data) % _itemsize(dtype):
      raise TorchFileError(f"a storage of {len(data)} bytes is not a whole number of "
                           f"{_itemsize(dtype)}-byte elements")
    self.dtype = dtype
    if dtype == "bfloat16":
      if budget is not None:
        budget.charge(2 * len(data), "a bfloat16 storage widened to float32")
      bits = np.frombuffer(data, ">u2" if big_endian else "<u2").astype(np.uint32)
      bits <<= 16      # in place: the widened copy is the only one (what was charged)
      self.array = bits.view(np.float32)
    else:
      self.array = np.frombuffer(data, np.dtype(dtype).newbyteorder(">" if big_endian else "<"))


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _rebuild_tensor(storage, offset, size, stride, budget: _Budget):
  """torch._utils._rebuild_tensor(_v2): a strided view of a storage; a view of its elements
  when contiguous, else copied out (charged)."""
  if not isinstance(storage, _Storage):
    raise TorchFileError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
  base = storage.array
  if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
          and len(size) == len(stride)):
    raise TorchFileError(f"a tensor's size {str(size)[:80]} and stride {str(stride)[:80]} are "
                         "not two sequences of the same length")
  if not all(_is_int(v) and v >= 0 for v in (offset, *size, *stride)):
    raise TorchFileError(f"a tensor of size {str(size)[:80]}, stride {str(stride)[:80]} at "
                         f"offset {str(offset)[:40]}: offset, sizes and strides must be "
                         "integers >= 0")
  count = math.prod(size)
  if count == 0:
    return np.zeros(size, base.dtype.newbyteorder("="))
  # as_strided does not check bounds: a crafted size or stride would read past the storage,
  # and a stride 0 (torch's `expand`) would copy one element out a billion times.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= len(base) or count > len(base) - offset:
    raise TorchFileError(
        f"a tensor of size {str(tuple(size))[:80]}, stride {str(tuple(stride))[:80]} at offset "
        f"{offset} does not fit its storage of {len(base)} elements: it would read past it or "
        "hold more elements than it (a stride-0 expand or overlapping view, which a state dict "
        "does not hold)")
  contiguous = all(s == math.prod(size[i + 1:]) for i, s in enumerate(stride) if size[i] != 1)
  if contiguous and base.dtype.isnative:
    return base[offset:offset + count].reshape(size)
  budget.charge(count * base.itemsize, f"a tensor of size {tuple(size)} copied from its storage")
  if not size:
    return np.array(base[offset], dtype=base.dtype.newbyteorder("="))
  view = np.lib.stride_tricks.as_strided(base[offset:], shape=tuple(size),
                                         strides=tuple(s * base.itemsize for s in stride))
  return np.array(view, dtype=base.dtype.newbyteorder("="))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _StorageType:
  def __init__(self, name):
    self.dtype = STORAGE_DTYPES[name]


_REBUILDS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}
_ALLOWED = {
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001
  """The pure-Python unpickler: its memo is a dict. The C one grows its memo array to twice a
  PUT's index before anything runs, so `LONG_BINPUT 2**28` in a 10-byte pickle took 4 GiB
  past every budget (found in review)."""

  def __init__(self, file, path: str, load_storage, budget: _Budget):
    super().__init__(file, encoding="utf-8")
    self.path = path
    self.load_storage = load_storage
    self.budget = budget

  def find_class(self, module, name):
    if (module, name) in _REBUILDS:
      return self.rebuild
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafePickleError(
        f"{self.path}: refusing to unpickle global {module}.{name} (only tensors and plain "
        "containers are read, so no pickled code runs)")

  def rebuild(self, storage, offset, size, stride, *unused):
    del unused   # requires_grad, backward hooks, metadata
    if isinstance(storage, _Lazy):     # a legacy storage: its bytes follow this pickle
      return _PendingTensor(storage, (offset, size, stride))
    return _rebuild_tensor(storage, offset, size, stride, self.budget)

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy: the same and view metadata.
    if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != "storage":
      raise TorchFileError(f"{self.path}: unknown persistent id {str(pid)[:80]}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f"{self.path}: storage {key} has no storage type")
    view = pid[5] if len(pid) > 5 else None
    if view is not None and not (isinstance(view, tuple) and len(view) == 3
                                 and _is_int(view[1]) and _is_int(view[2])
                                 and view[1] >= 0 and view[2] >= 0):
      raise TorchFileError(f"{self.path}: storage {key} has a malformed view "
                           f"{str(view)[:80]} (expected (view_key, offset, size))")
    return self.load_storage(storage_type.dtype, key, view)


class _Bounded:
  """A file's `read` and `readline` that never ask for more than is left in it: a pickle that
  claims a huge byte string then costs at most the file's size."""

  def __init__(self, f, end: int):
    self.f, self.end = f, end

  def read(self, n=-1):
    left = max(self.end - self.f.tell(), 0)
    return self.f.read(left if n is None or n < 0 else min(n, left))

  def readinto(self, buffer):
    data = self.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def readline(self, n=-1):
    left = max(self.end - self.f.tell(), 0)
    return self.f.readline(left if n is None or n < 0 else min(n, left))


def _read_member(path: str, archive: zipfile.ZipFile, name: str, budget: _Budget,
                 what: str) -> bytearray:
  """A zip member's bytes, streamed: its declared size is charged first, and a member whose
  stream runs past that size (a header that lies) is refused before it is read whole."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise TorchFileError(f"{path}: {what} is missing from the archive") from None
  budget.charge(info.file_size, f"{what} (its declared uncompressed size)")
  # Grown as the bytes arrive rather than allocated at the declared size: a header that
  # claims more than the member holds costs what it holds.
  data = bytearray()
  with archive.open(info) as stream:
    while True:
      chunk = stream.read(min(CHUNK, info.file_size - len(data)) or 1)
      if not chunk:
        break
      if len(data) + len(chunk) > info.file_size:
        raise TorchFileError(f"{path}: {what} inflates past the {info.file_size:,} bytes its "
                             "header declares")
      data += chunk
  if len(data) != info.file_size:
    raise TorchFileError(f"{path}: {what} holds {len(data):,} bytes, its header declares "
                         f"{info.file_size:,}: truncated")
  return data


def _load_zip(path: str, archive: zipfile.ZipFile, budget: _Budget):
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
  if len(pickles) != 1:
    raise TorchFileError(f"{path}: a zip without one data.pkl: not a PyTorch file")
  root = pickles[0][:-len("data.pkl")]
  big_endian = (root + "byteorder" in names and bytes(_read_member(
      path, archive, root + "byteorder", _Budget(path, 16), "byteorder")).strip() == b"big")
  cache = {}

  def load_storage(dtype, key, view):
    if view is not None:
      raise TorchFileError(f"{path}: storage {key} is a view, which zip files do not hold")
    if key not in cache:
      data = _read_member(path, archive, f"{root}data/{key}", budget, f"storage {key}")
      cache[key] = _Storage(dtype, data, big_endian, budget)
    elif cache[key].dtype != dtype:
      raise TorchFileError(f"{path}: storage {key} is read as two dtypes")
    return cache[key]

  size = archive.getinfo(pickles[0]).file_size
  budget.charge(size * (PICKLE_EXPANSION - 1), f"data.pkl's objects ({PICKLE_EXPANSION} bytes "
                "a byte of its {size:,})")
  pkl = _read_member(path, archive, pickles[0], budget, "data.pkl")
  return _RestrictedUnpickler(io.BytesIO(pkl), path, load_storage, budget).load()


def _load_legacy(path: str, f, budget: _Budget):
  end = os.fstat(f.fileno()).st_size
  # The five pickles come first; they are charged PICKLE_EXPANSION bytes a byte, so they may
  # not read past what the budget allows. Each storage is charged before it is read.
  pickle_end = min(end, budget.left // PICKLE_EXPANSION)
  src = _Bounded(f, pickle_end)

  def read_pickle(what, load_storage):
    try:
      return _RestrictedUnpickler(src, path, load_storage, budget).load()
    except (pickle.UnpicklingError, EOFError) as e:
      if pickle_end < end and f.tell() >= pickle_end:
        raise TorchFileError(
            f"{path}: the {what} pickle runs past {pickle_end:,} bytes, the most the load cap "
            f"of {budget.max_bytes:,} bytes allows ({PICKLE_EXPANSION} bytes charged a byte of "
            "pickle; raise --max_load_bytes for a file you trust)") from None
      raise TorchFileError(f"{path}: not a PyTorch file ({what}: {e})") from None

  def plain(what):
    return read_pickle(what, _no_storage)

  def _no_storage(dtype, key, view):
    raise TorchFileError(f"{path}: a storage outside the object pickle")

  magic = plain("magic number")
  if magic != LEGACY_MAGIC:
    raise TorchFileError(f"{path}: not a PyTorch file (no zip archive, no legacy magic number)")
  if plain("protocol version") != LEGACY_PROTOCOL:
    raise TorchFileError(f"{path}: unknown legacy protocol version")
  info = plain("system info")
  if isinstance(info, dict) and not info.get("little_endian", True):
    raise TorchFileError(f"{path}: saved on a big-endian machine, which this reader does not read")
  storages = {}   # root key -> [dtype, _Storage once read]

  def load_storage(dtype, key, view):
    if key not in storages:
      storages[key] = [dtype, None]
    elif storages[key][0] != dtype:
      raise TorchFileError(f"{path}: storage {key} is read as two dtypes")
    return _Lazy(storages, key, view)

  obj = read_pickle("object", load_storage)
  keys = plain("storage keys")
  budget.charge(f.tell() * PICKLE_EXPANSION, f"the pickles' objects ({PICKLE_EXPANSION} bytes "
                f"a byte of their {f.tell():,})")
  if not isinstance(keys, list):
    raise TorchFileError(f"{path}: the storage keys are a {type(keys).__name__}, not a list")
  for key in keys:
    key = str(key)
    if key not in storages:
      raise TorchFileError(f"{path}: storage {key} is listed but no tensor uses it")
    if storages[key][1] is not None:
      raise TorchFileError(f"{path}: storage {key} is listed twice")
    dtype = storages[key][0]
    head = f.read(8)
    if len(head) != 8:
      raise TorchFileError(f"{path}: truncated (storage {key} has no element count)")
    count = struct.unpack("<q", head)[0]
    nbytes = count * _itemsize(dtype)
    if count < 0 or nbytes > end - f.tell():
      raise TorchFileError(f"{path}: truncated (storage {key} declares {count:,} elements, "
                           f"{max(end - f.tell(), 0):,} bytes are left)")
    budget.charge(nbytes, f"storage {key}")
    data = bytearray(nbytes)
    if f.readinto(data) != nbytes:
      raise TorchFileError(f"{path}: truncated (storage {key})")
    storages[key][1] = _Storage(dtype, data, budget=budget)
  return _resolve(obj, path, budget, {})


class _Lazy:
  """A legacy storage, perhaps a view (view_key, offset, size) of it: its bytes follow the
  object pickle, so tensors are built after."""

  def __init__(self, storages, key, view):
    self.storages, self.key, self.view = storages, key, view

  def storage(self, path: str) -> _Storage:
    root = self.storages[self.key][1]
    if root is None:
      raise TorchFileError(f"{path}: storage {self.key} has no data")
    if self.view is None:
      return root
    _, offset, size = self.view
    if offset + size > len(root.array):
      raise TorchFileError(f"{path}: a view of {size} elements at offset {offset} of storage "
                           f"{self.key} ends past its {len(root.array)} elements")
    view = _Storage.__new__(_Storage)
    view.dtype, view.array = root.dtype, root.array[offset:offset + size]
    return view


class _PendingTensor:
  def __init__(self, storage, args):
    self.storage, self.args = storage, args


def _resolve(obj, path, budget, done):
  """obj with its legacy tensors built. `done` (by id) keeps shared objects shared: a pickle
  that nests one list in itself 60 times over is 60 objects, not 2**60."""
  if id(obj) in done:
    return done[id(obj)][1]
  if isinstance(obj, _PendingTensor):
    out = _rebuild_tensor(obj.storage.storage(path), *obj.args, budget)
  elif isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v, path, budget, done)
  elif isinstance(obj, (list, tuple)):
    out = type(obj)(_resolve(v, path, budget, done) for v in obj)
  else:
    return obj
  done[id(obj)] = (obj, out)    # obj kept alive, so its id is not reused
  return out


# A ZipInfo of a short name takes 520-580 bytes (tracemalloc, 200,000 entries, Python 3.12).
_ZIPINFO_BYTES = 600
_CENTRAL_HEADER_BYTES = 46    # the least one entry of the central directory takes


def _central_directory_bytes(f) -> int:
  """An upper bound on what zipfile.ZipFile allocates to open the archive: its central
  directory, read in one piece, a name string or two per entry and a ZipInfo each. Read from
  the end record before ZipFile reads anything; a crafted entry count cannot lower it, since
  the directory's declared size bounds the entries it can hold."""
  f.seek(0)
  end = zipfile._EndRecData(f)   # noqa: SLF001 - the record ZipFile itself reads first
  if not end:
    return 0                      # ZipFile raises BadZipFile
  size = end[zipfile._ECD_SIZE]   # noqa: SLF001
  entries = max(end[zipfile._ECD_ENTRIES_TOTAL], size // _CENTRAL_HEADER_BYTES)  # noqa: SLF001
  return 2 * size + _ZIPINFO_BYTES * entries


def load(path: str, max_bytes: int = DEFAULT_MAX_BYTES):
  """The object in a `.pth` file, tensors as numpy arrays (zip or legacy container). Refuses,
  with one TorchFileError naming the file, anything malformed and any file whose data would
  take more than `max_bytes` bytes of memory."""
  budget = _Budget(path, max_bytes)
  try:
    with open(path, "rb") as f:
      if zipfile.is_zipfile(f):
        budget.charge(_central_directory_bytes(f), "the zip's central directory")
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
          return _load_zip(path, archive, budget)
      f.seek(0)
      return _load_legacy(path, f, budget)
  except TorchFileError as e:
    if str(e).startswith(path):
      raise
    raise type(e)(f"{path}: {e}") from None
  except OSError as e:
    raise TorchFileError(f"cannot read {path}: {e.strerror or e}") from None
  except MALFORMED as e:
    raise TorchFileError(f"{path}: not a readable PyTorch file ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
