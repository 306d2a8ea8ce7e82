"""`ilora_jax.recommend`'s inputs: how history and candidate entries resolve to items, the
run's config.json, notices and --help; none of these tests loads a model."""

import importlib.util
import json
import os
import subprocess
import sys
import types
import unicodedata

import pytest
from conftest import ROOT, assert_one_line_error, run_cli, shared_path
from ml_collections import ConfigDict

import ilora_jax.recommend as rec_mod
from ilora_jax import compile_cache, errors, synthetic, train_ilora
from ilora_jax.data import load_titles
from ilora_jax.errors import UserError
from ilora_jax.recommend import load_run_config, resolve_items, split_entries, titles_with_years

MODULE = "ilora_jax.recommend"
REAL_RECOMMENDER = rec_mod.Recommender  # The tests that load no model replace it.


def resolve(names, titles, full_titles=None):
  if full_titles is None:
    return resolve_items(names, titles, "history")
  return resolve_items(names, titles, "history", full_titles)


def error_of(names, titles, full_titles=None) -> str:
  with pytest.raises(UserError) as info:
    resolve(names, titles, full_titles)
  return str(info.value)


def test_a_title_may_be_given_with_or_without_its_year():
  titles = {0: "Toy Story", 1: "Heat", 2: "Legend (1994)", 3: "Shadowgate", 4: "Shadowgate (2014)"}
  full = {0: "Toy Story (1995)", 1: "Heat (1995)"}  # MovieLens's u.item years.
  names = ["Toy Story (1995)", "toy story", "HEAT (1995)", "Legend", "legend (1994)"]
  assert resolve(names, titles, full) == [0, 0, 1, 2, 2]
  # A title stored with its year keeps it; an exact title wins over the one without a year.
  assert resolve(["Shadowgate", "Shadowgate (2014)"], titles) == [3, 4]
  # A year given must be the title's own (Steam's "Shadowgate (2014)") or its u.item year.
  message = error_of(["Shadowgate (1987)"], titles)
  assert message.startswith("unknown history title 'Shadowgate (1987)'; close matches:"), message


def test_a_close_match_with_a_character_that_prints_as_nothing_is_escaped_with_its_id():
  """Steam's item 3073 is 'Starlight Inception™' with U+0099 after it: "unknown history title
  'Starlight Inception™'; close matches: Starlight Inception™" (an audit), the two alike on a
  terminal. The match now shows the character and the id to give instead."""
  titles = {3073: "Starlight Inception™\x99", 3074: "Half-Life"}
  assert error_of(["Starlight Inception™"], titles) == (
    "unknown history title 'Starlight Inception™'; close matches: Starlight Inception™\\x99 (#3073)"
  )
  assert resolve(["#3073"], titles) == [3073]


def test_a_year_is_refused_where_the_title_has_none():
  """Titles without years (LastFM, Steam, the synthetic data): "Echo Amber 4 (1995)" was item
  4 "Echo Amber 4", though the README says a year given must be the item's."""
  titles = {4: "Echo Amber 4", 5: "Legend (1994)", 6: "Heat"}
  message = error_of(["Echo Amber 4 (1995)"], titles)
  assert message == (
    "unknown history title 'Echo Amber 4 (1995)'; close matches: Echo Amber 4; the data's "
    "title 'Echo Amber 4' has no year: leave out '(1995)'"
  )
  assert "has no year" not in error_of(["Legend (1995)"], titles)  # It has one: another year.
  assert resolve(["Echo Amber 4", "legend", "Legend (1994)"], titles) == [4, 5, 5]
  # MovieLens without its u.item years known: a year cannot be checked, so it is refused too.
  assert "has no year" in error_of(["Heat (1995)"], titles)


def test_a_title_shared_by_several_items_is_an_error_listing_them():
  titles = {5: "Heat", 217: "Cape Fear", 672: "Cape Fear"}
  message = error_of(["Heat", "cape fear"], titles)
  assert "ambiguous history title 'cape fear'" in message
  assert "217 'Cape Fear'" in message and "672 'Cape Fear'" in message
  assert "give the id instead" in message and "'#217'" in message
  assert resolve(["Heat", "#672"], titles) == [5, 672]
  # With the titles' years (MovieLens's u.item), the year tells them apart.
  full = {5: "Heat (1995)", 217: "Cape Fear (1991)", 672: "Cape Fear (1962)"}
  assert resolve(["Cape Fear (1962)", "cape fear (1991)", "Heat"], titles, full) == [672, 217, 5]
  message = error_of(["Cape Fear"], titles, full)
  assert "217 'Cape Fear (1991)'" in message and "672 'Cape Fear (1962)'" in message
  message = error_of(["Cape Fear (1975)"], titles, full)  # No item of that year.
  assert "unknown history title 'Cape Fear (1975)'" in message and "Cape Fear (1962)" in message


def test_digits_are_an_id_unless_also_another_items_title():
  titles = {3: "Fleetwood Mac", 7: "7", 161: "12012", 274: "#####", 311: "Oomph!", 2559: "311"}
  message = error_of(["311"], titles)
  for fragment in ("'311' is both item id 311 'Oomph!'", "title of item 2559", "'#311'",
                   "'title:311'"):  # fmt: skip
    assert fragment in message, message
  assert resolve(["#311", "title:311", "title: 311 "], titles) == [311, 2559, 2559]
  assert resolve(["3", "7", "12012", "#####", "#7"], titles) == [3, 7, 161, 274, 7]
  assert "no item has this id or title" in error_of(["99"], titles)
  assert "unknown history id #99" in error_of(["#99"], titles)
  assert "unknown history title 'Oomph'" in error_of(["title:Oomph"], titles)


