"""The allowlisting unpickler: real LLaRA files load; anything that could run code is refused."""

import contextlib
import glob
import importlib
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, SHARED, shared_path

from ilora_jax import safe_pickle, sasrec, torch_checkpoint
from ilora_jax.errors import UserError
from ilora_jax.safe_pickle import load_dataframe


class _RunsCode:
  """Unpickling this calls os.system: the attack a .df file can carry."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


def test_refuses_code_execution_and_never_runs_it(tmp_path):
  marker = tmp_path / "pwned"
  evil = tmp_path / "evil.df"
  evil.write_bytes(pickle.dumps(_RunsCode(marker)))
  with pytest.raises(UserError, match="refusing to load .*system"):
    load_dataframe(str(evil))
  assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1])
def test_protocols_0_and_1_are_refused_with_the_way_out(tmp_path, protocol):
  frame = pd.DataFrame({"seq": [[1, 2, 5]], "len_seq": [2], "next": [4]})
  path = tmp_path / "old.df"
  frame.to_pickle(path, protocol=protocol)
  with pytest.raises(UserError, match="protocol 0 or 1 is not read .* protocol 2 or later"):
    load_dataframe(str(path))


def test_python2_module_names_are_mapped_before_the_allowlist(tmp_path):
  path = tmp_path / "evil2.df"  # `__builtin__.eval` maps to builtins.eval: still refused.
  path.write_bytes(b"c__builtin__\neval\n(S'1'\ntR.")
  with pytest.raises(UserError, match="refusing to load builtins.eval"):
    load_dataframe(str(path))


def test_refuses_payload_hidden_inside_a_dataframe(tmp_path):
  marker = tmp_path / "pwned2"
  frame = pd.DataFrame({"seq": [[1, 2, 3]], "len_seq": [3], "next": [_RunsCode(marker)]})
  path = tmp_path / "frame.df"
  path.write_bytes(pickle.dumps(frame))
  with pytest.raises(UserError, match="refusing"):
    load_dataframe(str(path))
  assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_round_trip_of_a_dataframe_written_by_pandas(tmp_path, protocol):
  rows = 300  # Protocol 2 numbers its memo past 255 with LONG_BINPUT.
  frame = pd.DataFrame(
    {"seq": [[i, i + 1, 5] for i in range(rows)], "len_seq": [2] * rows, "next": [4] * rows}
  )
  path = tmp_path / "ok.df"
  frame.to_pickle(path, protocol=protocol)  # 2 names Python 2's `__builtin__` module.
  if protocol == 2:
    assert any(op.name == "LONG_BINPUT" for op, _, _ in pickletools.genops(path.read_bytes()))
  loaded = load_dataframe(str(path))
  pd.testing.assert_frame_equal(loaded, frame)
  assert loaded["seq"].tolist()[:2] == [[0, 1, 5], [1, 2, 5]]


@pytest.mark.parametrize("cut", [10, 200])
def test_truncated_pickle_is_a_clear_error(tmp_path, cut):
  frame = pd.DataFrame({"seq": [[1, 2, 5]] * 20, "len_seq": [2] * 20, "next": [4] * 20})
  data = pickle.dumps(frame)
  path = tmp_path / "cut.df"
  path.write_bytes(data[:cut])
  with pytest.raises(UserError, match="corrupt or truncated"):
    load_dataframe(str(path))


def test_not_a_dataframe(tmp_path):
  path = tmp_path / "list.df"
  path.write_bytes(pickle.dumps([1, 2, 3]))
  with pytest.raises(UserError, match="expected a pandas DataFrame"):
    load_dataframe(str(path))


def test_missing_file(tmp_path):
  with pytest.raises(UserError, match="not found"):
    load_dataframe(str(tmp_path / "nope.df"))


@pytest.mark.parametrize(
  "dataset,file,rows",
  [
    ("lastfm", "Val_data.df", 122),
    ("lastfm", "train_data.df", 50800),
    ("movielens", "Val_data.df", 94),
    ("movielens", "train_data.df", 68389),
    ("steam", "Val_data.df", 1194),
    ("steam", "train_data_sample1000.df", 1000),
  ],
)
def test_loads_the_real_llara_files(dataset, file, rows):
  path = shared_path("data", dataset, file)
  frame = load_dataframe(path)
  assert len(frame) == rows
  assert {"seq", "len_seq", "next"} <= set(frame.columns)
  pd.testing.assert_frame_equal(frame, pd.read_pickle(path))  # Trusted files: the reference.
  for column in ["seq", "len_seq", "next"]:  # Plain arrays, not the loader's checked ones.
    assert type(frame[column].to_numpy(copy=False)) is np.ndarray
    assert type(frame[column].values) is np.ndarray
  assert type(frame.index.to_numpy()) is np.ndarray


# Damaged files that crashed the process (segfault, abort) or asked for gigabytes: each is
# loaded in a child process, so that a regression fails its test, not the pytest worker.

_LOAD_IN_CHILD = """
import resource, sys
import pandas
try:
  import pyarrow
except ImportError:
  pass
from ilora_jax.errors import UserError
from ilora_jax.safe_pickle import load_dataframe
from ilora_jax.torch_checkpoint import load_module
pages = int(open("/proc/self/statm").read().split()[0])  # 1 GiB more than the imports took.
limit = pages * resource.getpagesize() + 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
  if sys.argv[1].endswith(".pt"):
    print("loaded", load_module(sys.argv[1]))
  else:
    frame = load_dataframe(sys.argv[1])
    print("loaded", list(frame.columns), frame.to_dict("list"))
except UserError as exc:
  print(exc)
