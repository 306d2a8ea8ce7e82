"""Unit tests of train_ilora.py's host-side helpers (no model, no compilation): the order of an
epoch's rows and its bucketing, batch padding and a process's rows, candidate and prompt-size
draws, weight selection, the settings a checkpoint records and their checks, the checks of a
workdir's checkpoints and per-group evaluation metrics.

Expected values come from the docstrings and README.md, worked by hand or with plain numpy;
the end-to-end behaviour of the stage is in test_ilora_stage.py."""

import copy
import dataclasses
import json
import math
import os
import types

import chex
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from ilora_jax import checkpointing, lora, prompts, sharding, train_ilora
from ilora_jax.data import Split, split_fingerprint
from ilora_jax.errors import UserError

SPECIAL = {prompts.PLACEHOLDER: 1000, prompts.HISTORY: 1001, prompts.CANDIDATE: 1002}
N_ITEMS = 30
NUM_CANDIDATES = 5


def _encode(text):
  """Toy tokenizer: one id per character (independent of the code under test)."""
  return [ord(c) for c in text]


def _title(item: int) -> str:
  return "T" + "abcdefg"[: item % 7] + str(item)  # Lengths 2 to 10: varied prompt sizes.


# Items 0..24 have titles (26..29 none); N_ITEMS itself (the padding id) has one too, which
# must count neither as a candidate nor in a prompt's size.
TITLES = {i: _title(i) for i in [*range(25), N_ITEMS]}


def _builder():
  return prompts.PromptBuilder(
    _encode, SPECIAL, pad_id=0, titles=TITLES, n_items=N_ITEMS, dataset="movielens"
  )


def _parts():
  return train_ilora.Parts(
    model=None, sasrec=None, router=None, projector=None, builder=_builder(), lora_cfg=None,
    n_items=N_ITEMS, max_target_tokens=8, newline_ids=(),
  )  # fmt: skip


def _split(rows=40, width=6, seed=0, name="train"):
  """Rows of 1..width titled items, padded with item 0 (which has a title: padding that
  counted would show)."""
  rng = np.random.default_rng(seed)
  seq = np.zeros((rows, width), np.int32)
  len_seq = rng.integers(1, width + 1, size=rows).astype(np.int32)
  nxt = np.zeros(rows, np.int32)
  for r in range(rows):
    items = rng.choice(25, size=len_seq[r] + 1, replace=False)
    seq[r, : len_seq[r]] = items[:-1]
    nxt[r] = items[-1]
  return Split(name, seq, len_seq, nxt)


def _config(**data):
  return ConfigDict({"data": {"num_candidates": NUM_CANDIDATES, **data}})


# ----------------------------------------------------------------------------- small helpers


def test_lora_config_maps_each_field():
  config = ConfigDict(
    {"lora": {"rank": 8, "num_experts": 4, "alpha": 32.0, "dropout": 0.25, "targets": ["q", "v"]}}
  )
  cfg = train_ilora.lora_config(config)
  assert isinstance(cfg, lora.LoRAConfig)
  assert (cfg.rank, cfg.num_experts, cfg.alpha, cfg.dropout) == (8, 4, 32.0, 0.25)
  assert cfg.targets == ("q", "v") and isinstance(cfg.targets, tuple)


def test_router_kwargs_give_the_shortcut_to_resnet1d_only():
  def config(kind):
    return ConfigDict({"router": {"kind": kind, "shortcut": "conv"}})

  assert train_ilora.router_kwargs(config("resnet1d")) == {"shortcut": "conv"}
  assert train_ilora.router_kwargs(config("linear")) == {}
  assert train_ilora.router_kwargs(config("mlp")) == {}


def _attention(impl, dtype="bfloat16"):
  return ConfigDict({"llm": {"attention": impl, "dtype": dtype}})


def test_attention_auto_picks_by_backend_and_precision():
  assert jax.default_backend() == "cpu"
  assert train_ilora.attention_impl(_attention("auto")) == "xla"  # A CPU.
  assert train_ilora.attention_impl(_attention("xla")) == "xla"
  assert train_ilora.attention_impl(_attention("splash")) == "splash"  # Interpreted, for tests.
  with sharding.compiling_for("gpu"):
    assert train_ilora.attention_impl(_attention("auto", "bfloat16")) == "cudnn"
    assert train_ilora.attention_impl(_attention("auto", "float16")) == "cudnn"
    assert train_ilora.attention_impl(_attention("auto", "float32")) == "xla"
    assert train_ilora.attention_impl(_attention("cudnn")) == "cudnn"
    assert train_ilora.attention_impl(_attention("xla")) == "xla"
  with sharding.compiling_for("tpu"):
    assert train_ilora.attention_impl(_attention("auto", "float32")) == "splash"
    assert train_ilora.attention_impl(_attention("auto", "bfloat16")) == "splash"
    assert train_ilora.attention_impl(_attention("splash")) == "splash"


def test_attention_refuses_unknown_and_misplaced_kernels():
  with pytest.raises(UserError, match=r"attention='flash' is not auto, xla, cudnn or splash"):
    train_ilora.attention_impl(_attention("flash"))
  with pytest.raises(UserError, match=r"attention=cudnn is an NVIDIA GPU kernel .* are CPUs"):
    train_ilora.attention_impl(_attention("cudnn"))
  with sharding.compiling_for("tpu"), pytest.raises(UserError, match=r"are TPUs: use auto"):
    train_ilora.attention_impl(_attention("cudnn"))
  with sharding.compiling_for("gpu"), pytest.raises(UserError, match=r"splash is a TPU kernel"):
    train_ilora.attention_impl(_attention("splash"))


class _Tokenizer:
  """A tokenizer with BOS id 7 that puts it before a text or not."""

  def __init__(self, adds_bos: bool, bos=7):
    self.bos_token_id, self.adds_bos = bos, adds_bos

  def __call__(self, text):
    ids = _encode(text)
    return {"input_ids": [self.bos_token_id, *ids] if self.adds_bos else ids}


def test_prompt_bos_follows_the_rule_and_an_older_run_keeps_the_tokenizers_bos():
  def config(rule):
    llm = {} if rule is None else {"bos": rule}
    return ConfigDict({"llm": llm})

  quiet, loud = _Tokenizer(False), _Tokenizer(True)
  # A run saved before `llm.bos`: the tokenizer's BOS whenever it has one.
  assert train_ilora.prompt_bos(config(None), quiet) == 7
  assert train_ilora.prompt_bos(config(None), _Tokenizer(False, bos=None)) is None
  assert train_ilora.prompt_bos(config("auto"), quiet) is None
  assert train_ilora.prompt_bos(config("auto"), loud) == 7
  assert train_ilora.prompt_bos(config("always"), quiet) == 7
  assert train_ilora.prompt_bos(config("never"), loud) is None


@pytest.mark.parametrize(
  "longest, cap, slots",
  [(0, 48, 1), (1, 48, 8), (7, 48, 8), (8, 48, 8), (9, 48, 16), (16, 48, 16), (17, 48, 24),
   (47, 48, 48), (60, 48, 48), (3, 5, 5), (9, 12, 12), (3, 1, 1)],
)  # fmt: skip
def test_target_slots_round_the_longest_answer_up_to_8_within_the_cap(longest, cap, slots):
  assert train_ilora.target_slots(longest, cap) == slots


def test_labels_of_names_every_leaf_by_its_top_level_group():
  trainable = {
    "lora": {"a": np.zeros(2), "b": {"c": np.ones(3)}},
    "router": {"w": np.zeros((2, 2))},
    "projector": [np.zeros(1), np.zeros(1)],
  }
  labels = train_ilora.labels_of(trainable)
  assert labels == {
    "lora": {"a": "lora", "b": {"c": "lora"}},
    "router": {"w": "router"},
    "projector": ["projector", "projector"],
  }


