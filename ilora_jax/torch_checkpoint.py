"""Reads whole pickled torch modules (`torch.save(model)`) without torch and without running code.

A `.pt` file is a zip holding `<name>/data.pkl` (the pickled module tree) and
`<name>/data/<key>` (raw little-endian tensor storages). The pickle is replayed by
an unpickler that maps module classes to an inert `ModuleRecord` (it only records
the state the pickle hands it) and tensors to numpy arrays read from the storages;
any other global is refused before it is imported. Tensors are checked against their
storage (offset, sizes, strides) and read once the pickle is replayed, when their names
(`mh_attn.linear_q.weight`) are known for the messages.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from ilora_jax import safe_pickle
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
  "BFloat16Storage": ml_dtypes.bfloat16,  # Read as numpy's bfloat16 (ml_dtypes, jax's own).
}
# Classes of the original SASRec code, recorded (never instantiated) when found in a pickle.
_RECORDED_CLASS_NAMES = {"SASRec", "MultiHeadAttention", "PositionwiseFeedForward", "GRU", "Caser"}


class ModuleRecord:
  """Inert stand-in for a pickled torch module: remembers its class name and state."""

  def __new__(cls, *args, **kwargs):  # What the pickle's NEWOBJ calls, without __init__.
    self = super().__new__(cls)
    self.args, self.kwargs, self.state = args, kwargs, {}
    return self

  def __init__(self, *args, **kwargs):
    pass

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

  def __setstate__(self, state):  # A BUILD on it would set its dtype (to "M8[s]", say).
    raise ValueError("the pickle sets the state of a torch storage type")


class _TensorRef:
  """A tensor of the pickle, `_rebuild_tensor_v2`'s arguments; read by `_materialize`."""

  def __init__(self, storage, storage_offset, size, stride):
    self.storage, self.size, self.stride = storage, size, stride
    self.storage_offset = storage_offset


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRef:
  return _TensorRef(storage, storage_offset, size, stride)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
  """`repr(value)` on one line, cut to 60 characters (an array's can be long)."""
  return " ".join(repr(value).split())[:60]


def _read_tensor(ref: _TensorRef, name: str, source: str) -> np.ndarray:
  """The tensor's elements, after checking that every one of them lies inside its storage
  (exact integer arithmetic, before numpy sees a stride)."""
  storage, offset, size, stride = ref.storage, ref.storage_offset, ref.size, ref.stride
  where = f"{source}: tensor {name}"
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise UserError(f"{where} has no storage (not a torch checkpoint?)")
  if not (
    _is_int(offset)
    and isinstance(size, tuple)
    and isinstance(stride, tuple)
    and len(size) == len(stride)
    and all(_is_int(v) for v in size + stride)
  ):
    raise UserError(
      f"{where} has a malformed layout (offset {_short(offset)}, size {_short(size)}, "
      f"stride {_short(stride)})"
    )
  layout = f"offset {offset}, size {list(size)}, stride {list(stride)}"
  if offset < 0 or any(v < 0 for v in size) or any(v < 0 for v in stride):
    raise UserError(
      f"{where} has a negative offset, size or stride ({layout}): torch never "
      "writes one; the file is corrupt or crafted"
    )
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))  # Strides are >= 0.
  if last >= storage.size:
    raise UserError(
      f"{where} reaches element {last} of a storage of {storage.size} "
      f"({layout}): the file is truncated or corrupt"
    )
  # No two elements on one storage element (torch's dense and strided views, permuted or
  # sliced, pass): a damaged stride (64 -> 0) would otherwise read other weights silently.
  span = 1
  for n, st in sorted((p for p in zip(size, stride) if p[0] > 1), key=lambda p: p[1]):
    if st < span:
      raise UserError(
        f"{where} has elements sharing storage ({layout}): a trained parameter never "
        "does; the file is corrupt, or save a contiguous copy of it"
      )
    span += (n - 1) * st
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
    storage[offset:], shape=size, strides=tuple(st * itemsize for st in stride)
  ).copy()


