"""The allowlisting unpickler: real LLaRA files load; anything that could run code is refused."""

import os
import pickle
import struct
import zipfile

import numpy as np
import pandas as pd
import pytest
from conftest import shared_path

from ilora_jax import sasrec, torch_checkpoint
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
  frame = pd.DataFrame({"seq": [[1, 2, 5], [3, 5, 5]], "len_seq": [2, 1], "next": [4, 0]})
  path = tmp_path / "ok.df"
  frame.to_pickle(path, protocol=protocol)  # 2 names Python 2's `__builtin__` module.
  loaded = load_dataframe(str(path))
  assert loaded["seq"].tolist() == [[1, 2, 5], [3, 5, 5]]
  np.testing.assert_array_equal(loaded["next"].to_numpy(), [4, 0])


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
    ("movielens", "Val_data.df", 94),
    ("steam", "train_data_sample1000.df", 1000),
  ],
)
def test_loads_the_real_llara_files(dataset, file, rows):
  frame = load_dataframe(shared_path("data", dataset, file))
  assert len(frame) == rows
  assert {"seq", "len_seq", "next"} <= set(frame.columns)


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


def _crafted_pt(path, offset, size, stride, storage=None):
  """A torch-format zip written by hand (no torch): a module `net` holding a Linear `lin`
  whose `weight` is `_rebuild_tensor_v2(storage, offset, size, stride)` over `storage`
  (float32 0, 1, 2, 3 by default)."""
  storage = np.arange(4, dtype=np.float32) if storage is None else storage
  storage_id = _tuple(
    _str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"), _int(storage.size)
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

  linear = module(("linear", "Linear"), _str("weight") + tensor)
  root = module(("container", "Sequential"), b"", _str("lin") + linear)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("net/data.pkl", b"\x80\x02" + root + b".")
    archive.writestr("net/data/0", storage.tobytes())
  return str(path)


def test_crafted_layouts_inside_the_storage_read_as_numpy_does(tmp_path):
  storage = np.arange(6, dtype=np.float32)
  cases = [
    (0, [2, 3], [3, 1]),
    (0, [3, 2], [1, 3]),
    (2, [2, 2], [2, 1]),
    (5, [], []),
    (1, [4], [0]),
  ]
  for offset, size, stride in cases:  # (1, [4], [0]): an expanded view, inside its storage.
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
    (0, [2**31 - 1, 2**31 - 1], [0, 0], "elements over a storage of 4"),
  ],
)
def test_tensors_outside_their_storage_are_refused_by_name(tmp_path, offset, size, stride, message):
  path = _crafted_pt(tmp_path / "crafted.pt", offset, size, stride)
  with pytest.raises(UserError, match=f"checkpoint {path}: tensor lin.weight .*{message}"):
    torch_checkpoint.load_module(path)


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
