"""Tokenizers for the base LLM, built without torch.

* GGUF files: a byte-level BPE `tokenizers.Tokenizer` rebuilt from the GGUF metadata
  (`tokenizer.ggml.model == 'gpt2'`, as used by SmolLM2), wrapped in
  `transformers.PreTrainedTokenizerFast`.
* Hugging Face folders: `transformers.AutoTokenizer`.
* A tiny byte-level tokenizer that needs no files.

Also the iLoRA special tokens and the matching growth of embedding / LM-head rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ilora_jax.errors import UserError
from ilora_jax.files import atomic_write
from ilora_jax.llama import LlamaConfig

ILORA_TOKENS = ("[PH]", "[HistoryEmb]", "[CansEmb]", "[ItemEmb]")
PAD_TOKEN = "[PAD]"
# `config.llm.bos`: when prompts start with the tokenizer's BOS token.
BOS_RULES = ("auto", "always", "never")

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool = True):
  return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


# The pre-tokenizer types llama.cpp reads as Llama 3's: besides its splitting, a word that is
# itself a token is taken whole (merges ignored), and a BOS is added unless the file says not.
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")


def _pre_tokenizer(pre: str | None):
  """The pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` type."""
  if pre in ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b"):
    # Digits are split one by one, then GPT-2 byte-level splitting.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])
  if pre in (*_LLAMA3_PRE, "smaug-bpe", "dbrx"):
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
        _byte_level(use_regex=False),
      ]
    )
  if pre not in (None, "default", "gpt-2", "gpt2"):
    # Splitting text otherwise than the model was trained to see it: prompts it never read.
    raise NoTokenizer(
      f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre): only smollm, llama-bpe "
      "and gpt2 splitting (and their kin) are rebuilt; load the model from a Hugging Face "
      "folder instead"
    )
  return _byte_level()


def _wrap(tk: Tokenizer, bos: str | None, eos: str | None, unk: str | None, pad: str | None):
  from transformers import PreTrainedTokenizerFast

  kwargs = {
    k: v
    for k, v in dict(bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad).items()
    if v is not None
  }
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
  tok.padding_side = "left"
  return tok


_GGUF_CACHE: dict[tuple, tuple[str, tuple]] = {}  # (path, size, mtime) -> (json, specials)

# Where GGUF tokenizers rebuilt once are kept for later processes ('' = nowhere).
CACHE_ENV = "ILORA_JAX_TOKENIZER_CACHE"
DEFAULT_CACHE = "~/.cache/ilora_jax/tokenizers"
_CACHE_FORMAT = 1


def _file_key(path: str | None) -> tuple | None:
  if not path or not os.path.isfile(path):
    return None
  stat = os.stat(path)
  return (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _builder_version() -> list[str]:
  """The `tokenizers` version and a digest of this module's source (read once)."""
  import tokenizers

  with open(__file__, "rb") as f:
    return [tokenizers.__version__, hashlib.sha256(f.read()).hexdigest()[:16]]


def _disk_key(key: tuple) -> list:
  """A disk entry's key: the file's key and `_builder_version`, so an entry made by other
  tokenizer-building code is never used."""
  return [*key, *_builder_version()]


def _cache_file(disk_key: list) -> str | None:
  """The disk cache's file for an entry's key, or None when the cache is off."""
  folder = os.environ.get(CACHE_ENV, DEFAULT_CACHE)
  if not folder.strip():  # '' or spaces only: off, as config.compile_cache_dir.
    return None
  digest = hashlib.sha256(json.dumps(disk_key).encode()).hexdigest()[:24]
  return os.path.join(os.path.abspath(os.path.expanduser(folder)), f"gguf-{digest}.json")


def _read_cached(key: tuple) -> tuple[str, tuple] | None:
  """(tokenizer json, specials) saved for `key` by an earlier process, or None: no cache, no
  entry, or one that is unreadable or made for another file (then it is rebuilt)."""
  disk_key = _disk_key(key)
  path = _cache_file(disk_key)
  if path is None or not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      entry = json.load(f)
    if entry.get("format") != _CACHE_FORMAT or entry.get("key") != disk_key:
      return None
    return str(entry["tokenizer"]), tuple(entry["specials"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None


def _write_cached(key: tuple, json_str: str, specials: tuple) -> None:
  """Saves the rebuilt tokenizer for later processes: written whole and then renamed, so a
  reader never sees half a file. A folder that cannot be written just means no cache."""
  disk_key = _disk_key(key)
  path = _cache_file(disk_key)
  if path is None:
    return
  entry = {"format": _CACHE_FORMAT, "key": disk_key, "specials": list(specials),
           "tokenizer": json_str}  # fmt: skip
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, encoding="utf-8") as f:
      json.dump(entry, f)
  except OSError:
    pass


class NoTokenizer(UserError):
  """A readable model file that stores no tokenizer this package can rebuild."""


def tokenizer_from_gguf(path_or_reader: Any):
  """Builds a `PreTrainedTokenizerFast` from the tokenizer stored in a GGUF file.

  Reading a GGUF file's metadata and rebuilding its tokenizer take about 0.7 s for
  SmolLM2-135M on a CPU core, against 0.3 s to load the result, so the result is kept per
  file: in this process, and on disk for later ones, in the folder named by the environment
  variable ILORA_JAX_TOKENIZER_CACHE (default ~/.cache/ilora_jax/tokenizers; '' turns it
  off). An entry is keyed by the file's absolute path, size and modification time, the
  `tokenizers` version and this module's source, so a changed file is read again and a
  changed tokenizer builder builds again. Every call returns a new, independent wrapper.

  Args:
    path_or_reader: a .gguf path or an open GGUF file (`weights.open_gguf`, `gguf.GGUFReader`).

  Returns:
    The tokenizer (left padding; bos/eos/unk/pad from the GGUF metadata).

  Raises:
    NoTokenizer: the file's metadata holds no tokenizer, or one of another kind.
    UserError: the file is missing, not a GGUF file, truncated or corrupt.
  """
  from ilora_jax.weights import open_gguf

  if isinstance(path_or_reader, str):
    key, reader = _file_key(path_or_reader), None
  else:
    reader = path_or_reader
    key = _file_key(str(getattr(reader.data, "filename", "") or ""))
  if key is not None and key not in _GGUF_CACHE:
    cached = _read_cached(key)
    if cached is not None:
      try:  # A damaged entry can be JSON and no tokenizer: rebuilt below, and rewritten.
        tk = Tokenizer.from_str(cached[0])
      except Exception:  # noqa: BLE001 - the Rust parser raises a plain Exception.
        cached = None
    if cached is not None:
      _GGUF_CACHE[key] = cached
      return _wrap(tk, *cached[1])
  if key is None or key not in _GGUF_CACHE:
    reader = open_gguf(path_or_reader) if reader is None else reader
    tk, specials = _build_gguf_tokenizer(reader)
    if key is None:
      return _wrap(tk, *specials)
    _GGUF_CACHE[key] = (tk.to_str(), specials)
    _write_cached(key, *_GGUF_CACHE[key])
  json_str, specials = _GGUF_CACHE[key]
  return _wrap(Tokenizer.from_str(json_str), *specials)


def _build_gguf_tokenizer(reader) -> tuple[Tokenizer, tuple]:
  """-> (backend tokenizer, (bos, eos, unk, pad) token strings or None)."""
  from ilora_jax.weights import gguf_field, gguf_name

  name = gguf_name(reader)  # For messages.
  kind = gguf_field(reader, "tokenizer.ggml.model")
  if kind is None:
    raise NoTokenizer("its metadata has no tokenizer.ggml.model")
  if kind != "gpt2":
    raise NoTokenizer(
      f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE (gpt2) is supported; "
      "load the model from a Hugging Face folder instead"
    )
  tokens = gguf_field(reader, "tokenizer.ggml.tokens")
  merges = gguf_field(reader, "tokenizer.ggml.merges") or []
  if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
    raise UserError(f"{name}: the tokenizer's tokenizer.ggml.tokens is missing or "
                    "not a list of strings: a damaged file?")  # fmt: skip
  if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
    raise UserError(f"{name}: the tokenizer's tokenizer.ggml.merges is not a list "
                    "of 'left right' strings: a damaged file?")  # fmt: skip
  types = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  if not isinstance(types, list) or len(types) != len(tokens):
    raise UserError(
      f"{name}: the tokenizer's tokenizer.ggml.token_type does not give a type "
      f"to each of its {len(tokens)} tokens: a damaged file?"
    )
  merges = [tuple(m.split(" ", 1)) for m in merges]
  vocab: dict[str, int] = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)
  llama3 = gguf_field(reader, "tokenizer.ggml.pre") in _LLAMA3_PRE
  try:
    bpe = models.BPE(
      vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=llama3
    )
  except Exception as exc:  # noqa: BLE001 - the Rust builder raises a plain Exception.
    raise UserError(f"{name}: its tokenizer does not build ({exc})") from None
  tk = Tokenizer(bpe)
  tk.pre_tokenizer = _pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre"))
  tk.decoder = decoders.ByteLevel()
  special = [
    AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL
  ]
  user = [
    AddedToken(t, special=False, normalized=False)
    for t, k in zip(tokens, types)
    if k == _USER_DEFINED
  ]
  tk.add_special_tokens(special)
  tk.add_tokens(user)

  def token_of(key, added=False):
    """The token `key` names; None where it names none, but an error for a token that the
    tokenizer adds to every text (else prompts would silently lack it)."""
    idx = gguf_field(reader, key)
    if isinstance(idx, int) and 0 <= idx < len(tokens):
      return tokens[idx]
    if added and idx is not None:
      raise UserError(
        f"{name}: {key}={idx!r} names none of its {len(tokens)} tokens, yet the "
        "tokenizer adds that token to every text: a damaged file?"
      )
    return None

  add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", llama3))
  add_eos = bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False))
  bos = token_of("tokenizer.ggml.bos_token_id", add_bos)
  eos = token_of("tokenizer.ggml.eos_token_id", add_eos)
  add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
  if add_bos or add_eos:
    single = " ".join(([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else []))
    pair = " ".join(([bos] if add_bos else []) + ["$A", "$B:1"] + ([eos] if add_eos else []))
    specials = {t: vocab[t] for t in (bos if add_bos else None, eos if add_eos else None) if t}
    tk.post_processor = processors.TemplateProcessing(
      single=single, pair=pair, special_tokens=list(specials.items())
    )
  pad = token_of("tokenizer.ggml.padding_token_id")
  return tk, (bos, eos, token_of("tokenizer.ggml.unknown_token_id"), pad)


def byte_level_tokenizer():
  """A 259-token byte-level tokenizer needing no files: ids 0-2 are '<|endoftext|>' (unk),
  '<|im_start|>' (bos) and '<|im_end|>' (eos, pad), then the 256 byte symbols."""
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {t: i for i, t in enumerate(specials + alphabet)}
  tk = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  tk.pre_tokenizer = _byte_level()
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  return _wrap(tk, specials[1], specials[2], specials[0], specials[2])


def tokenizer_from_hf(folder: str):
  """Loads `tokenizer.json` / `tokenizer.model` from a Hugging Face folder (left padding).

  Files transformers cannot read (damaged JSON, a `tokenizer.model` it has no reader for) are
  one `UserError` naming the folder, its files and the reason; transformers' own log lines
  about them are held back."""
  from transformers import AutoTokenizer
  from transformers.utils import logging as hf_logging

  files = [
    n for n in ("tokenizer.json", "tokenizer.model") if os.path.isfile(os.path.join(folder, n))
  ]
  if not files:
    raise UserError(f"no tokenizer.json or tokenizer.model in {folder}")
  verbosity = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()
  try:
    tok = AutoTokenizer.from_pretrained(folder)
  except Exception as exc:  # noqa: BLE001 - any failure here is a file transformers can't read.
    import importlib.util

    reason = " ".join(str(exc).split())[:240]  # Its first line alone may name no reason.
    hint = ""
    if _raised_reading_config(exc):  # transformers reads config.json to pick the tokenizer.
      raise UserError(
        f"cannot load the tokenizer in {folder}: transformers, which reads it, refuses its "
        f"config.json ({type(exc).__name__}{': ' + reason if reason else ''})"
      ) from None
    if files == ["tokenizer.model"] and importlib.util.find_spec("sentencepiece") is None:
      hint = (
        "; a tokenizer.model alone needs the sentencepiece package (not installed), or give "
        "the folder the model's tokenizer.json"
      )
    raise UserError(
      f"cannot load the tokenizer in {folder} ({' and '.join(files)}): "
      f"{type(exc).__name__}{': ' + reason if reason else ''}{hint}"
    ) from None
  finally:
    hf_logging.set_verbosity(verbosity)
  tok.padding_side = "left"
  if tok.pad_token is None and tok.eos_token is not None:
    tok.pad_token = tok.eos_token
  return tok


def _raised_reading_config(exc: BaseException) -> bool:
  """Whether `exc` came from transformers' reading of a model's config.json."""
  import traceback

  names = ("configuration_utils.py", "configuration_auto.py")
  return any(frame.f_code.co_filename.endswith(names)
             for frame, _ in traceback.walk_tb(exc.__traceback__))  # fmt: skip


def add_ilora_tokens(tokenizer) -> dict[str, int]:
  """Adds '[PAD]' as the pad token and the special tokens '[PH]', '[HistoryEmb]',
  '[CansEmb]', '[ItemEmb]' (never split, skipped when decoding).

  Returns:
    {token: id} for the five tokens. Grow the model with `resize_vocab(..., len(tokenizer))`.
  """
  tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
  tokenizer.add_tokens(
    [AddedToken(t, special=True, normalized=False) for t in ILORA_TOKENS], special_tokens=True
  )
  return {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD_TOKEN, *ILORA_TOKENS)}


@functools.lru_cache(maxsize=8)
def blank_ids(tokenizer) -> tuple[int, ...]:
  """The ids whose text alone is empty or whitespace, decoded as generated answers are
  (special tokens skipped): what may come before an answer's text (`llm.greedy_decode`).
  Decodes the vocabulary once per tokenizer, through the Rust backend where the tokenizer has
  one (0.04 s for 49k tokens on a CPU core, against 0.35 s through `batch_decode`'s Python
  loop, whose clean-up of spaces before punctuation never makes a text blank or not blank)."""
  ids = [[i] for i in range(len(tokenizer))]
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    texts = backend.decode_batch(ids, skip_special_tokens=True)
  else:
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
  return tuple(i for i, text in enumerate(texts) if not text.strip())


def prompt_bos(tokenizer, rule: str = "auto") -> int | None:
  """The id that starts every prompt under `rule` (one of `BOS_RULES`), or None for none.

  `auto` follows the tokenizer: its BOS when it puts one before a text it encodes (Hugging
  Face's Llama-2 tokenizer does; the SmolLM2 GGUF's `add_bos_token` is false, so its
  prompts start with the text).
  """
  if rule not in BOS_RULES:
    raise UserError(f"config.llm.bos={rule!r} is not one of {', '.join(BOS_RULES)}")
  bos = tokenizer.bos_token_id
  if rule == "always" and bos is None:
    raise UserError("config.llm.bos=always, but the tokenizer has no BOS token")
  if rule == "never" or bos is None:
    return None
  return bos if rule == "always" or tokenizer("a")["input_ids"][:1] == [bos] else None


def _grow(table: jax.Array, extra: int, axis: int, key: jax.Array, noise: float) -> jax.Array:
  """Appends `extra` slices along `axis`: the mean slice plus noise * std * N(0, 1)."""
  table32 = table.astype(jnp.float32)
  mean = jnp.mean(table32, axis=axis, keepdims=True)
  std = jnp.std(table32)
  shape = list(table.shape)
  shape[axis] = extra
  rows = jnp.broadcast_to(mean, shape) + noise * std * jax.random.normal(key, shape)
  return jnp.concatenate([table, rows.astype(table.dtype)], axis=axis)


def resize_vocab(
  params: dict,
  config: LlamaConfig,
  new_vocab_size: int,
  *,
  key: jax.Array | None = None,
  noise: float = 0.01,
  multiple_of: int = 1,
) -> tuple[dict, LlamaConfig]:
  """Grows the embedding rows (and untied LM-head columns) to at least `new_vocab_size`.

  New rows are the mean of the existing rows plus `noise` times their std times N(0, 1).
  A tied head stays tied (it is the embedding). Never shrinks.

  Args:
    params: `Llama` params; 'embedding' is [vocab, embed], 'lm_head' (untied) [embed, vocab].
    config: their config.
    new_vocab_size: e.g. `len(tokenizer)` after `add_ilora_tokens`.
    key: PRNG key for the noise (default key 0).
    noise: relative noise scale (0 for exact mean rows).
    multiple_of: round the new size up to a multiple of this (e.g. for sharding).

  Returns:
    (params, config) with `vocab_size` updated; rows added by the rounding alone (no token
    maps to them) are left out of the logits (`logit_vocab`).
  """
  target = -(-int(new_vocab_size) // multiple_of) * multiple_of
  extra = target - config.vocab_size
  if extra <= 0:
    return params, config
  key = jax.random.key(0) if key is None else key
  k_embed, k_head = jax.random.split(key)
  params = dict(params)
  params["embedding"] = _grow(params["embedding"], extra, 0, k_embed, noise)
  if not config.tie_word_embeddings:
    params["lm_head"] = _grow(params["lm_head"], extra, 1, k_head, noise)
  used = config.logit_vocab if config.logit_vocab is not None else config.vocab_size
  used = max(used, int(new_vocab_size))
  return params, config.replace(vocab_size=target, logit_vocab=None if used == target else used)


def encode_batch(tokenizer, texts: list[str], multiple_of: int = 16) -> tuple[np.ndarray, ...]:
  """Left-pads tokenized `texts` to a length rounded up to `multiple_of`.

  Returns:
    (tokens [b, t] int32, attention_mask [b, t] int32).
  """
  ids = [tokenizer(t)["input_ids"] for t in texts]
  if any(not x for x in ids):
    bos = tokenizer.bos_token_id
    if bos is None:
      raise UserError("a prompt is empty and the tokenizer has no bos token")
    ids = [x or [bos] for x in ids]
  length = -(-max(len(x) for x in ids) // multiple_of) * multiple_of
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  tokens = np.full((len(ids), length), pad, np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for i, x in enumerate(ids):
    tokens[i, length - len(x) :] = x
    mask[i, length - len(x) :] = 1
  return tokens, mask
