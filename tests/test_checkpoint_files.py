"""checkpoint_files.read_state_dict against what torch.save and safetensors write."""

import codecs
import os
import pickle
import types
import zipfile

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from ntxr import encoders
from ntxr.encoders import checkpoint_files


def _tensors():
  """Tensors of several dtypes, strided and offset views, and views sharing one storage."""
  generator = torch.Generator().manual_seed(0)
  base = torch.randn(6, 8, generator=generator)
  return {
      "float32": torch.randn(3, 4, generator=generator),
      "float16": torch.randn(5, generator=generator).half(),
      "bfloat16": torch.randn(2, 3, generator=generator).bfloat16(),
      "bfloat16_beyond_float16": torch.tensor([1e10, -3e-8, 1e38, -1e-38]).bfloat16(),
      "float64": torch.randn(2, 2, generator=generator).double(),
      "int64": torch.arange(-3, 7),
      "int32": torch.arange(4, dtype=torch.int32),
      "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
      "uint8": torch.tensor([0, 255], dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(2.5),
      "empty": torch.zeros(0, 3),
      "transposed": base.t(),  # strides (1, 8)
      "every_other_column": base[1:5, ::2],  # offset 8, strides (8, 2)
      "row": base[3],  # offset 24, shares base's storage
      "base": base,
      "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
      "uint16": torch.tensor([1, 40000], dtype=torch.int32).to(torch.uint16),
  }


def _numpy(tensor: torch.Tensor) -> np.ndarray:
  """The tensor's values as NumPy computes them (bfloat16 widened to float32)."""
  if tensor.dtype == torch.bfloat16:
    return tensor.float().numpy()
  if tensor.dtype == torch.uint16:
    return tensor.to(torch.int32).numpy().astype(np.uint16)
  return tensor.numpy()


def _assert_same(found: dict, tensors: dict):
  assert sorted(found) == sorted(tensors)
  for name, tensor in tensors.items():
    expected = _numpy(tensor)
    assert found[name].dtype == expected.dtype, name
    assert found[name].shape == expected.shape, name
    np.testing.assert_array_equal(found[name], expected, err_msg=name)


# torch.save's zip format, and its legacy format (PyTorch < 1.6, as PANNs' code wrote it)
FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}


@pytest.mark.parametrize("written_as", FORMATS)
def test_reads_torch_save_tensors_of_every_dtype_and_layout(tmp_path, written_as):
  tensors = _tensors()
  path = tmp_path / "tensors.pth"
  torch.save(tensors, path, **FORMATS[written_as])
  found = checkpoint_files.read_state_dict(str(path))
  _assert_same(found, tensors)
  found["row"][0] = 123.0  # arrays are the reader's own, not views of one another
  assert found["base"][3, 0] == tensors["base"][3, 0]


def test_reads_a_module_state_dict_with_parameters(tmp_path):
  module = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
  module[1].running_mean.uniform_(-1, 1)
  state_dict = module.state_dict()
  path = tmp_path / "module.pt"
  torch.save(state_dict, path)
  _assert_same(checkpoint_files.read_state_dict(str(path)), state_dict)
  path = tmp_path / "parameters.bin"  # nn.Parameter objects, not detached tensors
  torch.save(dict(module.named_parameters()), path)
  _assert_same(checkpoint_files.read_state_dict(str(path)),
               {name: value.detach() for name, value in module.named_parameters()})


@pytest.mark.parametrize("written_as", FORMATS)
@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_unwraps_a_state_dict_nested_in_a_training_checkpoint(tmp_path, key, written_as):
  tensors = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
  path = tmp_path / "checkpoint.ckpt"
  # As a training loop saves it: an iteration count and a sampler's NumPy state beside it.
  torch.save({key: tensors, "iteration": 7,
              "sampler": {"queue": np.arange(5), "seed": np.int64(3),
                          "empty_class": np.array([], np.int64),
                          "random_state": np.random.RandomState(0).get_state()}},
             path, **FORMATS[written_as])
  _assert_same(checkpoint_files.read_state_dict(str(path)), tensors)