def test_an_unknown_title_names_close_matches():
  titles = {0: "Toy Story", 1: "Heat", 2: "Tommy Boy"}
  message = error_of(["title:toy stroy (1995)"], titles)
  assert message.startswith("unknown history title 'toy stroy (1995)'; close matches: Toy Story")
  full = {0: "Toy Story (1995)", 1: "Heat (1995)", 2: "Tommy Boy (1995)"}
  assert "close matches: Toy Story (1995)" in error_of(["Toy Stroy (1995)"], titles, full)
  # Digits other than ASCII (str.isdigit accepts them; int() may not) are a title.
  assert "unknown history title '²'" in error_of(["²"], titles)


def test_entries_are_split_on_unescaped_bars():
  assert split_entries(r"Odd\|\|Even| #3 ||Heat") == ["Odd||Even", " #3 ", "Heat"]
  assert split_entries("|Heat|") == ["Heat"]  # Blank entries, README says, are skipped.
  assert resolve(split_entries(r"Odd\|\|Even|#3"), {2207: "Odd||Even", 3: "3"}) == [2207, 3]


def test_real_movielens_titles():
  path = shared_path("data", "movielens", "u.item")
  titles = load_titles(path)
  config = ConfigDict({"data": {"name": "movielens", "dir": os.path.dirname(path)}})
  full = titles_with_years(config, "unused")
  assert full[0] == "Toy Story (1995)" and titles[0] == "Toy Story"
  assert resolve(["Toy Story (1995)", "Heat (1995)", "Star Wars"], titles, full) == [0, 272, 49]
  assert "unknown history title 'Heat (1996)'" in error_of(["Heat (1996)"], titles, full)
  for years in (None, full):
    message = error_of(["Cape Fear"], titles, years)
    assert "ambiguous" in message and "217 " in message and "672 " in message
  assert resolve(["Cape Fear (1991)", "Cape Fear (1962)"], titles, full) == [217, 672]
  assert "'#187' for the id" in error_of(["187"], titles, full)  # Item 329 is titled "187".
  # The run's titles with the article first (the default), looked up in any of the forms.
  front = load_titles(path, articles="front")
  assert front[11] == "The Usual Suspects" and titles[11] == "Usual Suspects, The"
  forms = ["The Usual Suspects", "Usual Suspects, The", "usual suspects, the (1995)",
           "The Usual Suspects (1995)"]  # fmt: skip
  assert resolve(forms, front, full) == [11] * 4
  assert resolve(forms[:1], front) == [11]