"""


def _load_in_child(path) -> subprocess.CompletedProcess:
  """`load_dataframe(path)` (`torch_checkpoint.load_module` for a `.pt`) in a child process;
  it printed the UserError (or what it loaded)."""
  proc = subprocess.run(
    [sys.executable, "-c", _LOAD_IN_CHILD, str(path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])  # -11: segv
  return proc


def _small_frame_pickle(rows=5, protocol=5) -> bytes:
  frame = pd.DataFrame({"seq": [[1, 2, 5]] * rows, "len_seq": [2] * rows, "next": [4] * rows})
  return pickle.dumps(frame, protocol=protocol)


def _patched(data: bytes, old: bytes, new: bytes) -> bytes:
  assert data.count(old) == 1, (old, data.count(old))
  return data.replace(old, new)


def test_object_array_with_a_shape_past_its_items_is_an_error(tmp_path):
  # The object block `seq` is pickled as ndarray state (version 1, shape (1, 5), ...) with a
  # list of 5 items; numpy filled 100000 x 5 items from it, reading past the list.
  path = tmp_path / "Val_data.df"
  shape = b"K\x01J" + struct.pack("<i", 100000) + b"K\x05\x86"
  path.write_bytes(_patched(_small_frame_pickle(), b"K\x01K\x01K\x05\x86", shape))
  out = _load_in_child(path).stdout
  assert f"data file {path} is corrupt or truncated" in out, out
  assert "an object array of shape (100000, 5) holds 5 items" in out, out


def test_dtype_state_numpy_never_writes_is_an_error(tmp_path):
  # The object dtype's state (3, '|', None, None, None, -1, -1, 63) with one byte changed:
  # BININT2 swallows two of the Nones, and numpy read a state of 6 items as one of 8.
  path = tmp_path / "Val_data.df"
  state = b"\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?t"
  path.write_bytes(_patched(_small_frame_pickle(), state, state.replace(b"NNN", b"MNN")))
  out = _load_in_child(path).stdout
  assert f"data file {path} is corrupt or truncated" in out, out
  assert "numpy dtype object has the state (3, '|', 20046, -1, -1, 63)" in out, out


def test_direct_ndarray_call_over_a_buffer_is_refused(tmp_path):
  # ndarray((2,), "O", buffer) reads object pointers from the bytes of the buffer (a crash
  # once anything reads the array).
  path = tmp_path / "Val_data.df"
  buffer = _global("builtins", "bytearray") + b"C\x10" + b"\x01" * 16 + b"\x85R"
  array = _global("numpy", "ndarray") + b"(K\x02\x85" + _str("O") + buffer + b"tR"
  path.write_bytes(b"\x80\x04]" + array + b"a.")
  out = _load_in_child(path).stdout
  assert "corrupt or truncated (TypeError: a pickle calls numpy.ndarray(...)" in out, out


def test_a_second_state_for_an_array_is_refused(tmp_path):
  # numpy's __setstate__ replaces an array's data, which views of the array (a DataFrame's
  # block, say) still read once it is freed.
  path = tmp_path / "Val_data.df"
  built = pickle.dumps(np.arange(2), protocol=4)  # _reconstruct, then BUILD with its state.
  over_buffer = pickle.dumps(np.arange(2), protocol=5)  # _frombuffer over a bytearray.
  for data in (built, over_buffer):
    path.write_bytes(data[:-1] + b")b.")  # BUILD again, before STOP.
    with pytest.raises(UserError, match=r"sets the state of an array of shape \(2,\) again"):
      load_dataframe(str(path))


def test_arrow_column_labels_with_offsets_past_their_data_are_an_error(tmp_path):
  pytest.importorskip("pyarrow")
  data = _small_frame_pickle()
  offsets = struct.pack("<4q", 0, 3, 10, 14)  # "seq", "len_seq", "next" as a large_string.
  if offsets not in data:
    pytest.skip("this pandas pickles column labels without Arrow")
  path = tmp_path / "Val_data.df"
  path.write_bytes(_patched(data, offsets, struct.pack("<4q", 0, 3, 2**40, 2**40 + 4)))
  out = _load_in_child(path).stdout
  assert f"data file {path} is corrupt or truncated (ArrowInvalid: " in out, out


def test_memo_index_past_the_file_is_refused_before_it_is_allocated(tmp_path):
  # LONG_BINPUT to memo slot 2**30: CPython's unpickler allocated 16 GiB for its memo.
  path = tmp_path / "Val_data.df"
  path.write_bytes(b"\x80\x04Nr" + struct.pack("<I", 2**30) + b".")
  out = _load_in_child(path).stdout
  assert "corrupt or truncated (ValueError: memo index 1073741824 in a pickle of 9 bytes)" in out


def test_bytearray_of_a_number_is_refused_before_it_is_allocated(tmp_path):
  # bytearray(3 * 10**9): 37 bytes that made the loader allocate 3 GB before refusing the
  # result (not a DataFrame); 10**13 was a MemoryError.
  path = tmp_path / "Val_data.df"
  big = b"\x8a\x05" + (3 * 10**9).to_bytes(5, "little")  # LONG1.
  path.write_bytes(b"\x80\x02" + _global("builtins", "bytearray") + big + b"\x85R.")
  out = _load_in_child(path).stdout
  assert (
    "corrupt or truncated (ValueError: a pickle calls bytearray(int), which allocates" in out
  ), out


def test_bytearray_longer_than_the_file_is_refused_before_it_is_allocated(tmp_path):
  # The int64 block's 80 bytes (protocol 5, in band) said to be 1 TiB long: the unpickler
  # allocated it first, and printed a SystemError ("deallocated bytearray object has
  # exported buffers") on its way to a MemoryError.
  path = tmp_path / "Val_data.df"
  length = b"\x96" + struct.pack("<Q", 80)
  path.write_bytes(_patched(_small_frame_pickle(), length, b"\x96" + struct.pack("<Q", 2**40)))
  proc = _load_in_child(path)
  assert "corrupt or truncated (ValueError: expected 1099511627776 bytes in a bytearray8" in (
    proc.stdout
  ), proc.stdout
  assert "SystemError" not in proc.stderr, proc.stderr


def test_damaged_dataframes_are_corrupt_not_unexpected_errors(tmp_path):
  data = _small_frame_pickle()
  cases = {
    # The int64 block placed on columns 1..2 instead of 1..3: pandas asserts the shapes.
    "AssertionError: Number of manager items must equal union of block items": _patched(
      data, b"K\x01K\x03K\x01\x87", b"K\x01K\x02K\x01\x87"
    ),
    # The DataFrame's state names `_mgX` for `_mgr`: it loaded, without its data.
    "AttributeError: 'DataFrame' object has no attribute '_mgr'": _patched(
      data, b"\x8c\x04_mgr", b"\x8c\x04_mgX"
    ),
    # The int64 dtype named "08i8": numpy parses the "08" as a Python literal.
    "SyntaxError: leading zeros in decimal integer literals": _patched(
      data, b"\x8c\x02i8", b"\x8c\x0408i8"
    ),
    # A BlockManager given a state of no format pandas reads.
    "NotImplementedError: pre-0.14.1 pickles are no longer supported": (
      b"\x80\x02" + _global("pandas.core.internals.managers", "BlockManager") + b")\x81)b."
    ),
  }
  for message, damaged in cases.items():
    path = tmp_path / "Val_data.df"
    path.write_bytes(damaged)
    with pytest.raises(UserError, match=f"data file {path} is corrupt or truncated \\({message}"):
      load_dataframe(str(path))


_EXTENSION = "has a column \\(or index\\) of a pandas extension type .* astype\\('int64'\\)"


@pytest.mark.parametrize(
  "change,message",
  [
    (lambda f: f.assign(when=pd.to_datetime(["2024-01-01"] * len(f))), _EXTENSION),
    (lambda f: f.astype({"next": "Int64"}), _EXTENSION),
    (lambda f: f.assign(genre=pd.Categorical(["rock"] * len(f))), _EXTENSION),
    # A missing value of a nullable or text column: a security refusal before (found by the
    # bad-input audit, from a pyarrow string column too).
    (
      lambda f: f.assign(note=pd.Series(["a", pd.NA, "c"], dtype=object)),
      _EXTENSION.replace("type .*", "type .*pandas.*NA, the missing value of such a column.*"),
    ),
    (
      lambda f: f.set_axis(pd.MultiIndex.from_product([["a"], f.columns]), axis=1),
      "has MultiIndex columns .* flatten them",
    ),
    (
      lambda f: f["next"],
      "holds a pandas Series, expected a DataFrame: save series\\.to_frame\\(\\)",
    ),
  ],
  ids=["datetime", "nullable-int", "category", "missing-value", "multiindex-columns", "series"],
)
def test_unsupported_pandas_types_name_the_way_out(tmp_path, change, message):
  frame = pd.DataFrame({"seq": [[1, 2, 5]] * 3, "len_seq": [2] * 3, "next": [4] * 3})
  path = tmp_path / "Val_data.df"
  change(frame).to_pickle(path)
  with pytest.raises(UserError, match=f"data file {path} {message}"):
    load_dataframe(str(path))


# The torch `.pt` reader (torch_checkpoint) and SASRec's use of it: the same allowlisting
# unpickler idea, for whole pickled modules.


def _global(module, name):
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text):
  return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def _int(value):
  return b"J" + struct.pack("<i", value)


def _tuple(*items):
  return b"(" + b"".join(items) + b"t"


def _crafted_pt(path, offset, size, stride, storage=None, numel=None, entries=(), linear=None):
  """A torch-format zip written by hand (no torch): a module `net` holding a Linear `lin`
  whose `weight` is `_rebuild_tensor_v2(storage, offset, size, stride)` over `storage`
  (float32 0, 1, 2, 3 by default) of `numel` elements (its size by default), and more
  `entries` (name, bytes); `linear` replaces the Linear's pickle."""
  storage = np.arange(4, dtype=np.float32) if storage is None else storage
  numel = storage.size if numel is None else numel
  storage_id = _tuple(
    _str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"), _int(numel)
  )
  tensor = (
    _global("torch._utils", "_rebuild_tensor_v2")
    + _tuple(
      storage_id + b"Q",  # BINPERSID: the storage of the zip's data/0.
      _int(offset),
      _tuple(*map(_int, size)),
      _tuple(*map(_int, stride)),
      b"\x89",  # requires_grad=False
      _global("collections", "OrderedDict") + b")R",
    )
    + b"R"
  )

  def module(cls, params, children=b""):
    state = b"}(" + _str("_parameters") + b"}(" + params + b"u" + _str("_modules") + b"}("
    return _global("torch.nn.modules." + cls[0], cls[1]) + b")\x81" + state + children + b"uub"

  if linear is None:
    linear = module(("linear", "Linear"), _str("weight") + tensor)
  root = module(("container", "Sequential"), b"", _str("lin") + linear)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("net/data.pkl", b"\x80\x02" + root + b".")
    archive.writestr("net/data/0", storage.tobytes())
    for name, data in entries:
      archive.writestr(name, data)
  return str(path)


