"""`train_ilora.Evaluator` on the host side: batching, row order, the paper's generation metric
(valid_ratio, hit_ratio@1 from the generated text, as REFERENCE.md defines them), candidate
ranks, the loss and the predictions file, checked against hand-worked values.

The model passes are scripted: a fake prompt builder and tokenizer, and stubs of the jitted
passes that answer per real row (found from the prompt's history and candidates), so the
evaluator's own bookkeeping is what is tested, in under a second."""

import hashlib
import json
import types

import ml_collections
import numpy as np
import pytest

from ilora_jax import report, train_ilora
from ilora_jax.data import Split

N_ITEMS, ROWS, MAX_LEN, N_CANDS = 12, 11, 5, 6
TITLES = {i: f"Movie {chr(65 + i) * 2}" for i in range(N_ITEMS)}  # None inside another.
NOTHING, NEWLINE = 50, 51  # Token ids of a word that names no title, and of a newline.
GEN_CASES = 5  # Row r's scripted answer is case r % 5 (model) or (r + 2) % 5 (base).


def _ntok(item):
  """Answer tokens of an item: 1 to 3, and 10 for the last item."""
  return 10 if item == N_ITEMS - 1 else 1 + item % 3


def _decode(ids, skip_special_tokens=True):
  words = {NOTHING: "nothing", NEWLINE: "\n"}
  return " ".join(TITLES[i - 1] if 1 <= i <= N_ITEMS else words.get(i, "") for i in ids)


def _split():
  rng = np.random.default_rng(7)
  len_seq = rng.integers(1, MAX_LEN + 1, ROWS).astype(np.int32)
  seq = np.full((ROWS, MAX_LEN), N_ITEMS, np.int32)
  nxt = np.zeros(ROWS, np.int32)
  for r in range(ROWS):
    items = rng.choice(N_ITEMS, len_seq[r] + 1, replace=False)
    seq[r, : len_seq[r]], nxt[r] = items[:-1], items[-1]
  return Split("val", seq, len_seq, nxt)


class _Builder:
  """What evaluation reads of a `PromptBuilder`: titles, answer tokens and batches that
  remember their rows (each row's id found from its history and candidates)."""

  titles = TITLES
  pad_id = 0
  templates = ("t0", "t1", "t2")  # Only their count is read.

  def __init__(self):
    self.row_of: dict = {}

  def target_tokens(self, item):
    return [100 + item] * _ntok(item)

  def batch(self, rows, template, hybrid, pad_left=False):
    ids = np.array([self.row_of[(tuple(h), tuple(c))] for h, c, _ in rows])
    targets = [t for _, _, t in rows]
    return types.SimpleNamespace(
      row=ids, hybrid=hybrid, template=template, pad_left=pad_left, targets=targets,
      input_ids=np.zeros((len(rows), 3), np.int32), attention=np.ones((len(rows), 3), np.int32),
      as_dict=lambda: {"row": ids, "targets": targets},
    )  # fmt: skip


def _config(**ilora):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(
    {"name": "movielens", "num_candidates": N_CANDS, "candidate_seed": 3}
  )
  c.ilora = ml_collections.ConfigDict(
    dict(
      eval_rows=10,
      eval_batch_size=4,
      eval_sort=True,
      eval_generate=True,
      eval_score=True,
      eval_shared_prefill=True,
      eval_base=True,
      max_new_tokens=8,
      score_chunk=4,
      score_packed=True,
    )  # fmt: skip
  )
  c.ilora.update(ilora)
  return c


def _parts():
  model = types.SimpleNamespace(
    module="adapted", base_module="base", tokenizer=types.SimpleNamespace(decode=_decode)
  )
  return types.SimpleNamespace(n_items=N_ITEMS, eligible=None, builder=_Builder(), model=model)


def _answer(ev, r, case):
  """Row r's scripted answer tokens for a case, and trailing tokens past its length that
  would change its outcome if read: (tokens, junk)."""
  cands, t = ev.cands[r], int(ev.target[r])
  target, other = int(cands[t]) + 1, int(cands[(t + 1) % N_CANDS]) + 1
  return {
    0: ([target, NEWLINE, other], [other]),  # The target on the first line: valid, a hit.
    1: ([other], [target]),  # Another candidate: valid, no hit.
    2: ([target, other], []),  # Two candidates: not valid.
    3: ([NOTHING, NEWLINE, target], []),  # The target, but not on the first line: not valid.
    4: ([NEWLINE, target], [other]),  # A leading blank line is skipped: valid, a hit.
  }[case]