def test_rows_for_takes_each_rows_history_its_candidates_and_target():
  split = _split(rows=6)
  idx = np.array([4, 1])
  cands = np.array([[9, 8, 7], [1, 2, 3]])
  rows = train_ilora.rows_for(split, idx, cands, True)
  for (history, c, target), r, want in zip(rows, idx, cands.tolist()):
    assert history == [int(x) for x in split.seq[r][: split.len_seq[r]]]
    assert c == want and target == int(split.next[r]) and isinstance(target, int)
  assert [t for _, _, t in train_ilora.rows_for(split, idx, cands, False)] == [None, None]


# ----------------------------------------------------------------------------- candidates, sizes


def test_parts_pool_is_the_titled_items_below_n_items():
  np.testing.assert_array_equal(_parts().eligible, np.arange(25))


def test_train_candidates_are_each_rows_own_draw_per_seed_and_epoch():
  parts, config, split = _parts(), _config(), _split()
  cands = train_ilora.train_candidates(parts, config, split, epoch=0, seed=3)
  chex.assert_shape(cands, (len(split), NUM_CANDIDATES))
  for r in range(len(split)):
    row = cands[r].tolist()
    assert int(split.next[r]) in row and len(set(row)) == NUM_CANDIDATES
    assert set(row) <= set(range(25))  # Titled items only.
    assert not set(row) & set(split.seq[r, : split.len_seq[r]].tolist())
  again = train_ilora.train_candidates(parts, config, split, epoch=0, seed=3)
  np.testing.assert_array_equal(again, cands)
  # Each row draws by its id in the training split: a subset (a batch) draws the same.
  idx = np.array([7, 2, 31])
  sub = Split(split.name, split.seq[idx], split.len_seq[idx], split.next[idx])
  np.testing.assert_array_equal(
    train_ilora.train_candidates(parts, config, sub, 0, 3, row_ids=idx), cands[idx]
  )
  # Another epoch or seed, or seed and epoch traded, draw other candidates.
  others = [(1, 3), (0, 4), (3, 0), (4, 3), (0, 2)]
  for epoch, seed in others:
    other = train_ilora.train_candidates(parts, config, split, epoch, seed)
    assert not np.array_equal(other, cands), (epoch, seed)
  # Nor are they the evaluation's fixed candidates of `data.candidate_seed`.
  with_seed = _config(candidate_seed=3)
  assert not np.array_equal(train_ilora.train_candidates(parts, with_seed, split, 0, 0), cands)


def _key_by_hand(split: Split, cands: np.ndarray) -> np.ndarray:
  """Tokens of ' <title>\\n' (the toy tokenizer: the title's characters plus 2) of each history
  item and candidate, plus one per history item."""
  size = lambda item: len(TITLES[item]) + 2  # noqa: E731
  out = []
  for r in range(len(split)):
    history = split.seq[r, : split.len_seq[r]].tolist()
    out.append(sum(size(i) + 1 for i in history) + sum(size(int(c)) for c in cands[r]))
  return np.array(out)


def test_prompt_key_counts_history_and_candidate_titles_plus_one_per_history_item():
  parts, split = _parts(), _split()
  cands = train_ilora.train_candidates(parts, _config(), split, 0, 1)
  np.testing.assert_array_equal(
    train_ilora.prompt_key(parts, split, cands), _key_by_hand(split, cands)
  )
  # An untitled item (26) or the padding id counts nothing.
  padded = np.concatenate([cands[:, :-1], np.full((len(split), 1), N_ITEMS)], 1)
  np.testing.assert_array_equal(
    train_ilora.prompt_key(parts, split, padded), _key_by_hand(split, cands[:, :-1])
  )
  untitled = np.concatenate([cands[:, :-1], np.full((len(split), 1), 26)], 1)
  np.testing.assert_array_equal(
    train_ilora.prompt_key(parts, split, untitled), _key_by_hand(split, cands[:, :-1])
  )


def test_prompt_key_follows_the_real_prompt_length():
  """The hybrid prompts (one template) the builder makes of the rows, without the answer, are
  as much longer than the key in every row, but for one token per history item: the key
  leaves out the separator after each history item (',', one token here)."""
  parts, split = _parts(), _split()
  cands = train_ilora.train_candidates(parts, _config(), split, 0, 1)
  key = train_ilora.prompt_key(parts, split, cands)
  rows = train_ilora.rows_for(split, np.arange(len(split)), cands, False)
  for template in range(len(parts.builder.templates)):
    lengths = parts.builder.batch(rows, template, True).attention.sum(1)
    assert len(set((lengths - key - split.len_seq).tolist())) == 1


def test_prompt_sizes_are_the_keys_of_the_epochs_training_candidates():
  parts, config, split = _parts(), _config(), _split()
  for epoch, seed in ((0, 1), (2, 1), (0, 5)):
    cands = train_ilora.train_candidates(parts, config, split, epoch, seed)
    np.testing.assert_array_equal(
      train_ilora.prompt_sizes(parts, config, split, epoch, seed), _key_by_hand(split, cands)
    )


# ----------------------------------------------------------------------------- step order


def _assert_bucketed(out, order, sizes, per_step, window):
  """`out` is `order` with every `window` steps' rows sorted by size (ties in any order), cut
  into steps; the rows after the last whole step kept in place."""
  n_steps = len(order) // per_step
  np.testing.assert_array_equal(np.sort(out), np.sort(order))
  np.testing.assert_array_equal(out[n_steps * per_step :], order[n_steps * per_step :])
  for first in range(0, n_steps, window):
    span = slice(first * per_step, min(first + window, n_steps) * per_step)
    np.testing.assert_array_equal(np.sort(out[span]), np.sort(order[span]))
    steps = np.sort(sizes[out[span]].reshape(-1, per_step), axis=1)
    runs = np.sort(sizes[order[span]]).reshape(-1, per_step)
    assert sorted(map(tuple, steps.tolist())) == sorted(map(tuple, runs.tolist()))


def test_bucketed_order_by_hand():
  """7 rows, 2 per step, 2 steps a window: steps 0-1 (rows 5 0 3 1) then step 2 alone (2 4);
  row 6, after the last whole step, stays last."""
  order = np.array([5, 0, 3, 1, 2, 4, 6])
  sizes = np.array([40, 10, 70, 30, 60, 20, 50])  # Rows 5 0 3 1 by size: 1 5 3 0.
  for seed in range(8):
    out = train_ilora.bucketed_order(order, sizes, 2, 2, np.random.default_rng(seed))
    steps = {frozenset(out[0:2].tolist()), frozenset(out[2:4].tolist())}
    assert steps == {frozenset({1, 5}), frozenset({3, 0})}, out
    assert set(out[4:6].tolist()) == {2, 4} and out[6] == 6


def test_bucketed_order_sorts_each_window_and_shuffles_its_steps():
  rng = np.random.default_rng(0)
  rows, per_step = 203, 4  # 50 steps; 3 rows left over.
  sizes = rng.permutation(rows) * 3  # Distinct.
  order = rng.permutation(rows)
  step_orders, row_orders = set(), set()
  for window, seed in ((2, 0), (8, 1), (16, 2), (50, 3), (64, 4)):
    out = train_ilora.bucketed_order(order, sizes, per_step, window, np.random.default_rng(seed))
    _assert_bucketed(out, order, sizes, per_step, window)
    again = train_ilora.bucketed_order(order, sizes, per_step, window, np.random.default_rng(seed))
    np.testing.assert_array_equal(again, out)
    steps = sizes[out[: 50 * per_step]].reshape(50, per_step)
    if window >= 8:  # Two steps are in order by chance every other time.
      step_orders.add(bool(np.all(np.diff(steps.min(1)[:window]) > 0)))
    row_orders.add(bool(np.all(np.diff(steps, axis=1) > 0)))
  # The steps are shuffled (not always in size order), as are the rows inside each step.
  assert step_orders == {False} and row_orders == {False}