def base_config() -> dict:
  path = os.path.join(ROOT, "configs", "base.py")
  spec = importlib.util.spec_from_file_location("base_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return json.loads(json.dumps(module.get_config().to_dict(), default=str))


@pytest.mark.parametrize(
  "content, fragment",
  [
    ('{"stage": ', "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object: it is not the config of an ilora run"),
    ('"ilora"', "holds a JSON str"),
    (b"\xff\xfe{}", "is not valid JSON"),
    ('{"stage": "ilora"}', "lacks the section(s) data, train"),
  ],
)
def test_a_bad_config_json_is_a_user_error_naming_it(tmp_path, content, fragment):
  path = tmp_path / "config.json"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(UserError) as info:
    load_run_config(str(tmp_path))
  assert str(path) in str(info.value) and fragment in str(info.value), info.value


def test_a_config_without_a_section_the_run_needs_is_a_user_error(tmp_path):
  saved = base_config()
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert load_run_config(str(tmp_path)).lora.rank == saved["lora"]["rank"]
  del saved["lora"], saved["data"]["max_len"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(UserError) as info:
    load_run_config(str(tmp_path))
  assert str(info.value) == (
    f"{tmp_path / 'config.json'} lacks the section(s) lora and the key(s) data.max_len: it is "
    "not the config of an ilora run, or was written by incompatible code"
  )
  os.remove(tmp_path / "config.json")
  os.mkdir(tmp_path / "config.json")
  with pytest.raises(UserError, match="cannot read"):
    load_run_config(str(tmp_path))


@pytest.mark.parametrize(
  "section,key,value,fragment",
  [
    ("lora", "rank", "x", "holds a value of the wrong type ('>=' not supported between"),
    ("lora", "rank", -4, ": config.lora.rank=-4 must be a multiple of lora.num_experts=4"),
    ("lora", "gate", "fancy", ": config.lora.gate='fancy' is not one of router"),
    ("sasrec", "dropout", 1.5, r": config.sasrec.dropout=1.5 must be in [0, 1)"),
  ],
)
def test_a_hand_edited_value_is_named_before_a_model_is_built(tmp_path, section, key, value,
                                                              fragment):  # fmt: skip
  """The run's config.json gets the checks of a config file: an edit that makes a value
  impossible or of the wrong type is one UserError naming the file, not a crash in the
  restore. A run saved before a setting existed still loads (the check is skipped)."""
  saved = base_config()
  saved[section][key] = value
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(UserError) as info:
    load_run_config(str(tmp_path))
  assert str(info.value).startswith(str(tmp_path / "config.json")), info.value
  assert fragment in str(info.value), info.value
  older = base_config()
  del older["sasrec"]["max_bad_steps"]  # A setting added later than the run.
  (tmp_path / "config.json").write_text(json.dumps(older))
  assert load_run_config(str(tmp_path)).lora.rank == older["lora"]["rank"]


class FakeRecommender:
  """Stands in for a restored run: its titles and config, candidates scored in order."""

  def __init__(self, workdir, config=None):
    self.config = ConfigDict({"data": {"max_len": 3, "num_candidates": 4}})
    self.titles = {1: "Oomph!", 2: "1", 3: "Heat", 4: "Toy Story", 5: "Cape Fear"}
    self.titles_with_years = {}
    self.seen = None
    FakeRecommender.given_config = config

  def resolve(self, entries, what):
    return REAL_RECOMMENDER.resolve(self, entries, what)

  def recommend(self, history, candidates=None, k=5):
    FakeRecommender.seen = history
    cands = list(dict.fromkeys(candidates or [5, 4]))
    return [(c, self.titles[c], -float(i)) for i, c in enumerate(cands)][:k]


def test_notices_for_a_truncated_history_and_fewer_candidates_than_k(monkeypatch):
  monkeypatch.setattr(rec_mod, "Recommender", FakeRecommender)
  notices = []
  top = rec_mod.recommend("w", [1, "#2", "Heat", "toy story"], ["Heat", "#3"], 10,
                          notices.append)  # fmt: skip
  assert FakeRecommender.seen == [1, 2, 3, 4] and [t for t, *_ in top] == [3]
  assert notices == [
    "the history has 4 items, more than the run's data.max_len=3: the model reads its last 3 "
    "(all are kept out of SASRec's candidates)",
    "1 candidate is in the history, ranked all the same: 'Heat' (#3)",
    "only 1 distinct candidate was given, so 1 row instead of k=10",
  ]
  notices.clear()
  rec_mod.recommend("w", [1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 4], 5, notices.append)
  assert notices[1] == (
    "5 candidates are in the history, ranked all the same: 'Cape Fear' (#5), 'Toy Story' (#4), "
    "'Heat' (#3) and 2 more"
  )
  notices.clear()
  rec_mod.recommend("w", [1, 2], [5, 4], 2, notices.append)
  assert notices == []  # No candidate in the history, none fewer than k: no notice.
  notices.clear()
  rec_mod.recommend("w", ["Heat"], k=3, notify=notices.append)
  assert notices == [
    "only 2 items were retrieved (data.num_candidates=4), so 2 rows instead of k=3"
  ]
  notices.clear()
  # With 2 items left outside the history, the history limits them (not num_candidates=4).
  rec_mod.recommend("w", [1, 2, 3], k=3, notify=notices.append)
  assert notices == [
    "the history leaves only 2 items outside it to recommend, so 2 rows instead of k=3"
  ]
  notices.clear()
  assert len(rec_mod.recommend("w", ["Heat"], k=2, notify=notices.append)) == 2 and not notices
  # An int entry is an item id; the string "1" is both id 1 and item 2's title.
  assert [t for t, *_ in rec_mod.recommend("w", [1], [1, 2])] == [1, 2]
  with pytest.raises(UserError, match="'1' is both item id 1"):
    rec_mod.recommend("w", ["1"])


def test_the_api_refuses_a_bad_k_and_unknown_item_ids(monkeypatch, tmp_path):
  """The Python API checks what the CLI's flags check: k a positive integer (k=-1 returned all
  candidates but the last, k=True one), and item ids given to `Recommender.recommend`
  directly must be items (a bare KeyError before), both before any model is built."""
  monkeypatch.setattr(rec_mod, "Recommender", FakeRecommender)
  for k in (0, -1, True, 2.0, "3"):
    with pytest.raises(UserError, match=f"k must be a positive integer, got {k!r}"):
      rec_mod.recommend("w", [1], [1, 2], k=k)
  with pytest.raises(UserError, match="history entry 1.5 is a float"):
    rec_mod.recommend("w", [1.5])
  # A negative int is an unknown id (it was looked up as the title '#-1'), a blank string a
  # blank entry (it was named an empty title after 'title:', which nobody wrote).
  with pytest.raises(UserError, match=r"^unknown history item id -1: the item ids are 1\.\.5$"):
    rec_mod.recommend("w", [-1])
  for entry in ("", "  "):
    with pytest.raises(UserError) as info:
      rec_mod.recommend("w", ["Heat"], [entry])
    assert str(info.value) == f"a candidate entry is blank ({entry!r}): name an item by title or id"
  monkeypatch.undo()
  config = base_config()
  config["data"]["name"], config["data"]["n_items"] = "synthetic", 0
  (tmp_path / "config.json").write_text(json.dumps(config))
  rec = rec_mod.Recommender(str(tmp_path))
  n = len(rec.titles)
  cases = (([n], None, f"unknown history item id {n}"),
           ([0], [1, -1], "unknown candidate item id -1"),
           ([True], None, "unknown history item id True"))  # fmt: skip
  for history, candidates, fragment in cases:
    with pytest.raises(UserError, match=fragment + rf": the item ids are 0..{n - 1}"):
      rec.recommend(history, candidates)
  with pytest.raises(UserError, match="k must be a positive integer, got 0"):
    rec.recommend([0], k=0)
  assert rec._restored is None  # Refused before the model was built.


def test_cli_prints_notices_on_stderr(monkeypatch, tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps(base_config()))
  monkeypatch.setattr(rec_mod, "Recommender", FakeRecommender)
  monkeypatch.setattr(compile_cache, "enable", lambda folder: None)
  rec_mod.main(["recommend", f"--workdir={tmp_path}", "--history=#1|#2|Heat|#1", "--k=3"])
  out, err = capsys.readouterr()
  assert [line.split()[1] for line in out.splitlines()] == ["5", "4"]
  assert "recommend: the history has 4 items" in err
  assert "recommend: the history leaves only 2 items outside it to recommend" in err
  # The run's config.json is read once, by the CLI, and handed to the Recommender.
  assert FakeRecommender.given_config.data.max_len == base_config()["data"]["max_len"]


def test_cli_help_prints_the_flags():
  for flag in ("--help", "-h", "--helpfull"):
    proc = run_cli(flag, "--bogus", module=MODULE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--history:" in proc.stdout and "'#N'" in proc.stdout and "title:" in proc.stdout
    assert proc.stderr == ""


def test_cli_bad_config_json_fails_before_loading_a_model(tmp_path):
  (tmp_path / "config.json").write_text('{"stage": ')
  proc = run_cli(f"--workdir={tmp_path}", "--history=Heat", module=MODULE, timeout=120)
  assert proc.returncode == 2
  assert_one_line_error(proc, str(tmp_path / "config.json"), "is not valid JSON")
  proc = run_cli(f"--workdir={tmp_path}", "--history= | ", module=MODULE, timeout=120)
  assert proc.returncode == 2
  assert_one_line_error(proc, "--history=' | ' names no item")


def test_a_wrong_year_and_a_decomposed_unicode_title():
  titles = {0: "Toy Story", 1: "Röyksopp"}
  full = {0: "Toy Story (1995)", 1: "Röyksopp"}
  assert resolve(["Toy Story (1995)", "toy story"], titles, full) == [0, 0]
  # With the years known, a year given must be the item's: no silent match to another year.
  message = error_of(["Toy Story (1996)"], titles, full)
  assert "unknown history title 'Toy Story (1996)'" in message and "Toy Story (1995)" in message
  typed = unicodedata.normalize("NFD", "Röyksopp")  # As some keyboards and systems write it.
  assert typed != "Röyksopp" and resolve([typed], titles, full) == [1]


def test_cli_candidates_that_name_no_item_are_an_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(base_config()))
  proc = run_cli(f"--workdir={tmp_path}", "--history=#1", "--candidates=|", module=MODULE)
  assert_one_line_error(proc, "--candidates='|' names no item")


def test_a_relative_data_folder_or_model_from_elsewhere_is_one_line(tmp_path):
  """Relative paths in the run's config.json name folders of the place the run started from:
  from elsewhere they are named, not reported missing (or, for a model, taken from here)."""
  for key, section in (("dir", "data"), ("name", "llm")):
    config = base_config()
    config["data"]["name"] = "lastfm"  # Read from data.dir (synthetic data refuses one).
    config[section][key] = "no/such/relative/folder"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"the run's config.{section}.{key}=no/such/relative/folder "
                       "\\(.*\\) is relative to the folder the run was started from"):  # fmt: skip
      REAL_RECOMMENDER(str(tmp_path))
    # An absolute path gone since the run (its folder moved): named too.
    config[section][key] = gone = str(tmp_path / "moved")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as info:
      REAL_RECOMMENDER(str(tmp_path))
    assert str(info.value) == (
      f"the run's config.{section}.{key}={gone} ({tmp_path / 'config.json'}) does not exist "
      "(moved since the run?): write its path now into that file"
    )


def test_a_hash_entry_that_is_no_id_says_how_ids_are_written():
  titles = {0: "Heat", 1: "#killallzombies"}
  assert resolve(["#killallzombies", "#0"], titles) == [1, 0]  # A title may start with '#'.
  message = error_of(["#-1"], titles)
  assert "unknown history title '#-1'" in message and "written '#N' with N in 0..1" in message


def test_entries_resolve_before_the_model_is_built(tmp_path, monkeypatch):
  synthetic_workdir(tmp_path, monkeypatch)
  rec = REAL_RECOMMENDER(str(tmp_path))
  titles = synthetic.titles(base_config()["data"]["synthetic"]["num_items"])
  assert rec.titles == titles
  assert rec.resolve([titles[4], "#7", 2], "history") == [4, 7, 2]
  with pytest.raises(UserError, match="unknown history title 'no such film'"):
    rec_mod.recommend(str(tmp_path), [titles[4], "no such film"])
  with pytest.raises(AssertionError, match="the model was built"):
    rec_mod.recommend(str(tmp_path), [titles[4]])


def synthetic_workdir(tmp_path, monkeypatch, **sasrec) -> str:
  """A workdir whose config.json is the base config on the synthetic data (60 items), with
  the model's construction replaced by an AssertionError: what passes its checks is refused
  or accepted before any model is built."""
  config = base_config()
  config["data"]["name"] = "synthetic"
  config["sasrec"].update(sasrec)
  (tmp_path / "config.json").write_text(json.dumps(config))

  def no_model(*args, **kwargs):
    raise AssertionError("the model was built")

  monkeypatch.setattr(train_ilora, "setup", no_model)
  monkeypatch.setattr(train_ilora, "latest_step", lambda workdir, stage="ilora": 6)  # Trained.
  return str(tmp_path)


def test_a_workdir_without_ilora_checkpoints_is_refused_before_the_model_is_built(
  tmp_path, monkeypatch
):
  """A SASRec-only workdir (or an iLoRA run before its first checkpoint) was refused only
  after the LLM was built and SASRec restored: minutes for a 7B model."""
  workdir = synthetic_workdir(tmp_path, monkeypatch)
  monkeypatch.undo()  # The real checkpoint lookup, and a setup that must not be reached:
  monkeypatch.setattr(train_ilora, "setup", lambda *args, **kwargs: pytest.fail("built"))
  sasrec_only = r"no ilora checkpoint in .*checkpoints/ilora: the run trained SASRec alone"
  with pytest.raises(UserError, match=sasrec_only):  # The synthetic run's stage is sasrec.
    rec_mod.recommend(workdir, ["#1"])
  config = rec_mod.load_run_config(workdir)
  config.eval.stage = "ilora"
  with pytest.raises(UserError, match=sasrec_only):
    train_ilora.evaluate(config, workdir)


def test_cli_refuses_words_that_are_no_flag(tmp_path):
  """`--history=#1 '#2'` ranked for #1 alone, `--history=Heat Toy Story` (unquoted) for
  "Heat": a word that is no flag, on the command line or a line of a flagfile, is refused
  before the run's config is read."""
  proc = run_cli(f"--workdir={tmp_path}", "--history=#1", "#2", "--k=2", module=MODULE)
  assert_one_line_error(proc, "unexpected argument(s) '#2'", "quote a value that holds spaces")
  flagfile = tmp_path / "flags"
  flagfile.write_text(f"--workdir={tmp_path}\n--history=Heat\nToy Story\n")
  proc = run_cli(f"--flagfile={flagfile}", module=MODULE)
  assert_one_line_error(proc, "unexpected argument(s) 'Toy Story'")


def test_a_history_of_every_item_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
  """A history holding every item left SASRec nothing to retrieve: `max() arg is an empty
  sequence` (exit 3) after the model was loaded."""
  workdir = synthetic_workdir(tmp_path, monkeypatch)
  every = list(range(60))
  for call in (lambda: rec_mod.recommend(workdir, every),
               lambda: REAL_RECOMMENDER(workdir).recommend(every)):  # fmt: skip
    with pytest.raises(UserError) as info:
      call()
    assert str(info.value).startswith(
      "the history holds every one of the 60 items: no item outside it is left to recommend"
    ), info.value
  with pytest.raises(AssertionError, match="the model was built"):  # One item left: ranked.
    rec_mod.recommend(workdir, every[1:])
  with pytest.raises(AssertionError, match="the model was built"):  # Candidates given.
    rec_mod.recommend(workdir, every, ["#3"])


@pytest.mark.parametrize(
  "history, candidates, fragment",
  [
    ("12", None, "history='12' is a str, not a list: pass a list of titles or item ids"),
    (b"12", None, "history=b'12' is a bytes, not a list"),
    (None, None, "history=None is a NoneType, not a list"),
    (7, None, "history=7 is a int, not a list"),
    ([1, 2], "56", "candidates='56' is a str, not a list"),
  ],
)
def test_the_api_refuses_a_string_for_a_list(tmp_path, monkeypatch, history, candidates,
                                            fragment):  # fmt: skip
  """`recommend(W, '12')` recommended for items 1 and 2 (a string read one character at a
  time), `candidates="56"` ranked items 5 and 6, `history=None` was a bare TypeError."""
  workdir = synthetic_workdir(tmp_path, monkeypatch)
  with pytest.raises(UserError) as info:
    rec_mod.recommend(workdir, history, candidates)
  assert str(info.value).startswith(fragment), info.value
  rec = REAL_RECOMMENDER(workdir)
  with pytest.raises(UserError, match="not a list"):
    rec.recommend(history, candidates)
  if candidates is None:
    with pytest.raises(UserError, match="not a list"):
      rec.resolve(history, "history")
  assert rec._restored is None
  # Any other iterable is a list of entries.
  assert rec.resolve((1, "#2"), "history") == [1, 2]


def test_titles_the_terminal_cannot_encode_are_printed_escaped(tmp_path):
  """With an ASCII stdout, "Tiësto" ended the run with `unexpected UnicodeEncodeError` after
  all the work, printing nothing: the rows are printed, the title escaped."""
  (tmp_path / "config.json").write_text(json.dumps(base_config()))
  script = f"""
import ilora_jax.recommend as rec_mod
from ilora_jax import compile_cache
from ml_collections import ConfigDict

class Fake:
  def __init__(self, workdir, config=None):
    self.config = ConfigDict({{"data": {{"max_len": 3, "num_candidates": 4}}}})
    self.titles, self.titles_with_years = {{0: "Heat", 1: "Tiësto", 2: "Röyksopp"}}, {{}}
  def resolve(self, entries, what):
    return rec_mod.Recommender.resolve(self, entries, what)
  def recommend(self, history, candidates=None, k=5):
    return [(1, "Tiësto", -1.0), (2, "Röyksopp", -2.0)]

compile_cache.enable = lambda folder: None
rec_mod.Recommender, real = Fake, rec_mod.Recommender
Fake.resolve = lambda self, entries, what: real.resolve(self, entries, what)
rec_mod.main(["recommend", "--workdir={tmp_path}", "--history=#0", "--k=2"])
"""
  env = {**os.environ, "PYTHONIOENCODING": "ascii"}
  env.pop("ILORA_JAX_DEBUG", None)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, encoding="ascii", errors="strict", env=env)  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
    "    -1.000       1  Ti\\xebsto",
    "    -2.000       2  R\\xf6yksopp",
  ]


