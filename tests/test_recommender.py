"""`ilora_jax.recommend`'s model side and the synthetic data generator, from a mutation audit:
each test fails with a small change to `recommend.py` (the `Recommender`'s sequence, retrieval,
ranking and restore, the API's `describe`, the CLI's rows) or to `synthetic.py` that the other
tests let pass. The Recommender's model is a scripted stand-in (no model is built), its
expectations written out by hand."""

import io
import json
import os
import re
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path
from ml_collections import ConfigDict

import ilora_jax.recommend as rec_mod
from ilora_jax import compile_cache, configuration, errors, synthetic, train_ilora
from ilora_jax.errors import UserError
from ilora_jax.recommend import Recommender, Restored, titles_with_years

N_ITEMS = 8  # The stand-in's catalogue: items 0..7, SASRec's padding id 8.
TITLES = {i: f"t{i}" for i in range(N_ITEMS)}


class Scripted:
  """A Recommender whose restored model is scripted: SASRec's logits over items 0..7 and the
  LLM's score of each candidate, by item; it records what the Recommender hands each part."""

  def __init__(self, logits=None, score_of=None, max_len=3, num_candidates=4, titles=None,
               eval_template=0):  # fmt: skip
    self.calls = {}
    rec = object.__new__(Recommender)
    rec.config = ConfigDict({"data": {"max_len": max_len, "num_candidates": num_candidates},
                             "ilora": {"eval_template": eval_template}})  # fmt: skip
    rec.workdir, rec.titles_with_years = "w", {}
    rec.dataset = types.SimpleNamespace(titles=dict(TITLES if titles is None else titles))
    calls = self.calls

    def sasrec_apply(variables, seq, len_seq):
      calls["sasrec"] = (variables, np.asarray(seq), np.asarray(len_seq))
      return np.asarray(logits, np.float32)[None]

    def batch(rows, template, hybrid, pad_left=False):
      calls["batch"] = (rows, template, hybrid, pad_left)
      return types.SimpleNamespace(as_dict=lambda: {"input_ids": "ids", "item_ids": "items"})

    def prepare(trainable, stats, frozen, batch):
      calls["prepare"] = (trainable, stats, frozen, batch)
      return "params", "gate", "mask", "embeds"

    def score(module, params, gate, mask, embeds, prompt, cands):
      calls["score"] = (module, params, gate, mask, embeds, prompt, cands)
      return np.array([[score_of[int(c)] for c in cands[0]]], np.float32)

    parts = types.SimpleNamespace(
      n_items=N_ITEMS,
      sasrec=types.SimpleNamespace(apply=sasrec_apply),
      builder=types.SimpleNamespace(batch=batch),
      model=types.SimpleNamespace(module="llm-module"),
    )
    su = types.SimpleNamespace(parts=parts, frozen={"sasrec": "sasrec-params", "llm": "base"})
    evaluator = types.SimpleNamespace(_prepare=prepare, _score=score)
    state = {"trainable": "trainable", "stats": "stats"}
    rec._restored = Restored(su, state, 6, "the weights of step 6", evaluator)
    self.rec = rec


# ---------------------------------------------------------------- Recommender._sequence


def test_the_sequence_is_the_last_max_len_items_padded_on_the_right_with_the_padding_id():
  rec = Scripted(max_len=3).rec
  hist, seq = rec._sequence([5, 1, 7, 2])
  assert hist == [1, 7, 2] and seq.dtype == np.int32
  np.testing.assert_array_equal(seq, [[1, 7, 2]])
  hist, seq = rec._sequence([6])
  assert hist == [6]
  np.testing.assert_array_equal(seq, [[6, 8, 8]])  # 8: SASRec's padding id (n_items).
  hist, seq = rec._sequence([4, 3, 0])  # Exactly max_len: all kept, in order.
  assert hist == [4, 3, 0]
  np.testing.assert_array_equal(seq, [[4, 3, 0]])


# ---------------------------------------------------------------- Recommender.retrieve


