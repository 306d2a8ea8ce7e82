"""Reads whole pickled torch modules (`torch.save(model)`) without torch and without running code.

A `.pt` file is a zip holding `<name>/data.pkl` (the pickled module tree) and
`<name>/data/<key>` (raw little-endian tensor storages). The pickle is replayed by
an unpickler that maps module classes to an inert `ModuleRecord` (it only records
the state the pickle hands it) and tensors to numpy arrays read from the storages;
any other global is refused before it is imported.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np

from ilora_jax.errors import UserError, require_file

_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
# Classes of the original SASRec code, recorded (never instantiated) when found in a pickle.
_RECORDED_CLASS_NAMES = {"SASRec", "MultiHeadAttention", "PositionwiseFeedForward", "GRU", "Caser"}


class ModuleRecord:
  """Inert stand-in for a pickled torch module: remembers its class name and state."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state = args, kwargs, {}

  def __setstate__(self, state):
    self.state = state if isinstance(state, dict) else {"state": state}

  def children(self) -> dict[str, ModuleRecord]:
    return {k: v for k, v in (self.state.get("_modules") or {}).items() if v is not None}

  def parameters(self) -> dict[str, np.ndarray]:
    params = dict(self.state.get("_parameters") or {})
    params.update(self.state.get("_buffers") or {})
    return {k: v for k, v in params.items() if v is not None}


def _record_class(qualname: str) -> type:
  return type(qualname.rsplit(".", 1)[-1], (ModuleRecord,), {"qualname": qualname})


class _StorageType:
  def __init__(self, dtype):
    self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
  itemsize = storage.dtype.itemsize
  if len(size) == 0:
    return storage[storage_offset].copy()
  needed = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
  if min(size) > 0 and needed > storage.size:
    raise UserError("checkpoint tensor reaches past the end of its storage (truncated file?)")
  return np.lib.stride_tricks.as_strided(
    storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
  ).copy()


def _device(*args) -> str:
  return ":".join(str(a) for a in args)


def _rebuild_parameter(data, *unused):
  return data


def _codecs_encode(text, encoding="utf-8"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UserError("checkpoint uses _codecs.encode in a way torch never writes")
  return text.encode("latin1")


class _TorchUnpickler(pickle.Unpickler):
  """Resolves only tensor rebuilding, dtypes and inert module records."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
    super().__init__(file)
    self._archive, self._prefix, self._source = archive, prefix, source
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    qualname = f"{module}.{name}"
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name == "device":
      return _device
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) in (("__builtin__", "set"), ("builtins", "set")):
      return set
    if (module, name) == ("_codecs", "encode"):
      return _codecs_encode
    if (module, name) == ("numpy", "dtype"):
      return np.dtype
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
      return _numpy_scalar
    if module.startswith("torch.nn.modules.") or name in _RECORDED_CLASS_NAMES:
      return _record_class(qualname)
    raise UserError(f"{self._source}: refusing to load {qualname} from a checkpoint pickle")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise UserError(f"{self._source}: unexpected persistent id in checkpoint")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise UserError(f"{self._source}: unsupported storage type {storage_type!r}")
    if key not in self._storages:
      name = f"{self._prefix}/data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError:
        raise UserError(f"{self._source}: storage {name} is missing (truncated file?)") from None
      self._storages[key] = np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"))
    return self._storages[key]


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise UserError("checkpoint holds a numpy scalar of an unsupported kind")
  return np.frombuffer(data, dtype=dtype)[0]


def load_module(path: str) -> ModuleRecord:
  """Reads a whole pickled torch module as a tree of `ModuleRecord`s with numpy parameters.

  Raises:
    UserError: for a missing, corrupt or truncated file, or one that names classes
      other than torch modules, tensors and the original SASRec classes.
  """
  require_file(path, "checkpoint")
  try:
    archive = zipfile.ZipFile(path)
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles:
      raise UserError(f"checkpoint {path} has no data.pkl: not a torch zip checkpoint")
    prefix = pickles[0].rsplit("/", 1)[0] if "/" in pickles[0] else ""
    data = archive.read(pickles[0])
    root = _TorchUnpickler(io.BytesIO(data), archive, prefix, f"checkpoint {path}").load()
  except UserError:
    raise
  except (
    zipfile.BadZipFile,
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    OSError,
    zipfile.LargeZipFile,
  ) as exc:
    raise UserError(
      f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})"
    ) from None
  if not isinstance(root, ModuleRecord):
    raise UserError(f"checkpoint {path} holds a {type(root).__name__}, expected a pickled module")
  return root


def flat_parameters(root: ModuleRecord, prefix: str = "") -> dict[str, np.ndarray]:
  """`state_dict`-style flat names (`ln_1.weight`, ...) to numpy arrays."""
  out = {f"{prefix}{k}": v for k, v in root.parameters().items()}
  for name, child in root.children().items():
    out.update(flat_parameters(child, f"{prefix}{name}."))
  return out