def test_the_note_says_when_the_run_is_unfinished(tmp_path, monkeypatch):
  """A run stopped at step 2 of 4 (`train.stop_after_steps`) was used as "the latest
  checkpoint, step 2", as if finished: the note says it is unfinished (still a note)."""
  workdir = synthetic_workdir(tmp_path, monkeypatch)
  su = types.SimpleNamespace(state={}, total_steps=4, settings={}, parts=None, gate_kind=None,
                             dataset=types.SimpleNamespace(val=None))  # fmt: skip
  monkeypatch.setattr(train_ilora, "setup", lambda *args, **kwargs: su)
  monkeypatch.setattr(train_ilora, "Evaluator", lambda *args: None)
  monkeypatch.setattr(train_ilora, "require_checkpoint", lambda workdir: None)
  cases = [
    # (what restore_for_use returns, the ilora stage's latest step, the note)
    (("the latest checkpoint, step 2", None), 2,
     "the latest checkpoint, step 2 (an unfinished run: trained 2 of 4 steps)"),
    (("the weights of step 2, selected by val m", "m"), 3,
     "the weights of step 2, selected by val m (an unfinished run: trained 3 of 4 steps)"),
    (("the weights of step 2, selected by val m", "m"), 4,
     "the weights of step 2, selected by val m"),
    (("the latest checkpoint, step 4", None), 4, "the latest checkpoint, step 4"),
  ]  # fmt: skip
  for (how, selected_by), latest, note in cases:
    step = int(how.split("step ")[1].split(",")[0])
    restored = ({}, step, how, selected_by)
    monkeypatch.setattr(train_ilora, "restore_for_use", lambda *args, r=restored: r)
    monkeypatch.setattr(train_ilora, "latest_step", lambda workdir, stage="ilora", at=latest: at)
    assert REAL_RECOMMENDER(workdir).weights == note


