"""Scoring evaluation: rank the candidates by the model's log-likelihood of each title.

For a batch of prompts and `n` candidate continuations per prompt (title tokens + newline),

  score[b, c] = sum_j log p(cand[b, c, j] | prompt[b], cand[b, c, :j]).

The prompt is run once (one prefill into a KV cache), so a row costs one prompt pass plus `n`
short continuations instead of `n` full passes. The continuations then run either

- packed (`packed_len`, the evaluation's default): a row's candidates laid end to end in one
  sequence of their real tokens, each attending to the prompt's cache and to its own earlier
  tokens only (rotary positions restart after the prompt for each), in one cached pass; or
- chunked: the cache repeated for `chunk` candidates and their tokens, each padded to the
  longest candidate of the batch, through one cached pass per chunk.

Titles differ in length, so the chunked form computes mostly padding (on LastFM, about three
of every four candidate slots) and copies the cache `chunk` times. `generate_and_score` shares
the prefill with greedy generation, where an evaluation runs both.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ilora_jax import llama, llm

Array = jax.Array


def pad_candidates(
  token_lists: list[list[list[int]]], pad_id: int, multiple_of: int = 8, at_least: int = 0
):
  """[rows][cands][tokens] -> (tokens [rows, cands, L] int32, mask [rows, cands, L] int32),
  L the longest candidate rounded up to `multiple_of`, or `at_least` if that is more."""
  longest = max(len(c) for row in token_lists for c in row)
  length = max(-(-longest // multiple_of) * multiple_of, at_least)
  rows, cands = len(token_lists), len(token_lists[0])
  tokens = np.full((rows, cands, length), pad_id, np.int32)
  mask = np.zeros((rows, cands, length), np.int32)
  for i, row in enumerate(token_lists):
    if len(row) != cands:
      raise ValueError(f"row {i} has {len(row)} candidates, expected {cands}")
    for j, cand in enumerate(row):
      tokens[i, j, : len(cand)] = cand
      mask[i, j, : len(cand)] = 1
  return tokens, mask


def _repeat_cache(cache: llama.KVCache, n: int) -> llama.KVCache:
  # Axis -4 is the batch of a stacked [layers, b, k, s, h] cache and of per-layer buffers.
  return llama.KVCache(
    k=jax.tree.map(lambda a: jnp.repeat(a, n, axis=-4), cache.k),
    v=jax.tree.map(lambda a: jnp.repeat(a, n, axis=-4), cache.v),
    mask=jnp.repeat(cache.mask, n, axis=0),
    index=cache.index,
    positions=jnp.repeat(cache.positions, n, axis=0),
  )


def chunk_for(n: int, most: int) -> int:
  """Candidates per cached pass: the largest divisor of `n` that is at most `most` (>= 1)."""
  return max(c for c in range(1, n + 1) if n % c == 0 and c <= max(most, 1))


def packed_length(cand_mask: np.ndarray, multiple_of: int = 32) -> int:
  """The packed length of candidates [rows, n, l] with mask `cand_mask`: the most real tokens
  of a row, rounded up to `multiple_of` (few shapes, few compilations)."""
  longest = int(np.asarray(cand_mask).sum(axis=(1, 2)).max())
  return -(-longest // multiple_of) * multiple_of


def _free_slots(cands: Array, packed_len: int | None) -> int:
  """Cache slots the candidates' pass writes after the prompt: one title's, or the packed row's."""
  return cands.shape[2] if packed_len is None else packed_len


def _pack(cands: Array, cand_mask: Array, length: int) -> tuple[Array, Array, Array]:
  """Each row's real candidate tokens end to end: (tokens, candidate index or -1 for padding,
  offset in its candidate), each [b, length]."""
  b, n, cl = cands.shape
  real = cand_mask.reshape(b, n * cl).astype(bool)
  dest = jnp.where(real, jnp.cumsum(real, axis=1) - 1, length)  # Padding -> out of range.
  rows = jnp.arange(b)[:, None]

  def scatter(values, fill):
    out = jnp.full((b, length), fill, jnp.int32)
    return out.at[rows, dest].set(values.reshape(b, n * cl).astype(jnp.int32), mode="drop")

  candidate = jnp.broadcast_to(jnp.arange(n)[None, :, None], (b, n, cl))
  offset = jnp.broadcast_to(jnp.arange(cl)[None, None, :], (b, n, cl))
  return scatter(cands, 0), scatter(candidate, -1), scatter(offset, 0)