def _materialize(obj, name: str, source: str, memo: dict[int, tuple[Any, Any]]):
  """`obj` with every `_TensorRef` inside it read into a numpy array (in place for dicts,
  lists and module records; tuples are rebuilt). `name` is its state_dict-style name; `memo`
  maps objects already seen (shared or cyclic in the pickle) to (object, result)."""
  if id(obj) in memo:
    return memo[id(obj)][1]
  if isinstance(obj, _TensorRef):
    memo[id(obj)] = (obj, _read_tensor(obj, name, source))
  elif isinstance(obj, tuple):
    items = tuple(
      _materialize(v, f"{name}.{i}" if name else str(i), source, memo) for i, v in enumerate(obj)
    )
    memo[id(obj)] = (obj, items)
  elif isinstance(obj, (ModuleRecord, dict, list)):
    memo[id(obj)] = (obj, obj)  # Before its items: a cycle comes back to it.
    prefix = f"{name}." if name else ""
    items = obj.state if isinstance(obj, ModuleRecord) else obj
    for key in range(len(items)) if isinstance(items, list) else items:
      value = items[key]
      if isinstance(obj, ModuleRecord) and key in ("_parameters", "_buffers", "_modules"):
        if isinstance(value, dict):  # Named as state_dict does: `mh_attn.linear_q.weight`.
          memo[id(value)] = (value, value)
          for k in value:
            value[k] = _materialize(value[k], f"{prefix}{k}", source, memo)
          continue
      items[key] = _materialize(value, f"{prefix}{key}", source, memo)
  elif isinstance(obj, (set, frozenset)) and any(isinstance(v, _TensorRef) for v in obj):
    raise UserError(
      f"{source}: {name or 'the checkpoint'} is a set of tensors, which a module never holds"
    )
  return memo[id(obj)][1] if id(obj) in memo else obj


def _device(*args) -> str:
  return ":".join(str(a) for a in args)


def _rebuild_parameter(data, *unused):
  return data


