"""The allowlisting unpickler: real LLaRA files load; anything that could run code is refused."""

import os
import pickle

import numpy as np
import pandas as pd
import pytest
from conftest import shared_path

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