VALID = {0: True, 1: True, 2: False, 3: False, 4: True}  # By hand, from REFERENCE.md.
HIT = {0: True, 1: False, 2: False, 3: False, 4: True}


class Scripted:
  """Stubs for the jitted passes: per real row, fixed candidate scores (with ties), gates,
  SASRec scores, per-row NLL, and the scripted answers."""

  def __init__(self, ev, split, frozen):
    rng = np.random.default_rng(1)
    self.ev, self.frozen = ev, frozen
    # Scores on a grid of eighths, so ties are exact; rows 0, 3, 6, 9 tie the target with
    # one or two other candidates.
    self.tables = {k: np.round(rng.normal(size=(ROWS, N_CANDS)) * 8) / 8 for k in ("m", "b", "s")}
    for r in range(0, ROWS, 3):
      t = int(ev.target[r])
      for k in range(1 + r % 2):
        self.tables["m"][r, (t + 1 + k) % N_CANDS] = self.tables["m"][r, t]
    self.tables["b"] += 0.5  # Its target scores sum to other than the adapted model's.
    self.gates = rng.uniform(size=(ROWS, 2))
    self.nll = rng.uniform(1, 2, ROWS)
    self.seq_of = {tuple(split.seq[r]) + (int(split.len_seq[r]),): r for r in range(ROWS)}
    ev._prepare, ev._score, ev._generate = self.prepare, self.score, self.generate
    ev._generate_and_score, ev._sasrec_scores, ev._nll_sum = self.both, self.sasrec, self.nll_sum

  def prepare(self, trainable, stats, frozen, batch):
    users = zip(batch["seq"], batch["len_seq"])
    assert np.array_equal(batch["row"], [self.seq_of[tuple(s) + (int(n),)] for s, n in users])
    return "merged", self.gates[batch["row"]], "mask", "embeds"

  def _check(self, module, params, gate, prompt):
    base = module == "base"
    assert prompt.hybrid != base and prompt.pad_left
    np.testing.assert_array_equal(prompt.template, self.ev.templates[prompt.row])
    assert all(t is None for t in prompt.targets)  # No answer in an evaluation prompt.
    assert params == (self.frozen["llm"] if base else "merged")
    assert (gate is None) if base else np.array_equal(gate, self.gates[prompt.row])
    return base

  def score(self, module, params, gate, mask, embeds, prompt, cands):
    base = self._check(module, params, gate, prompt)
    assert np.array_equal(cands, self.ev.cands[prompt.row])
    return self.tables["b" if base else "m"][prompt.row].astype(np.float32)

  def generate(self, params, gate, mask, embeds, prompt, base):
    assert self._check("base" if base else "adapted", params, gate, prompt) == base
    answers = [_answer(self.ev, r, (r + 2 * base) % GEN_CASES) for r in prompt.row]
    width = max(len(a) + len(j) for a, j in answers)
    ids = np.zeros((len(answers), width), np.int32)
    for i, (a, j) in enumerate(answers):
      ids[i, : len(a) + len(j)] = a + j
    return ids, np.array([len(a) for a, _ in answers], np.int32)

  def both(self, module, params, gate, mask, embeds, prompt, cands):
    s = self.score(module, params, gate, mask, embeds, prompt, cands)
    return (*self.generate(params, gate, mask, embeds, prompt, module == "base"), s)

  def sasrec(self, frozen, seq, len_seq, cands):
    rows = [self.seq_of[tuple(s) + (int(n),)] for s, n in zip(seq, len_seq)]
    assert np.array_equal(cands, self.ev.cands[rows])
    return self.tables["s"][rows]

  def nll_sum(self, trainable, stats, frozen, batch, rows):
    assert batch["targets"] == self.ev.split.next[batch["row"]].tolist()  # With the answers.
    real = batch["row"][:rows]
    return self.nll[real].sum(), 3 * len(real)