def test_bucketed_order_keeps_the_epochs_order_between_equal_sizes():
  """Ties keep the random order (a stable sort, so the epoch's order is the same on every
  machine and numpy build; a resume mid-epoch relies on it): with two sizes, each step holds
  consecutive rows of the window sorted by Python's (stable) `sorted`."""
  rows, per_step, window = 512, 8, 16
  order = np.random.default_rng(5).permutation(rows)
  sizes = np.random.default_rng(6).integers(0, 2, rows) * 100
  out = train_ilora.bucketed_order(order, sizes, per_step, window, np.random.default_rng(1))
  span = per_step * window
  for first in range(0, rows, span):
    ranked = sorted(order[first : first + span].tolist(), key=lambda r: sizes[r])
    want = {frozenset(ranked[s : s + per_step]) for s in range(0, span, per_step)}
    got = {
      frozenset(out[first + s : first + s + per_step].tolist()) for s in range(0, span, per_step)
    }
    assert got == want


def test_bucketed_order_window_one_keeps_the_order():
  order = np.random.default_rng(2).permutation(30)
  sizes = np.arange(30)
  for window in (1, 0):
    np.testing.assert_array_equal(
      train_ilora.bucketed_order(order, sizes, 4, window, np.random.default_rng(0)), order
    )


def test_bucketed_order_leaves_its_input_alone():
  order = np.random.default_rng(2).permutation(40)
  kept = order.copy()
  train_ilora.bucketed_order(order, np.arange(40)[::-1].copy(), 4, 4, np.random.default_rng(0))
  np.testing.assert_array_equal(order, kept)


def test_epoch_order_is_a_seeded_permutation_bucketed_by_prompt_size():
  parts, config, split = _parts(), _config(), _split(rows=66)
  per_step = 4  # 16 steps, 2 rows left over.
  plain = train_ilora.epoch_order(parts, config, split, 0, 1, per_step, 1)
  np.testing.assert_array_equal(np.sort(plain), np.arange(66))
  np.testing.assert_array_equal(train_ilora.epoch_order(parts, config, split, 0, 1, per_step, 1),
                                plain)  # fmt: skip
  for epoch, seed in ((1, 1), (0, 2), (1, 0)):
    other = train_ilora.epoch_order(parts, config, split, epoch, seed, per_step, 1)
    assert not np.array_equal(other, plain), (epoch, seed)
  sizes = train_ilora.prompt_sizes(parts, config, split, 0, 1)
  assert len(set(sizes.tolist())) > 20
  for window in (2, 5, 16):
    out = train_ilora.epoch_order(parts, config, split, 0, 1, per_step, window)
    _assert_bucketed(out, plain, sizes, per_step, window)
    np.testing.assert_array_equal(
      train_ilora.epoch_order(parts, config, split, 0, 1, per_step, window), out
    )
  # Another epoch's bucketing follows that epoch's own candidates and its own order.
  sizes1 = train_ilora.prompt_sizes(parts, config, split, 1, 1)
  assert not np.array_equal(sizes1, sizes)
  plain1 = train_ilora.epoch_order(parts, config, split, 1, 1, per_step, 1)
  out1 = train_ilora.epoch_order(parts, config, split, 1, 1, per_step, 16)
  _assert_bucketed(out1, plain1, sizes1, per_step, 16)


def test_epoch_order_shuffles_the_steps_of_a_window():
  parts, config, split = _parts(), _config(), _split(rows=64)
  firsts = set()
  for seed in range(6):  # Steps in increasing order of size every time: not shuffled.
    sizes = train_ilora.prompt_sizes(parts, config, split, 0, seed)
    out = train_ilora.epoch_order(parts, config, split, 0, seed, 4, 16)
    firsts.add(bool(np.all(np.diff(sizes[out].reshape(16, 4).min(1)) >= 0)))
  assert firsts == {False}


# ----------------------------------------------------------------------------- batches