class _Python2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickles str as Python 2 did (latin-1 bytes, BINSTRING), as torch.save under Python 2
  wrote a checkpoint's keys."""
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_str(self, text):
    data = text.encode("latin1")
    self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
    self.memoize(text)

  dispatch[str] = _save_str


def test_reads_a_checkpoint_pickled_by_python_2(tmp_path):
  tensors = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
  python2 = types.SimpleNamespace(__name__="python2", Pickler=_Python2Pickler,
                                  dump=lambda obj, f, protocol: _Python2Pickler(f, protocol)
                                  .dump(obj))
  path = tmp_path / "python2.pth"
  torch.save({"model": tensors, "sampler": {"queue": np.arange(300)}}, path,
             pickle_module=python2, _use_new_zipfile_serialization=False)
  _assert_same(checkpoint_files.read_state_dict(str(path)), tensors)


def test_reads_safetensors(tmp_path):
  tensors = {name: tensor.contiguous().clone() for name, tensor in _tensors().items()}
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file(tensors, str(path))
  _assert_same(checkpoint_files.read_state_dict(str(path)), tensors)
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2])}
  safetensors.numpy.save_file(arrays, str(path))
  found = checkpoint_files.read_state_dict(str(path))
  expected = safetensors.numpy.load_file(str(path))
  for name in arrays:
    np.testing.assert_array_equal(found[name], expected[name])
    assert found[name].dtype == expected[name].dtype


def test_reads_a_zip_file_written_big_endian(tmp_path):
  """torch.save's zip format records the writer's byte order: a big-endian machine's
  file (here a little-endian one's, its byteorder entry and storages rewritten) reads
  as the same tensors."""
  tensors = {"w": torch.randn(2, 3), "b": torch.randn(3)}
  little, big = tmp_path / "little.pth", tmp_path / "big.pth"
  torch.save(tensors, little)
  with zipfile.ZipFile(little) as source, zipfile.ZipFile(big, "w") as target:
    for name in source.namelist():
      data = source.read(name)
      if name.endswith("/byteorder"):
        data = b"big"
      elif "/data/" in name:  # every storage here is float32
        data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
      target.writestr(name, data)
  _assert_same(checkpoint_files.read_state_dict(str(big)), tensors)


def _error(path) -> str:
  with pytest.raises(ValueError) as error:
    checkpoint_files.read_state_dict(str(path))
  message = str(error.value)
  assert "\n" not in message and str(path) in message
  return message


@pytest.mark.parametrize("name", encoders.AUDIO)
def test_a_file_not_there_is_named_with_where_it_is_published(tmp_path, name):
  path = tmp_path / "weights.pth"
  with pytest.raises(FileNotFoundError) as error:
    encoders.load(name, str(path))
  assert str(error.value) == f"{path} not found: it is published at {encoders.PUBLISHED[name]}"
  path.mkdir()  # a model folder, say, where the audio encoder's one file goes
  with pytest.raises(FileNotFoundError) as error:
    encoders.load(name, str(path))
  assert str(error.value) == (f"{path} is a folder, not a checkpoint file: it is published "
                              f"at {encoders.PUBLISHED[name]}")


@pytest.mark.parametrize("written_as", FORMATS)
def test_any_byte_damaged_reads_or_is_refused_in_one_line(tmp_path, written_as):
  """Each byte of a training checkpoint flipped in turn: the file reads, or its error is
  one line naming it (never a crash, nor another error from deep in the reader)."""
  path = tmp_path / "checkpoint.pth"
  torch.save({"model": {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2).half()},
              "iteration": 5, "sampler": {"queue": np.arange(5), "seed": np.int64(3)}},
             path, **FORMATS[written_as])
  data = path.read_bytes()
  damaged = tmp_path / "damaged.pth"
  refused = 0
  for at in range(len(data)):
    damaged.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    try:
      checkpoint_files.read_state_dict(str(damaged))
    except checkpoint_files.CheckpointError as error:
      assert "\n" not in str(error) and str(damaged) in str(error)
      refused += 1
  assert 0 < refused < len(data)