def _evaluator(**ilora):
  split, parts = _split(), _parts()
  ev = train_ilora.Evaluator(parts, _config(**ilora), split, "router")
  parts.builder.row_of = {
    (tuple(split.seq[r, : split.len_seq[r]].tolist()), tuple(ev.cands[r].tolist())): r
    for r in range(ROWS)
  }
  assert len(parts.builder.row_of) == ROWS
  frozen = {"llm": "frozen-llm", "sasrec": "frozen-sasrec"}
  return ev, Scripted(ev, split, frozen), frozen


def _ranks(table, target):
  """0-based ranks by hand: candidates strictly above the target plus half the others tied
  with it, rounded up (metrics.target_ranks' definition)."""
  out = []
  for row, t in zip(table, target):
    above = sum(s > row[t] for s in row)
    tied = sum(s == row[t] for s in row) - 1
    out.append(above + (tied + 1) // 2)
  return np.array(out)


def _ranking(ranks):
  return {
    "hr@1": np.mean(ranks < 1),
    "hr@5": np.mean(ranks < 5),
    "ndcg@5": np.mean([1 / np.log2(r + 2) if r < 5 else 0.0 for r in ranks]),
    "mrr": np.mean(1 / (ranks + 1)),
  }


def _generation(cases):
  n_valid = sum(VALID[c] for c in cases)
  hits = sum(HIT[c] for c in cases)
  return {"valid_ratio": n_valid / len(cases), "hit_ratio@1": hits / n_valid,
          "hits_over_total": hits / len(cases)}  # fmt: skip


def test_rows_candidates_and_length_order():
  ev, _, _ = _evaluator()
  np.testing.assert_array_equal(ev.idx, np.arange(10))  # eval_rows of the split's 11.
  assert ev.cands.shape == (ROWS, N_CANDS)
  assert all(ev.cands[r, ev.target[r]] == ev.split.next[r] for r in range(ROWS))
  # Prompt length key by hand: answer tokens of history and candidates, one per history item.
  b = ev.parts.builder
  key = [sum(len(b.target_tokens(int(i))) + 1 for i in ev.split.seq[r, : ev.split.len_seq[r]])
         + sum(len(b.target_tokens(int(c))) for c in ev.cands[r]) for r in range(10)]  # fmt: skip
  assert sorted(ev.order.tolist()) == list(range(10))
  assert [key[r] for r in ev.order] == sorted(key)
  ties = [(key[a], a) for a in ev.order]
  assert ties == sorted(ties)  # Stable: equal keys keep the split's order.
  assert not np.array_equal(ev.order, np.arange(10))
  whole, unsorted = _evaluator(eval_rows=0)[0], _evaluator(eval_sort=False)[0]
  np.testing.assert_array_equal(whole.idx, np.arange(ROWS))
  np.testing.assert_array_equal(unsorted.order, np.arange(10))
  assert _evaluator(eval_rows=50)[0].idx.tolist() == list(range(ROWS))
  # The fingerprint names the evaluated rows' candidates: it changes with the rows.
  assert whole.fingerprint != ev.fingerprint == unsorted.fingerprint
  assert len(ev.fingerprint) == 16


def test_batches_cover_each_row_once_padded_by_repeating_rows():
  ev, _, _ = _evaluator()
  o = ev.order
  got = ev.batch_rows()
  assert [take for _, take in got] == [4, 4, 2]
  want = [o[0:4], o[4:8], [o[8], o[9], o[8], o[9]]]
  for (rows, _), w in zip(got, want):
    np.testing.assert_array_equal(rows, w)
  assert ev.row_shards == 1
  ev.mesh = types.SimpleNamespace(shape={"data": 3, "fsdp": 2})
  assert ev.row_shards == 6
  got = ev.batch_rows()  # Batch size 4 rounded up to 6 rows, a multiple of the shards.
  assert [take for _, take in got] == [6, 4]
  np.testing.assert_array_equal(got[0][0], o[:6])
  np.testing.assert_array_equal(got[1][0], [*o[6:10], o[6], o[7]])
  ev.mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 5})
  assert ev.row_shards == 5 and [len(r) for r, _ in ev.batch_rows()] == [5, 5]
  ev.mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 3})  # 4 rounded up, not down.
  assert [(len(r), take) for r, take in ev.batch_rows()] == [(6, 6), (6, 4)]