def test_pad_time_pads_token_arrays_on_the_right_with_each_fill():
  ids = np.array([[[5, 6, 7], [8, 9, 4]]])  # [accum 1, rows 2, time 3]
  batch = {
    "input_ids": ids,
    "attention": np.ones_like(ids),
    "loss_mask": np.array([[[0, 1, 1], [0, 0, 1]]]),
    "item_ids": np.array([[[3, 30, 30], [30, 2, 30]]]),
    "seq": np.array([[[1, 2], [3, 4]]]),
  }
  out = train_ilora.pad_time(batch, 5, pad_id=99, n_items=30)
  np.testing.assert_array_equal(out["input_ids"], [[[5, 6, 7, 99, 99], [8, 9, 4, 99, 99]]])
  np.testing.assert_array_equal(out["attention"], [[[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]])
  np.testing.assert_array_equal(out["loss_mask"], [[[0, 1, 1, 0, 0], [0, 0, 1, 0, 0]]])
  np.testing.assert_array_equal(out["item_ids"], [[[3, 30, 30, 30, 30], [30, 2, 30, 30, 30]]])
  assert out["seq"] is batch["seq"]  # Not a token array.
  assert batch["input_ids"].shape == (1, 2, 3)  # The input is left as it was.
  for length in (3, 2):  # Already as long (or longer): unchanged.
    same = train_ilora.pad_time(batch, length, 99, 30)
    assert same.keys() == batch.keys()
    for key, value in batch.items():
      np.testing.assert_array_equal(same[key], value)


def test_pad_time_keeps_leading_axes():
  batch = {k: np.zeros((2, 3, 4), np.int32) for k in ("input_ids", "attention", "loss_mask")}
  batch["item_ids"] = np.full((2, 3, 4), 7, np.int32)
  out = train_ilora.pad_time(batch, 6, 1, 7)
  chex.assert_shape(list(out.values()), (2, 3, 6))
  assert (out["input_ids"][..., 4:] == 1).all() and (out["item_ids"] == 7).all()


@pytest.mark.parametrize(
  "processes, index, accum, micro, rows",
  [(1, 0, 2, 4, [0, 1, 2, 3, 4, 5, 6, 7]),
   (2, 0, 2, 4, [0, 1, 4, 5]),
   (2, 1, 2, 4, [2, 3, 6, 7]),
   (4, 3, 3, 4, [3, 7, 11]),
   (2, 1, 1, 6, [3, 4, 5])],
)  # fmt: skip
def test_host_rows_are_this_processs_slice_of_every_micro_batch(
  monkeypatch, processes, index, accum, micro, rows
):
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  monkeypatch.setattr(jax, "process_index", lambda: index)
  idx = np.arange(100, 100 + accum * micro)[::-1].copy()  # Global row ids, not positions.
  np.testing.assert_array_equal(train_ilora.host_rows(idx, accum, micro), idx[rows])


def test_host_rows_refuse_a_micro_batch_the_processes_cannot_split(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with pytest.raises(UserError, match="not divisible by 2 processes"):
    train_ilora.host_rows(np.arange(6), 2, 3)


# ----------------------------------------------------------------------------- selection


def test_better_loss_lower_other_metrics_higher_ties_and_non_finite_lose():
  nan, inf = float("nan"), float("inf")
  assert train_ilora.better("loss", 1.0, 2.0) and not train_ilora.better("loss", 2.0, 1.0)
  assert train_ilora.better("hr@1", 0.3, 0.2) and not train_ilora.better("hr@1", 0.2, 0.3)
  assert train_ilora.better("hits_over_total", 0.5, 0.25)
  assert not train_ilora.better("mrr", 0.1, 0.2)
  for metric in ("loss", "hr@1"):
    assert not train_ilora.better(metric, 0.2, 0.2)  # A tie keeps the earlier weights.
    assert train_ilora.better(metric, 0.2, None) and train_ilora.better(metric, 0.0, None)
    for bad in (nan, inf, -inf):
      assert not train_ilora.better(metric, bad, None) and not train_ilora.better(metric, bad, 1.0)
  assert train_ilora.better("loss", -5.0, 0.0) and train_ilora.better("hr@1", 1.0, 0.0)


# ----------------------------------------------------------------------------- settings


def _params():
  return {"a": np.ones((2, 3), np.float32), "b": {"c": np.full(4, -2.0, np.float32)}}


def test_sasrec_fingerprint_counts_weights_and_sums_magnitudes_to_four_digits():
  assert train_ilora.sasrec_fingerprint(_params()) == "10 weights, |w| sum 14"
  big = {"w": np.full((100, 10), 12.3456, np.float32)}  # |w| sum 12345.6
  assert train_ilora.sasrec_fingerprint(big) == "1000 weights, |w| sum 1.235e+04"
  small = {"w": np.full(3, 0.1234567, np.float32)}
  assert train_ilora.sasrec_fingerprint(small) == "3 weights, |w| sum 0.3704"


def test_same_sasrec_allows_one_unit_of_the_fourth_digit():
  same = train_ilora.same_sasrec
  assert same("10 weights, |w| sum 12.34", "10 weights, |w| sum 12.34")
  assert same("10 weights, |w| sum 12.34", "10 weights, |w| sum 12.35")
  assert same("10 weights, |w| sum 12.35", "10 weights, |w| sum 12.34")
  assert not same("10 weights, |w| sum 12.34", "10 weights, |w| sum 12.36")
  assert not same("10 weights, |w| sum 12.34", "11 weights, |w| sum 12.34")
  assert same("9 weights, |w| sum 1.235e+04", "9 weights, |w| sum 1.234e+04")
  assert not same("9 weights, |w| sum 1.235e+04", "9 weights, |w| sum 1.233e+04")
  assert same("9 weights, |w| sum 0.3704", "9 weights, |w| sum 0.3705")
  assert not same("9 weights, |w| sum 0.3704", "9 weights, |w| sum 0.3706")
  # Across a power of ten, one unit of the larger sum's fourth digit (10.00: 0.01).
  assert same("9 weights, |w| sum 9.999", "9 weights, |w| sum 10")
  assert same("9 weights, |w| sum 9.99", "9 weights, |w| sum 10")
  assert not same("9 weights, |w| sum 9.98", "9 weights, |w| sum 10")
  assert same("9 weights, |w| sum 0", "9 weights, |w| sum 0")
  assert not same("9 weights, |w| sum 0", "9 weights, |w| sum 1")
  assert not same("a SASRec", "another")
  assert not same("9 weights, |w| sum 12.34", "9 weights, |w| sum 12.34 extra")
  assert same(None, None) and not same(None, "9 weights, |w| sum 1")
  # A fingerprint of one SASRec's weights nudged in the float32 rounding matches.
  nudged = {"a": np.ones((2, 3), np.float32) * (1 + 1e-6), "b": _params()["b"]}
  assert same(train_ilora.sasrec_fingerprint(_params()), train_ilora.sasrec_fingerprint(nudged))


def test_same_sasrec_takes_a_unit_apart_computed_a_little_over_one_unit():
  """10.05 - 10.04 is 0.01000000000000156 in floating point: still one unit of the fourth digit."""
  a, b = "9 weights, |w| sum 10.04", "9 weights, |w| sum 10.05"
  assert train_ilora.same_sasrec(a, b) and train_ilora.same_sasrec(b, a)
  assert not train_ilora.same_sasrec(a, "9 weights, |w| sum 10.06")


def test_same_settings_compare_the_llm_by_name_only_for_older_checkpoints():
  with_weights = train_ilora.same_settings({"llm_weights": None, "llm": "x"})
  assert set(with_weights) == {"sasrec", "llm", "llm_weights"}
  older = train_ilora.same_settings({"llm": "x"})
  assert set(older) == {"sasrec", "llm_weights"}
  assert older["sasrec"] is train_ilora.same_sasrec
  # The LLM: a preset by its name (and init), files by their fingerprint.
  same_llm = with_weights["llm"]
  assert same_llm("tiny", "tiny") and not same_llm("tiny", "tiny (init_std 0.05)")
  assert not same_llm("tiny", "/models/tiny.gguf")
  assert not same_llm("tiny (init_std 0.05)", "/models/tiny.gguf")  # Still the preset.
  assert same_llm("/a/model.gguf", "/b/model.gguf") and same_llm("smollm2-135m", "/b/m.gguf")
  same_weights = with_weights["llm_weights"]
  assert same_weights(None, "abc") and same_weights("abc", None) and same_weights("abc", "abc")
  assert not same_weights("abc", "abd")


def _full_config(**llm):
  from ilora_jax import configuration

  config = configuration.load("configs/tiny.py", [])
  config.llm.update(llm)
  return config


NUMERICS_KEYS = {
  "bos", "data.titles", "llm.dtype, param_dtype", "target_slots", "ilora.train.clip_norm",
  "weight_decay", "sasrec", "llm_weights", "sasrec.num_heads", "ilora.bucket_window",
  "ilora.pad_multiple", "llm.unroll_train", "data.num_candidates", "data.candidate_seed",
  "prompt templates", "prompt tokens", "llm.rope",
}  # fmt: skip


def test_numerics_settings_record_what_a_resume_must_share(tmp_path):
  config = _full_config(dtype="bfloat16", param_dtype="float32")
  config.ilora.train.clip_norm, config.ilora.train.weight_decay = 0.5, 0.125
  config.sasrec.num_heads, config.ilora.bucket_window = 2, 4
  config.ilora.pad_multiple, config.llm.unroll_train = 16, True
  config.data.num_candidates, config.data.candidate_seed = 12, 77
  titles = {0: "Heat", 1: "Alien"}
  got = train_ilora.numerics_settings(config, 5, 24, _params(), titles, "00ff")
  assert set(got) == NUMERICS_KEYS
  assert got["prompt tokens"] == "00ff" and got["llm.rope"][1] is None
  # The rope as the model's files give it (a folder's config.json alone is read).
  hf = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0}}  # fmt: skip
  (tmp_path / "config.json").write_text(json.dumps(hf))
  folder = copy.deepcopy(config)
  folder.llm.name = str(tmp_path)
  rope = train_ilora.numerics_settings(folder, 5, 24, _params(), titles)["llm.rope"]
  assert rope == [5e5, {"rope_type": "linear", "factor": 4.0}]
  assert got["bos"] == 5 and got["target_slots"] == 24 and got["llm_weights"] is None
  assert got["llm.dtype, param_dtype"] == ["bfloat16", "float32"]
  assert got["ilora.train.clip_norm"] == 0.5 and got["weight_decay"] == 0.125
  assert got["sasrec"] == "10 weights, |w| sum 14" and got["sasrec.num_heads"] == 2
  assert got["ilora.bucket_window"] == 4
  assert got["ilora.pad_multiple"] == 16 and got["llm.unroll_train"] is True
  assert (got["data.num_candidates"], got["data.candidate_seed"]) == (12, 77)
  # The tiny config's synthetic data reads Steam's templates: the original's game.txt.
  assert got["prompt templates"] == "8c5f4365d21c5f0b"
  other = train_ilora.numerics_settings(config, 5, 24, _params(), {0: "Heat", 1: "Ran"})
  assert other["data.titles"] != got["data.titles"]
  config.train.weight_decay = 0.25  # `config.train.*` overrides the stage's (`stage_train`).
  assert train_ilora.numerics_settings(config, None, 24, _params(), titles)["weight_decay"] == 0.25
  assert train_ilora.numerics_settings(config, None, 24, _params(), titles)["bos"] is None