def test_checkpoint_pickles_get_the_memo_and_dtype_checks_too(tmp_path):
  """A `.pt`'s data.pkl is unpickled by its own allowlist (torch classes), with the checks of
  `safe_pickle`: a memo index past the pickle is refused before the unpickler allocates it
  (16 GiB for 2**30), and a numpy dtype state numpy never writes before numpy trusts it."""
  bomb = b"\x80\x02Nr" + struct.pack("<I", 2**30) + b"."
  state = _tuple(b"K\x03", _str("|"), _int(20046), _int(-1), _int(-1), b"K?")  # 6 of 8 items.
  dtype = b"\x80\x02" + _global("numpy", "dtype") + _tuple(_str("O8"), b"\x89\x88")
  for name, pkl, message in (
    ("bomb.pt", bomb, "memo index 1073741824 in a pickle of 9 bytes"),
    ("dtype.pt", dtype + b"R" + state + b"b.", "numpy dtype object has the state (3, '|', 20046"),
  ):
    with zipfile.ZipFile(tmp_path / name, "w") as archive:
      archive.writestr("net/data.pkl", pkl)
    out = _load_in_child(tmp_path / name).stdout
    assert f"checkpoint {tmp_path / name} is corrupt or truncated (ValueError: {message}" in out, (
      out
    )


def test_crafted_layouts_inside_the_storage_read_as_numpy_does(tmp_path):
  storage = np.arange(6, dtype=np.float32)
  cases = [
    (0, [2, 3], [3, 1]),
    (0, [3, 2], [1, 3]),
    (2, [2, 2], [2, 1]),
    (5, [], []),
    (0, [3], [2]),  # A slice with a step.
    (0, [2, 1, 3], [3, 0, 1]),  # A broadcast dimension of size 1 (an unsqueezed tensor).
    (0, [0, 3], [0, 0]),
  ]
  for offset, size, stride in cases:
    path = _crafted_pt(tmp_path / "ok.pt", offset, size, stride, storage)
    got = torch_checkpoint.flat_parameters(torch_checkpoint.load_module(path))["lin.weight"]
    want = [storage[offset + sum(i * s for i, s in zip(ix, stride))] for ix in np.ndindex(*size)]
    assert got.shape == tuple(size)
    np.testing.assert_array_equal(got.reshape(-1), want)


@pytest.mark.parametrize(
  "offset,size,stride,message",
  [
    (0, [1000], [-(2**24)], "negative offset, size or stride"),  # Segfaulted: far before it.
    (0, [1000000], [-1], "negative offset, size or stride"),  # Read process memory.
    (-100000000, [2], [1], "negative offset, size or stride"),  # Was clamped by slicing.
    (0, [-2, 2], [1, 1], "negative offset, size or stride"),
    (3, [2], [1], "reaches element 4 of a storage of 4"),  # One past the end.
    (0, [2, 2], [3, 1], "reaches element 4 of a storage of 4"),
    (10**9, [], [], "reaches element 1000000000"),
    (0, [2], [2**30], "reaches element 1073741824"),
    # Elements on one storage element: the stride 64 of SASRec's s_fc.weight [4606, 64]
    # damaged to 0 read row 0 4606 times, silently; torch never trains such a parameter.
    (0, [2, 2], [0, 1], "has elements sharing storage"),
    (1, [3], [0], "has elements sharing storage"),  # An expanded view.
    (0, [2, 2], [1, 1], "has elements sharing storage"),
    (0, [2**31 - 1, 2**31 - 1], [0, 0], "has elements sharing storage"),
  ],
)
def test_tensors_outside_their_storage_are_refused_by_name(tmp_path, offset, size, stride, message):
  path = _crafted_pt(tmp_path / "crafted.pt", offset, size, stride)
  with pytest.raises(UserError, match=f"checkpoint {path}: tensor lin.weight .*{message}"):
    torch_checkpoint.load_module(path)


def test_storages_of_another_length_than_the_pickle_says_are_refused(tmp_path):
  """torch writes each storage's element count in the pickle: bytes inserted into (or cut
  from) a storage shifted the weights its tensors read, silently while they fit."""
  path = tmp_path / "damaged.pt"
  for storage, size in ((np.arange(5, dtype=np.float32), 4), (np.arange(3, dtype=np.float32), 3)):
    _crafted_pt(path, 0, [size], [1], storage, numel=4)
    with pytest.raises(
      UserError,
      match=f"checkpoint {path} is corrupt or truncated \\(ValueError: storage net/data/0 holds "
      f"{storage.size} float32 elements, the pickle says 4 float32\\)$",
    ):
      torch_checkpoint.load_module(str(path))
  # A damaged storage key ("1" for "0") sends a tensor to a storage of the same size.
  _crafted_pt(path, 0, [4], [1], entries=[("net/data/1", np.ones(4, np.float32).tobytes())])
  with pytest.raises(UserError, match="no tensor reads the storage\\(s\\) net/data/1\\)$"):
    torch_checkpoint.load_module(str(path))


def _patch_central(path, entry, offset, fmt, value):
  """Sets a field of `entry`'s central directory record (at `offset` in it) in the zip."""
  data = bytearray(open(path, "rb").read())
  record = data.index(b"PK\x01\x02")
  while data[record + 46 : record + 46 + len(entry) + 1] != entry.encode() + b"P":
    record = data.index(b"PK\x01\x02", record + 1)  # Entries carry no extra field here.
  struct.pack_into(fmt, data, record + offset, value)
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
  "offset,fmt,value,message",
  [
    (8, "<H", 1, "RuntimeError: File .*net/data/0.* is encrypted"),
    (6, "<H", 64, "NotImplementedError: zip file version 6.4"),
    (10, "<H", 12, "ValueError: entry net/data/0 is compressed, which torch.save never does"),
  ],
)
def test_zip_entries_torch_never_writes_are_refused(tmp_path, offset, fmt, value, message):
  """Fields of the zip's central directory, damaged: zipfile raised RuntimeError (and its
  NotImplementedError) past the loader, or read a bzip2 entry that torch never writes."""
  path = _crafted_pt(tmp_path / "damaged.pt", 0, [4], [1])
  _patch_central(path, "net/data/0", offset, fmt, value)
  with pytest.raises(UserError, match=f"checkpoint {path} is corrupt or truncated \\({message}"):
    torch_checkpoint.load_module(path)


def test_a_compressed_storage_is_refused_before_it_expands(tmp_path):
  """A 2 MB zip whose storage inflates to 2 GiB (the reader reads whole entries): refused
  before it is read, instead of the memory it claims."""
  path = _crafted_pt(tmp_path / "bomb.pt", 0, [4], [1])
  with zipfile.ZipFile(path) as archive:
    pkl = archive.read("net/data.pkl")
  zeros = zlib.compressobj(9, zlib.DEFLATED, -15)  # Raw deflate, as zip stores it.
  block = zeros.compress(bytes(2**20)) + zeros.flush(zlib.Z_FULL_FLUSH)  # 1 MiB; no history.
  bomb = block * 2048 + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("net/data.pkl", pkl)
    archive.writestr("net/data/0", bomb)  # Stored, then marked deflated below.
  _patch_central(path, "net/data/0", 10, "<H", zipfile.ZIP_DEFLATED)
  _patch_central(path, "net/data/0", 24, "<I", 2**31)  # Its uncompressed size.
  out = _load_in_child(path).stdout
  assert "(ValueError: entry net/data/0 is compressed, which torch.save never does)" in out, out


def test_big_endian_checkpoints_read_in_their_byte_order(tmp_path):
  """torch >= 2.1 records the byte order of the storages; a big-endian machine's file read
  as little-endian gave byte-swapped weights."""
  path = tmp_path / "big.pt"
  storage = np.arange(4, dtype=">f4")
  _crafted_pt(path, 0, [4], [1], storage, entries=[("net/byteorder", b"big")])
  got = torch_checkpoint.flat_parameters(torch_checkpoint.load_module(str(path)))["lin.weight"]
  np.testing.assert_array_equal(got, [0, 1, 2, 3])
  assert got.dtype == np.float32
  _crafted_pt(path, 0, [4], [1], entries=[("net/byteorder", b"middle")])
  with pytest.raises(UserError, match="byteorder record is neither 'little' nor 'big'"):
    torch_checkpoint.load_module(str(path))


def _linear_state(memo, state):
  """A pickled Linear (put in memo slot `memo`) whose state dict holds `state`'s items."""
  linear = _global("torch.nn.modules.linear", "Linear") + b")\x81q" + bytes([memo])
  return linear + b"}(" + state + b"ub"


def _shared_twice(depth):
  """Sequential modules nested `depth` deep, each holding the one below twice: 2**depth
  leaves named from 2 * depth pickled references."""
  out = _global("torch.nn.modules.linear", "Linear") + b")\x81q\x01"
  for i in range(2, depth + 2):
    children = _str("a") + b"h" + bytes([i - 1]) + _str("b") + b"h" + bytes([i - 1])
    sequential = _global("torch.nn.modules.container", "Sequential") + b")\x81q" + bytes([i])
    out = out + b"0" + sequential + b"}(" + _str("_modules") + b"}(" + children + b"uub"
  return out  # Each POP (0) leaves only the newest module on the stack.