def test_stop_is_asked_before_each_batch_and_abandons_the_evaluation():
  """Training's val passes `stop` (a signal arrived): asked before batches 0, 1 and 2 of the
  three; one that never says stop leaves the metrics as they are without it."""
  ev, _, frozen = _evaluator()
  asked = []
  with pytest.raises(train_ilora.EvalStopped, match="stopped before batch 1"):
    ev("trainable", "stats", frozen, False, stop=lambda i: asked.append(i) or i == 1)
  assert asked == [0, 1]
  asked.clear()
  kept = ev("trainable", "stats", frozen, False, stop=lambda i: asked.append(i) or False)
  assert asked == [0, 1, 2]
  assert kept == ev("trainable", "stats", frozen, False)


def test_a_batch_size_above_the_rows_evaluated_is_cut_to_them():
  """`ilora.eval_batch_size=256` on 10 rows padded one batch to 256 rows, 246 of them
  computed for nothing (4x the time of batch 10 in the bad-input audit's tiny run)."""
  ev, _, _ = _evaluator(eval_batch_size=256)
  [(rows, take)] = ev.batch_rows()
  assert take == 10 and len(rows) == 10  # `eval_rows` 10 of the split's 11.
  np.testing.assert_array_equal(rows, ev.order)
  ev.mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 1})  # Up to the shards: 12 rows.
  [(rows, take)] = ev.batch_rows()
  assert take == 10
  np.testing.assert_array_equal(rows, [*ev.order, *ev.order[:2]])
  ev, _, _ = _evaluator(eval_batch_size=256, eval_rows=3)  # The rows evaluated, not the split's.
  assert [(len(r), take) for r, take in ev.batch_rows()] == [(3, 3)]


def test_prompts_are_left_padded_template_0_without_answers():
  ev, _, _ = _evaluator()
  idx = np.array([3, 1])
  for hybrid in (True, False):
    p = ev.prompts(idx, hybrid)
    assert p.hybrid is hybrid and p.pad_left and p.targets == [None, None]
    np.testing.assert_array_equal(p.template, [0, 0])
    np.testing.assert_array_equal(p.row, idx)
  assert ev.prompts(idx).hybrid is True


def test_eval_template_picks_each_rows_prompt_and_joins_the_fingerprint():
  """`ilora.eval_template`: one template for every row, or (-1) one per row drawn from the
  candidate seed, as the original draws one per batch; the fingerprint that pairs runs' rows
  holds the rows' candidates, targets and templates and the templates' wording (the digest of
  the original's movie.txt, recorded in test_prompts), which code before 2026-12-07 did not
  hold: its runs' templates were others."""
  zero, _, _ = _evaluator()
  digest = hashlib.sha1(np.ascontiguousarray(zero.cands[zero.idx], np.int64).tobytes())
  digest.update(np.ascontiguousarray(zero.target[zero.idx], np.int64).tobytes())
  digest.update(np.zeros(len(zero.idx), np.int64).tobytes())  # Template 0 for every row.
  digest.update(b"234855b6f6250373")
  assert zero.fingerprint == digest.hexdigest()[:16]
  two, _, _ = _evaluator(eval_template=2)
  np.testing.assert_array_equal(two.prompts(np.array([3, 1])).template, [2, 2])
  drawn, script, frozen = _evaluator(eval_template=-1)
  want = np.random.default_rng([3, 11]).integers(3, size=ROWS)  # data.candidate_seed 3.
  np.testing.assert_array_equal(drawn.templates, want)
  assert len(set(want[:10].tolist())) == 3  # All three templates among the evaluated rows.
  np.testing.assert_array_equal(drawn.prompts(np.array([3, 1])).template, want[[3, 1]])
  assert len({zero.fingerprint, two.fingerprint, drawn.fingerprint}) == 3
  checked, check = [], script._check  # Each prompt passed must carry its rows' templates.
  script._check = lambda *args: checked.append(args[-1].row) or check(*args)
  drawn("trainable", "stats", frozen, False, baselines=True)
  assert set(np.concatenate(checked).tolist()) == set(range(10))