def test_run_settings_record_the_model_data_batch_schedule_and_numerics():
  config = _full_config()
  config.ilora.train.lr, config.train.seed = 0.002, 11
  dataset = types.SimpleNamespace(name="lastfm", train=_split(37))
  numerics = {"bos": None, "target_slots": 8}
  got = train_ilora.run_settings(config, dataset, (4, 2), 60, numerics)
  assert set(got) == {"llm", "lora", "router", "data", "batch", "total_steps", "seed", "lr",
                      "train_rows", "data.train", "bos", "target_slots"}  # fmt: skip
  assert got["llm"] == "tiny" and got["data"] == "lastfm" and got["train_rows"] == 37
  # The rows' digest: as many other rows (one next item changed) give another.
  other_rows = _split(37)
  other_rows.next[5] += 1
  assert got["data.train"] == split_fingerprint(dataset.train) != split_fingerprint(other_rows)
  changed = train_ilora.run_settings(config, types.SimpleNamespace(name="lastfm", train=other_rows),
                                     (4, 2), 60, numerics)  # fmt: skip
  assert {k for k in got if got[k] != changed[k]} == {"data.train"}
  assert got["lora"] == config.lora.to_dict() | {"targets": list(config.lora.targets)}
  assert got["router"] == config.router.to_dict()
  assert got["batch"] == [4, 2] and got["total_steps"] == 60
  assert got["seed"] == 11 and got["lr"] == 0.002 and got["bos"] is None
  assert _full_config(init_std=0.05).llm.init_std == 0.05
  other = train_ilora.run_settings(_full_config(init_std=0.05), dataset, (4, 2), 60, {})
  assert other["llm"] == "tiny (init_std 0.05)"


def test_run_settings_record_the_learning_rate_the_run_uses():
  """`config.train.lr`, where set, is the run's learning rate (`stage_train`)."""
  config = _full_config()
  config.ilora.train.lr, config.train.lr = 0.002, 0.003
  dataset = types.SimpleNamespace(name="lastfm", train=_split(5))
  assert train_ilora.run_settings(config, dataset, (2, 1), 10, {})["lr"] == 0.003


class _Ckpt:
  """A checkpoint's settings, as `StageCheckpoints.restore_meta` gives them."""

  directory = "/runs/w/checkpoints/ilora"

  def __init__(self, settings):
    self.settings, self.read = settings, []

  def restore_meta(self, step):
    self.read.append(step)
    return {"settings": self.settings}


SAVED = {
  "llm": "/models/a.gguf",
  "lora": {"rank": 8, "num_experts": 4, "alpha": 32.0, "dropout": 0.1, "targets": ["q", "v"]},
  "router": {"kind": "linear", "hidden": 64, "dropout": 0.2},
  "data": "lastfm",
  "train_rows": 8,
  "sasrec": "100 weights, |w| sum 12.34",
  "sasrec.num_heads": 1,
  "llm_weights": "abc",
  "data.titles": "0123",
  "lr": 0.001,
  "total_steps": 100,
}


def _check(saved, settings, capsys):
  capsys.readouterr()
  train_ilora._check_model_settings(_Ckpt(saved), 7, settings)
  return capsys.readouterr().err


def test_check_model_settings_passes_the_same_model(capsys):
  assert _check(SAVED, dict(SAVED), capsys) == ""
  # Not model settings: the schedule, the dropout rates; the SASRec within its rounding.
  running = {**SAVED, "lr": 0.5, "total_steps": 3, "sasrec": "100 weights, |w| sum 12.35"}
  running["lora"] = {**SAVED["lora"], "dropout": 0.0}
  running["router"] = {**SAVED["router"], "dropout": 0.0}
  assert _check(SAVED, running, capsys) == ""
  # A setting the checkpoint does not record (older code) is not compared.
  older = {k: v for k, v in SAVED.items() if k != "sasrec.num_heads"}
  assert _check(older, {**SAVED, "sasrec.num_heads": 4}, capsys) == ""
  # A router field its kind does not read (the linear router's width of the mlp one's hidden
  # layer, its resnet1d shortcut): refused before (found by the bad-input audit).
  running["router"] = {**SAVED["router"], "hidden": 0, "shortcut": "conv"}
  assert _check({**SAVED, "router": {**SAVED["router"], "shortcut": "pad"}}, running, capsys) == ""


def test_a_resume_compares_the_router_fields_either_kind_reads():
  """The resume's check (`check_same_settings`, every key of either side): a field neither
  kind reads is left out, and where the kinds differ no field is called missing (each side
  filtered by its own kind gave 'checkpoint 64 vs config None'; found by the diff review)."""
  from ilora_jax import checkpointing

  def refusal(saved_router, router):
    saved, current = ({"router": saved_router, "lr": 1.0}, {"router": router, "lr": 1.0})
    try:
      checkpointing.check_same_settings(*train_ilora.router_read(saved, current), "d")
    except UserError as err:
      return str(err)
    return ""

  linear = {"kind": "linear", "hidden": 64, "shortcut": "pad"}
  assert refusal(linear, {**linear, "hidden": 0, "shortcut": "conv"}) == ""
  assert "router.hidden: checkpoint 64 vs config 32" in refusal(
    {**linear, "kind": "mlp"}, {**linear, "kind": "mlp", "hidden": 32}
  )
  message = refusal({**linear, "kind": "mlp"}, {**linear, "kind": "resnet1d"})
  assert "(router.kind: checkpoint 'mlp' vs config 'resnet1d');" in message


def test_a_router_field_its_kind_reads_is_compared():
  for kind, field, values in (
    ("mlp", "hidden", (64, 32)),
    ("resnet1d", "shortcut", ("pad", "conv")),
  ):
    saved = {**SAVED, "router": {"kind": kind, "hidden": 64, "shortcut": "pad"}}
    running = {**saved, "router": {**saved["router"], field: values[1]}}
    assert f"router.{field} {values[0]!r} vs config {values[1]!r}" in _refusal(saved, running)


def test_weights_trained_on_other_prompt_templates_are_warned_of(capsys):
  """`stage=evaluate` and `recommend` on a run trained on prompt templates of other wording
  (a checkpoint of code before 2026-12-07 records none: its data set's templates of then)
  warn that the evaluation reads this code's; the same wording, or a data set whose older
  templates are unknown, says nothing."""
  ours = {**SAVED, "prompt templates": "ec67243239e3c647"}  # LastFM's, the original's.
  for saved in (SAVED, {**SAVED, "prompt templates": "0dc290193f146d2b"}):
    err = _check(saved, ours, capsys)
    want = "warning: checkpoint 7 in /runs/w/checkpoints/ilora was trained on prompt templates"
    assert err.startswith(f"{want} of other wording than this code writes"), err
    assert "its metrics and rankings may differ from the run's own" in err and err.count("\n") == 1
  assert _check(ours, ours, capsys) == ""
  unknown = {k: v for k, v in SAVED.items() if k != "data"}  # No data set: templates unknown.
  assert _check(unknown, ours, capsys) == ""