@pytest.mark.parametrize(
  "linear,message",
  [
    (
      _linear_state(1, _str("_parameters") + _str("oops")),
      "module lin has a _parameters torch never",
    ),
    (
      _linear_state(1, _str("_modules") + b"}(" + _str("me") + b"N" + _str("x") + _int(3) + b"u"),
      "module lin has a _modules torch never",
    ),
    (_linear_state(1, _str("_modules") + b"}(" + _str("me") + b"h\x01u"), "module tree holds over"),
    (_shared_twice(60), "module tree holds over 1000000 modules"),
  ],
  ids=["parameters-a-string", "child-an-int", "inside-itself", "shared-2**60"],
)
def test_module_trees_torch_never_writes_are_refused(tmp_path, linear, message):
  """flat_parameters raised TypeError for a `_parameters` that is no dict, recursed forever
  through a module inside itself, and named 2**60 parameters through shared modules."""
  path = _crafted_pt(tmp_path / "tree.pt", 0, [4], [1], linear=linear)
  with pytest.raises(UserError, match=f"checkpoint {path} is corrupt or truncated .*{message}"):
    torch_checkpoint.load_module(path)


@pytest.mark.parametrize(
  "call",
  [
    _global("_codecs", "encode") + _tuple(_int(1), _str("latin1")) + b"R",
    _global("numpy.core.multiarray", "scalar") + _tuple(_int(1)) + b"R",
  ],
  ids=["codecs", "numpy-scalar"],
)
def test_calls_torch_never_pickles_name_the_file(tmp_path, call):
  path = _crafted_pt(tmp_path / "odd.pt", 0, [4], [1], linear=call)
  with pytest.raises(UserError, match=f"^checkpoint {path} is corrupt or truncated \\(ValueError"):
    torch_checkpoint.load_module(path)


def test_a_malformed_layout_is_named_on_one_line(tmp_path):
  """A damaged pickle handed a tensor its storage for a stride: numpy's repr of it spread
  the message over lines."""
  storage = _tuple(
    _str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"), _int(100)
  )
  tensor = _global("torch._utils", "_rebuild_tensor_v2") + _tuple(
    storage + b"Q", _int(0), _tuple(_int(4)), storage + b"Q"
  )
  linear = _linear_state(1, _str("_parameters") + b"}(" + _str("weight") + tensor + b"Ru")
  storage = np.arange(100, dtype=np.float32)
  path = _crafted_pt(tmp_path / "odd.pt", 0, [4], [1], storage, 100, linear=linear)
  with pytest.raises(UserError) as error:
    torch_checkpoint.load_module(path)
  assert "lin.weight has a malformed layout (offset 0, size (4,), stride array([ 0., 1.," in str(
    error.value
  )
  assert "\n" not in str(error.value)


def test_bfloat16_checkpoints_read_as_torch_widens_them(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)
  path = tmp_path / "bf16.pt"
  torch.save(net, path)
  flat = torch_checkpoint.flat_parameters(torch_checkpoint.load_module(str(path)))
  assert sorted(flat) == sorted(net.state_dict())
  for name, value in net.state_dict().items():
    np.testing.assert_array_equal(flat[name].astype(np.float32), value.float().numpy())


def test_legacy_torch_files_and_plain_pickles_are_named_as_such(tmp_path):
  plain = tmp_path / "plain.pt"
  plain.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=2))
  paths = [plain]
  torch = None
  try:
    import torch
  except ImportError:
    pass
  if torch is not None:
    paths.append(tmp_path / "legacy.pt")
    torch.save({"x": torch.zeros(2)}, paths[-1], _use_new_zipfile_serialization=False)
  for path in paths:
    with pytest.raises(UserError, match="is not a torch zip checkpoint .*legacy torch format"):
      torch_checkpoint.load_module(str(path))
  whole = _crafted_pt(tmp_path / "whole.pt", 0, [4], [1])
  cut = tmp_path / "cut.pt"
  cut.write_bytes(open(whole, "rb").read()[:-30])
  with pytest.raises(UserError, match="corrupt or truncated"):
    torch_checkpoint.load_module(str(cut))


def _torch_sasrec(torch, n_items=5, hidden=8, max_len=10):
  """The original's SASRec module layout (its classes' names; weights random)."""
  nn = torch.nn
  module = type(
    "SASRec",
    (nn.Module,),
    {"__module__": __name__, "__qualname__": "SASRec"},
  )
  globals()["SASRec"] = module  # torch.save pickles classes by module and name.
  model = module()
  model.item_num = n_items
  model.item_embeddings = nn.Embedding(n_items + 1, hidden)
  model.positional_embeddings = nn.Embedding(max_len, hidden)
  model.emb_dropout = nn.Dropout(0.1)
  for name in ("ln_1", "ln_2", "ln_3"):
    setattr(model, name, nn.LayerNorm(hidden))
  model.mh_attn = nn.Module()
  for name in ("linear_q", "linear_k", "linear_v"):
    setattr(model.mh_attn, name, nn.Linear(hidden, hidden))
  model.feed_forward = nn.Module()
  model.feed_forward.w_1 = nn.Conv1d(hidden, hidden, 1)
  model.feed_forward.w_2 = nn.Conv1d(hidden, hidden, 1)
  model.feed_forward.layer_norm = nn.LayerNorm(hidden)
  model.s_fc = nn.Linear(hidden, n_items)
  return model


def test_sasrec_refuses_weights_it_does_not_use(tmp_path):
  torch = pytest.importorskip("torch")
  cfg = sasrec.SASRecConfig(n_items=5, hidden=8)
  model = _torch_sasrec(torch)
  path = tmp_path / "sasrec.pt"
  torch.save(model, path)
  params = sasrec.params_from_torch(str(path), cfg)  # The original's layout loads.
  want = model.state_dict()
  np.testing.assert_array_equal(params["s_fc"]["kernel"], want["s_fc.weight"].numpy().T)
  np.testing.assert_array_equal(
    params["feed_forward"]["w_1"]["kernel"], want["feed_forward.w_1.weight"].numpy()[:, :, 0].T
  )

  model.register_parameter("bogus", torch.nn.Parameter(torch.zeros(4)))
  torch.save(model, path)
  with pytest.raises(UserError, match=r"holds 1 weight\(s\) this SASRec does not use: bogus \("):
    sasrec.params_from_torch(str(path), cfg)
  del model.bogus
  model.extra = torch.nn.Linear(3, 3)
  for i in range(3):
    model.register_buffer(f"buf_{i}", torch.zeros(2))
  torch.save(model, path)
  with pytest.raises(
    UserError, match=r"holds 5 weight\(s\) .* not use: buf_0, buf_1, buf_2 and 2 more \("
  ):
    sasrec.params_from_torch(str(path), cfg)


def test_sasrec_refuses_an_item_count_that_is_no_integer(tmp_path):
  """The original module's `item_num` (an int) checked against the data; a damaged or foreign
  file's string or list there is one line, not int()'s ValueError or TypeError."""
  torch = pytest.importorskip("torch")
  cfg = sasrec.SASRecConfig(n_items=5, hidden=8)
  path = tmp_path / "sasrec.pt"
  for value in ("5", [5], 5.0, True):
    model = _torch_sasrec(torch)
    model.item_num = value
    torch.save(model, path)
    with pytest.raises(UserError, match=re.escape(f"holds item_num={value!r}, not an item count")):
      sasrec.params_from_torch(str(path), cfg)
  model.item_num = 6
  torch.save(model, path)
  with pytest.raises(UserError, match="trained on 6 items but the data set has 5"):
    sasrec.params_from_torch(str(path), cfg)


# A mutation audit of both loaders (2026-12-05): each test below fails for a one-line change
# of safe_pickle.py or torch_checkpoint.py that the tests above let through.


def _bytes(data):
  return b"B" + struct.pack("<I", len(data)) + data


def _dangerous_calls(marker, evil):
  """(module, name, REDUCE arguments) of globals that run code (each would create `marker`,
  `evil` being a pickle that does), read arbitrary pickles, or reach numpy's unchecked
  ndarray under another module's name."""
  touch = _str(f"touch {marker}")
  source = _str(f"open({str(marker)!r}, 'w').close()")
  return [
    ("os", "system", touch),
    ("posix", "system", touch),
    ("subprocess", "getoutput", touch),
    ("builtins", "eval", source),
    ("builtins", "exec", source),
    ("builtins", "getattr", _global("builtins", "list") + _str("__name__")),
    ("builtins", "__import__", _str("os")),
    ("importlib", "import_module", _str("os")),
    ("numpy", "load", _str(str(evil)) + b"N\x88"),  # allow_pickle=True
    ("numpy.testing._private.utils", "runstring", source + b"}"),
    ("pandas", "read_pickle", _str(str(evil))),
    ("pandas.io.pickle", "read_pickle", _str(str(evil))),
    ("pickle", "loads", _bytes(evil.read_bytes())),
    ("numpy.ma.core", "ndarray", _tuple(b"K\x02") + _str("O")),  # numpy's own, unchecked.
    ("os", "DataFrame", b""),  # A name allowed in another module.
  ]


