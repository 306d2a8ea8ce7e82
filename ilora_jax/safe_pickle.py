"""Loading pickled LLaRA DataFrames without letting the pickle run code.

A pickle is a small program: its `GLOBAL`/`STACK_GLOBAL` opcodes import any
callable and `REDUCE` calls it. `load_dataframe` resolves only the handful of
numpy and pandas names that a DataFrame of lists and integers needs; anything
else (`os.system`, `builtins.eval`, ...) is refused before it is imported.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
from typing import Any

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
}
_RENAMED = {
  "numpy.core.multiarray": "numpy._core.multiarray",
  "numpy.core.numeric": "numpy._core.numeric",
}


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
    if (module, name) == ("copyreg", "_reconstructor"):  # Protocols 0 and 1 build objects so.
      raise UserError(
        f"{self._source}: a pickle of protocol 0 or 1 is not read (it builds objects through "
        "copyreg._reconstructor); save the DataFrame again with protocol 2 or later"
      )
    if (module, name) not in _ALLOWED:
      raise UserError(
        f"{self._source}: refusing to load {module}.{name} from a pickle "
        "(only pandas/numpy DataFrame classes are allowed)"
      )
    if module in _RENAMED:
      try:
        return getattr(importlib.import_module(_RENAMED[module]), name)
      except (ImportError, AttributeError):
        pass
    return getattr(importlib.import_module(module), name)

  def persistent_load(self, pid):
    raise UserError(f"{self._source}: pickle uses persistent ids, which a DataFrame file never has")


def safe_load(path: str, what: str = "pickle") -> Any:
  """Unpickles `path` allowing only DataFrame-related numpy/pandas names.

  Raises:
    UserError: if the file is missing, corrupt, truncated or names any other class.
  """
  require_file(path, what)
  with open(path, "rb") as f:
    data = f.read()
  try:
    return _AllowlistUnpickler(io.BytesIO(data), f"{what} {path}").load()
  except UserError:
    raise
  except (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    ImportError,
    MemoryError,
    OverflowError,
    UnicodeDecodeError,
  ) as exc:
    raise UserError(
      f"{what} {path} is corrupt or truncated ({type(exc).__name__}: {exc})"
    ) from None


def load_dataframe(path: str, what: str = "data file"):
  """Loads a pickled pandas DataFrame safely (see `safe_load`)."""
  import pandas as pd

  obj = safe_load(path, what)
  if not isinstance(obj, pd.DataFrame):
    raise UserError(f"{what} {path} holds a {type(obj).__name__}, expected a pandas DataFrame")
  return obj