MODES = {  # (generate, score, shared prefill)
  "shared": (True, True, True),
  "apart": (True, True, False),
  "generate": (True, False, True),  # A shared prefill needs both modes: generation alone.
  "score": (False, True, True),
  "loss": (False, False, False),
}


@pytest.fixture(scope="module", params=list(MODES))
def called(request):
  gen, score, shared = MODES[request.param]
  ev, script, frozen = _evaluator(eval_generate=gen, eval_score=score, eval_shared_prefill=shared)
  result = ev("trainable", "stats", frozen, False, baselines=True)
  return types.SimpleNamespace(ev=ev, script=script, result=result, mode=MODES[request.param])


def test_metrics_are_the_hand_worked_ones(called):
  ev, script, result = called.ev, called.script, called.result
  gen, score, _ = called.mode
  rows, target = np.arange(10), ev.target[:10]
  want = {f"sasrec/{k}": v for k, v in _ranking(_ranks(script.tables["s"][rows], target)).items()}
  if gen:
    want.update(_generation([r % GEN_CASES for r in rows]))
    want.update(
      {f"base/{k}": v for k, v in _generation([(r + 2) % GEN_CASES for r in rows]).items()}
    )
  if score:
    want.update(_ranking(_ranks(script.tables["m"][rows], target)))
    want.update(
      {f"base/{k}": v for k, v in _ranking(_ranks(script.tables["b"][rows], target)).items()}
    )
    # The loss: minus the target's score summed, per answer token of the next items.
    tokens = sum(_ntok(int(ev.split.next[r])) for r in rows)
    want["loss"] = -sum(script.tables["m"][r, target[r]] for r in rows) / tokens
  else:
    want["loss"] = script.nll[rows].sum() / (3 * 10)  # Padding rows left out.
  assert set(result) == set(want)
  for key, value in want.items():
    assert result[key] == pytest.approx(value, rel=1e-6), key
  base = {"prepare"} if gen or score else set()
  if gen and score and called.mode[2]:
    base |= {"generate+score"}
  else:
    base |= {m for m, on in (("generate", gen), ("score", score)) if on}
  loss = {"loss"} if not score else set()
  assert set(ev.timings) == base | {f"base_{m}" for m in base - {"prepare"}} | loss
  if gen:
    # Answers' own lengths (junk past them not counted), real rows only.
    assert ev.generated_tokens == sum(len(_answer(ev, r, r % GEN_CASES)[0]) for r in rows)
  else:
    assert ev.generated_tokens == 0


def test_per_row_results_come_back_in_the_splits_order(called):
  ev, script = called.ev, called.script
  gen, score, _ = called.mode
  rows = np.arange(10)
  if gen or score:
    np.testing.assert_allclose(ev.gates, script.gates[rows])
  else:
    assert ev.gates is None
  if score:
    np.testing.assert_array_equal(ev.scores["model"], script.tables["m"][rows])
    np.testing.assert_array_equal(ev.scores["base"], script.tables["b"][rows])
  else:
    assert ev.scores == {}
  got = ev.rows
  assert [g["row"] for g in got] == list(range(10))
  for r, g in zip(rows, got):
    nxt = int(ev.split.next[r])
    assert g["next"] == nxt and g["title"] == TITLES[nxt]
    rank = {k: int(_ranks(script.tables[k][[r]], ev.target[[r]])[0]) for k in "msb"}
    assert g["sasrec/rank"] == rank["s"]
    if score:
      assert g["rank"] == rank["m"] and g["base/rank"] == rank["b"]
    else:
      assert "rank" not in g and "base/rank" not in g
    if gen:
      for prefix, case in (("", r % GEN_CASES), ("base/", (r + 2) % GEN_CASES)):
        assert g[prefix + "valid"] is VALID[case] and g[prefix + "hit"] is HIT[case], (r, prefix)
        assert g[prefix + "generated"] == _decode(_answer(ev, r, case)[0])
    else:
      assert "generated" not in g and "valid" not in g