_DANGEROUS_IDS = [
  "os.system",
  "posix.system",
  "subprocess.getoutput",
  "builtins.eval",
  "builtins.exec",
  "builtins.getattr",
  "builtins.__import__",
  "importlib.import_module",
  "numpy.load",
  "numpy.testing.runstring",
  "pandas.read_pickle",
  "pandas.io.pickle.read_pickle",
  "pickle.loads",
  "numpy.ma.core.ndarray",
  "os.DataFrame",
]


@pytest.mark.parametrize("index", range(len(_DANGEROUS_IDS)), ids=_DANGEROUS_IDS)
def test_globals_that_run_code_are_refused_by_both_loaders_and_never_run(tmp_path, index):
  """Each global by GLOBAL and by STACK_GLOBAL in a .df, and in a .pt's data.pkl: refused on
  one line, by its name, and the marker file its call would create never appears."""
  marker, evil = tmp_path / "pwned", tmp_path / "evil.pkl"
  evil.write_bytes(pickle.dumps(_RunsCode(marker)))
  calls = _dangerous_calls(marker, evil)
  assert len(calls) == len(_DANGEROUS_IDS)
  module, name, args = calls[index]
  call = b"(" + args + b"tR"
  stack_global = b"\x8c" + bytes([len(module)]) + module.encode()
  stack_global += b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93"
  for n, form in enumerate([_global(module, name), stack_global]):
    path = tmp_path / f"{n}.df"
    path.write_bytes(b"\x80\x04" + form + call + b".")
    with pytest.raises(UserError) as error:
      load_dataframe(str(path))
    assert str(error.value) == (
      f"data file {path}: refusing to load {module}.{name} from a pickle "
      "(only pandas/numpy DataFrame classes are allowed)"
    )
  path = _crafted_pt(tmp_path / "evil.pt", 0, [4], [1], linear=_global(module, name) + call)
  with pytest.raises(UserError) as error:
    torch_checkpoint.load_module(path)
  assert (
    str(error.value)
    == f"checkpoint {path}: refusing to load {module}.{name} from a checkpoint pickle"
  )
  assert not marker.exists()


def test_persistent_ids_and_python2_names_are_refused_by_name(tmp_path):
  path = tmp_path / "Val_data.df"
  path.write_bytes(b"\x80\x04" + _str("storage") + b"Q.")  # BINPERSID
  with pytest.raises(UserError) as error:
    load_dataframe(str(path))
  assert str(error.value) == (
    f"data file {path}: pickle uses persistent ids, which a DataFrame file never has"
  )
  # Python 2's names refused by what they would import (_compat_pickle's renames).
  for old, new in (
    ("__builtin__\nreduce", "functools.reduce"),
    ("__builtin__\nxrange", "builtins.range"),
  ):
    path.write_bytes(b"\x80\x02c" + old.encode() + b"\n)R.")
    with pytest.raises(UserError, match=f"^data file {path}: refusing to load {new} from"):
      load_dataframe(str(path))


def _memo_put(index):
  return b"r" + struct.pack("<I", index)  # LONG_BINPUT


def _refused_as_corrupt(path, pickled: bytes, message: str) -> None:
  """`pickled`, written to `path`, is refused by load_dataframe as a corrupt file whose
  ValueError says `message`."""
  path.write_bytes(pickled)
  with pytest.raises(UserError) as error:
    load_dataframe(str(path))
  assert str(error.value) == f"data file {path} is corrupt or truncated (ValueError: {message})"


def test_memo_indices_past_the_file_are_refused_after_any_opcode(tmp_path):
  """The scan that refuses memo indices past the file skips runs of opcodes by their sizes:
  a PUT (protocol 0's, its index in decimal) or LONG_BINPUT behind any of them is still
  found, and an index up to the file's size is not refused."""
  path = tmp_path / "Val_data.df"

  def refused(pickled, index):
    _refused_as_corrupt(path, pickled, f"memo index {index} in a pickle of {len(pickled)} bytes")

  refused(b"\x80\x02Np1000000\n.", 1000000)
  r = b"r" * 8  # Argument bytes that read as LONG_BINPUT opcodes if the scan misaligns.
  for op in (
    b"K" + r[:1],  # BININT1
    b"M" + r[:2],  # BININT2
    b"J" + r[:4],  # BININT
    b"G" + r,  # BINFLOAT
    b"\x8a\x03" + r[:3],  # LONG1
    b"\x8c\xc8" + b"r" * 200,  # SHORT_BINUNICODE of 200 bytes
    b"C\x00",  # SHORT_BINBYTES, empty
    b"C\xff" + b"r" * 255,
  ):
    refused(b"\x80\x04" + op + _memo_put(10**6) + b"0N.", 10**6)
  for index in (9, 10):  # 9 bytes: index 9 is allowed, 10 is not.
    path.write_bytes(b"\x80\x04N" + _memo_put(index) + b".")
    if index == 9:
      with pytest.raises(UserError, match="holds a NoneType, expected a pandas DataFrame"):
        load_dataframe(str(path))
    else:
      refused(path.read_bytes(), index)


def test_array_states_of_another_size_or_a_dtype_state_of_other_flags_are_named(tmp_path):
  """numpy's own __setstate__ checks a byte string's length, but fills an object array from
  the front of a longer list; both named by the loader. A dtype state of numpy's length with
  other flags (object flags on an integer) is refused before numpy sees it."""
  data = pickle.dumps(
    pd.DataFrame({"seq": [[1, 2, 5]] * 5, "len_seq": [2] * 5, "next": [4] * 5}), protocol=4
  )
  path = tmp_path / "Val_data.df"
  cases = [
    (b"K\x01K\x05\x86", b"K\x01K\x04\x86", "an object array of shape (1, 4) holds 5 items"),
    (b"K\x02K\x05\x86", b"K\x02K\x04\x86", "a int64 array of shape (2, 4) holds 80 bytes"),
    (b"K\x02K\x05\x86", b"K\x02K\x06\x86", "a int64 array of shape (2, 6) holds 80 bytes"),
    (b"K\x01K\x05\x86", b"K\x01" + _int(-5) + b"\x86", "an ndarray has the shape (1, -5)"),
  ]
  for old, new, message in cases:
    _refused_as_corrupt(path, _patched(data, old, new), message)
  dtype = _global("numpy", "dtype") + _tuple(_str("i8"), b"\x89\x88") + b"R"
  for items, shown in ((b"K?", "63"), (b"K\x00N", "0, None")):  # Flags 63; a 9th item.
    state = _tuple(b"K\x03", _str("<"), b"NNN", _int(-1), _int(-1), items)
    _refused_as_corrupt(
      path,
      b"\x80\x04]" + dtype + state + b"ba.",
      "numpy dtype int64 has the state "
      f"(3, '<', None, None, None, -1, -1, {shown}), not (3, '<', None, None, None, -1, -1, 0)",
    )
  state = _tuple(b"K\x03", _str("="), b"NNN", _int(-1), _int(-1), b"K\x00")  # No byte order.
  _refused_as_corrupt(
    path,
    b"\x80\x04]" + dtype + state + b"ba.",
    "numpy dtype int64 has the state (3, '=', None, None, None, -1, -1, 0)",
  )


def test_a_second_state_for_an_empty_array_over_a_buffer_is_refused(tmp_path):
  """An empty array over a buffer (`_frombuffer`) given a state: numpy would drop the buffer
  that views of the array read; refused as for any array that is not `_reconstruct`'s."""
  dtype = _global("numpy", "dtype") + _tuple(_str("i8"), b"\x89\x88") + b"Rq\x01"
  empty = _global("builtins", "bytearray") + b")R"
  array = _global("numpy._core.numeric", "_frombuffer")
  array += _tuple(empty, dtype, _tuple(b"K\x00"), _str("C")) + b"R"
  state = _tuple(b"K\x01", _tuple(b"K\x03"), b"h\x01", b"\x89", b"C\x18" + bytes(24))
  path = tmp_path / "Val_data.df"
  path.write_bytes(b"\x80\x04" + array + state + b"b.")
  with pytest.raises(UserError, match=r"sets the state of an array of shape \(0,\) again\)$"):
    load_dataframe(str(path))