@functools.partial(jax.jit, static_argnames=("module", "chunk", "packed_len"))
def candidate_loglik(
  module: llama.Llama,
  params: Any,
  prompt: Array,
  prompt_mask: Array,
  cands: Array,
  cand_mask: Array,
  *,
  gate_weights: Array | None = None,
  replace_mask: Array | None = None,
  replace_embeds: Array | None = None,
  chunk: int = 5,
  packed_len: int | None = None,
) -> Array:
  """Log-likelihood of each candidate continuation: [b, n] float32.

  Args:
    module: the (unbound) `Llama` module, static.
    params: its params.
    prompt: [b, t] int prompts, LEFT-padded per `prompt_mask` (the last column is real).
    prompt_mask: [b, t] 1 real / 0 pad.
    cands: [b, n, l] int candidate tokens, right-padded per `cand_mask`.
    cand_mask: [b, n, l] 1 real / 0 pad (every candidate has at least one token).
    gate_weights: [b, E] or None, the same for the prompt and its candidates.
    replace_mask, replace_embeds: embedding replacement in the prompt ([b, t], [b, t, d]).
    chunk: candidates per cached pass of the chunked form (memory: the cache is repeated
      `chunk` times).
    packed_len: static; the packed form with this many slots per row, or None for the
      chunked form. It must hold every row's real candidate tokens (`packed_length`): tokens
      past it are dropped, which would score their candidates too high.
  """
  first, cache = llm.prefill(
    module,
    params,
    prompt,
    prompt_mask,
    prompt.shape[1] + _free_slots(cands, packed_len),
    gate_weights=gate_weights,
    replace_mask=replace_mask,
    replace_embeds=replace_embeds,
  )
  scores, _ = loglik_after_prefill(
    module, params, first, cache, cands, cand_mask, gate_weights, chunk, packed_len
  )
  return scores


def loglik_after_prefill(
  module: llama.Llama,
  params: Any,
  first_logits: Array,
  cache: llama.KVCache,
  cands: Array,
  cand_mask: Array,
  gate_weights: Array | None,
  chunk: int,
  packed_len: int | None = None,
  keep_cache: bool = True,
) -> tuple[Array, llama.KVCache]:
  """`candidate_loglik` from a `llm.prefill`'s last-position logits [b, vocab] and cache (with
  `l`, or `packed_len`, free slots). Returns the scores [b, n] and the cache to continue the
  prompts from: the prefill's, its free slots possibly overwritten but not marked as used.
  `keep_cache` (static): the packed pass writes the given cache in place (`Llama`'s
  argument); False writes a second cache, as before 2026-12-02, which costs a cache more at
  the peak when the caller continues from it (decoding after scoring)."""
  if packed_len is not None:
    return _packed(
      module, params, first_logits, cache, cands, cand_mask, gate_weights, packed_len, keep_cache
    )
  b, n, cl = cands.shape
  if n % chunk:
    chunk = 1  # Static fallback keeps shapes whole.
  first = jax.nn.log_softmax(first_logits.astype(jnp.float32), axis=-1)  # [b, v]
  gates = None if gate_weights is None else jnp.repeat(gate_weights, chunk, axis=0)
  big = _repeat_cache(cache, chunk)

  def one_chunk(carry, inputs):
    toks, mask = inputs  # [b, chunk, cl]
    flat_t = toks.reshape(b * chunk, cl)
    flat_m = mask.reshape(b * chunk, cl)
    hidden, _ = module.apply(
      {"params": params}, flat_t, flat_m, gate_weights=gates, cache=big, return_hidden=True
    )  # [b*chunk, cl, d]
    # Token j is predicted at position j - 1; token 0 by the prompt's last position.
    later = next_logp(module.config, params, hidden, _shifted(flat_t))[:, :-1]
    head = jnp.take_along_axis(
      jnp.repeat(first, chunk, axis=0), flat_t[:, :1], axis=-1
    )  # [b*chunk, 1]
    per_token = jnp.concatenate([head, later], axis=1) * flat_m  # [b*chunk, cl]
    return carry, per_token.sum(-1).reshape(b, chunk)

  steps = n // chunk
  toks = cands.reshape(b, steps, chunk, cl).transpose(1, 0, 2, 3)
  masks = cand_mask.reshape(b, steps, chunk, cl).transpose(1, 0, 2, 3)
  _, scores = jax.lax.scan(one_chunk, None, (toks, masks))  # [steps, b, chunk]
  return scores.transpose(1, 0, 2).reshape(b, n), cache


def head_piece(length: int, most: int = 64) -> int:
  """Positions per LM-head piece of a `length`-position pass: the largest divisor of `length`
  up to `most` (the whole pass where it is no longer); where that divisor is under
  `most // 4` (a longer pass with no fitting divisor, a prime length say, would take many
  small pieces), `most` itself, the pass padded to a multiple of it."""
  if length <= most:
    return length
  piece = max(p for p in range(1, most + 1) if length % p == 0)
  return piece if piece >= most // 4 else most


def _shifted(tokens: Array) -> Array:
  """[b, L] -> each position's next token [b, L] (the last position's is a stand-in, unused)."""
  return jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)