def test_a_resume_on_other_prompt_templates_is_refused():
  """A run trained on templates of other wording (older code's, which its checkpoints do not
  record, or another digest) is not resumed: the rest would train on other prompts."""
  ours = {"data": "movielens", "prompt templates": "234855b6f6250373"}
  train_ilora._check_same_prompts(dict(ours), ours, "/w/checkpoints/ilora", False)
  train_ilora._check_same_prompts({}, ours, "/w/checkpoints/ilora", False)  # Data unknown.
  head = (
    "the checkpoint in /w/checkpoints/ilora was trained on prompt templates of other wording "
    "(digest {}) than this code writes (234855b6f6250373; code before 2026-12-07 wrote its "
    "own, this code the original's): "
  )
  for saved in ({"data": "movielens"}, {**ours, "prompt templates": "0123"}):
    with pytest.raises(UserError) as err:
      train_ilora._check_same_prompts(saved, ours, "/w/checkpoints/ilora", False)
    theirs = saved.get("prompt templates", "2d460409248f8cfa")
    assert str(err.value) == head.format(theirs) + (
      "finish the run with the code that started it, or start it anew (another --workdir, or "
      "remove /w)"
    )
  # A finished run's command only evaluates again: the report and stage=evaluate are the ways.
  with pytest.raises(UserError) as err:
    train_ilora._check_same_prompts({"data": "movielens"}, ours, "/w/checkpoints/ilora", True)
  assert str(err.value) == head.format("2d460409248f8cfa") + (
    "the run has finished: python -m ilora_jax.report --workdir=/w rebuilds its report, "
    "--config.stage=evaluate scores it on this code's prompts"
  )


def test_check_model_settings_without_settings_reads_nothing():
  ckpt = _Ckpt({"lora": {"rank": 1}})
  train_ilora._check_model_settings(ckpt, 7, None)
  assert ckpt.read == []


def _refusal(saved, settings) -> str:
  with pytest.raises(UserError) as err:
    train_ilora._check_model_settings(_Ckpt(saved), 7, settings)
  message = str(err.value)
  assert "\n" not in message and message.startswith(
    "checkpoint 7 in /runs/w/checkpoints/ilora was made with other model settings ("
  )
  return message


def test_check_model_settings_names_each_differing_setting():
  running = {**SAVED, "lora": {**SAVED["lora"], "rank": 4, "targets": ["q"]}, "data": "steam"}
  message = _refusal(SAVED, running)
  # Each, by name in order, separated by '; '.
  assert (
    "(data 'lastfm' vs config 'steam'; lora.rank 8 vs config 4; "
    "lora.targets ['q', 'v'] vs config ['q']); " in message
  )
  assert "lora.alpha" not in message and "sasrec" not in message
  assert message.endswith("; the run was trained on other data: give the config.data.* it was "
                          "trained with")  # fmt: skip
  message = _refusal(SAVED, {**SAVED, "lora": {**SAVED["lora"], "rank": 4}})
  assert message.endswith("(lora.rank 8 vs config 4); set them as the run had them")
  message = _refusal(SAVED, {**SAVED, "train_rows": 16})  # Other rows of one data set.
  assert message.endswith("(train_rows 8 vs config 16); the run was trained on other data: give "
                          "the config.data.* it was trained with")  # fmt: skip
  message = _refusal(SAVED, {**SAVED, "router": {**SAVED["router"], "kind": "mlp"}})
  assert "router.kind 'linear' vs config 'mlp'" in message
  message = _refusal(SAVED, {**SAVED, "sasrec.num_heads": 2})
  assert "sasrec.num_heads 1 vs config 2" in message
  assert message.endswith("; set them as the run had them")


def test_check_model_settings_advice_for_another_sasrec_or_llm():
  message = _refusal(SAVED, {**SAVED, "sasrec": "100 weights, |w| sum 12.36"})
  assert "sasrec '100 weights, |w| sum 12.34' vs config" in message
  assert "trained on another SASRec: give it back" in message
  message = _refusal(SAVED, {**SAVED, "llm_weights": "abd"})
  assert "llm_weights 'abc' vs config 'abd'" in message
  assert "trained on other LLM weights ('/models/a.gguf' as it was then)" in message
  # Both: the SASRec's advice.
  message = _refusal(SAVED, {**SAVED, "llm_weights": "abd", "sasrec": "1 weights, |w| sum 1"})
  assert "another SASRec" in message and "other LLM weights" not in message
  # The same file kept in another dtype: named, with the run's (found by the README audit;
  # "other LLM weights" alone sent one looking for another model file).
  kept = {**SAVED, "llm.dtype, param_dtype": ["float32", "float32"]}
  message = _refusal(kept, {**kept, "llm_weights": "abd",
                            "llm.dtype, param_dtype": ["float32", "bfloat16"]})  # fmt: skip
  assert message.endswith(
    "; the run kept the LLM's weights in float32, this config in bfloat16 (llm.param_dtype), "
    "and their fingerprint is of the weights as kept: give --config.llm.param_dtype=float32"
  )


def test_check_model_settings_warns_of_other_titles_and_another_llm_name(capsys):
  err = _check(SAVED, {**SAVED, "data.titles": "4567"}, capsys)
  assert err.startswith("warning: checkpoint 7 in /runs/w/checkpoints/ilora was trained with "
                        "other item titles")  # fmt: skip
  assert err.count("\n") == 1
  assert _check({k: v for k, v in SAVED.items() if k != "data.titles"}, SAVED, capsys) == ""
  # Another name of fingerprinted weights: no warning (the fingerprints agree).
  assert _check(SAVED, {**SAVED, "llm": "/moved/a.gguf"}, capsys) == ""
  # Without a fingerprint on either side, another name is warned of.
  for side in ("saved", "running"):
    saved, running = dict(SAVED), {**SAVED, "llm": "/moved/a.gguf"}
    (saved if side == "saved" else running)["llm_weights"] = None
    err = _check(saved, running, capsys)
    assert "was trained with llm '/models/a.gguf', this config gives '/moved/a.gguf'" in err
  no_name = {k: v for k, v in SAVED.items() if k not in ("llm", "llm_weights")}
  assert _check(no_name, {**SAVED, "llm_weights": None}, capsys) == ""


def test_check_model_settings_warns_of_other_dtypes_and_prompt_start(capsys):
  """Scoring a run in other dtypes or with another first token moves its metrics (the audit:
  a float32 run scored in bfloat16, hr@5 0.24 -> 0.12): each named in a warning."""
  saved = {**SAVED, "llm.dtype, param_dtype": ["float32", "float32"], "bos": []}
  err = _check(saved, {**saved, "llm.dtype, param_dtype": ["bfloat16", "bfloat16"]}, capsys)
  assert err == (
    "warning: checkpoint 7 in /runs/w/checkpoints/ilora was trained with llm.dtype, "
    "param_dtype ['float32', 'float32'], this config gives ['bfloat16', 'bfloat16']: its "
    "metrics may differ from the run's own (give the run's settings to score it as it was "
    "trained)\n"
  )
  err = _check(saved, {**saved, "bos": [1]}, capsys)
  assert "was trained with llm.bos [], this config gives [1]: " in err and err.count("\n") == 1
  assert _check(saved, dict(saved), capsys) == ""
  assert _check(SAVED, {**saved, "bos": [1]}, capsys) == ""  # Not recorded: not compared.


# ----------------------------------------------------------------------------- workdirs


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """Workdirs with: nothing; an ilora checkpoint at step 3; selected weights (ilora_best) at
  step 2 only; both."""
  base = tmp_path_factory.mktemp("workdirs")
  state = {"x": np.arange(3, dtype=np.float32)}

  def save(workdir, stage, step, settings=None):
    ckpt = checkpointing.StageCheckpoints(str(workdir), stage, 2, False)
    try:
      ckpt.save(step, state, {"settings": settings or {}})
      ckpt.wait()
    finally:
      ckpt.close()

  dirs = {name: base / name for name in ("empty", "latest", "best", "both", "recorded")}
  for d in dirs.values():
    d.mkdir()
  save(dirs["latest"], "ilora", 3)
  save(dirs["recorded"], "ilora", 3, {"total_steps": 6})
  save(dirs["best"], "ilora_best", 2)
  save(dirs["both"], "ilora", 3)
  save(dirs["both"], "ilora_best", 2)
  return {k: str(v) for k, v in dirs.items()}