def test_retrieve_takes_sasrecs_best_items_outside_the_whole_history():
  logits = [4.0, 1.0, 7.0, 3.0, 0.0, 8.0, 6.0, 2.0]  # By logit: 5, 2, 6, 0, 3, 7, 1, 4.
  s = Scripted(logits, max_len=3)
  # History (oldest first) 5, 0, 3, 7: SASRec sees its last 3 (0, 3, 7), but 5, left out of
  # the sequence, is still history, not a recommendation.
  assert s.rec.retrieve([5, 0, 3, 7], 3) == [2, 6, 1]
  variables, seq, len_seq = s.calls["sasrec"]
  assert variables == {"params": "sasrec-params"}
  np.testing.assert_array_equal(seq, [[0, 3, 7]])
  np.testing.assert_array_equal(len_seq, [3])
  assert s.rec.retrieve([5], 2) == [2, 6]
  np.testing.assert_array_equal(s.calls["sasrec"][1], [[5, 8, 8]])
  np.testing.assert_array_equal(s.calls["sasrec"][2], [1])
  assert s.rec.retrieve([5], 10) == [2, 6, 0, 3, 7, 1, 4]  # All 7 left.
  assert all(type(i) is int for i in s.rec.retrieve([5], 3))


def test_retrieve_skips_ids_the_run_has_no_title_for():
  logits = [4.0, 1.0, 7.0, 3.0, 0.0, 8.0, 6.0, 2.0]
  titles = {i: t for i, t in TITLES.items() if i != 2}  # Item 2: no title (an unused id).
  assert Scripted(logits, titles=titles).rec.retrieve([0], 2) == [5, 6]


# ---------------------------------------------------------------- Recommender.recommend


def test_recommend_ranks_the_given_candidates_by_their_scores():
  score_of = {1: -3.0, 2: -1.5, 4: -7.0, 6: -0.5, 7: -2.0}
  s = Scripted(score_of=score_of, max_len=3)
  top = s.rec.recommend([3, 0, 5, 2], [4, 2, 7, 2, 6, 1, 4], k=3)
  assert top == [(6, "t6", -0.5), (2, "t2", -1.5), (7, "t7", -2.0)]
  assert all(type(score) is float for *_, score in top)
  # The prompt: the history's last 3 items, the candidates once each in the order given, no
  # target; the first template, hybrid, padded on the left (generation prompts).
  assert s.calls["batch"] == ([([0, 5, 2], [4, 2, 7, 6, 1], None)], 0, True, True)
  trainable, stats, frozen, batch = s.calls["prepare"]
  assert (trainable, stats) == ("trainable", "stats") and frozen["sasrec"] == "sasrec-params"
  assert (batch["input_ids"], batch["item_ids"]) == ("ids", "items")
  np.testing.assert_array_equal(batch["seq"], [[0, 5, 2]])
  np.testing.assert_array_equal(batch["len_seq"], [3])
  module, params, gate, mask, embeds, _, cands = s.calls["score"]
  assert (module, params, gate, mask, embeds) == ("llm-module", "params", "gate", "mask", "embeds")
  np.testing.assert_array_equal(cands, [[4, 2, 7, 6, 1]])
  # k beyond the candidates: all of them, best first; k=1: the best.
  assert [i for i, *_ in s.rec.recommend([3], [4, 2, 7], k=10)] == [2, 7, 4]
  assert s.rec.recommend([3], [4, 2, 7], k=1) == [(2, "t2", -1.5)]


@pytest.mark.parametrize("eval_template,template", [(2, 2), (1, 1), (-1, 0)])
def test_recommend_writes_the_prompt_in_the_runs_evaluation_template(eval_template, template):
  """The prompt was always template 0, whatever template the run's evaluations (and so its
  selected weights) read; a run that drew one per row (-1) gets template 0."""
  s = Scripted(score_of={1: -1.0, 2: -2.0}, eval_template=eval_template)
  s.rec.recommend([3], [1, 2], k=2)
  assert s.calls["batch"][1] == template


def test_recommend_without_candidates_ranks_sasrecs_retrieved_items_in_its_order():
  logits = [4.0, 1.0, 7.0, 3.0, 0.0, 8.0, 6.0, 2.0]  # SASRec: 5, 2, 6, 0, 3, 7, 1, 4.
  score_of = {i: -float(i) for i in range(N_ITEMS)}  # The LLM prefers low ids.
  s = Scripted(logits, score_of, max_len=2, num_candidates=4)
  top = s.rec.recommend([2, 7, 5], k=3)  # 4 retrieved outside the history: 6, 0, 3, 1.
  assert s.calls["batch"][0] == [([7, 5], [6, 0, 3, 1], None)]
  assert top == [(0, "t0", -0.0), (1, "t1", -1.0), (3, "t3", -3.0)]