def next_logp(
  config: llama.LlamaConfig, params: Any, hidden: Array, targets: Array, most: int = 64
) -> Array:
  """log p(targets[:, j] | position j) [b, L] from the final hidden states [b, L, d]: the LM
  head and its log-softmax in pieces of `head_piece(L, most)` positions, so that logits
  [b, piece, vocab] live at once instead of [b, L, vocab] (float32 [8, 224, vocab], a Steam
  batch's: 0.35 GB for SmolLM2's 49k vocabulary, 0.92 GB for a 128k one)."""
  b, length, d = hidden.shape
  piece = head_piece(length, most)
  n = -(-length // piece)
  if n * piece > length:  # Padded positions (zero states, token 0) are computed, then dropped.
    pad = n * piece - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))

  def one(_, inputs):
    h, tok = inputs  # [b, piece, d], [b, piece]
    logits = llama.head_logits(config, h, params["embedding"], params.get("lm_head"))
    picked = jnp.take_along_axis(logits, tok[..., None], axis=-1)[..., 0]
    return None, picked - jax.nn.logsumexp(logits, axis=-1)

  pieces = (
    hidden.reshape(b, n, piece, d).swapaxes(0, 1),
    targets.reshape(b, n, piece).swapaxes(0, 1),
  )
  _, out = jax.lax.scan(one, None, pieces)  # [n, b, piece]
  return out.swapaxes(0, 1).reshape(b, n * piece)[:, :length]


def _packed(module, params, first_logits, cache, cands, cand_mask, gate_weights, length, keep):
  """The packed form of `loglik_after_prefill` (see the module docstring)."""
  n = cands.shape[1]
  tokens, candidate, offset = _pack(cands, cand_mask, length)  # [b, L] each
  real = candidate >= 0
  # A token sees its own candidate's tokens up to itself (and the prompt, through the cache).
  attend = (candidate[:, :, None] == candidate[:, None, :]) & (
    offset[:, None, :] <= offset[:, :, None]
  )
  hidden, after = module.apply(
    {"params": params},
    tokens,
    real.astype(jnp.int32),
    gate_weights=gate_weights,
    positions=cache.positions[:, None] + offset,
    cache=cache,
    attend=attend & real[:, None, :],
    return_hidden=True,
    keep_cache=keep,
  )  # [b, L, d]
  first = jax.nn.log_softmax(first_logits.astype(jnp.float32), axis=-1)  # [b, v]
  head = jnp.take_along_axis(first, tokens, axis=1)  # [b, L]: every token after the prompt...
  # [b, L - 1]: ...or after its predecessor.
  later = next_logp(module.config, params, hidden, _shifted(tokens))[:, :-1]
  later = jnp.concatenate([jnp.zeros_like(head[:, :1]), later], axis=1)
  per_token = jnp.where(offset == 0, head, later) * real
  # Summed per candidate element-wise (a matmul with the one-hot would run at the backend's
  # default matmul precision: TF32 or bfloat16 on accelerators).
  scores = jnp.sum(per_token[:, :, None] * jax.nn.one_hot(candidate, n, dtype=per_token.dtype), 1)
  # The pass wrote the candidates' keys into the free slots; the prompt continues from there
  # with those slots still unused (decoding overwrites them, its mask marks what it writes).
  return scores, after.replace(mask=cache.mask, index=cache.index, positions=cache.positions)


@functools.partial(
  jax.jit,
  static_argnames=(
    "module",
    "max_new_tokens",
    "eos_ids",
    "pad_id",
    "chunk",
    "packed_len",
    "unroll",
    "keep_cache",
    "line_end_ids",
    "blank_ids",
    "min_new_tokens",
  ),
  compiler_options=llm.DECODE_COMPILER_OPTIONS,
)
def generate_and_score(
  module: llama.Llama,
  params: Any,
  prompt: Array,
  prompt_mask: Array,
  cands: Array,
  cand_mask: Array,
  *,
  max_new_tokens: int,
  eos_ids: tuple[int, ...],
  pad_id: int,
  gate_weights: Array | None = None,
  replace_mask: Array | None = None,
  replace_embeds: Array | None = None,
  chunk: int = 5,
  packed_len: int | None = None,
  unroll: bool = False,
  keep_cache: bool = True,
  line_end_ids: tuple[int, ...] = (),
  blank_ids: tuple[int, ...] = (),
  min_new_tokens: int = 0,
) -> tuple[Array, Array, Array]:
  """Both evaluation modes from one prefill of the prompts: greedy generation as
  `llm.generate_tokens` and candidate scores as `candidate_loglik` (same arguments), where
  separately each mode runs the prompts through the model on its own.

  `keep_cache=False` has the packed pass write a second cache instead of the prefill's in
  place (as before 2026-12-02; `bench/eval_memory.py` compares the two).

  Returns (new tokens [b, max_new_tokens], lengths [b], scores [b, n]).
  """
  first, cache = llm.prefill(
    module,
    params,
    prompt,
    prompt_mask,
    prompt.shape[1] + max(max_new_tokens, _free_slots(cands, packed_len)),
    gate_weights=gate_weights,
    replace_mask=replace_mask,
    replace_embeds=replace_embeds,
  )
  scores, cache = loglik_after_prefill(
    module, params, first, cache, cands, cand_mask, gate_weights, chunk, packed_len, keep_cache
  )
  out, lengths = llm.greedy_decode(
    module,
    params,
    first,
    cache,
    max_new_tokens=max_new_tokens,
    eos_ids=eos_ids,
    pad_id=pad_id,
    gate_weights=gate_weights,
    unroll=unroll,
    line_end_ids=line_end_ids,
    blank_ids=blank_ids,
    min_new_tokens=min_new_tokens,
  )
  return out, lengths, scores
