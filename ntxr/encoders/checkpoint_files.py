"""Tensors from publishers' checkpoint files as NumPy arrays, without importing PyTorch.

Three formats are read:
- torch.save's zip format (PyTorch >= 1.6; .pth/.pt/.bin/.ckpt): a zip holding `data.pkl`,
  a pickle whose tensors point at raw storages `data/<key>` in the same zip;
- torch.save's legacy format (PyTorch < 1.6; PANNs' training code pins PyTorch 1.0): the
  pickle, then the storages one after another in the same file (`_read_torch_legacy`).
  Both pickles are read by an unpickler that builds only dicts, lists, tuples, numbers,
  strings and tensors, drops NumPy's objects (a training loop's bookkeeping beside the
  model) unbuilt, and refuses every other global, so reading a file never runs its code;
- safetensors (.safetensors): an 8-byte little-endian header size, a JSON header naming each
  tensor's dtype, shape and byte range, then the bytes (read here rather than by
  `safetensors.numpy`, which cannot hold bfloat16).

With a cache folder, a file's tensors are read once and kept there as an .npz (NumPy's
own format, read without unpickling), named by the file's path and its size, times and
inode, so a changed file is read again.
"""

import collections
import contextlib
import functools
import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import numpy as np

from ntxr import files

# torch.save's storage classes, by the name its pickle gives them.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
# torch dtypes (pickled as globals `torch.<name>`) that `_rebuild_tensor_v3` may name.
_TORCH_DTYPES = {
    "float64": "float64", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "bool": "bool",
    "complex64": "complex64", "complex128": "complex128",
}
# safetensors' dtype names.
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
    "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
# NumPy's globals in a training loop's bookkeeping (a sampler's state beside the model's):
# parsed into _Dropped, never built, so a file cannot steer NumPy's own unpickling.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read: one line naming the file and why."""


class _Dropped:
  """A NumPy object the pickle holds beside the tensors: its arguments and state unread."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


def _encode(path: str, text: str, encoding: str = "latin1") -> bytes:
  """_codecs.encode as protocol 2 pickles bytes (latin-1 text), and nothing else."""
  if not isinstance(text, str) or encoding != "latin1":
    raise CheckpointError(f"{path}: _codecs.encode({type(text).__name__}, {encoding!r}) is "
                          "not how a pickle holds bytes")
  return text.encode("latin1")


class _Kind:
  """A storage class or dtype named in the pickle: the NumPy dtype name it stands for."""

  def __init__(self, dtype: str):
    self.dtype = dtype


class _Storage:
  """One storage's bytes as a flat array of its dtype (bfloat16 as its uint16 bits)."""

  def __init__(self, data: bytes, dtype: str, big_endian: bool):
    self.dtype, self.order = dtype, ">" if big_endian else "<"
    self.array = np.frombuffer(data, _stored(dtype).newbyteorder(self.order))


def _stored(dtype: str) -> np.dtype:
  """The NumPy dtype holding `dtype`'s bits (bfloat16's are uint16)."""
  return np.dtype("uint16" if dtype == "bfloat16" else dtype)


def _as_dtype(bits: np.ndarray, dtype: str) -> np.ndarray:
  """bits in their stored dtype -> a native NumPy array (bfloat16 widened to float32)."""
  if dtype == "bfloat16":
    return (bits.astype(np.uint32) << 16).view(np.float32)
  return bits.astype(bits.dtype.newbyteorder("="))


