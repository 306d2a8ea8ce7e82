"""Loading pickled LLaRA DataFrames without letting the pickle run code.

A pickle is a small program: its `GLOBAL`/`STACK_GLOBAL` opcodes import any
callable and `REDUCE` calls it. `load_dataframe` resolves only the handful of
numpy and pandas names that a DataFrame of lists and integers needs; anything
else (`os.system`, `builtins.eval`, ...) is refused before it is imported.

The allowed names trust their input, and a damaged file must fail with an error, never
crash the process, so some resolve to stand-ins that check it first (`_RESOLVED`): numpy
arrays and dtypes, whose `__setstate__` reads past data shorter than the shape says or
trusts the flags it is given, and pyarrow arrays, whose offsets are read unchecked; pandas'
`Index` classes resolve to `_IndexClass` (a BUILD would set attributes of the class). Before
unpickling, a scan of the opcodes refuses memo indices past the file's size, for which
CPython's unpickler would allocate memory in proportion (9 bytes can ask for gigabytes).

Files written by pandas 1.x load as pandas' own `read_pickle` reads them: the names pandas 2
removed map to current ones as pandas' compat layer maps them (`_PANDAS1_NAMES`), to the same
checked stand-ins. A file that is no pickle (compressed, Parquet, CSV, JSON, ...) is named
for what it looks like (`_MAGIC`, `_text_kind`) rather than called corrupt.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import math
import pickle
import pickletools
import re
from typing import Any

import numpy as np

from ilora_jax.errors import UserError, require_file

# (module, name) pairs a pickled DataFrame of lists, ints and tuples needs. numpy 1.x
# wrote `numpy.core.*`; numpy 2 moved those to `numpy._core.*` (same objects).
_ALLOWED = {
  ("numpy", "ndarray"),
  ("numpy", "dtype"),
  ("numpy.core.multiarray", "_reconstruct"),
  ("numpy.core.multiarray", "scalar"),
  ("numpy.core.numeric", "_frombuffer"),
  ("numpy._core.multiarray", "_reconstruct"),
  ("numpy._core.multiarray", "scalar"),
  ("numpy._core.numeric", "_frombuffer"),
  ("pandas.core.frame", "DataFrame"),
  ("pandas", "DataFrame"),
  ("pandas", "Index"),
  ("pandas", "RangeIndex"),
  ("pandas.core.series", "Series"),
  ("pandas.core.internals.managers", "BlockManager"),
  ("pandas.core.internals.managers", "SingleBlockManager"),
  ("pandas._libs.internals", "_unpickle_block"),
  ("pandas.core.indexes.base", "_new_Index"),
  ("pandas.core.indexes.base", "Index"),
  ("pandas.core.indexes.range", "RangeIndex"),
  # pandas 3 stores string column labels as Arrow arrays: pure data constructors.
  ("pandas", "StringDtype"),
  ("pandas.arrays", "ArrowStringArray"),
  ("pyarrow.lib", "_restore_array"),
  ("pyarrow.lib", "py_buffer"),
  ("pyarrow.lib", "type_for_alias"),
  ("builtins", "bytearray"),
  ("builtins", "slice"),
  ("builtins", "tuple"),
  ("builtins", "list"),
  ("_codecs", "encode"),
  ("functools", "partial"),  # Only of `_unpickle_block` (pandas 1.3's blocks): `_BlockPartial`.
}

# pandas 1.x's names that pandas 2 removed, mapped before the allowlist as pandas' own
# read_pickle maps them (pandas.compat.pickle_compat): its Int64Index, UInt64Index and
# Float64Index are pandas 2's Index (only ever handed to `_new_Index`, see `_IndexClass`), and
# pandas 1.3 pickled each block as `functools.partial(new_block, ndim=2)(values, placement)`.
_PANDAS1_NAMES = {
  ("pandas.core.indexes.numeric", "Int64Index"): ("pandas.core.indexes.base", "Index"),
  ("pandas.core.indexes.numeric", "UInt64Index"): ("pandas.core.indexes.base", "Index"),
  ("pandas.core.indexes.numeric", "Float64Index"): ("pandas.core.indexes.base", "Index"),
  ("pandas.core.internals.blocks", "new_block"): ("pandas._libs.internals", "_unpickle_block"),
}


try:
  from numpy._core.multiarray import _reconstruct, scalar
  from numpy._core.numeric import _frombuffer as _numpy_frombuffer
except ImportError:  # numpy 1.x
  from numpy.core.multiarray import _reconstruct, scalar
  from numpy.core.numeric import _frombuffer as _numpy_frombuffer


class CheckedDtype:
  """What a pickle's `numpy.dtype(...)` resolves to. numpy's own `dtype.__setstate__` trusts
  the state it is given (one of 6 items, or object flags on an integer type, crash the
  process), so the state must be the one numpy writes for the dtype the arguments name (up
  to byte order and a datetime unit). Arrays and scalars take the real dtype, `.dtype`."""

  def __init__(self, *args):
    self.dtype = np.dtype(*args)

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|"):
      raise ValueError(f"numpy dtype {self.dtype} has the state {state!r:.100}")
    dtype = np.dtype(self.dtype.newbyteorder(state[1]), False, True)  # A copy of its own.
    own = dtype.__reduce__()[2]
    if len(state) != len(own) or state[:8] != own[:8]:  # [8]: a datetime's unit, checked.
      raise ValueError(f"numpy dtype {self.dtype} has the state {state!r:.100}, not {own}")
    dtype.__setstate__(state)
    self.dtype = dtype


class _CheckedArray(np.ndarray):
  """What a pickle's `numpy.ndarray` resolves to. numpy's own `__setstate__` fills an object
  array with as many items as the pickled shape says, reading past a shorter list, so the
  state is checked first; a second state would free data that views still read; and
  `ndarray(shape, object, buffer)` reads pointers from bytes (numpy's pickles never call it)."""

  def __new__(cls, *args, **kwargs):
    raise TypeError("a pickle calls numpy.ndarray(...), which numpy's own pickles never do")

  def __setstate__(self, state):
    if self.shape != (0,) or self.base is not None:  # Not the empty array `_reconstruct` made.
      raise ValueError(f"a pickle sets the state of an array of shape {self.shape} again")
    if not isinstance(state, tuple) or len(state) not in (4, 5):  # Optional version first.
      raise ValueError("an ndarray state is not a tuple of 4 or 5 items")
    shape, dtype, _, data = state[-4:]
    dtype = real_dtype(dtype)
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
      raise ValueError(f"an ndarray has the shape {shape!r:.100}")
    size = math.prod(shape)
    if dtype.hasobject:  # The items themselves, as a list.
      if not isinstance(data, list) or len(data) != size:
        got = f"{len(data)} items" if isinstance(data, list) else type(data).__name__
        raise ValueError(f"an object array of shape {shape} holds {got}")
      data = [x.view(np.ndarray) if isinstance(x, _CheckedArray) else x for x in data]
    elif not isinstance(data, (bytes, str)) or len(data) != size * dtype.itemsize:
      got = f"{len(data)} bytes" if isinstance(data, (bytes, str)) else type(data).__name__
      raise ValueError(f"a {dtype} array of shape {shape} holds {got}")
    super().__setstate__((*state[:-3], dtype, state[-2], data))


def real_dtype(dtype):
  """The numpy dtype a pickle's `numpy.dtype(...)` built (see `CheckedDtype`)."""
  return dtype.dtype if isinstance(dtype, CheckedDtype) else dtype


def _plain(value):
  """`value` as a plain ndarray if the pickle built it as a `_CheckedArray`."""
  return value.view(np.ndarray) if isinstance(value, _CheckedArray) else value


def _scalar(dtype, *args):
  """numpy's `scalar` (a numpy integer in a cell, say), given the real dtype."""
  return scalar(real_dtype(dtype), *args)


def _frombuffer(buf, dtype, *args):
  """numpy's `_frombuffer`, as a `_CheckedArray`: a state set on an array over a buffer
  would release the buffer that views of the array still read."""
  return _numpy_frombuffer(buf, real_dtype(dtype), *args).view(_CheckedArray)


def _unpickle_block(values, placement, ndim):
  """pandas' `_unpickle_block` (a DataFrame's column block), given plain arrays."""
  from pandas._libs.internals import _unpickle_block

  return _unpickle_block(_plain(values), _plain(placement), ndim)


class _BlockPartial:
  """What a pickle's `functools.partial` resolves to: pandas 1.3 pickled each block as
  `partial(new_block, ndim=2)` called on (values, placement), and `new_block` resolves to
  `_unpickle_block` (`_PANDAS1_NAMES`); a partial of anything else is refused."""

  def __init__(self, func):
    if func is not _unpickle_block:
      raise TypeError(f"a pickle calls functools.partial({func!r:.100}), not of pandas' new_block")
    self.ndim = None

  def __setstate__(self, state):
    if (
      self.ndim is not None
      or not isinstance(state, tuple)
      or len(state) != 4
      or state[:2] != (_unpickle_block, ())
      or not isinstance(state[2], dict)
      or list(state[2]) != ["ndim"]
      or state[2]["ndim"] not in (1, 2)
      or state[3] not in (None, {})
    ):
      raise ValueError(f"a pickle gives partial(new_block) the state {state!r:.100}")
    self.ndim = int(state[2]["ndim"])

  def __call__(self, values, placement):
    if self.ndim is None:
      raise ValueError("a pickle calls partial(new_block) without its ndim")
    return _unpickle_block(values, placement, self.ndim)


class _IndexClass:
  """What a pickle's pandas `Index` and `RangeIndex` resolve to: pandas' pickles only hand
  them to `_new_Index`. The classes have no `__setstate__`, so a BUILD on them would set
  attributes of pandas' own classes (`Index.tolist = tuple`) for the rest of the process."""

  def __init__(self, cls):
    self.cls = cls

  def __setstate__(self, state):
    raise ValueError(f"a pickle sets attributes of the class pandas.{self.cls.__name__}")


def _new_index(cls, d):
  """pandas' `_new_Index` (an index or the column labels), given plain arrays and dtypes."""
  from pandas.core.indexes.base import _new_Index

  if isinstance(cls, _IndexClass):
    cls = cls.cls
  if isinstance(d, dict):
    d = {key: _plain(real_dtype(value)) for key, value in d.items()}
  return _new_Index(cls, d)


def _restore_array(state):
  """pyarrow's `_restore_array`, validated: its buffers (string offsets, say) are as
  pickled, and reading a bad offset reads far outside them."""
  from pyarrow.lib import _restore_array

  array = _restore_array(state)
  array.validate(full=True)
  return array


def _py_buffer(data):
  """pyarrow's `py_buffer`, through a function of ours: a BUILD on pyarrow's own would set its
  attributes for the rest of the process (as on `type_for_alias`'s)."""
  from pyarrow.lib import py_buffer

  return py_buffer(data)


def _type_for_alias(name):
  from pyarrow.lib import type_for_alias

  return type_for_alias(name)


def _bytearray(*args):
  """`bytearray` of the bytes or text given (as pickles of protocols 2 to 4 call it), never
  of a number: `bytearray(n)` allocates n zero bytes, gigabytes from a 37-byte file."""
  if args and not isinstance(args[0], (bytes, bytearray, str, list, tuple)):
    raise ValueError(f"a pickle calls bytearray({type(args[0]).__name__}), which allocates")
  return bytearray(*args)


# What allowed names resolve to where that is not the object they name: numpy's under either
# of its names, and stand-ins that check their input or keep a BUILD off the library's objects.
_RESOLVED = {
  ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
  ("numpy", "ndarray"): _CheckedArray,
  ("numpy", "dtype"): CheckedDtype,
  ("numpy._core.multiarray", "scalar"): _scalar,
  ("numpy._core.numeric", "_frombuffer"): _frombuffer,
  ("pandas._libs.internals", "_unpickle_block"): _unpickle_block,
  ("pandas.core.indexes.base", "_new_Index"): _new_index,
  ("pyarrow.lib", "_restore_array"): _restore_array,
  ("pyarrow.lib", "py_buffer"): _py_buffer,
  ("pyarrow.lib", "type_for_alias"): _type_for_alias,
  ("functools", "partial"): _BlockPartial,
  ("builtins", "bytearray"): _bytearray,
}

_EXTENSION_TYPE = (
  "has a column (or index) of a pandas extension type such as datetime, category or "
  "nullable integer ({}), which is not read: convert a column of ids with astype('int64'), "
  "drop any other (such as a column of text), and save the DataFrame again"
)

_INDEX_TYPE = (
  "has an index (or column labels) of a pandas type that is not read, such as datetimes or "
  "categories ({}): replace it with a plain one (frame.reset_index(drop=True)) and save the "
  "DataFrame again"
)


_EXTENSION_MODULES = (
  "pandas.arrays",
  "pandas.core.arrays",
  "pandas.core.dtypes",
  "pandas._libs.arrays",
  "pandas._libs.tslibs",
)
_EXTENSION_NAMES = ("Dtype", "Array", "Categorical")


def _unsupported_pandas(module: str, name: str) -> str | None:
  """Why a DataFrame file needs the pandas name `module.name`, which is not allowed;
  None if it is no pandas name."""
  if module != "pandas" and not module.startswith("pandas."):
    return None
  if name == "Series":
    return "holds a pandas Series, expected a DataFrame: save series.to_frame() instead"
  if name == "MultiIndex":
    return (
      "has MultiIndex columns (or index), which are not read: flatten them "
      "(frame.columns = ['_'.join(map(str, c)) for c in frame.columns]) and save again"
    )
  if name in ("NA", "NaT"):  # The missing value of a nullable or text column, its dtype's.
    return _EXTENSION_TYPE.format(f"{module}.{name}, the missing value of such a column")
  if name.endswith("Index") or module.startswith("pandas.core.indexes"):  # DatetimeIndex, ...
    return _INDEX_TYPE.format(f"{module}.{name}")
  if module.startswith(_EXTENSION_MODULES) or name.endswith(_EXTENSION_NAMES):
    return _EXTENSION_TYPE.format(f"{module}.{name}")
  return None


class _AllowlistUnpickler(pickle.Unpickler):
  """Unpickler that imports only allowlisted names."""

  def __init__(self, file, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    # Protocols 0-2 name Python 2's modules (`__builtin__.slice`); map them as pickle's own
    # find_class does, before the allowlist sees them.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
      module = _compat_pickle.IMPORT_MAPPING[module]
    module, name = _PANDAS1_NAMES.get((module, name), (module, name))
    if (module, name) == ("copyreg", "_reconstructor"):  # Protocols 0 and 1 build objects so.
      raise UserError(
        f"{self._source}: a pickle of protocol 0 or 1 is not read (it builds objects through "
        "copyreg._reconstructor); save the DataFrame again with protocol 2 or later"
      )
    if (module, name) not in _ALLOWED:
      unsupported = _unsupported_pandas(module, name)
      if unsupported:
        raise UserError(f"{self._source} {unsupported}")
      raise UserError(
        f"{self._source}: refusing to load {module}.{name} from a pickle "
        "(only pandas/numpy DataFrame classes are allowed)"
      )
    module = module.replace("numpy.core.", "numpy._core.")  # numpy 1.x's names of numpy 2's.
    if (module, name) in _RESOLVED:
      return _RESOLVED[module, name]
    if name in ("Index", "RangeIndex"):
      return _IndexClass(getattr(importlib.import_module(module), name))
    return getattr(importlib.import_module(module), name)

  def persistent_load(self, pid):
    raise UserError(f"{self._source}: pickle uses persistent ids, which a DataFrame file never has")


_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_MEMO_PUT = {"PUT", "LONG_BINPUT"}  # BINPUT's one-byte index is harmless.


def _skippable_opcodes() -> re.Pattern:
  """A regex matching a run of opcodes whose length it can tell (no argument, a fixed-size
  one, or a one-byte length and that many bytes), except STOP and the memo PUTs: the scan
  below skips those at the speed of the regex engine and reads the rest one by one."""
  fixed, counted = {}, []
  for code, op in _OPCODES.items():
    if op.name in _MEMO_PUT or op.name == "STOP":
      continue
    size = 0 if op.arg is None else op.arg.n
    if size >= 0:
      fixed.setdefault(size, []).append(re.escape(code))
    elif size == pickletools.TAKEN_FROM_ARGUMENT1:
      counted.append(re.escape(code))
  runs = [b"[" + b"".join(codes) + b"]" + b"." * size for size, codes in sorted(fixed.items())]
  lengths = b"|".join(re.escape(bytes([n])) + b"." * n for n in range(256))
  runs.append(b"[" + b"".join(counted) + b"](?:" + lengths + b")")
  return re.compile(b"(?:" + b"|".join(runs) + b")*+", re.DOTALL)


_SKIPPABLE = _skippable_opcodes()


def check_memo_indices(data: bytes) -> None:
  """Raises ValueError if a PUT or LONG_BINPUT names a memo index past the file's size:
  pickle numbers memo entries from 0, one per opcode at most, and CPython's unpickler
  grows its memo to the index named, 16 bytes a slot, before it stores anything."""
  f = io.BytesIO(data)
  pos = 0
  while True:
    pos = _SKIPPABLE.match(data, pos).end()
    op = _OPCODES.get(data[pos : pos + 1])
    if op is None:
      raise ValueError("no STOP opcode" if pos >= len(data) else f"bad opcode at byte {pos}")
    if op.name == "STOP":
      return
    f.seek(pos + 1)
    arg = op.arg.reader(f)
    if op.name in _MEMO_PUT and arg > len(data):
      raise ValueError(f"memo index {arg} in a pickle of {len(data)} bytes")
    pos = f.tell()


# What unpickling a damaged file raises: pickle's own errors, and whatever the allowed
# numpy, pandas and pyarrow code makes of the data (pandas asserts a BlockManager's shapes
# and raises NotImplementedError for formats it no longer reads; numpy parses the repeat
# count of a dtype string such as "08i8" with ast.literal_eval).
CORRUPT = (
  pickle.UnpicklingError,
  EOFError,
  ValueError,
  TypeError,
  AttributeError,
  LookupError,
  ImportError,
  MemoryError,
  ArithmeticError,
  AssertionError,
  RuntimeError,
  SystemError,
  SyntaxError,
)


def _corrupt(what: str, path: str, exc: Exception) -> UserError:
  return UserError(f"{what} {path} is corrupt or truncated ({type(exc).__name__}: {exc})")


_SAVE = "save the DataFrame with frame.to_pickle(path)"
_COMPRESSED = (
  "a compressed pickle? decompress it, or save it with to_pickle(path, compression=None)"
)

# The first bytes of files that are no pickle (no pickle this reader loads starts so), what
# they are and the way out.
_MAGIC = (
  (b"\x1f\x8b", "a gzip file", _COMPRESSED),
  (b"BZh", "a bzip2 file", _COMPRESSED),
  (b"\xfd7zXZ\x00", "an xz file", _COMPRESSED),
  (b"\x28\xb5\x2f\xfd", "a zstd file", _COMPRESSED),
  (b"PK\x03\x04", "a zip archive", _COMPRESSED),
  (b"PK\x05\x06", "an empty zip archive", _COMPRESSED),
  (b"PAR1", "a Parquet file", _SAVE),
  (b"ARROW1", "an Arrow (Feather) file", _SAVE),
  (b"\x89HDF\r\n\x1a\n", "an HDF5 file", _SAVE),
  (b"\x93NUMPY", "a numpy .npy file", _SAVE),
  (b"version https://git-lfs", "a Git LFS pointer", "fetch the data with git lfs pull"),
)


def _not_a_pickle(data: bytes) -> str | None:
  """What `data` looks like if it is a known format of another kind (compressed, columnar)."""
  for magic, kind, advice in _MAGIC:
    if data.startswith(magic):
      return f"{kind} ({advice})"
  return None


def _text_kind(data: bytes) -> str | None:
  """What `data` looks like if it is CSV, JSON or HTML text (asked of a file that starts with
  no opcode or failed to unpickle: a pickle of protocol 0 or 1 is text too, but its first line
  is an opcode and a name or number, `ccopy_reg` or `(dp0`)."""
  head = data[:4096]
  try:
    text = head.decode("utf-8")
  except UnicodeDecodeError as exc:
    if exc.start < len(head) - 3:  # Not just a character cut at the end of the head.
      return None
    text = head[: exc.start].decode("utf-8")
  if not text or any(c < " " and c not in "\t\r\n" for c in text):
    return None
  text = text.lstrip("\ufeff \t\r\n")
  if text[:1] in ("{", "["):
    return f"JSON text ({_SAVE})"
  if text[:1] == "<":
    return "an HTML or XML page (a failed download?)"
  first = text.split("\n", 1)[0]
  if any(sep in first for sep in ",\t;"):
    return f"CSV text ({_SAVE})"
  if "::" in first or "|" in first:  # Given as a split, say: no pickle's line holds these.
    return "a titles file (id::title or u.item lines), not a split's DataFrame"
  return None


def safe_load(path: str, what: str = "pickle") -> Any:
  """Unpickles `path` allowing only DataFrame-related numpy/pandas names.

  Raises:
    UserError: if the file is missing, corrupt, truncated or names any other class.
  """
  require_file(path, what)
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise UserError(f"{what} {path} is empty")
  kind = _not_a_pickle(data)
  if not kind and data[:1] not in _OPCODES:  # No pickle starts so: a JSON text, say.
    kind = _text_kind(data)
  if kind:
    raise UserError(f"{what} {path} is not a pickle: it looks like {kind}")
  try:
    check_memo_indices(data)
    return _AllowlistUnpickler(io.BytesIO(data), f"{what} {path}").load()
  except (UserError, *CORRUPT) as exc:
    # Text that starts with an opcode (a CSV header "seq,..."), named once it fails.
    kind = _text_kind(data) if data[:1] != pickle.PROTO else None
    if kind:
      raise UserError(f"{what} {path} is not a pickle: it looks like {kind}") from None
    if isinstance(exc, UserError):
      raise
    raise _corrupt(what, path, exc) from None


def load_dataframe(path: str, what: str = "data file"):
  """Loads a pickled pandas DataFrame safely (see `safe_load`)."""
  import pandas as pd

  obj = safe_load(path, what)
  if isinstance(obj, pd.Series):
    raise UserError(f"{what} {path} {_unsupported_pandas('pandas', 'Series')}")
  if not isinstance(obj, pd.DataFrame):
    raise UserError(f"{what} {path} holds a {type(obj).__name__}, expected a pandas DataFrame")
  try:  # A damaged file can leave a DataFrame without its parts.
    len(obj), len(obj.columns)
    for block in obj._mgr.blocks:  # pandas <= 1.2 pickled them straight into its state.
      block.values = _plain(block.values)
  except CORRUPT as exc:
    raise _corrupt(what, path, exc) from None
  return obj