def test_tied_scores_keep_the_candidates_order():
  """Equal log-likelihoods (a title's tokens the model cannot tell apart) rank in the order
  the candidates were given, as `argsort(kind="stable")` keeps them."""
  ids = list(range(40))
  titles = {i: f"t{i}" for i in ids}
  score_of = {i: -1.0 if i % 3 else -2.0 for i in ids}
  given = ids[::-1]
  s = Scripted(score_of=score_of, titles=titles)
  top = s.rec.recommend([0], given, k=40)
  want = [i for i in given if i % 3] + [i for i in given if not i % 3]
  assert [i for i, *_ in top] == want


# ---------------------------------------------------------------- Recommender.load


def test_load_restores_the_selected_weights_once(tmp_path, monkeypatch):
  config = configuration.load("configs/tiny.py", ["checkpoint.max_to_keep=5"])
  config.progress = True
  rec = Recommender(str(tmp_path), config)
  assert rec.config is config and config.progress is False  # The config given, not re-read.
  assert rec.titles == synthetic.titles(60)
  calls = []
  val = object()
  su = types.SimpleNamespace(state={"a": jnp.zeros(2)}, total_steps=6, settings={"s": 1},
                             parts="parts", gate_kind="setup-gate",
                             dataset=types.SimpleNamespace(val=val))  # fmt: skip

  def setup(config_, workdir, dataset=None, generates=True, trains=True):
    calls.append(("setup", config_, workdir, dataset, generates, trains))
    return su

  def restore_for_use(workdir, abstract, weights, keep, settings, on_lost):
    calls.append(("restore", workdir, abstract["a"].shape, weights, keep, settings))
    return {"restored": 1}, 4, "the weights of step 4, selected by val m", "m"

  monkeypatch.setattr(train_ilora, "require_checkpoint", lambda w: calls.append(("require", w)))
  monkeypatch.setattr(train_ilora, "setup", setup)
  monkeypatch.setattr(train_ilora, "restore_for_use", restore_for_use)
  monkeypatch.setattr(train_ilora, "unfinished", lambda w, total: f" ({w} {total})")
  monkeypatch.setattr(train_ilora, "Evaluator", lambda *args: ("evaluator", *args))
  w = str(tmp_path)
  assert rec._restored is None  # Nothing built before first use.
  restored = rec.restored
  assert (
    rec.load() is rec
    and rec.restored is restored
    and rec.weights == (f"the weights of step 4, selected by val m ({w} 6)")
  )
  # Nothing is generated: titles too long to generate are no warning of its; nor trained: no
  # training batch checks.
  assert calls == [("require", w), ("setup", config, w, rec.dataset, False, False),
                   ("restore", w, (2,), "selected", 5, {"s": 1})]  # fmt: skip
  assert restored.su is su and restored.state == {"restored": 1} and restored.step == 4
  assert restored.evaluator == ("evaluator", "parts", config, val, "setup-gate")


def test_the_run_config_is_read_from_the_workdir(tmp_path):
  config = configuration.load("configs/tiny.py", ["data.max_len=7"])
  (tmp_path / "config.json").write_text(json.dumps(configuration.json_form(config)))
  rec = Recommender(str(tmp_path))
  assert rec.config.data.max_len == 7 and rec.config.progress is False
  assert rec.workdir == str(tmp_path) and rec.titles_with_years == {}


def test_the_recommender_tells_movielens_titles_apart_by_their_years(tmp_path):
  """The run's MovieLens titles lack years; u.item's, read again, tell the two "Cape Fear"
  apart (items 217 and 672)."""
  folder = os.path.dirname(shared_path("data", "movielens", "u.item"))
  config = configuration.load(
    "configs/base.py", ["data.name=movielens", f"data.dir={folder}", "data.n_items=0"]
  )
  rec = Recommender(str(tmp_path), config)
  assert rec.titles[217] == rec.titles[672] == "Cape Fear"
  assert rec.resolve(["Cape Fear (1991)", "cape fear (1962)", 0], "history") == [217, 672, 0]