class _Unpickler(pickle.Unpickler):
  """A pickle torch.save wrote -> Python containers of its tensors as NumPy arrays (NumPy's
  own objects dropped); any other global refused.

  read_storage(key) -> the bytes of the storage the pickle names `key`, in the byte order
  `big_endian` says.
  """

  def __init__(self, file, path: str, read_storage: Optional[Callable[[str], bytes]] = None,
               big_endian: bool = False):
    # Python 2's str as latin-1, which maps every byte (NumPy's among them, dropped);
    # torch.load takes it as UTF-8 unless given encoding="latin1".
    super().__init__(file, encoding="latin1")
    self._path, self._read_storage, self._big_endian = path, read_storage, big_endian
    self._storages: Dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "_codecs" and name == "encode":  # protocol 2 pickles bytes this way
      return functools.partial(_encode, self._path)
    if module in ("builtins", "__builtin__") and name == "bytes":  # and b"" this way
      return lambda: b""
    if module == "torch._utils" and name in _REBUILDERS:
      return _REBUILDERS[name](self._path)
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _Kind(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return _Kind(_TORCH_DTYPES[name])
    if (module, name) in _NUMPY_GLOBALS or (module == "numpy.dtypes"
                                            and name.endswith("DType")):
      return _Dropped
    raise CheckpointError(f"{self._path}: refusing to unpickle {module}.{name}: only "
                          "tensors, dicts, lists, numbers and strings are read")

  def storage_id(self, pid) -> Tuple[str, str, int]:
    """(key, dtype, element count) of a storage's persistent id: ("storage", its class,
    key, location, count), and in the legacy format a sixth entry, None where the storage
    is not a view into another (views: PyTorch < 0.4, not read)."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _Kind)):
      raise CheckpointError(f"{self._path}: a persistent id that names no tensor storage")
    if pid[5:] not in ((), (None,)):
      raise CheckpointError(f"{self._path}: a storage view (PyTorch < 0.4), which is not "
                            "read")
    return str(pid[2]), pid[1].dtype, pid[4]

  def persistent_load(self, pid) -> _Storage:
    key, dtype, numel = self.storage_id(pid)
    if key not in self._storages:
      self._storages[key] = _Storage(self._read_storage(key), dtype, self._big_endian)
    storage = self._storages[key]
    if storage.array.size < numel:
      raise CheckpointError(f"{self._path}: storage {key} holds {storage.array.size} "
                            f"elements, the pickle says {numel}")
    return storage


class _StorageDtypes(_Unpickler):
  """A first pass over a legacy file's pickle, whose storages come after it: `dtypes`
  {key: dtype} of the storages it names (its tensors are not built)."""

  def __init__(self, file, path: str):
    super().__init__(file, path)
    self.dtypes: Dict[str, str] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name in _REBUILDERS:
      return lambda *args: None
    return super().find_class(module, name)

  def persistent_load(self, pid) -> None:
    key, dtype, _ = self.storage_id(pid)
    self.dtypes.setdefault(key, dtype)  # the dtype the storage was written in


def _tensor(path: str, storage: _Storage, offset: int, size, stride, dtype: str) -> np.ndarray:
  """A copy of the tensor at `offset` with `size` and `stride` (in elements) into storage."""
  size, stride = tuple(size), tuple(stride)
  bits = storage.array
  if storage.dtype != dtype:  # an untyped (byte) storage seen as `dtype`
    bits = bits.view(_stored(dtype).newbyteorder(storage.order))
  if 0 in size:
    return _as_dtype(np.zeros(size, bits.dtype), dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or min(stride, default=0) < 0 or last >= bits.size:
    raise CheckpointError(f"{path}: a tensor of size {size}, stride {stride} at offset "
                          f"{offset} runs past its storage of {bits.size} elements")
  view = np.lib.stride_tricks.as_strided(
      bits[offset:], size, tuple(s * bits.itemsize for s in stride), writeable=False)
  return _as_dtype(np.array(view), dtype)


def _rebuild_tensor_v2(path):
  def rebuild(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _tensor(path, storage, offset, size, stride, storage.dtype)
  return rebuild


def _rebuild_tensor_v3(path):
  def rebuild(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _tensor(path, storage, offset, size, stride, dtype.dtype)
  return rebuild


def _rebuild_parameter(path):
  return lambda data, requires_grad, hooks, state=None: data


_REBUILDERS = {
    "_rebuild_tensor_v2": _rebuild_tensor_v2, "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}


def _read_torch_zip(path: str) -> Any:
  """The object torch.save wrote to the zip file `path`, its tensors as NumPy arrays."""
  with zipfile.ZipFile(path) as archive:
    pickles = [name for name in archive.namelist()
               if name == "data.pkl" or name.endswith("/data.pkl")]
    if not pickles:
      raise CheckpointError(f"{path}: a zip file without data.pkl, not a torch.save "
                            "checkpoint")
    prefix = min(pickles, key=len)[:-len("data.pkl")]
    try:  # files from before the byte order was recorded are little-endian
      big_endian = archive.read(prefix + "byteorder").decode() == "big"
    except KeyError:
      big_endian = False
    with archive.open(prefix + "data.pkl") as file:
      return _Unpickler(file, path, lambda key: archive.read(f"{prefix}data/{key}"),
                        big_endian).load()


# The legacy format's first two pickles: a magic number and the format's version.
_LEGACY_MAGIC, _LEGACY_VERSION = 0x1950A86A20F9469CFC6C, 1001


def _read_torch_legacy(path: str) -> Any:
  """The object torch.save wrote to `path` in its legacy format (PyTorch < 1.6, or
  _use_new_zipfile_serialization=False): pickles of a magic number, the format's version
  and the writer's type sizes; the object's pickle naming its storages; the pickle of the
  storages' keys; then each storage in that order, an 8-byte little-endian element count
  and its elements, little-endian."""
  with open(path, "rb") as file:
    try:
      magic = _Unpickler(file, path).load()
    except Exception:  # pylint: disable=broad-except  # any other file: said below
      magic = None
    if magic != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: not a checkpoint file (neither torch.save's zip or "
                            "legacy format nor .safetensors)")
    version = _Unpickler(file, path).load()
    if version != _LEGACY_VERSION:
      raise CheckpointError(f"{path}: torch.save's legacy format version {version}, not "
                            f"{_LEGACY_VERSION}, which is read")
    _Unpickler(file, path).load()  # the writer's byte order and type sizes
    start = file.tell()
    first_pass = _StorageDtypes(file, path)
    first_pass.load()
    storages, end = {}, os.fstat(file.fileno()).st_size
    for key in map(str, _Unpickler(file, path).load()):
      count = int.from_bytes(file.read(8), "little")
      size = count * _stored(first_pass.dtypes.get(key, "uint8")).itemsize
      if file.tell() + size > end:
        raise CheckpointError(f"{path}: ends inside storage {key}: the file is truncated")
      storages[key] = file.read(size)
    file.seek(start)
    return _Unpickler(file, path, storages.__getitem__).load()


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """The tensors of the .safetensors file `path`."""
  with open(path, "rb") as file:
    data = file.read()
  size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + size])
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has dtype {entry['dtype']}, which is "
                            f"not read (only {', '.join(_SAFETENSORS_DTYPES)})")
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    start, end = (8 + size + offset for offset in entry["data_offsets"])
    bits = np.frombuffer(data[start:end], _stored(dtype).newbyteorder("<"))
    tensors[name] = _as_dtype(bits.reshape(entry["shape"]), dtype)
  return tensors


def _is_state_dict(obj: Any) -> bool:
  return (isinstance(obj, dict) and bool(obj)
          and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


def read_state_dict(path: str, cache_dir: Optional[str] = None,
                    published: str = "") -> Dict[str, np.ndarray]:
  """The tensors of checkpoint file `path` by name, as NumPy arrays (bfloat16 as float32).

  cache_dir: a local folder where they are kept after the first read (`cached_path`);
  a cache that cannot be written (read-only, full) or read back is skipped with a warning.
  published: where the file is published, said if it is not found.
  """
  if not os.path.isfile(path):
    found = "is a folder, not a checkpoint file" if os.path.isdir(path) else "not found"
    raise FileNotFoundError(f"{path} {found}" + (f": it is published at {published}"
                                                 if published else ""))
  if cache_dir is None or files.is_bucket(cache_dir):
    return _read_publisher_file(path)
  cached = cached_path(path, cache_dir)
  if os.path.isfile(cached):
    try:
      return _read_arrays(cached)
    except Exception as error:  # pylint: disable=broad-except  # the cache is optional
      logging.warning("%s is unreadable (%s): reading %s again", cached, error, path)
  state_dict = _read_publisher_file(path)
  _keep(cached, state_dict)
  return state_dict


CACHE_FORMAT = 1  # raised when what the cache holds for a file changes


def cached_path(path: str, cache_dir: str) -> str:
  """<cache_dir>/weights/<file name>-<path key>-<file key>.npz: the path key hashes the
  file's absolute path, the file key its size, modification and change times, inode and
  the cache's format (a file rewritten, copied over or moved in is read again)."""
  stat = os.stat(path)
  path_key = _hash(os.path.realpath(path))
  file_key = _hash(CACHE_FORMAT, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                   stat.st_ino, stat.st_dev)
  return os.path.join(cache_dir, "weights",
                      f"{os.path.basename(path)}-{path_key}-{file_key}.npz")


def _hash(*parts) -> str:
  return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]