def test_cells_and_indexes_of_numpy_values_load_as_numpy_wrote_them(tmp_path):
  """Cells holding numpy arrays (big-endian, datetime with its unit, 2-D) and scalars, and an
  index of integers, come back as plain numpy objects of the same dtype and values."""
  cells = [
    np.array([1, 2], ">i4"),
    np.array(["2024-01-02T03:04:05"], "M8[s]"),
    np.arange(6.0).reshape(2, 3),
    np.int64(5),
  ]
  frame = pd.DataFrame(
    {"seq": cells, "len_seq": [2] * 4, "next": [4] * 4}, index=pd.Index([10, 20, 30, 40])
  )
  path = tmp_path / "Val_data.df"
  frame.to_pickle(path)
  loaded = load_dataframe(str(path))
  for got, want in zip(loaded["seq"], cells):
    assert type(got) is type(want)
    assert got.dtype.str == want.dtype.str
    np.testing.assert_array_equal(got, want)
  assert type(loaded.index.to_numpy()) is np.ndarray
  assert loaded.index.tolist() == [10, 20, 30, 40]
  pd.testing.assert_frame_equal(loaded, frame)


def test_every_storage_dtype_and_view_reads_as_torch_saved_it(tmp_path):
  """Buffers of each storage type torch_checkpoint reads, and views at offsets and strides of
  one storage, written by torch.save: the same dtypes and values, as independent arrays."""
  torch = pytest.importorskip("torch")
  import ml_dtypes

  gen = torch.Generator().manual_seed(0)
  net = torch.nn.Module()
  kinds = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
  }
  for i, kind in enumerate(kinds):
    if kind.is_floating_point:
      values = torch.randn(3, 4, generator=gen) * 1000
    elif kind == torch.bool:
      values = torch.randn(3, 4, generator=gen) > 0
    else:
      info = torch.iinfo(kind)
      values = torch.randint(info.min, info.max, (3, 4), generator=gen, dtype=torch.int64)
    net.register_buffer(f"b{i}", values.to(kind))
  base = torch.arange(24.0).reshape(4, 6)
  net.register_buffer("rows", base[1:3])  # Offset 6 in the storage of `base`.
  net.register_buffer("cols", base[1:, 2:5:2])  # Offset 8, strides (6, 2).
  net.register_buffer("t", base.t())  # Strides (1, 6).
  path = tmp_path / "dtypes.pt"
  torch.save(net, path)
  flat = torch_checkpoint.flat_parameters(torch_checkpoint.load_module(str(path)))
  assert sorted(flat) == sorted(net.state_dict())
  for name, value in net.state_dict().items():
    got = flat[name]
    assert got.dtype == kinds[value.dtype], name
    np.testing.assert_array_equal(got.astype(np.float64), value.double().numpy(), err_msg=name)
    assert got.flags.c_contiguous and got.flags.writeable, name
  flat["rows"][:] = -1  # Copies: the views of one storage do not share memory.
  np.testing.assert_array_equal(flat["t"], base.t().numpy())


def _tensor_pt(tmp_path, offset, size, stride, storage=None, pid=None, more=b""):
  """A .pt whose Linear `lin` holds `weight`: `_rebuild_tensor_v2` of pickled arguments, over
  a storage of float32 0..3 (`storage` pickles the storage argument itself, `pid` the
  persistent id), and the Linear state's `more` items."""
  if storage is None:
    pid = pid or _tuple(
      _str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"), _int(4)
    )
    storage = pid + b"Q"
  tensor = _global("torch._utils", "_rebuild_tensor_v2")
  tensor += _tuple(storage, offset, size, stride) + b"R"
  params = _str("_parameters") + b"}(" + _str("weight") + tensor + b"u"
  return _crafted_pt(tmp_path / "odd.pt", 0, [4], [1], linear=_linear_state(1, params + more))


def test_tensor_arguments_torch_never_writes_are_named(tmp_path):
  cases = [
    (
      _int(0),
      _tuple(_int(2), _int(2)),
      _tuple(_int(1)),
      "malformed layout (offset 0, size (2, 2), stride (1,))",
    ),
    (
      _int(0),
      _tuple(_int(2)),
      _tuple(b"G" + struct.pack(">d", 1.0)),
      "malformed layout (offset 0, size (2,), stride (1.0,))",
    ),
    (
      b"\x88",
      _tuple(_int(2)),
      _tuple(_int(1)),
      "malformed layout (offset True, size (2,), stride (1,))",
    ),
  ]
  for offset, size, stride, message in cases:
    path = _tensor_pt(tmp_path, offset, size, stride)
    with pytest.raises(UserError) as error:
      torch_checkpoint.load_module(path)
    assert str(error.value) == f"checkpoint {path}: tensor lin.weight has a {message}"
  path = _tensor_pt(tmp_path, _int(0), _tuple(_int(2)), _tuple(_int(1)), storage=_int(7))
  with pytest.raises(UserError) as error:
    torch_checkpoint.load_module(path)
  assert str(error.value) == (
    f"checkpoint {path}: tensor lin.weight has no storage (not a torch checkpoint?)"
  )


def test_persistent_ids_and_storage_types_torch_never_writes_are_refused(tmp_path):
  layout = (_int(0), _tuple(_int(4)), _tuple(_int(1)))
  float_storage = _global("torch", "FloatStorage")
  cases = [
    (
      _tuple(_str("storagX"), float_storage, _str("0"), _str("cpu"), _int(4)),
      "unexpected persistent id in checkpoint",
    ),
    (
      _tuple(_str("storage"), float_storage, _str("0"), _str("cpu")),
      "unexpected persistent id in checkpoint",
    ),
    (
      _tuple(_str("storage"), _str("FloatStorage"), _str("0"), _str("cpu"), _int(4)),
      "unsupported storage type 'FloatStorage'",
    ),
  ]
  for pid, message in cases:
    path = _tensor_pt(tmp_path, *layout, pid=pid)
    with pytest.raises(UserError) as error:
      torch_checkpoint.load_module(path)
    assert str(error.value) == f"checkpoint {path}: {message}"
  # One storage key named with two types: the second reads the first's float32 bytes.
  long_pid = _tuple(
    _str("storage"), _global("torch", "LongStorage"), _str("0"), _str("cpu"), _int(4)
  )
  bias = _str("_buffers") + b"}(" + _str("b") + _global("torch._utils", "_rebuild_tensor_v2")
  bias += _tuple(long_pid + b"Q", *layout) + b"Ru"
  path = _tensor_pt(tmp_path, *layout, more=bias)
  with pytest.raises(UserError) as error:
    torch_checkpoint.load_module(path)
  assert str(error.value) == (
    f"checkpoint {path} is corrupt or truncated (ValueError: storage net/data/0 holds 4 "
    "float32 elements, the pickle says 4 int64)"
  )


@pytest.mark.parametrize(
  "more,message",
  [
    (
      _str("_buffers") + b"}(" + _str("b") + _str("text") + b"u",
      "module lin has a _buffers torch never writes",
    ),
    (_str("_modules") + b"}(" + _int(3) + b"Nu", "module lin has a _modules torch never writes"),
  ],
  ids=["buffer-a-string", "module-named-by-an-int"],
)
def test_module_items_torch_never_writes_are_refused(tmp_path, more, message):
  layout = (_int(0), _tuple(_int(4)), _tuple(_int(1)))
  path = _tensor_pt(tmp_path, *layout, more=more)
  with pytest.raises(
    UserError, match=f"^checkpoint {path} is corrupt or truncated \\(ValueError: {message}\\)$"
  ):
    torch_checkpoint.load_module(path)