def test_a_relative_sasrec_init_from_is_named_unless_the_run_has_its_own(tmp_path, monkeypatch):
  """A run trained with a relative `sasrec.init_from` and no SASRec of its own reads it again:
  from another folder, `checkpoint not found: w2`; now the hint `data.dir` and `llm.name` get."""
  workdir = synthetic_workdir(tmp_path, monkeypatch, init_from="no/such/w2")
  with pytest.raises(UserError, match=r"the run's config.sasrec.init_from=no/such/w2 \(.*\) is "
                     "relative to the folder the run was started from"):  # fmt: skip
    REAL_RECOMMENDER(workdir)
  os.makedirs(tmp_path / "checkpoints" / "sasrec" / "130")  # Its own SASRec: init_from unread.
  assert len(REAL_RECOMMENDER(workdir).titles) == 60


def test_the_api_refuses_empty_lists_dicts_and_an_unordered_history(tmp_path, monkeypatch):
  """`candidates=[]` ranked SASRec's own pick (items the caller never offered, where the CLI
  refuses `--candidates='|'`); a dict gave its keys; a set lost the history's order."""
  workdir = synthetic_workdir(tmp_path, monkeypatch)
  cases = [
    ([1], [], "candidates is empty: name at least one item (or leave candidates out"),
    ([], None, "history is empty: name at least one item"),
    ({1: 2}, None, "history is a dict: pass a list of titles or item ids, oldest first"),
    ({1, 2}, None, "history is a set: pass a list of titles or item ids, oldest first"),
    ([1], {3: 4}, "candidates is a dict: pass a list of titles or item ids"),
  ]
  for history, candidates, fragment in cases:
    for call in (rec_mod.recommend, lambda *args: REAL_RECOMMENDER(args[0]).recommend(*args[1:])):
      with pytest.raises(UserError) as info:
        call(workdir, history, candidates)
      assert str(info.value).startswith(fragment), info.value
  with pytest.raises(AssertionError, match="the model was built"):  # A set of candidates.
    rec_mod.recommend(workdir, [1], {3, 4})


