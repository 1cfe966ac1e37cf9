"""Reads PyTorch `.pth` files into numpy arrays without torch and without running pickled code.

A `.pth` file is a pickle whose tensors point at raw storages by "persistent id". Two
containers exist (torch/serialization.py):
  zip     (torch >= 1.6): `<name>/data.pkl` and one `<name>/data/<key>` entry per storage,
          little-endian unless `<name>/byteorder` says otherwise.
  legacy  (`_use_new_zipfile_serialization=False`, and every file saved before torch 1.6):
          five pickles back to back (magic number, protocol version, system info, the object,
          the sorted storage keys), then each storage as an int64 element count and its bytes.

`load` unpickles with a restricted `find_class`: the only globals it resolves are the tensor
rebuilds, the storage classes and `collections.OrderedDict`; anything else (an optimizer
class, `argparse.Namespace`, any callable) is refused with `UnsafePickleError` naming the file
and the global found, before it is imported, so a crafted file cannot run code. This is what
`torch.load(weights_only=True)` allows, less what state dicts never hold.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

from dc_tf.config import UserError

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> numpy dtype of its elements (BFloat16 is read as its top 16 bits).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(UserError, ValueError):
  """Not a PyTorch file this reader understands; the message names the file."""


class UnsafePickleError(TorchFileError):
  """The pickle asks for a global that is neither a tensor rebuild nor a plain container."""


class _Storage:
  """A storage's bytes, as numpy elements of its dtype."""

  def __init__(self, dtype, data: bytes, big_endian: bool = False):
    if dtype == "bfloat16":
      bits = np.frombuffer(data, ">u2" if big_endian else "<u2").astype(np.uint32) << 16
      self.array = bits.view(np.float32)
    else:
      self.array = np.frombuffer(data, np.dtype(dtype).newbyteorder(">" if big_endian else "<"))


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2): a strided view of a storage, copied out."""
  del unused   # requires_grad, backward hooks, metadata
  base = storage.array
  # as_strided does not check bounds: a crafted size or stride would read past the storage.
  if not (isinstance(offset, int) and all(isinstance(v, int) and v >= 0
                                          for v in (offset, *size, *stride))
          and len(size) == len(stride)
          and (0 in size or offset + sum((n - 1) * s for n, s in zip(size, stride)) < len(base))):
    raise TorchFileError(f"a tensor of size {size}, stride {stride} at offset {offset} does not "
                         f"fit its storage of {len(base)} elements")
  if not size:
    return np.array(base[offset], dtype=base.dtype.newbyteorder("="))
  item = base.itemsize
  view = np.lib.stride_tricks.as_strided(base[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view, dtype=base.dtype.newbyteorder("="))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _StorageType:
  def __init__(self, name):
    self.dtype = STORAGE_DTYPES[name]


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): lambda *a: _rebuild_any(*a),
    ("torch._utils", "_rebuild_tensor"): lambda *a: _rebuild_any(*a),
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, path: str, load_storage):
    super().__init__(file, encoding="utf-8")
    self.path = path
    self.load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafePickleError(
        f"{self.path}: refusing to unpickle global {module}.{name} (only tensors and plain "
        "containers are read, so no pickled code runs)")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise TorchFileError(f"{self.path}: unknown persistent id {str(pid)[:80]}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f"{self.path}: storage {key} has no storage type")
    return self.load_storage(storage_type.dtype, key)


def _load_zip(path: str, archive: zipfile.ZipFile):
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
  if len(pickles) != 1:
    raise TorchFileError(f"{path}: a zip without one data.pkl: not a PyTorch file")
  root = pickles[0][:-len("data.pkl")]
  big_endian = (root + "byteorder" in names
                and archive.read(root + "byteorder").strip() == b"big")
  cache = {}

  def load_storage(dtype, key):
    if key not in cache:
      try:
        cache[key] = _Storage(dtype, archive.read(f"{root}data/{key}"), big_endian)
      except KeyError:
        raise TorchFileError(f"{path}: storage {key} is missing from the archive") from None
    return cache[key]

  return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, load_storage).load()


def _load_legacy(path: str, f):
  def plain(what):
    try:
      return _RestrictedUnpickler(f, path, _no_storage).load()
    except (pickle.UnpicklingError, EOFError) as e:
      raise TorchFileError(f"{path}: not a PyTorch file ({what}: {e})") from None

  def _no_storage(dtype, key):
    raise TorchFileError(f"{path}: a storage outside the object pickle")

  magic = plain("magic number")
  if magic != LEGACY_MAGIC:
    raise TorchFileError(f"{path}: not a PyTorch file (no zip archive, no legacy magic number)")
  if plain("protocol version") != LEGACY_PROTOCOL:
    raise TorchFileError(f"{path}: unknown legacy protocol version")
  info = plain("system info")
  if isinstance(info, dict) and not info.get("little_endian", True):
    raise TorchFileError(f"{path}: saved on a big-endian machine, which this reader does not read")
  storages = {}   # key -> (dtype, _Storage to fill)

  def load_storage(dtype, key):
    if key not in storages:
      storages[key] = [dtype, None]
    return _Lazy(storages, key)

  obj = _RestrictedUnpickler(f, path, load_storage).load()
  keys = plain("storage keys")
  for key in keys:
    if key not in storages:
      raise TorchFileError(f"{path}: storage {key} is listed but no tensor uses it")
    dtype = storages[key][0]
    count = struct.unpack("<q", f.read(8))[0]
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    data = f.read(count * itemsize)
    if len(data) != count * itemsize:
      raise TorchFileError(f"{path}: truncated (storage {key})")
    storages[key][1] = _Storage(dtype, data)
  return _resolve(obj, storages, path)


class _Lazy:
  """A legacy storage: its bytes follow the object pickle, so tensors are built after."""

  def __init__(self, storages, key):
    self.storages, self.key = storages, key


class _PendingTensor:
  def __init__(self, storage, args):
    self.storage, self.args = storage, args


def _resolve(obj, storages, path):
  if isinstance(obj, _PendingTensor):
    entry = obj.storage.storages[obj.storage.key]
    if entry[1] is None:
      raise TorchFileError(f"{path}: storage {obj.storage.key} has no data")
    return _rebuild_tensor(entry[1], *obj.args)
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v, storages, path)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, storages, path) for v in obj)
  return obj


def _rebuild_any(storage, offset, size, stride, *rest):
  if isinstance(storage, _Lazy):
    return _PendingTensor(storage, (offset, size, stride))
  return _rebuild_tensor(storage, offset, size, stride, *rest)


def load(path: str):
  """The object in a `.pth` file, tensors as numpy arrays (zip or legacy container)."""
  try:
    with open(path, "rb") as f:
      if zipfile.is_zipfile(f):
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
          return _load_zip(path, archive)
      f.seek(0)
      return _load_legacy(path, f)
  except OSError as e:
    raise TorchFileError(f"cannot read {path}: {e.strerror or e}") from None
  except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile) as e:
    raise TorchFileError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None