def test_a_sasrec_folder_without_a_finished_step_is_not_the_runs_own(tmp_path):
  """Only a step folder (digits) is a SASRec of the run's own: beside an unfinished save's
  temporary folder, a relative `sasrec.init_from` is still read, and named."""
  config = configuration.load("configs/tiny.py", ["sasrec.init_from=no/such/w2"])
  os.makedirs(tmp_path / "checkpoints" / "sasrec" / "130.orbax-checkpoint-tmp-1")
  with pytest.raises(UserError, match=r"config.sasrec.init_from=no/such/w2 \(.*\) is relative"):
    Recommender(str(tmp_path), config)
  os.makedirs(tmp_path / "checkpoints" / "sasrec" / "130")
  assert len(Recommender(str(tmp_path), config).titles) == 60


def test_titles_with_years_are_none_where_the_u_item_cannot_be_read(tmp_path):
  """The years only help to resolve titles: a u.item that is missing or damaged gives none
  (the run's own titles still apply), not an error."""
  config = ConfigDict(
    {"data": {"name": "movielens", "dir": str(tmp_path), "titles_file": "u.item"}}
  )
  assert titles_with_years(config, str(tmp_path)) == {}
  (tmp_path / "u.item").write_bytes(b"\xff\xfe|\x00\n")
  assert titles_with_years(config, str(tmp_path)) == {}


def test_an_absolute_data_folder_that_is_missing_is_named_as_missing(tmp_path):
  """Only a relative path is blamed on the folder recommend runs from; an absolute one is
  gone since the run, to be written anew into the run's config.json."""
  missing = str(tmp_path / "gone")
  overrides = ["data.name=movielens", f"data.dir={missing}", "data.n_items=0"]
  config = configuration.load("configs/base.py", overrides)
  message = (f"the run's config.data.dir={missing} ({tmp_path / 'config.json'}) does not exist "
             "(moved since the run?): write its path now into that file")  # fmt: skip
  with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
    Recommender(str(tmp_path), config)


# ---------------------------------------------------------------- recommend() and main


class Described:
  """A Recommender stand-in with weights: what the API hands on, in order."""

  events: list = []

  def __init__(self, workdir, config=None):
    Described.events.append(("init", workdir, config))
    self.config = ConfigDict({"data": {"max_len": 5, "num_candidates": 3}})
    self.titles, self.titles_with_years = {1: "Heat", 2: "Alien", 3: "Up"}, {}

  def resolve(self, entries, what):
    return Recommender.resolve(self, entries, what)

  @property
  def weights(self):
    Described.events.append(("weights",))
    return "the latest checkpoint, step 9"

  def recommend(self, history, candidates=None, k=5):
    Described.events.append(("recommend", history, candidates, k))
    return [(3, "Up", -1.25), (2, "Alien", -2.5)][:k]


def test_the_api_describes_the_weights_before_ranking(monkeypatch):
  monkeypatch.setattr(rec_mod, "Recommender", Described)
  Described.events, said = [], []
  config = ConfigDict({"x": 1})
  top = rec_mod.recommend("w", ["Heat"], ["Up", "#2"], 2, describe=said.append, config=config)
  assert top == [(3, "Up", -1.25), (2, "Alien", -2.5)]
  assert said == ["the latest checkpoint, step 9"]
  assert Described.events[0] == ("init", "w", config)
  assert Described.events[-1] == ("recommend", [1], [3, 2], 2)
  assert Described.events.index(("weights",)) < len(Described.events) - 1
  Described.events = []
  rec_mod.recommend("w", ["Heat"], k=1)  # No describe: the weights are not asked for.
  assert ("weights",) not in Described.events
  assert Described.events[-1] == ("recommend", [1], None, 1)