def test_cli_an_empty_history_flag_and_an_unwritable_stdout_are_one_line(tmp_path):
  """`--history=` said `--workdir and --history are required` though both were given; a full
  disk behind stdout was `unexpected OSError` (exit 3) after the work."""
  proc = run_cli(f"--workdir={tmp_path}", "--history=", module=MODULE, timeout=120)
  assert_one_line_error(proc, "--history is empty: name at least one item")
  (tmp_path / "config.json").write_text(json.dumps(base_config()))
  script = f"""
import ilora_jax.recommend as rec_mod
from ilora_jax import compile_cache
compile_cache.enable = lambda folder: None
rec_mod.recommend = lambda *args: [(1, "Heat", -1.0)]
rec_mod.main(["recommend", "--workdir={tmp_path}", "--history=#2"])
"""
  # Buffered stdout, as a user's shell gives it: with PYTHONUNBUFFERED the print itself fails,
  # and the flush that writes the rows out inside the command would go untested.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
  with open("/dev/full", "w") as full:
    proc = subprocess.run([sys.executable, "-c", script], stdout=full, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT, timeout=120, env=env)  # fmt: skip
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
    "error: cannot write the recommendations to stdout: No space left on device"
  ], proc.stderr


# A mutation audit of the entries' rules (README's "Recommend"): each test below fails with
# one small change to recommend.py that the tests above let pass.


def test_spacing_around_and_inside_entries_is_ignored():
  """Entries are stripped (`Heat | #3` from the command line) and a title's inner spacing is
  not part of it, as its case is not."""
  titles = {3: "Heat", 7: "Toy Story", 311: "Oomph!", 2559: "311"}
  names = ["  toy   STORY ", " #3 ", " 7 ", " title: 311", "Toy\tStory", "\u00a0Heat"]
  assert resolve(names, titles) == [7, 3, 7, 2559, 7, 3]


def test_a_long_unknown_entry_is_clipped_in_the_message():
  title = "x" * 100_000
  assert error_of([title], {0: "Heat"}) == (
    f"unknown history title {'x' * 80!r}... (100000 characters)"
  )
  assert error_of(["9" * 200], {0: "Heat"}) == (
    f"unknown history entry {'9' * 80!r}... (200 characters): no item has this id or title"
  )


def test_an_empty_title_after_the_prefix_is_named():
  for entry in ("title:", "title:   ", " title: \t"):
    assert error_of([entry], {0: "Heat"}) == "empty history title after 'title:'"
  with pytest.raises(UserError, match="^empty candidate title after 'title:'$"):
    resolve_items(["title:"], {0: "Heat"}, "candidate")
  # The title after the prefix is stripped too, in messages and the hint for a '#'.
  assert error_of(["title:  no such film"], {0: "Heat"}) == "unknown history title 'no such film'"
  assert error_of(["title: #-1"], {0: "Heat"}) == (
    "unknown history title '#-1'; an item id is written '#N' with N in 0..0"
  )


def test_only_a_whole_entry_of_ascii_digits_is_an_id():
  """`#N` and a bare id are the whole entry in ASCII digits: "#1 Crush" and "3 Idiots" are
  titles (not item 1, nor a ValueError), and so are other scripts' digits (int() reads
  "٣" and "３" as 3)."""
  titles = {1: "Heat", 2: "#1 Crush", 3: "Toy Story", 8: "3 Idiots"}
  assert resolve(["#1 Crush", "#1", "3 Idiots", "3", "#3"], titles) == [2, 1, 8, 3, 3]
  for entry in ("٣", "３", "#٣", "#３"):
    assert error_of([entry], titles).startswith(f"unknown history title {entry!r}")


def test_unknown_ids_name_the_range_of_ids():
  titles = {5: "Heat", 9: "Toy Story", 12: "#killallzombies"}
  assert error_of(["#99"], titles) == "unknown history id #99: the item ids are 5..12"
  # An item titled "#99" (a game, say) is named, with the way to ask for it.
  assert error_of(["#99"], {**titles, 7: "#99"}) == (
    "unknown history id #99: the item ids are 5..12; item 7 is titled '#99': write 'title:#99'"
  )
  assert error_of(["#-1"], titles) == (
    "unknown history title '#-1'; an item id is written '#N' with N in 5..12"
  )