def test_latest_step_of_each_stage(workdirs, tmp_path):
  assert train_ilora.latest_step(workdirs["latest"]) == 3
  assert train_ilora.latest_step(workdirs["latest"], train_ilora.BEST) is None
  assert train_ilora.latest_step(workdirs["best"]) is None
  assert train_ilora.latest_step(workdirs["best"], train_ilora.BEST) == 2
  assert train_ilora.latest_step(workdirs["empty"]) is None
  missing = str(tmp_path / "missing")
  assert train_ilora.latest_step(missing) is None
  assert not os.path.exists(missing)  # Read only: no folder made.


def test_a_resume_keeps_the_val_evaluations_its_epochs_were_compared_on(tmp_path):
  """`ilora.eval_rows` or `max_new_tokens` changed on resume were taken without a word: the
  weights were then selected by val values of other rows (step 130 on 2 rows over step 65 on
  5, in an audit). The rows count as scored (eval_rows above the split: all of them)."""
  from ilora_jax import configuration, data

  def load(*overrides):
    return configuration.load("configs/tiny.py", ["data.synthetic.num_users=120", *overrides])

  config = load()
  dataset = data.load_from_config(config, str(tmp_path))
  rows = len(dataset.val)
  assert rows > config.ilora.eval_rows > 3  # Some rows left out of val by default.
  saved = train_ilora.val_settings(config, dataset)
  assert saved["ilora.eval_rows"] == min(config.ilora.eval_rows, rows)
  for override, fine in (("eval_rows=0", False), ("eval_rows=3", False),
                         ("max_new_tokens=7", False), ("eval_score=False", False),
                         ("eval_batch_size=3", True), ("eval_sort=False", True)):  # fmt: skip
    other = load(f"ilora.{override}")
    mine = train_ilora.val_settings(other, dataset)
    if fine:
      train_ilora._check_same_val(saved, mine, 12)
      continue
    key, value = override.split("=")
    with pytest.raises(
      UserError, match=rf"^this run's val evaluations were made with ilora.{key}="
    ):
      train_ilora._check_same_val(saved, mine, 12)
  # All rows, however given (0, or a number at least the split's), are the same rows.
  train_ilora._check_same_val(
    train_ilora.val_settings(load("ilora.eval_rows=0"), dataset),
    train_ilora.val_settings(load(f"ilora.eval_rows={rows + 5}"), dataset),
    12,
  )
  with pytest.raises(UserError) as raised:  # Three rows scored, all of them asked for now.
    train_ilora._check_same_val(dict(saved, **{"ilora.eval_rows": 3}), saved, 12)
  assert str(raised.value) == (
    f"this run's val evaluations were made with ilora.eval_rows=3, this config's with "
    f"{saved['ilora.eval_rows']}: resume with --config.ilora.eval_rows=3 (the epochs before "
    "step 12 were compared on them; stage=evaluate may use others)"
  )
  # Another val split (rows edited in the data folder), and a checkpoint of older code that
  # records the template alone.
  val = dataset.val
  cut = Split(val.name, val.seq[:-1], val.len_seq[:-1], val.next[:-1])
  fewer = dataclasses.replace(dataset, val=cut)
  with pytest.raises(
    UserError,
    match=r"made with val split=\w+ \(\d+ rows\), this config's "
    r"with \w+ \(\d+ rows\): resume with the data the run was started with",
  ):
    train_ilora._check_same_val(saved, train_ilora.val_settings(config, fewer), 12)
  train_ilora._check_same_val({"ilora.eval_template": 0}, saved, 12)
  with pytest.raises(UserError, match="made with ilora.eval_template=1, this config's with 0"):
    train_ilora._check_same_val({"ilora.eval_template": 1}, saved, 12)


def test_require_checkpoint_wants_the_latest_or_selected_weights(workdirs, tmp_path):
  for name in ("latest", "best", "both"):
    train_ilora.require_checkpoint(workdirs[name])
  for workdir in (workdirs["empty"], str(tmp_path / "missing")):
    with pytest.raises(UserError) as err:
      train_ilora.require_checkpoint(workdir)
    want = os.path.join(workdir, "checkpoints", "ilora")
    assert str(err.value) == f"no ilora checkpoint in {want}: train with --config.stage=ilora"
  assert not os.path.exists(tmp_path / "missing")
  assert os.listdir(workdirs["empty"]) == []
  # The advice follows the stage of the run's config.json: a pipeline goes on by its command.
  run = tmp_path / "run"
  want = os.path.join(str(run), "checkpoints", "ilora")
  for stage, advice in (
    ("pipeline", "the run (stage=pipeline) has not reached its iLoRA stage: re-run its command "
                 "to go on"),
    ("sasrec", "the run trained SASRec alone (stage=sasrec): train iLoRA on it with "
               "--config.stage=ilora"),
    ("ilora", "train with --config.stage=ilora"),
  ):  # fmt: skip
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text(json.dumps({"stage": stage}))
    with pytest.raises(UserError) as err:
      train_ilora.require_checkpoint(str(run))
    assert str(err.value) == f"no ilora checkpoint in {want}: {advice}"
  for damaged in ("[", '{"stage": ["pipeline"]}'):  # The plain advice.
    (run / "config.json").write_text(damaged)
    with pytest.raises(UserError, match="train with --config.stage=ilora$"):
      train_ilora.require_checkpoint(str(run))
  # A run whose records hold its iLoRA stage (a folder copied without its checkpoints, or a
  # run killed before its first) was told it had not reached that stage.
  (run / "config.json").write_text(json.dumps({"stage": "pipeline"}))
  train = '{"run": "ilora", "stage": "ilora", "split": "train", "step": 1, "loss": 2.0}\n'
  (run / "metrics.jsonl").write_text(train)
  with pytest.raises(UserError) as err:
    train_ilora.require_checkpoint(str(run))
  assert str(err.value) == (
    f"no ilora checkpoint in {want}, though {run}'s metrics.jsonl holds iLoRA training "
    "records: the run stopped before its first checkpoint (re-run its command to start it "
    "again), or its checkpoints were removed"
  )
  final = '{"run": "ilora", "stage": "ilora", "split": "val", "step": 1, "final": true}\n'
  (run / "metrics.jsonl").write_text(train + final)
  with pytest.raises(UserError) as err:
    train_ilora.require_checkpoint(str(run))
  assert str(err.value) == (
    f"no ilora checkpoint in {want}, though {run}'s metrics.jsonl holds its iLoRA stage's "
    "final evaluations: its checkpoints were removed, or not copied with the run"
  )
  (run / "metrics.jsonl").write_text("{broken\n{}\n")  # Damaged: the advice by stage.
  with pytest.raises(UserError, match="has not reached its iLoRA stage"):
    train_ilora.require_checkpoint(str(run))