def test_the_cli_prints_one_row_per_item_and_names_the_weights(monkeypatch, tmp_path, capsys):
  config = configuration.load("configs/tiny.py")
  (tmp_path / "config.json").write_text(json.dumps(configuration.json_form(config)))
  monkeypatch.setattr(rec_mod, "Recommender", Described)
  monkeypatch.setattr(compile_cache, "enable", lambda folder: None)
  Described.events = []
  rec_mod.main(["recommend", f"--workdir={tmp_path}", "--history=Heat", "--candidates=Up|#2",
                "--k=2"])  # fmt: skip
  out, err = capsys.readouterr()
  assert out == "    -1.250       3  Up\n    -2.500       2  Alien\n"
  assert err == "recommend: ranking with the latest checkpoint, step 9\n"
  assert Described.events[-1] == ("recommend", [1], [3, 2], 2)
  assert Described.events[0][2].data.max_len == config.data.max_len  # The run's config.
  rec_mod.main(["recommend", f"--workdir={tmp_path}", "--history=Heat|Alien", "--k=1"])
  out, _ = capsys.readouterr()
  assert out == "    -1.250       3  Up\n" and Described.events[-1][1:] == ([1, 2], None, 1)


class _GoneReader(io.StringIO):
  """A stdout whose reader went away (`recommend ... | head -0`)."""

  def write(self, text):
    raise BrokenPipeError(32, "Broken pipe")


def _exit_with_stdout(monkeypatch, tmp_path, stdout) -> int:
  """The exit code of the CLI ranking one item for a history onto `stdout`."""
  config = configuration.load("configs/tiny.py")
  (tmp_path / "config.json").write_text(json.dumps(configuration.json_form(config)))
  monkeypatch.setattr(rec_mod, "recommend", lambda *args: [(1, "Heat", -1.0)])
  monkeypatch.setattr(compile_cache, "enable", lambda folder: None)
  monkeypatch.setattr(errors, "_quiet_at_exit", lambda: None)  # In this process: no effect.
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  monkeypatch.setattr(sys, "stdout", stdout)
  with pytest.raises(SystemExit) as info:
    rec_mod.main(["recommend", f"--workdir={tmp_path}", "--history=#2"])
  return info.value.code


def test_the_cli_ends_quietly_when_the_reader_of_its_rows_goes_away(monkeypatch, tmp_path,
                                                                   capsys):  # fmt: skip
  """Exit 141 (as a shell reports SIGPIPE) and nothing on stderr, not `error: cannot write the
  recommendations to stdout: Broken pipe` (exit 2), which a full disk gets."""
  assert _exit_with_stdout(monkeypatch, tmp_path, _GoneReader()) == 141
  assert capsys.readouterr().err == ""


class _FullDisk(io.StringIO):
  """A stdout that takes the rows into its buffer and fails when they are written out (a full
  disk behind `> file`; unbuffered, as with PYTHONUNBUFFERED=1, the print itself fails)."""

  def flush(self):
    raise OSError(28, "No space left on device")


def test_the_cli_writes_its_rows_out_before_it_ends(monkeypatch, tmp_path, capsys):
  """The rows are flushed inside the command, so that a full disk is its one error line
  (exit 2), not an OSError at the end."""
  assert _exit_with_stdout(monkeypatch, tmp_path, _FullDisk()) == 2
  assert capsys.readouterr().err == (
    "error: cannot write the recommendations to stdout: No space left on device\n"
  )


def test_help_is_printed_once_and_ends_the_command(monkeypatch):
  """`--help` prints the help and returns (exit 0), whatever other flags say (here a k the
  command refuses): nothing is parsed, nothing printed twice."""
  shown = []
  for module in (rec_mod, errors):
    monkeypatch.setattr(module, "print_help", lambda values: shown.append("history" in values))
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  assert rec_mod.main(["recommend", "--k=0", "--help"]) is None
  assert shown == [True]


# ---------------------------------------------------------------- synthetic.py


def test_synthetic_titles_are_two_words_of_the_id_in_base_20_and_the_id():
  titles = synthetic.titles(45)
  assert len(titles) == 45 and sorted(titles) == list(range(45))
  assert titles[0] == "Amber Amber 0" and titles[1] == "Blue Amber 1"
  assert titles[19] == "Tide Amber 19" and titles[20] == "Amber Blue 20"
  assert titles[43] == "Delta Cedar 43"
  assert synthetic.titles(3, "words") == {0: "apple", 1: "river", 2: "stone"}
  assert len(synthetic.titles(len(synthetic.WORD_TITLES), "words")) == len(synthetic.WORD_TITLES)
  with pytest.raises(synthetic.UserError, match="titles='word' is unknown: numbered or words"):
    synthetic.titles(3, "word")