def _keep(cached: str, state_dict: Dict[str, np.ndarray]) -> None:
  """Writes `state_dict` at `cached` whole (synced, then renamed into place) or not at all
  (a warning), and removes what the cache kept for earlier versions of the file."""
  folder, name = os.path.split(cached)
  partial = None
  try:
    os.makedirs(folder, exist_ok=True)
    files.remove_left_by_dead(cached)
    handle, partial = tempfile.mkstemp(dir=folder, prefix=f"{name}{files.PARTIAL}{os.getpid()}-")
    with os.fdopen(handle, "wb") as file:
      _write_arrays(file, state_dict)
      file.flush()
      os.fsync(file.fileno())
    os.replace(partial, cached)
    partial = None
    earlier = name[:name.rindex("-")] + "-"
    for other in os.listdir(folder):
      if other.startswith(earlier) and other.endswith(".npz") and other != name:
        with contextlib.suppress(OSError):
          os.remove(os.path.join(folder, other))
  except Exception as error:  # pylint: disable=broad-except  # the cache is optional
    logging.warning("%s not written (%s): the publisher's file will be read again next "
                    "time", cached, error)
  finally:
    if partial is not None:
      with contextlib.suppress(OSError):
        os.remove(partial)


def _write_arrays(file, arrays: Dict[str, np.ndarray]) -> None:
  """An .npz of `arrays`, each member named exactly by its key (np.savez would take the
  keys `file` and `allow_pickle` as its own arguments)."""
  with zipfile.ZipFile(file, "w") as archive:
    for name, array in arrays.items():
      with archive.open(name, "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def _read_arrays(path: str) -> Dict[str, np.ndarray]:
  """The arrays `_write_arrays` wrote, by name, in its order (nothing unpickled)."""
  with zipfile.ZipFile(path) as archive:
    arrays = {}
    for name in archive.namelist():
      with archive.open(name) as member:
        arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


def _starts_as_a_zip(path: str) -> bool:
  """Whether the file begins with a zip file's first entry (zipfile reads the end)."""
  with open(path, "rb") as file:
    return file.read(4) == b"PK\x03\x04"


def _read_publisher_file(path: str) -> Dict[str, np.ndarray]:
  """The tensors of checkpoint file `path` (`read_state_dict` without a cache).

  Reads torch.save's zip and legacy formats and .safetensors. A torch checkpoint may hold
  the state dict itself or a dict with it under "model" or "state_dict" (beside e.g. an
  iteration count). Raises CheckpointError (one line naming the file) for a file in none
  of these formats, damaged or truncated, for pickled objects other than tensors,
  containers and NumPy's (which are dropped), and for a file without a state dict.
  """
  path = str(path)
  with open(path, "rb"):  # a file that cannot be opened: OSError, naming it, as it is
    pass
  try:
    if path.endswith(".safetensors"):
      return _read_safetensors(path)
    if zipfile.is_zipfile(path):
      saved = _read_torch_zip(path)
    elif _starts_as_a_zip(path):
      raise CheckpointError(f"{path}: a zip file without its end (torch.save's zip format, "
                            "truncated: a download cut short?)")
    else:
      saved = _read_torch_legacy(path)
  except CheckpointError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # whatever a damaged file does
    raise CheckpointError(f"{path}: damaged or truncated ({type(error).__name__}: "
                          f"{error})") from error
  if _is_state_dict(saved):
    return dict(saved)
  for key in ("model", "state_dict"):
    if isinstance(saved, dict) and _is_state_dict(saved.get(key)):
      return dict(saved[key])
  found = (f"a dict with keys {sorted(map(str, saved))[:8]}" if isinstance(saved, dict)
           else f"a {type(saved).__name__}")
  raise CheckpointError(f"{path}: holds {found}, not a state dict of tensors by name "
                        "(at the top level or under 'model' or 'state_dict')")