@pytest.mark.parametrize("mode", list(MODES))
def test_baselines_of_the_same_frozen_weights_are_reused_not_run_again(mode):
  gen, score, shared = MODES[mode]
  ev, script, frozen = _evaluator(eval_generate=gen, eval_score=score, eval_shared_prefill=shared)
  calls = {"base": 0, "sasrec": 0}
  passes = {n: getattr(ev, n) for n in ("_score", "_generate", "_generate_and_score")}

  def counted(name):
    def run(*args):  # The base model: module "base" first, or `_generate`'s flag last.
      calls["base"] += args[0] == "base" or args[-1] is True
      return passes[name](*args)

    return run

  def sasrec(*args):
    calls["sasrec"] += 1
    return script.sasrec(*args)

  for name in passes:
    setattr(ev, name, counted(name))
  ev._sasrec_scores = sasrec
  first = ev("trainable", "stats", frozen, False, baselines=True)
  first_rows, ran = ev.rows, dict(calls)
  assert ran == {"base": 3 * (gen or score) * (1 + (gen and score and not shared)), "sasrec": 3}
  ev("trainable", "stats", frozen, False)  # An epoch's evaluation between the two.
  script.tables["m"] = -script.tables["m"]  # Other adapters: the model's scores negated.
  second = ev("trainable", "stats", frozen, False, baselines=True)
  assert calls == ran  # Neither baseline ran again ...
  kept = [k for k in first if k.startswith(("base/", "sasrec/"))]
  assert kept and {k: second[k] for k in kept} == {k: first[k] for k in kept}  # ... but kept.
  assert not any("base" in k for k in ev.timings)
  if score:  # The adapted model did run again, on its new scores.
    rows, target = np.arange(10), ev.target[:10]
    for key, value in _ranking(_ranks(script.tables["m"][rows], target)).items():
      assert second[key] == pytest.approx(value, rel=1e-6), key
    assert second["mrr"] != first["mrr"]
  per_row = ("base/generated", "base/valid", "base/hit", "base/rank", "sasrec/rank")
  for _ in range(2):  # Kept as they were: reused again, still each row's own.
    for a, b in zip(first_rows, ev.rows, strict=True):
      assert {k: a[k] for k in per_row if k in a} == {k: b[k] for k in per_row if k in b}
    assert ev("trainable", "stats", frozen, False, baselines=True) == second
  assert calls == ran
  # Another frozen tree (equal, not the same object) runs them again.
  third = ev("trainable", "stats", dict(frozen), False, baselines=True)
  assert calls == {k: 2 * v for k, v in ran.items()}
  assert {k: third[k] for k in kept} == {k: first[k] for k in kept}


def test_without_baselines_no_sasrec_or_base_model():
  ev, _, frozen = _evaluator()
  result = ev("trainable", "stats", frozen, False)
  assert "hr@1" in result and "valid_ratio" in result
  assert not any(k.startswith(("base/", "sasrec/")) for k in result)
  assert not any("base" in k for k in ev.timings) and set(ev.scores) == {"model"}
  ev, _, frozen = _evaluator(eval_base=False)
  result = ev("trainable", "stats", frozen, False, baselines=True)
  assert "sasrec/hr@1" in result and not any(k.startswith("base/") for k in result)
  ev, _, frozen = _evaluator(eval_score=False)  # Generation alone: rows without ranks.
  ev("trainable", "stats", frozen, False)
  got = ev.rows
  assert [g["valid"] for g in got] == [VALID[r % GEN_CASES] for r in range(10)]
  assert not any("rank" in k for g in got for k in g)


def test_fingerprint_names_the_evaluated_rows_candidates_and_targets(monkeypatch):
  ev, _, _ = _evaluator()
  split = ev.split
  # The same first 10 rows in a split of 10: the same candidates, so the same fingerprint.
  ten = Split("val", split.seq[:10], split.len_seq[:10], split.next[:10])
  assert train_ilora.Evaluator(ev.parts, ev.config, ten, "router").fingerprint == ev.fingerprint
  cands = np.tile(np.arange(N_CANDS), (ROWS, 1))
  prints = []
  for first in (0, 1):  # The same candidates, another target in row 0.
    target = np.zeros(ROWS, np.int64)
    target[0] = first
    monkeypatch.setattr(train_ilora, "sample_candidates", lambda *a, t=target: (cands, t))
    prints.append(train_ilora.Evaluator(ev.parts, ev.config, split, "router").fingerprint)
  assert prints[0] != prints[1]