def _users(split, seq_len):
  """The full sequences of a split's users (val/test: one row each; train: the row of the
  last position holds the history, seq_len <= max_len + 1 here)."""
  if split.name == "train":
    rows = np.arange(seq_len - 2, len(split), seq_len - 1)
  else:
    rows = np.arange(len(split))
  return [tuple(split.seq[r, : split.len_seq[r]]) + (int(split.next[r]),) for r in rows]


def test_synthetic_splits_users_eight_one_one_with_a_row_per_position():
  """55 users: 44 train, 5 val (int(5.5)) and the 6 left test."""
  num_items, users, seq_len, max_len = 30, 55, 6, 10
  train, val, test = synthetic.generate(num_items, users, 3, seq_len, max_len, 0.5, seed=3)
  assert (len(train), len(val), len(test)) == (44 * 5, 5, 6)
  assert (train.name, val.name, test.name) == ("train", "val", "test")
  for split in (val, test):
    assert split.len_seq.tolist() == [5] * len(split)  # The user's last item is the target.
  # Train: per user the rows of positions 1..5, each the items before it, in order.
  assert train.len_seq.tolist() == [1, 2, 3, 4, 5] * 44
  for u in range(44):
    block = slice(u * 5, u * 5 + 5)
    full = list(train.seq[u * 5 + 4, :5]) + [train.next[u * 5 + 4]]
    for i, r in enumerate(range(block.start, block.stop), start=1):
      assert train.seq[r, :i].tolist() == full[:i] and train.next[r] == full[i]
      assert train.seq[r, i:].tolist() == [num_items] * (max_len - i)
    assert len(set(train.group[block].tolist())) == 1
  # With this much noise every user's sequence differs: 55 distinct users, none in 2 splits.
  seen = _users(train, seq_len) + _users(val, seq_len) + _users(test, seq_len)
  assert len(set(seen)) == users


def test_synthetic_histories_keep_their_last_max_len_items():
  train, val, _ = synthetic.generate(20, 20, 2, 8, 3, 0.0, seed=0)
  assert train.seq.shape == (16 * 7, 3) and val.seq.shape == (2, 3)
  assert train.len_seq.tolist() == [1, 2, 3, 3, 3, 3, 3] * 16
  for r in range(1, len(train)):
    if train.len_seq[r] == 3 and train.len_seq[r - 1] == 3:  # One position on: shifted by one.
      assert train.seq[r].tolist() == train.seq[r - 1, 1:].tolist() + [train.next[r - 1]]


def test_synthetic_groups_walk_their_own_cycle_over_every_item():
  """Without noise each group's user follows the group's permutation from a random start:
  within a group every item has one successor, and following them visits all items once."""
  num_items = 12
  train, val, test = synthetic.generate(num_items, 200, 3, 6, 5, 0.0, seed=5)
  nxt = {}
  for split in (train, val, test):
    for seq, n, after, g in zip(split.seq, split.len_seq, split.next, split.group):
      walk = [int(x) for x in seq[:n]] + [int(after)]
      for a, b in zip(walk, walk[1:]):
        assert nxt.setdefault((int(g), a), b) == b
  for g in range(3):
    item, visited = 0, []
    for _ in range(num_items):
      visited.append(item)
      item = nxt[(g, item)]
    assert item == 0 and sorted(visited) == list(range(num_items)), (g, visited)
  assert len({tuple(nxt[(g, i)] for i in range(num_items)) for g in range(3)}) == 3


def test_synthetic_data_is_a_function_of_its_seed():
  def arrays(seed, noise=0.3):
    return [getattr(s, f) for s in synthetic.generate(25, 40, 3, 7, 4, noise, seed)
            for f in ("seq", "len_seq", "next", "group")]  # fmt: skip

  for a, b in zip(arrays(11), arrays(11)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(arrays(11), arrays(12)))
  # Noise 1: every item drawn at random, no group's order left: within a group an item is
  # followed by several others (without noise, by one: the test above).
  train = synthetic.generate(25, 200, 3, 7, 6, 1.0, 11)[0]
  followers = {}
  for seq, n, after, g in zip(train.seq, train.len_seq, train.next, train.group):
    followers.setdefault((int(g), int(seq[n - 1])), set()).add(int(after))
  assert max(len(f) for f in followers.values()) > 3