def test_a_set_of_tensors_and_calls_torch_never_writes_are_refused(tmp_path):
  layout = (_int(0), _tuple(_int(4)), _tuple(_int(1)))
  tensor = (
    _global("torch._utils", "_rebuild_tensor_v2")
    + _tuple(
      _tuple(_str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"), _int(4))
      + b"Q",
      *layout,
    )
    + b"R"
  )
  path = _tensor_pt(tmp_path, *layout, more=_str("cache") + b"\x8f(" + tensor + b"\x90")
  with pytest.raises(UserError) as error:
    torch_checkpoint.load_module(path)
  assert str(error.value) == (
    f"checkpoint {path}: lin.cache is a set of tensors, which a module never holds"
  )
  codecs = _global("_codecs", "encode") + _tuple(_str("\xe9"), _str("utf-8")) + b"R"
  path = _tensor_pt(tmp_path, *layout, more=_str("text") + codecs)
  with pytest.raises(UserError, match="ValueError: the pickle uses _codecs.encode in a way torch"):
    torch_checkpoint.load_module(path)
  # Names the reader maps elsewhere only under their own modules (torch.* only its modules).
  for module, name in (("torch", "load"), ("os", "OrderedDict"), ("os", "set"), ("os", "scalar")):
    path = _crafted_pt(tmp_path / "odd.pt", 0, [4], [1], linear=_global(module, name) + b")R")
    with pytest.raises(UserError) as error:
      torch_checkpoint.load_module(path)
    assert (
      str(error.value)
      == f"checkpoint {path}: refusing to load {module}.{name} from a checkpoint pickle"
    )


@pytest.mark.parametrize(
  "module,name",
  [
    ("pandas", "Index"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas", "RangeIndex"),
    ("pandas.core.indexes.range", "RangeIndex"),
  ],
)
def test_a_pickle_cannot_set_attributes_of_pandas_classes(tmp_path, module, name):
  """BUILD with a state (None, {attribute: value}) on a class without `__setstate__` sets the
  class's attributes: a .df set `pandas.Index.tolist = tuple` (any attribute to any value it
  builds) for the rest of the process. pandas' pickles only hand these classes to
  `_new_Index`; the real files and frames written by pandas load as before (tests above)."""
  path = tmp_path / "Val_data.df"
  state = b"N}" + _str("pickled_attribute") + _global("builtins", "tuple") + b"s\x86"
  path.write_bytes(b"\x80\x02" + _global(module, name) + state + b"b.")
  cls = getattr(pd, name)
  try:
    with pytest.raises(UserError) as error:
      load_dataframe(str(path))
    assert str(error.value) == (
      f"data file {path} is corrupt or truncated "
      f"(ValueError: a pickle sets attributes of the class pandas.{name})"
    )
    assert "pickled_attribute" not in vars(cls)
  finally:
    if "pickled_attribute" in vars(cls):
      delattr(cls, "pickled_attribute")


@pytest.mark.parametrize("module, name", sorted(safe_pickle._ALLOWED))
def test_no_allowed_name_gets_attributes_from_a_pickle(tmp_path, module, name):
  """The same BUILD on every allowed name: refused, or it lands on an object of the reader's
  own, never on the library's (pyarrow's `py_buffer` and `type_for_alias` took attributes for
  the rest of the process)."""
  real = module.replace("numpy.core.", "numpy._core.")
  if real.startswith("pyarrow"):
    pytest.importorskip("pyarrow")
  target = getattr(importlib.import_module(real), name)
  path = tmp_path / "Val_data.df"
  state = b"N}" + _str("pickled_attribute") + _global("builtins", "tuple") + b"s\x86"
  path.write_bytes(b"\x80\x02" + _global(module, name) + state + b"b.")
  try:
    with contextlib.suppress(UserError):
      safe_pickle.safe_load(str(path))
    assert not hasattr(target, "pickled_attribute")
  finally:
    with contextlib.suppress(AttributeError, TypeError):
      delattr(target, "pickled_attribute")


def test_a_checkpoint_pickle_cannot_set_a_storage_type(tmp_path):
  """BUILD on `torch.FloatStorage` (what the reader maps it to) set the dtype its storage is
  read as: a float checkpoint read as datetimes, strings or bytes."""
  storage_type = (
    _global("torch", "FloatStorage") + b"N}" + _str("dtype") + _str("M8[s]") + b"s\x86b"
  )
  pid = _tuple(_str("storage"), storage_type, _str("0"), _str("cpu"), _int(2))
  path = _tensor_pt(tmp_path, _int(0), _tuple(_int(2)), _tuple(_int(1)), pid=pid)
  with pytest.raises(UserError) as error:
    torch_checkpoint.load_module(path)
  assert str(error.value) == (
    f"checkpoint {path} is corrupt or truncated "
    "(ValueError: the pickle sets the state of a torch storage type)"
  )


def test_arrow_column_labels_with_offsets_out_of_order_are_an_error(tmp_path):
  """Offsets inside the data but out of order (a label of negative length) pass Arrow's
  shallow validation and aborted the process (std::length_error) when pandas read them."""
  pytest.importorskip("pyarrow")
  data = _small_frame_pickle()
  offsets = struct.pack("<4q", 0, 3, 10, 14)
  if offsets not in data:
    pytest.skip("this pandas pickles column labels without Arrow")
  path = tmp_path / "Val_data.df"
  path.write_bytes(_patched(data, offsets, struct.pack("<4q", 0, 13, 3, 14)))
  out = _load_in_child(path).stdout
  assert "(ArrowInvalid: Offset invariant failure: non-monotonic offset at slot 2: 3 < 13)" in out


def test_a_pickle_without_stop_or_with_an_unknown_opcode_is_named_by_the_scan(tmp_path):
  path = tmp_path / "Val_data.df"
  for pickled, message in (
    (b"\x80\x04N\xff.", "bad opcode at byte 3"),
    (b"\x80\x04N", "no STOP opcode"),
  ):
    _refused_as_corrupt(path, pickled, message)


# Pickles written by pandas 1.x (tests/data/pickles, see its README.md for how they were
# made): its Int64Index, UInt64Index and Float64Index, and pandas 1.3's blocks pickled as
# functools.partial(new_block, ndim=2), are read as pandas' own read_pickle reads them.

_PANDAS1 = os.path.join(ROOT, "tests", "data", "pickles")
_PANDAS1_FILES = sorted(name for name in os.listdir(_PANDAS1) if name.endswith(".df"))


def test_the_pandas1_fixtures_are_all_there():
  versions = {name.split("_")[0] for name in _PANDAS1_FILES}
  assert versions == {"pandas1.1.5", "pandas1.3.5", "pandas1.4.4", "pandas1.5.3"}
  assert len(_PANDAS1_FILES) == 4 * 5


@pytest.mark.parametrize("name", _PANDAS1_FILES)
def test_pandas1_pickles_load_as_pandas_reads_them(name):
  path = os.path.join(_PANDAS1, name)
  frame = load_dataframe(path, "x")
  pd.testing.assert_frame_equal(frame, pd.read_pickle(path))  # pandas' compat: the reference.
  assert list(frame.columns) == ["seq", "len_seq", "next"]
  for column in frame.columns:  # Plain arrays, not the loader's checked ones.
    assert type(frame[column].to_numpy(copy=False)) is np.ndarray
  for block in frame._mgr.blocks:  # pandas 1.1 put them straight into the manager's state.
    assert type(block.values) is np.ndarray
  assert type(frame.index.to_numpy()) is np.ndarray
  index = {
    "lastfm_filtered": [0, 1, 3],
    "movielens_filtered": [0, 1, 3],
    "steam_range": range(3),
    "uint64_index": np.arange(4, dtype=np.uint64) * 2,
    "float64_index": [0.5, 1.5, 2.5, 3.5],
  }[name.split("_", 1)[1].removesuffix(".df")]
  if isinstance(index, range):
    assert type(frame.index) is pd.RangeIndex
  pd.testing.assert_index_equal(frame.index, pd.Index(index), exact="equiv")
  if "movielens" in name:
    assert frame["seq"].iloc[1] == [(2, 5), (3, 3), (4, 5)]
    assert frame["next"].iloc[2] == (4, 5)
  else:
    assert frame["seq"].iloc[0] == [1, 2, 3, 9]


def _corrupt_error(path, pickled: bytes) -> str:
  """The one-line error load_dataframe gives for `pickled`, written to `path`, which must be
  the error of a corrupt file."""
  path.write_bytes(pickled)
  with pytest.raises(UserError) as error:
    load_dataframe(str(path))
  assert str(error.value).startswith(f"data file {path} is corrupt or truncated ("), error.value
  return str(error.value).split(" is corrupt or truncated ", 1)[1]


@pytest.mark.parametrize("old", ["Int64Index", "UInt64Index", "Float64Index"])
def test_pandas1_index_classes_are_only_index_constructors(tmp_path, old):
  """pandas 1.x's numeric index classes resolve to pandas' Index as pandas' own read_pickle
  resolves them, and like Index (`_IndexClass`) only `_new_Index` takes them: called, or given
  attributes by a BUILD, they are refused, and pandas' Index keeps its attributes."""
  path = tmp_path / "Val_data.df"
  old_class = _global("pandas.core.indexes.numeric", old)
  called = _corrupt_error(path, b"\x80\x02" + old_class + b"]\x85R.")
  assert called == "(TypeError: '_IndexClass' object is not callable)"
  state = b"N}" + _str("pickled_attribute") + _global("builtins", "tuple") + b"s\x86"
  built = _corrupt_error(path, b"\x80\x02" + old_class + state + b"b.")
  assert built == "(ValueError: a pickle sets attributes of the class pandas.Index)"
  assert "pickled_attribute" not in vars(pd.Index)
  # The same name in any other module is no pandas 1.x class: an index type not read.
  path.write_bytes(b"\x80\x02" + _global("pandas.core.indexes.other", old) + b".")
  with pytest.raises(UserError, match=f"index \\(or column labels\\) of a pandas type .*{old}"):
    load_dataframe(str(path))


def test_pandas1_block_partials_take_nothing_but_new_block(tmp_path):
  """pandas 1.3's blocks are `partial(new_block, ndim=2)(values, placement)`: a partial of any
  other allowed callable, or with other arguments, is refused."""
  path = tmp_path / "Val_data.df"
  partial = _global("functools", "partial")
  new_block = _global("pandas.core.internals.blocks", "new_block")
  for func in (_global("pandas", "DataFrame"), _global("builtins", "list"), b"N"):
    error = _corrupt_error(path, b"\x80\x02" + partial + func + b"\x85R.")
    assert error.startswith("(TypeError: a pickle calls functools.partial("), error
    assert error.endswith("not of pandas' new_block)"), error
  ndim = b"}" + _str("ndim") + _int(2) + b"s"
  for state in (
    _tuple(new_block, b")", b"}" + _str("klass") + b"Ns", b"N"),
    _tuple(new_block, _tuple(_int(1)), ndim, b"N"),
    _tuple(new_block, b")", b"}" + _str("ndim") + _int(7) + b"s", b"N"),
    _tuple(_global("pandas", "DataFrame"), b")", ndim, b"N"),
    _tuple(new_block, b")", ndim, b"}" + _str("x") + _int(1) + b"s"),
  ):
    error = _corrupt_error(path, b"\x80\x02" + partial + new_block + b"\x85R" + state + b"b.")
    assert error.startswith("(ValueError: a pickle gives partial(new_block) the state ("), error
  twice = _tuple(new_block, b")", ndim, b"N") + b"b"
  error = _corrupt_error(path, b"\x80\x02" + partial + new_block + b"\x85R" + twice * 2 + b".")
  assert error.startswith("(ValueError: a pickle gives partial(new_block) the state ("), error
  no_ndim = b"\x80\x02" + partial + new_block + b"\x85R" + _tuple(b"N", b"N") + b"R."  # No state.
  assert _corrupt_error(path, no_ndim) == (
    "(ValueError: a pickle calls partial(new_block) without its ndim)"
  )


def test_an_index_of_another_pandas_type_names_the_way_out(tmp_path):
  frame = pd.DataFrame({"seq": [[1, 2]] * 2, "len_seq": [2] * 2, "next": [3] * 2})
  path = tmp_path / "Val_data.df"
  for index in (pd.to_datetime(["2024-01-01", "2024-01-02"]), pd.CategoricalIndex(["a", "b"])):
    frame.set_axis(index).to_pickle(path)
    with pytest.raises(
      UserError, match="index .* not read.*\\(frame\\.reset_index\\(drop=True\\)\\)"
    ):
      load_dataframe(str(path))


# Files that are no pickle are named for what they look like, on one line.


def _frame_writers():
  frame = pd.DataFrame({"seq": [[1, 2, 5]] * 3, "len_seq": [2] * 3, "next": [4] * 3})
  compressed = (
    "a compressed pickle\\? decompress it, or save it with to_pickle\\(path, compression=None\\)"
  )
  save = "save the DataFrame with frame\\.to_pickle\\(path\\)"

  def numpy_save(path):
    with open(path, "wb") as f:
      np.save(f, np.arange(3))

  def parquet(path):
    pytest.importorskip("pyarrow")
    frame.to_parquet(path)

  def feather(path):
    pytest.importorskip("pyarrow")
    frame.to_feather(path)

  def raw(data):
    return lambda path: path.write_bytes(data)

  return {
    "gzip": (lambda p: frame.to_pickle(p, compression="gzip"), f"a gzip file \\({compressed}\\)"),
    "bz2": (lambda p: frame.to_pickle(p, compression="bz2"), f"a bzip2 file \\({compressed}\\)"),
    "xz": (lambda p: frame.to_pickle(p, compression="xz"), f"an xz file \\({compressed}\\)"),
    "zip": (lambda p: frame.to_pickle(p, compression="zip"), f"a zip archive \\({compressed}\\)"),
    # A zstd frame's magic and header (pandas needs the zstandard package to write one).
    "zstd": (raw(b"\x28\xb5\x2f\xfd\x24\x05\x29\x00\x00hello"), f"a zstd file \\({compressed}\\)"),
    "parquet": (parquet, f"a Parquet file \\({save}\\)"),
    "feather": (feather, f"an Arrow \\(Feather\\) file \\({save}\\)"),
    "hdf5": (raw(b"\x89HDF\r\n\x1a\n" + bytes(100)), f"an HDF5 file \\({save}\\)"),
    "npy": (numpy_save, f"a numpy \\.npy file \\({save}\\)"),
    "csv": (lambda p: frame.to_csv(p), f"CSV text \\({save}\\)"),
    "csv-no-index": (lambda p: frame.to_csv(p, index=False), f"CSV text \\({save}\\)"),
    "tsv": (lambda p: frame.to_csv(p, sep="\t", index=False), f"CSV text \\({save}\\)"),
    # Headers that start with an opcode: GLOBAL (would name a class), PERSID, INT.
    "csv-c": (lambda p: frame.add_prefix("c").to_csv(p, index=False), f"CSV text \\({save}\\)"),
    "csv-p": (lambda p: frame.add_prefix("P").to_csv(p, index=False), f"CSV text \\({save}\\)"),
    "csv-i": (lambda p: frame.add_prefix("I").to_csv(p, index=False), f"CSV text \\({save}\\)"),
    "json": (lambda p: frame.to_json(p), f"JSON text \\({save}\\)"),
    "json-records": (lambda p: frame.to_json(p, orient="records"), f"JSON text \\({save}\\)"),
    "html": (
      raw(b"<!DOCTYPE html>\n<html><body>Sign in</body></html>\n"),
      "an HTML or XML page \\(a failed download\\?\\)",
    ),
    "git-lfs": (
      raw(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n"),
      "a Git LFS pointer \\(fetch the data with git lfs pull\\)",
    ),
    # A titles file given as a split (was "corrupt or truncated: bad opcode at byte 1").
    **{
      name: (raw(text), "a titles file \\(id::title or u.item lines\\), not a split's DataFrame")
      for name, text in (("id2name", b"0::Air\n1::Cafe\n"), ("u.item", b"1|Toy Story (1995)|x\n"))
    },
  }


@pytest.mark.parametrize("kind", sorted(_frame_writers()))
def test_files_that_are_no_pickle_are_named_for_what_they_look_like(tmp_path, kind):
  write, looks_like = _frame_writers()[kind]
  path = tmp_path / "Val_data.df"
  write(path)
  with pytest.raises(UserError) as error:
    load_dataframe(str(path))
  assert re.fullmatch(
    f"data file {path} is not a pickle: it looks like {looks_like}", str(error.value)
  )
  assert "\n" not in str(error.value)


def test_an_empty_file_is_named_empty(tmp_path):
  path = tmp_path / "Val_data.df"
  path.write_bytes(b"")
  with pytest.raises(UserError, match=f"^data file {path} is empty$"):
    load_dataframe(str(path))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_truncated_pickles_are_never_named_another_format(tmp_path, protocol):
  frame = pd.DataFrame({"seq": [[1, 2, 5]] * 4, "len_seq": [2] * 4, "next": [4] * 4})
  frame.index = ["a,b", "c\td", "{e", "<f"]  # Text a protocol-0 pickle holds as it is.
  data = pickle.dumps(frame, protocol=protocol)
  path = tmp_path / "cut.df"
  for cut in range(1, len(data), 7):
    path.write_bytes(data[:cut])
    with pytest.raises(UserError) as error:
      load_dataframe(str(path))
    assert "is not a pickle" not in str(error.value), (cut, str(error.value))


@pytest.mark.parametrize(
  "path",
  sorted(glob.glob(os.path.join(SHARED, "data", "*", "*.df"))) or ["no shared data"],
  ids=lambda path: os.path.relpath(path, SHARED),
)
def test_every_shared_data_file_loads(path):
  if not os.path.exists(path):
    shared_path("data")  # Skips with its reason.
  frame = load_dataframe(path, "x")
  assert {"seq", "len_seq", "next"} <= set(frame.columns)