def test_digits_that_are_an_id_and_several_titles_name_every_other_item():
  titles = {5: "Heat", 8: "5", 9: "5"}
  assert error_of(["5"], titles) == (
    "history entry '5' is both item id 5 'Heat' and the title of item 8, 9: write '#5' for "
    "the id or 'title:5' for the title"
  )
  assert error_of(["title:5"], titles).startswith("ambiguous history title '5': items 8 '5', 9")


def test_an_ambiguous_title_lists_ten_items_by_id_and_counts_the_rest():
  ids = [40, 3, 17, 8, 25, 11, 2, 30, 19, 5, 14, 22]  # 12 items titled "Hamlet", in no order.
  titles = dict.fromkeys(ids, "Hamlet")
  first_ten = "2, 3, 5, 8, 11, 14, 17, 19, 22, 25".split(", ")
  listed = ", ".join(f"{i} 'Hamlet'" for i in first_ten)
  assert error_of(["hamlet"], titles) == (
    f"ambiguous history title 'hamlet': items {listed} and 2 more have it; give the id "
    "instead, e.g. '#2'"
  )
  ten = {int(i): "Hamlet" for i in first_ten}  # Exactly ten: all listed, no "more".
  assert error_of(["Hamlet"], ten) == (
    f"ambiguous history title 'Hamlet': items {listed} have it; give the id instead, e.g. '#2'"
  )


def test_a_title_both_maps_give_is_one_item():
  """The run's title and its u.item form may be equal but for case or spacing: one item,
  not "items 1, 1"."""
  titles, full = {1: "Heat (1995)", 2: "Heat"}, {1: "HEAT  (1995)"}
  assert resolve(["heat (1995)", "Heat  (1995)"], titles, full) == [1, 1]
  titles, full = {1: "Heat (1995)"}, {1: "Heat (1996)"}  # Bare "Heat": both forms, one item.
  assert resolve(["Heat"], titles, full) == [1]


def test_compatibility_forms_are_other_titles():
  """NFC, not NFKC: a decomposed title is the same title, "Alien²" is not "Alien2"."""
  titles = {0: "Alien²", 1: "Alien2", 2: "Alien II"}
  assert resolve(["alien²", "ALIEN2", "Alien II"], titles) == [0, 1, 2]


def test_close_matches_name_only_the_runs_items():
  """u.item names items the run may not have: no close match names one."""
  titles = {0: "Toy Story"}
  full = {0: "Toy Story (1995)", 1: "Toy Story 2 (1999)"}
  assert error_of(["Toy Story 2 (1999)"], titles, full) == (
    "unknown history title 'Toy Story 2 (1999)'; close matches: Toy Story (1995)"
  )


def test_close_matches_name_up_to_three_titles_and_a_title_typed_in_part():
  message = error_of(["Feat"], {0: "Heat", 1: "Beat", 2: "Meat", 3: "Toy Story"})
  head = "unknown history title 'Feat'; close matches: "
  assert message.startswith(head) and sorted(message[len(head) :].split(" | ")) == [
    "Beat",
    "Heat",
    "Meat",
  ]
  assert error_of(["Shawshank"], {0: "Shawshank Redemption", 1: "Heat"}) == (
    "unknown history title 'Shawshank'; close matches: Shawshank Redemption"
  )


def test_a_wrong_year_where_the_years_are_known_has_no_leave_out_hint():
  """With u.item's years, "Heat (1996)" is a wrong year, not a year the data lacks."""
  assert error_of(["Heat (1996)"], {1: "Heat"}, {1: "Heat (1995)"}) == (
    "unknown history title 'Heat (1996)'; close matches: Heat (1995)"
  )


def test_titles_with_years_only_for_a_u_item(tmp_path):
  """LastFM's and Steam's `id2name.txt` have no years to add; the synthetic data no file."""
  for name in ("lastfm", "steam"):
    folder = os.path.dirname(shared_path("data", name, "id2name.txt"))
    config = ConfigDict({"data": {"name": name, "dir": folder}})
    assert titles_with_years(config, str(tmp_path)) == {}
  config = ConfigDict({"data": {"name": "synthetic", "dir": "", "build": True}})
  assert titles_with_years(config, str(tmp_path)) == {}


def test_the_api_takes_numpy_ids_and_k_and_refuses_bools_and_bytearrays(monkeypatch):
  """numpy ints are item ids (np.int64(1) is item 1, not the string "1" that is also item
  2's title) and a k; a bool is neither an id nor a k; a bytearray is not a list of ids."""
  import numpy as np

  monkeypatch.setattr(rec_mod, "Recommender", FakeRecommender)
  top = rec_mod.recommend("w", [np.int64(1)], [np.int64(2), np.int32(1), 3], k=np.int64(2))
  assert FakeRecommender.seen == [1] and [t for t, *_ in top] == [2, 1]
  with pytest.raises(UserError, match=r"^history entry True is a bool: give a title or an "):
    rec_mod.recommend("w", [3, True])
  with pytest.raises(UserError, match=r"^candidate entry np.False_ is a bool: give a title"):
    rec_mod.recommend("w", [3], [4, np.False_])
  with pytest.raises(UserError) as info:
    rec_mod.recommend("w", bytearray(b"\x01\x02"))
  assert str(info.value).startswith(
    "history=bytearray(b'\\x01\\x02') is a bytearray, not a list: pass a list of titles"
  ), info.value
  # Nor a memoryview (its bytes read as ids) or a numpy array of other than one dimension
  # (0-d: a bare TypeError; 2-d: arrays as entries); a 1-d array is a list of ids.
  for value, kind in [(memoryview(b"\x01"), "memoryview"), (np.array(3), "ndarray"),
                      (np.array([[1, 2]]), "ndarray")]:  # fmt: skip
    with pytest.raises(UserError, match=rf" is a {kind}, not a list: pass a list of titles"):
      rec_mod.recommend("w", value)
  rec_mod.recommend("w", np.array([1, 2]), k=1)
  assert FakeRecommender.seen == [1, 2]
  # A long string is named, not shown (as the CLI's `|`-joined history, say).
  with pytest.raises(UserError) as info:
    rec_mod.recommend("w", "Toy Story (1995)|Heat (1995)|Cape Fear (1991)")
  assert str(info.value) == (
    "history is a str, not a list: pass a list of titles or item ids, e.g. "
    "history=['Heat', 12] (a string is not split into entries)"
  )