def test_each_prediction_names_its_row_of_the_split_file():
  """Rows that `data.min_len` left out shifted every later row: `row` counted the rows kept,
  not the file's rows. It is the file's row where the split came from a file."""
  ev, _, frozen = _evaluator()
  file_row = np.arange(ROWS) * 3 + 2  # Two rows left out before each row kept.
  ev.split = Split(ev.split.name, ev.split.seq, ev.split.len_seq, ev.split.next,
                   file_row=file_row)  # fmt: skip
  ev("trainable", "stats", frozen, False, baselines=True)
  assert [r["row"] for r in ev.rows] == file_row[:10].tolist()
  assert [r["next"] for r in ev.rows] == ev.split.next[:10].tolist()


def test_predictions_file_holds_the_head_then_each_row_in_order(tmp_path):
  ev, _, frozen = _evaluator()
  train_ilora.write_predictions(str(tmp_path), "test", ev, {})  # Before any evaluation.
  with open(report.predictions_path(str(tmp_path), "test")) as f:
    assert [json.loads(line)["rows"] for line in f] == [0]
  result = ev("trainable", "stats", frozen, False, baselines=True)
  train_ilora.write_predictions(str(tmp_path), "val", ev, {**result, "n": np.int64(3)})
  with open(report.predictions_path(str(tmp_path), "val")) as f:
    lines = [json.loads(line) for line in f]
  head, rows = lines[0], lines[1:]
  assert head["split"] == "val" and head["candidates"] == ev.fingerprint and head["rows"] == 10
  assert head["metrics"]["hr@1"] == pytest.approx(result["hr@1"]) and head["metrics"]["n"] == 3
  assert [r["row"] for r in rows] == list(range(10))
  assert [r["valid"] for r in rows] == [VALID[r % GEN_CASES] for r in range(10)]
  assert [r["next"] for r in rows] == ev.split.next[:10].tolist()


def test_jitted_loss_sum_leaves_out_padding_rows_and_sasrec_scores_pick_candidates(monkeypatch):
  """The two small jitted passes, their model calls stubbed: the NLL sum and token count of
  the real rows only; SASRec's score of each candidate, in the candidates' order."""
  import jax.numpy as jnp

  ev = train_ilora.Evaluator(_parts(), _config(), _split(), "router")  # Its own passes.
  nll = np.arange(12, dtype=np.float32).reshape(3, 4)
  valid = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]], bool)
  monkeypatch.setattr(
    train_ilora, "target_nll", lambda parts, kind, tr, st, fr, batch, key, train: (
      batch["nll"], batch["valid"], None, None)
  )  # fmt: skip
  batch = {"nll": jnp.asarray(nll), "valid": jnp.asarray(valid)}
  for rows, total, count in ((2, 0 + 1 + 5 + 6 + 7, 5), (3, 19 + 8 + 9 + 10 + 11, 9)):
    got = ev._nll_sum({}, {}, {}, batch, rows)
    assert (float(got[0]), int(got[1])) == (total, count), rows
  logits = np.arange(2 * N_ITEMS, dtype=np.float32).reshape(2, N_ITEMS) ** 2
  ev.parts.sasrec = types.SimpleNamespace(apply=lambda params, seq, len_seq: jnp.asarray(logits))
  cands = np.array([[3, 0, 7], [11, 2, 2]], np.int32)
  got = ev._sasrec_scores({"sasrec": None}, None, None, jnp.asarray(cands))
  np.testing.assert_array_equal(got, [[9, 0, 49], [23**2, 14**2, 14**2]])