def _codecs_encode(text, encoding="utf-8"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise ValueError("the pickle uses _codecs.encode in a way torch never writes")
  return text.encode("latin1")


class _TorchUnpickler(pickle.Unpickler):
  """Resolves only tensor rebuilding, dtypes and inert module records."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str, order: str):
    super().__init__(file)
    self._archive, self._prefix, self._source = archive, prefix, source
    self._order = order  # "<" or ">": the byte order of the storages.
    self.storages: dict[str, np.ndarray] = {}

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
    if (module, name) == ("numpy", "dtype"):  # Its state checked: numpy's trusts it.
      return safe_pickle.CheckedDtype
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
      return _numpy_scalar
    if module.startswith("torch.nn.modules.") or name in _RECORDED_CLASS_NAMES:
      return _record_class(qualname)
    raise UserError(f"{self._source}: refusing to load {qualname} from a checkpoint pickle")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise UserError(f"{self._source}: unexpected persistent id in checkpoint")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
      raise UserError(f"{self._source}: unsupported storage type {storage_type!r}")
    dtype = np.dtype(storage_type.dtype)
    name = f"{self._prefix}data/{key}"
    if key not in self.storages:
      try:
        raw = _read_entry(self._archive, name)
      except KeyError:
        raise UserError(f"{self._source}: storage {name} is missing (truncated file?)") from None
      storage = np.frombuffer(raw, dtype=dtype.newbyteorder(self._order))
      self.storages[key] = storage.astype(dtype, copy=False)  # Native order.
    storage = self.storages[key]
    # torch writes each storage's element count beside its key: a storage longer or shorter
    # than that lost or gained bytes, and its tensors would read shifted weights.
    if storage.dtype != dtype or not _is_int(numel) or storage.size != numel:
      raise ValueError(
        f"storage {name} holds {storage.size} {storage.dtype} elements, "
        f"the pickle says {numel!r} {dtype}"
      )
    return storage


def _read_entry(archive: zipfile.ZipFile, name: str) -> bytes:
  """The bytes of an entry, which must be stored as torch writes it: a compressed entry
  would need as much memory as it claims to expand to (a zip bomb), checked or not."""
  info = archive.getinfo(name)
  if info.compress_type != zipfile.ZIP_STORED:
    raise ValueError(f"entry {name} is compressed, which torch.save never does")
  return archive.read(info)


def _numpy_scalar(dtype, data=None):
  dtype = safe_pickle.real_dtype(dtype)
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise ValueError("the pickle holds a numpy scalar of an unsupported kind")
  return np.frombuffer(data, dtype=dtype)[0]


def load_module(path: str) -> ModuleRecord:
  """Reads a whole pickled torch module as a tree of `ModuleRecord`s with numpy parameters.

  Raises:
    UserError: for a missing, corrupt or truncated file, or one that names classes
      other than torch modules, tensors and the original SASRec classes.
  """
  require_file(path, "checkpoint")
  with open(path, "rb") as f:
    head = f.read(2)
  # A pickle of protocol 2 or later opens with PROTO: a legacy (pre-1.6 or
  # `_use_new_zipfile_serialization=False`) torch file or a plain pickle, never a zip.
  if len(head) == 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
    raise UserError(
      f"checkpoint {path} is not a torch zip checkpoint (legacy torch format or a plain "
      "pickle): re-save it with torch >= 1.6's default format (torch.save(model, path))"
    )
  source = f"checkpoint {path}"
  try:
    archive = zipfile.ZipFile(path)
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles:
      raise UserError(f"checkpoint {path} has no data.pkl: not a torch zip checkpoint")
    prefix = pickles[0][: -len("data.pkl")]  # "<name>/"
    data = _read_entry(archive, pickles[0])
    order = {None: "<", b"little": "<", b"big": ">"}.get(_byteorder(archive, prefix + "byteorder"))
    if order is None:
      raise ValueError("its byteorder record is neither 'little' nor 'big'")
    safe_pickle.check_memo_indices(data)  # Before the unpickler allocates a memo of that size.
    unpickler = _TorchUnpickler(io.BytesIO(data), archive, prefix, source, order)
    root = _materialize(unpickler.load(), "", source, {})
    if isinstance(root, ModuleRecord):
      _check_tree(root)
    # torch writes the storages its tensors use, and numbers them as it meets them: one no
    # tensor reads means a damaged key sent a tensor to another storage.
    unused = {n for n in archive.namelist() if n.startswith(prefix + "data/")}
    unused -= {f"{prefix}data/{key}" for key in unpickler.storages}
    if unused:
      raise ValueError(f"no tensor reads the storage(s) {', '.join(sorted(unused)[:3])}")
  except UserError:
    raise
  # What a damaged pickle raises (`safe_pickle.CORRUPT`, RuntimeError among them: zipfile's
  # encrypted entries and zip versions it does not read, recursion), and a damaged zip.
  except (*safe_pickle.CORRUPT, zipfile.BadZipFile, OSError) as exc:
    raise UserError(
      f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})"
    ) from None
  if not isinstance(root, ModuleRecord):
    # A state_dict lacks what the module records beside its weights (its attention heads and
    # item count), which the weights' shapes do not tell.
    what = " (a state_dict?)" if isinstance(root, dict) else ""
    name = type(root).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    raise UserError(
      f"checkpoint {path} holds {article} {name}{what}, expected a pickled module: the "
      "original saves its SASRec whole (torch.save(model)), with its head and item counts"
    )
  return root


def _byteorder(archive: zipfile.ZipFile, name: str) -> bytes | None:
  """The byte order torch (>= 2.1) records beside the storages, None in older files."""
  return _read_entry(archive, name).strip() if name in archive.namelist() else None


_MAX_TREE_ITEMS = 1_000_000


def _check_tree(root: ModuleRecord) -> None:
  """Raises ValueError unless every module's `_parameters` and `_buffers` map names to
  arrays and its `_modules` names to modules, and the tree, shared modules counted each
  time, holds at most `_MAX_TREE_ITEMS` of them (a module inside itself holds infinitely
  many; 60 nested pairs of one shared module, 2**60)."""
  stack, count = [(None, root)], 0  # A module's name as (key, parent's), joined if needed.
  while stack:
    path, module = stack.pop()
    for key, kind in (
      ("_parameters", np.ndarray),
      ("_buffers", np.ndarray),
      ("_modules", ModuleRecord),
    ):
      items = module.state.get(key)
      if items is None:
        continue
      if not isinstance(items, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, kind)) for k, v in items.items()
      ):
        name = []
        while path:
          name[:0], path = [path[0]], path[1]
        raise ValueError(f"module {'.'.join(name) or '(root)'} has a {key} torch never writes")
      count += len(items)
      if count > _MAX_TREE_ITEMS:
        raise ValueError(
          f"its module tree holds over {_MAX_TREE_ITEMS} modules and tensors (shared modules "
          "counted each time they are met: a module inside itself?)"
        )
    stack.extend(((k, path), v) for k, v in module.children().items())


def flat_parameters(root: ModuleRecord, prefix: str = "") -> dict[str, np.ndarray]:
  """`state_dict`-style flat names (`ln_1.weight`, ...) to numpy arrays."""
  out = {f"{prefix}{k}": v for k, v in root.parameters().items()}
  for name, child in root.children().items():
    out.update(flat_parameters(child, f"{prefix}{name}."))
  return out