def test_a_history_that_repeats_items_leaves_the_others_to_recommend(monkeypatch):
  monkeypatch.setattr(rec_mod, "Recommender", FakeRecommender)  # 5 items.
  top = rec_mod.recommend("w", [1, 2, 3, 4, 1], k=2)  # 5 entries, item 5 left out.
  assert [t for t, *_ in top] == [5, 4]


def test_cli_refuses_a_missing_workdir_and_k_below_one(monkeypatch, capsys, tmp_path):
  monkeypatch.setattr(errors, "_quiet_at_exit", lambda: None)  # In this process: no effect.
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  cases = [
    (["--history=Heat"], "--workdir and --history are required (see --help)"),
    ([f"--workdir={tmp_path}", "--history=Heat", "--k=0"], "--k must be at least 1, got 0"),
    ([f"--workdir={tmp_path}", "--history=Heat", "--k=-2"], "--k must be at least 1, got -2"),
    # `--candidates="$UNSET"` ranked SASRec's retrieved items instead, without a word.
    (
      [f"--workdir={tmp_path}", "--history=Heat", "--candidates="],
      "--candidates is empty: name at least one item, or leave it out for SASRec's",
    ),
    (
      [f"--workdir={tmp_path}", "--history=Heat", "--candidates=| |"],
      "--candidates='| |' names no item (leave it out for SASRec's)",
    ),
    (
      [f"--workdir={tmp_path}", "--history=" + "|" * 100],
      f"--history={'|' * 80!r}... (100 characters) names no item",
    ),
  ]
  for args, message in cases:
    with pytest.raises(SystemExit) as info:
      rec_mod.main(["recommend", *args])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_workdir_that_is_no_folder_path_is_named(tmp_path):
  """A file given as the workdir was reported as its config.json not found, a blank one as
  a config.json at the root, and None (from Python) was a bare TypeError."""
  afile = tmp_path / "afile"
  afile.write_text("")
  cases = ((str(afile), f"{afile} is a file, not a run's folder"),
           (" ", "the workdir ' ' is blank: give the run's folder"),
           (None, "workdir=None is a NoneType: give the run's folder"),
           (b"w", "workdir=b'w' is a bytes: give the run's folder"))  # fmt: skip
  for workdir, message in cases:
    with pytest.raises(UserError) as info:
      load_run_config(workdir)
    assert str(info.value) == message
    with pytest.raises(UserError) as info:
      rec_mod.recommend(workdir, [1], config=ConfigDict(base_config()))
    assert str(info.value) == message
  path = tmp_path / "config.json"
  path.write_text(json.dumps(base_config()))
  assert load_run_config(tmp_path).data.max_len == base_config()["data"]["max_len"]  # A Path.


def test_a_workdir_without_config_json_and_damaged_sections_are_named(tmp_path):
  path = tmp_path / "config.json"
  with pytest.raises(UserError) as info:
    load_run_config(str(tmp_path))
  assert str(info.value) == f"{path} not found: is {tmp_path} the workdir of an ilora run?"
  path.write_text('{"stage": ')
  with pytest.raises(UserError) as info:
    load_run_config(str(tmp_path))
  assert str(info.value) == (
    f"{path} is not valid JSON (Expecting value at line 1 column 11): the run's config file "
    "is damaged"
  )
  lacks = ": it is not the config of an ilora run, or was written by incompatible code"
  saved = base_config()
  saved["lora"] = 3  # A section that is no object.
  path.write_text(json.dumps(saved))
  with pytest.raises(UserError) as info:
    load_run_config(str(tmp_path))
  assert str(info.value) == f"{path} lacks the section(s) lora{lacks}"
  saved = base_config()
  del saved["data"]  # Its keys are not listed as well.
  path.write_text(json.dumps(saved))
  with pytest.raises(UserError) as info:
    load_run_config(str(tmp_path))
  assert str(info.value) == f"{path} lacks the section(s) data{lacks}"
  saved = base_config()
  del saved["mesh"], saved["checkpoint"]["max_to_keep"]  # What restoring the run reads.
  path.write_text(json.dumps(saved))
  with pytest.raises(UserError) as info:
    load_run_config(str(tmp_path))
  assert str(info.value) == (
    f"{path} lacks the section(s) mesh and the key(s) checkpoint.max_to_keep{lacks}"
  )


def test_the_cli_path_refuses_a_history_of_every_item_before_naming_the_weights(
  tmp_path, monkeypatch
):
  """With `describe` (the CLI's "ranking with ..." line), which builds the model to name the
  weights, a history of every item is still refused first."""
  workdir = synthetic_workdir(tmp_path, monkeypatch)
  with pytest.raises(UserError, match="^the history holds every one of the 60 items"):
    rec_mod.recommend(workdir, list(range(60)), describe=lambda weights: None)


def test_a_synthetic_run_saved_with_a_data_dir_still_loads(tmp_path):
  """Synthetic data never read data.dir, and a run saved before such a data.dir was refused
  holds one in its config.json: recommend takes the run (its data generated as before)."""
  config = base_config()
  assert config["data"]["name"] == "synthetic"
  config["data"]["dir"] = "/some/old/folder"
  (tmp_path / "config.json").write_text(json.dumps(config))
  rec = REAL_RECOMMENDER(str(tmp_path))
  assert rec.config.data.dir == "" and rec.dataset.name == "synthetic"