def test_scoring_inputs_pad_titles_to_one_length_for_the_split():
  """Packed, every batch's titles pad to the split's longest (10 tokens, to 16); in chunks, to
  the batch's own longest; with each candidate's tokens in place and the packed length."""
  ev = train_ilora.Evaluator(_parts(), _config(), _split(), "router")
  short = np.array([r for r in range(10) if N_ITEMS - 1 not in ev.cands[r]][:2])
  assert len(short) == 2 and any(N_ITEMS - 1 in ev.cands[r] for r in range(10))
  prompt = types.SimpleNamespace(input_ids=np.ones((2, 3)), attention=np.ones((2, 3)))
  cands = ev.cands[short]
  for packed, width in ((True, 16), (False, 8)):
    ev.config.ilora.score_packed, ev._title_slots = packed, None
    arrays, kw = ev._scoring_inputs(prompt, cands, "gate", "mask", "embeds")
    ids, attention, ctoks, cmask = arrays
    assert ids is prompt.input_ids and attention is prompt.attention
    assert ctoks.shape == cmask.shape == (2, N_CANDS, width)
    for j in range(2):
      for k, c in enumerate(cands[j]):
        n = _ntok(int(c))
        assert ctoks[j, k, :n].tolist() == [100 + c] * n and ctoks[j, k, n:].sum() == 0
        assert cmask[j, k].tolist() == [1] * n + [0] * (width - n)
    assert (kw["gate_weights"], kw["replace_mask"], kw["replace_embeds"]) == (
      "gate",
      "mask",
      "embeds",
    )
    assert kw["chunk"] == 3  # The largest divisor of 6 candidates up to score_chunk=4.
    most = max(sum(_ntok(int(c)) for c in row) for row in cands)
    assert kw["packed_len"] == (-(-most // 32) * 32 if packed else None)


def test_model_passes_get_the_prompts_settings_and_stops(monkeypatch):
  """`_generate`, `_score` and `_generate_and_score` hand the model the prompts, at most
  `ilora.max_new_tokens` new tokens, the base flag, and the original's stops: end of text
  but never as the first token (min_new_tokens=1); their results come back as numpy."""
  import jax.numpy as jnp

  from ilora_jax import scoring

  parts = _parts()
  parts.newline_ids = ()
  parts.model.eos_ids, parts.model.pad_id, parts.model.unroll_decode = [7, 9], 0, False
  ev = train_ilora.Evaluator(parts, _config(max_new_tokens=5), _split(), "router")
  prompt = types.SimpleNamespace(input_ids=np.ones((2, 3)), attention=np.ones((2, 3)))
  stops = {"eos_ids": (7, 9), "line_end_ids": (), "blank_ids": (), "min_new_tokens": 1}
  seen = {}

  def generate_ids(ids, attention, max_new, **kw):
    seen.update(kw, max_new=max_new, ids=ids, attention=attention)
    return "ids", "lengths"

  parts.model.generate_ids = generate_ids
  for base in (False, True):
    assert ev._generate("p", "g", "m", "e", prompt, base) == ("ids", "lengths")
    assert seen.pop("ids") is prompt.input_ids and seen.pop("attention") is prompt.attention
    assert seen == {"max_new": 5, "params": "p", "gate_weights": "g", "replace_mask": "m",
                    "replace_embeds": "e", "base": base, **stops}  # fmt: skip
  scores = jnp.arange(2 * N_CANDS, dtype=jnp.float32).reshape(2, N_CANDS)

  def loglik(module, params, ids, attention, ctoks, cmask, **kw):
    assert (module, params, ids, kw["gate_weights"]) == ("mod", "p", prompt.input_ids, "g")
    return scores

  def both(module, params, ids, attention, ctoks, cmask, **kw):
    assert kw["max_new_tokens"] == 5 and kw["pad_id"] == 0 and kw["unroll"] is False
    assert {k: kw[k] for k in stops} == stops and module == "mod" and params == "p"
    return jnp.ones((2, 4), jnp.int32), jnp.array([1, 4]), scores

  monkeypatch.setattr(scoring, "candidate_loglik", loglik)
  monkeypatch.setattr(scoring, "generate_and_score", both)
  got = ev._score("mod", "p", "g", "m", "e", prompt, ev.cands[:2])
  assert isinstance(got, np.ndarray) and got.tolist() == np.asarray(scores).tolist()
  assert ev.rows_per_device == 2
  ids, lengths, got = ev._generate_and_score("mod", "p", "g", "m", "e", prompt, ev.cands[:2])
  assert all(isinstance(a, np.ndarray) for a in (ids, lengths, got))
  assert lengths.tolist() == [1, 4] and got.tolist() == np.asarray(scores).tolist()