def test_unfinished_names_a_run_short_of_its_steps(workdirs):
  assert train_ilora.unfinished(workdirs["latest"], 5) == (
    " (an unfinished run: trained 3 of 5 steps)"
  )
  assert train_ilora.unfinished(workdirs["latest"], 4) == (
    " (an unfinished run: trained 3 of 4 steps)"
  )
  assert train_ilora.unfinished(workdirs["latest"], 3) == ""
  assert train_ilora.unfinished(workdirs["latest"], 2) == ""
  assert train_ilora.unfinished(workdirs["empty"], 5) == ""
  assert train_ilora.unfinished(workdirs["best"], 5) == ""  # Selected weights alone: no run.
  # The steps the checkpoint records, not those of an evaluation's config (other data, say).
  for config_steps in (3, 12):
    assert train_ilora.unfinished(workdirs["recorded"], config_steps) == (
      " (an unfinished run: trained 3 of 6 steps)"
    )


# ----------------------------------------------------------------------------- group metrics


def test_group_metrics_per_user_group_by_hand():
  """Rows 0-5 evaluated (row 6 of the split not): groups 1 0 1 1 0 2."""
  evaluator = types.SimpleNamespace(
    split=types.SimpleNamespace(group=np.array([1, 0, 1, 1, 0, 2, 0])),
    idx=np.arange(6),
    gates=np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]),
  )
  ranks = {"model": np.array([0, 3, 1, 7, 0, 2]), "sasrec": np.array([2, 0, 0, 6, 9, 0])}
  model_out = {"valid": [True, True, False, True, True, False],
               "hit": [True, False, False, False, True, False]}  # fmt: skip
  got = train_ilora.Evaluator._group_metrics(evaluator, model_out, ranks)
  ndcg = lambda r: 1 / math.log2(r + 2) if r < 5 else 0.0  # noqa: E731
  want = {
    # Group 0: rows 1 and 4.
    "group/0/rows": 2.0,
    "group/0/hr@1": 0.5, "group/0/hr@5": 1.0, "group/0/ndcg@5": (ndcg(3) + ndcg(0)) / 2,
    "group/0/mrr": (1 / 4 + 1) / 2,
    "group/0/valid_ratio": 1.0, "group/0/hit_ratio@1": 0.5, "group/0/hits_over_total": 0.5,
    "group/0/sasrec/hr@1": 1 / 2, "group/0/sasrec/hr@5": 1 / 2,
    "group/0/sasrec/ndcg@5": 1 / 2, "group/0/sasrec/mrr": (1 + 1 / 10) / 2,
    "group/0/gate/0": 0.375, "group/0/gate/1": 0.625,
    # Group 1: rows 0, 2, 3.
    "group/1/rows": 3.0,
    "group/1/hr@1": 1 / 3, "group/1/hr@5": 2 / 3, "group/1/ndcg@5": (ndcg(0) + ndcg(1)) / 3,
    "group/1/mrr": (1 + 1 / 2 + 1 / 8) / 3,
    "group/1/valid_ratio": 2 / 3, "group/1/hit_ratio@1": 1 / 2, "group/1/hits_over_total": 1 / 3,
    "group/1/sasrec/hr@1": 1 / 3, "group/1/sasrec/hr@5": 2 / 3,
    "group/1/sasrec/ndcg@5": (ndcg(2) + ndcg(0)) / 3, "group/1/sasrec/mrr": (1 / 3 + 1 + 1 / 7) / 3,
    "group/1/gate/0": 0.5, "group/1/gate/1": 0.5,
    # Group 2: row 5.
    "group/2/rows": 1.0,
    "group/2/hr@1": 0.0, "group/2/hr@5": 1.0, "group/2/ndcg@5": ndcg(2), "group/2/mrr": 1 / 3,
    "group/2/valid_ratio": 0.0, "group/2/hit_ratio@1": 0.0, "group/2/hits_over_total": 0.0,
    "group/2/sasrec/hr@1": 1.0, "group/2/sasrec/hr@5": 1.0, "group/2/sasrec/ndcg@5": 1.0,
    "group/2/sasrec/mrr": 1.0,
    "group/2/gate/0": 0.9, "group/2/gate/1": 0.1,
  }  # fmt: skip
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key] == pytest.approx(value), key
    assert type(got[key]) is (int if key.endswith("/rows") else float), key  # Python's, for JSON


def test_group_metrics_leave_out_what_was_not_computed():
  evaluator = types.SimpleNamespace(
    split=types.SimpleNamespace(group=np.array([4, 4, 5])), idx=np.arange(3), gates=None
  )
  got = train_ilora.Evaluator._group_metrics(
    evaluator, {"valid": []}, {"model": np.array([0, 1, 2])}
  )
  assert set(got) == {
    f"group/{g}/{k}" for g in (4, 5) for k in ("rows", "hr@1", "hr@5", "ndcg@5", "mrr")
  }
  assert got["group/4/hr@1"] == 0.5 and got["group/5/rows"] == 1
  assert isinstance(got["group/5/rows"], int)  # A count (summary.md: "1", not "1.0000").
  only_generation = train_ilora.Evaluator._group_metrics(
    evaluator, {"valid": [True, False, True], "hit": [True, False, False]}, {}
  )
  assert only_generation == {
    "group/4/rows": 2.0, "group/4/valid_ratio": 0.5, "group/4/hit_ratio@1": 1.0,
    "group/4/hits_over_total": 0.5,
    "group/5/rows": 1.0, "group/5/valid_ratio": 1.0, "group/5/hit_ratio@1": 0.0,
    "group/5/hits_over_total": 0.0,
  }  # fmt: skip


def test_group_metrics_take_the_groups_of_the_evaluated_rows():
  """Rows 5, 0 and 3 of a split evaluated, in that order: groups 1, 0, 1."""
  evaluator = types.SimpleNamespace(
    split=types.SimpleNamespace(group=np.array([0, 1, 0, 1, 2, 1])),
    idx=np.array([5, 0, 3]),
    gates=np.array([[1.0, 0.0], [0.2, 0.8], [0.5, 0.5]]),
  )
  model_out = {"valid": [True, True, False], "hit": [True, False, False]}
  got = train_ilora.Evaluator._group_metrics(evaluator, model_out, {"model": np.array([0, 2, 7])})
  want = {
    "group/0/rows": 1.0, "group/0/hr@1": 0.0, "group/0/hr@5": 1.0, "group/0/mrr": 1 / 3,
    "group/0/valid_ratio": 1.0, "group/0/hits_over_total": 0.0,
    "group/0/gate/0": 0.2, "group/0/gate/1": 0.8,
    "group/1/rows": 2.0, "group/1/hr@1": 0.5, "group/1/hr@5": 0.5, "group/1/mrr": 9 / 16,
    "group/1/valid_ratio": 0.5, "group/1/hit_ratio@1": 1.0, "group/1/hits_over_total": 0.5,
    "group/1/gate/0": 0.75, "group/1/gate/1": 0.25,
  }  # fmt: skip
  assert not any(k.startswith("group/2/") for k in got)
  for key, value in want.items():
    assert got[key] == pytest.approx(value), key


def test_past_positions_warns_of_a_prompt_longer_than_the_models_positions():
  """A training batch whose longest real prompt (attention ones, padding left out) runs past
  max_position_embeddings trained without a word (the planner and bench warn of theirs)."""
  attention = np.zeros((2, 3, 64), np.int32)  # [accum, micro, time]
  attention[0, 1, :40] = 1
  attention[1, 2, :50] = 1
  host = {"input_ids": np.zeros_like(attention), "attention": attention}
  assert train_ilora.past_positions(host, 50) is None  # Padding to 64 is not a prompt.
  assert train_ilora.past_positions(host, 49) == (
    "warning: a training prompt with its answer has 50 tokens, past the LLM's "
    "max_position_embeddings=49: it trains as given, but the model was never trained at those "
    "positions (fewer or shorter titles: data.max_len)"
  )
  assert train_ilora.past_positions(host, None) is None
  assert train_ilora.past_positions({"input_ids": attention}, 10) is None  # No mask: unknown.