@pytest.mark.parametrize("written_as", FORMATS)
def test_refuses_damaged_and_truncated_files(tmp_path, written_as):
  path = tmp_path / "tensors.pth"
  torch.save({"w": torch.arange(1000.0), "b": torch.ones(3)}, path, **FORMATS[written_as])
  data = path.read_bytes()
  cut = tmp_path / "cut.pth"
  for end in (len(data) - 100, len(data) // 2, 60, 4):  # in a storage, the pickle, the start
    cut.write_bytes(data[:end])
    message = _error(cut)
    assert "truncated" in message or (written_as, end) == ("legacy", 4), message
  path.write_text("w,b\n1,2\n")  # not a checkpoint at all
  assert "not a checkpoint file" in _error(path)


def test_refuses_pickled_objects_other_than_tensors_and_containers(tmp_path):
  path = tmp_path / "module.pth"
  torch.save(torch.nn.Linear(2, 3), path)  # the whole module: its class would be imported
  assert _error(path).startswith(f"{path}: refusing to unpickle torch.nn.modules.linear.Linear")
  path = tmp_path / "float8.pth"
  torch.save({"w": torch.zeros(2).to(torch.float8_e4m3fn)}, path)
  assert "float8_e4m3fn" in _error(path)


def test_refuses_a_legacy_file_of_another_version(tmp_path):
  path = tmp_path / "tensors.pth"
  torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  data = path.read_bytes()
  version = pickle.dumps(1001, protocol=2)  # its own pickle, after the magic number's
  assert data.count(version) == 1
  path.write_bytes(data.replace(version, pickle.dumps(1002, protocol=2)))
  assert "legacy format version 1002, not 1001" in _error(path)


def test_refuses_a_safetensors_dtype_it_does_not_read(tmp_path):
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file({"w": torch.zeros(2).to(torch.float8_e4m3fn)}, str(path))
  assert "tensor w has dtype F8_E4M3, which is not read" in _error(path)


@pytest.mark.parametrize("offset, size, stride", [
    (1, (4,), (1,)),  # its last element one past the storage's end
    (3, (2,), (-1,)),  # backwards
    (-1, (2,), (1,))])
def test_refuses_a_tensor_outside_its_storage(offset, size, stride):
  storage = checkpoint_files._Storage(  # pylint: disable=protected-access
      np.arange(4, dtype="<f4").tobytes(), "float32", False)
  with pytest.raises(checkpoint_files.CheckpointError, match="runs past its storage of 4"):
    checkpoint_files._tensor(  # pylint: disable=protected-access
        "file.pth", storage, offset, size, stride, "float32")


class _EncodedAsUtf8:
  """Pickles as a call of _codecs.encode with UTF-8, which no torch.save writes."""

  def __reduce__(self):
    return codecs.encode, ("x", "utf-8")


def test_refuses_calls_a_pickle_of_tensors_never_makes(tmp_path):
  path = tmp_path / "crafted.pth"
  torch.save({"w": torch.ones(2), "x": _EncodedAsUtf8()}, path,
             _use_new_zipfile_serialization=False)
  assert "_codecs.encode(str, 'utf-8')" in _error(path)


def test_refuses_a_file_without_a_state_dict(tmp_path):
  path = tmp_path / "no_tensors.pth"
  torch.save({"iteration": 7, "optimizer": {"lr": 0.1}}, path)
  assert "iteration" in _error(path)


def _publisher_reads(monkeypatch) -> list:
  """The paths read in the publisher's format from now on."""
  reads = []
  read = checkpoint_files._read_publisher_file
  monkeypatch.setattr(checkpoint_files, "_read_publisher_file",
                      lambda path: reads.append(path) or read(path))
  return reads


def test_a_cache_keeps_a_files_tensors_after_its_first_read(tmp_path, monkeypatch):
  tensors = {**_tensors(), "file": torch.ones(2), "allow_pickle": torch.zeros(1)}  # np.savez's
  path, cache = str(tmp_path / "tensors.pth"), str(tmp_path / "cache")           # own names
  torch.save(tensors, path)
  reads = _publisher_reads(monkeypatch)
  _assert_same(checkpoint_files.read_state_dict(path, cache), tensors)
  kept = checkpoint_files.cached_path(path, cache)
  assert kept.startswith(str(tmp_path / "cache" / "weights" / "tensors.pth-"))
  weights = tmp_path / "cache" / "weights"
  assert [p.name for p in weights.iterdir()] == [os.path.basename(kept)]  # no partial file
  _assert_same(checkpoint_files.read_state_dict(path, cache), tensors)
  assert reads == [path]
  changed = {"w": torch.arange(3.0)}
  torch.save(changed, path)
  _assert_same(checkpoint_files.read_state_dict(path, cache), changed)
  assert reads == [path, path]
  # the earlier version's tensors removed
  assert [p.name for p in weights.iterdir()] == [os.path.basename(
      checkpoint_files.cached_path(path, cache))]
  stat = os.stat(path)
  torch.save({"w": torch.arange(3.0) + 1}, path)  # the same size, its time set back
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert checkpoint_files.read_state_dict(path, cache)["w"].tolist() == [1.0, 2.0, 3.0]
  assert len(reads) == 3


def test_a_cache_that_cannot_be_kept_or_read_back_is_skipped(tmp_path, monkeypatch, caplog):
  tensors = {"w": torch.randn(4, 3), "b": torch.randn(3).bfloat16()}
  path = str(tmp_path / "tensors.pth")
  torch.save(tensors, path)
  reads = _publisher_reads(monkeypatch)
  blocked = tmp_path / "blocked"
  blocked.mkdir()
  (blocked / "weights").write_text("a file where the cache's folder would be")
  _assert_same(checkpoint_files.read_state_dict(path, str(blocked)), tensors)
  assert "not written" in caplog.text and "unreadable" not in caplog.text
  cache = str(tmp_path / "cache")

  def disk_full(file, arrays):
    file.write(b"PK\x03\x04 half")
    raise OSError(28, "No space left on device")
  with monkeypatch.context() as patched:
    patched.setattr(checkpoint_files, "_write_arrays", disk_full)
    _assert_same(checkpoint_files.read_state_dict(path, cache), tensors)
  assert list((tmp_path / "cache" / "weights").iterdir()) == []  # the half-written file gone
  kept = checkpoint_files.cached_path(path, cache)
  for damaged in (b"PK\x03\x04 damaged", b"", None):  # read around and replaced
    caplog.clear()
    if damaged is None:  # an array of pickled objects, which the cache never holds
      np.savez(kept, w=np.array([{"x": 1}], dtype=object), b=np.zeros(3, np.float32))
    else:
      with open(kept, "wb") as file:
        file.write(damaged)
    _assert_same(checkpoint_files.read_state_dict(path, cache), tensors)
    assert "unreadable" in caplog.text and kept in caplog.text
  assert len(reads) == 5
  _assert_same(checkpoint_files.read_state_dict(path, cache), tensors)
  assert len(reads) == 5


def test_files_sharing_a_cache_keep_their_own_tensors(tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  paths = [str(tmp_path / "a.pth"), str(tmp_path / "ab.pth")]  # one name begins the other's
  tensors = [{"w": torch.ones(2)}, {"w": torch.zeros(3)}]
  for path, saved in zip(paths, tensors):
    torch.save(saved, path)
  reads = _publisher_reads(monkeypatch)
  for _ in range(2):
    for path, saved in zip(paths, tensors):
      _assert_same(checkpoint_files.read_state_dict(path, cache), saved)
  assert reads == paths  # each read once, its cache entry left by the other's
  assert all(os.path.isfile(checkpoint_files.cached_path(path, cache)) for path in paths)
