"""Scoring evaluation: rank the candidates by the model's log-likelihood of each title.

For a batch of prompts and `n` candidate continuations per prompt (title tokens + newline),

  score[b, c] = sum_j log p(cand[b, c, j] | prompt[b], cand[b, c, :j]).

The prompt is run once (one prefill into a KV cache); the cache is then repeated for a chunk
of candidates and all their tokens go through one cached forward pass, so a row costs one
prompt pass plus `n` short continuations instead of `n` full passes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ilora_jax import llama

Array = jax.Array


def pad_candidates(token_lists: list[list[list[int]]], pad_id: int, multiple_of: int = 8):
  """[rows][cands][tokens] -> (tokens [rows, cands, L] int32, mask [rows, cands, L] int32)."""
  longest = max(len(c) for row in token_lists for c in row)
  length = -(-longest // multiple_of) * multiple_of
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


@functools.partial(jax.jit, static_argnames=("module", "chunk"))
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
    chunk: candidates per cached pass (memory: the cache is repeated `chunk` times).
  """
  b, t = prompt.shape
  _, n, cl = cands.shape
  if n % chunk:
    chunk = 1  # Static fallback keeps shapes whole.
  cache = llama.init_cache(module.config, b, t + cl)
  logits, cache = module.apply(
    {"params": params},
    prompt,
    prompt_mask,
    gate_weights=gate_weights,
    replace_mask=replace_mask,
    replace_embeds=replace_embeds,
    cache=cache,
    head_positions=jnp.full((b,), t - 1, jnp.int32),  # Left-padded: the last column is real.
    prefill=True,
  )
  first = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)  # [b, v]
  gates = None if gate_weights is None else jnp.repeat(gate_weights, chunk, axis=0)
  big = _repeat_cache(cache, chunk)

  def one_chunk(carry, inputs):
    toks, mask = inputs  # [b, chunk, cl]
    flat_t = toks.reshape(b * chunk, cl)
    flat_m = mask.reshape(b * chunk, cl)
    out, _ = module.apply({"params": params}, flat_t, flat_m, gate_weights=gates, cache=big)
    logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)  # [b*chunk, cl, v]
    # Token j is predicted at position j - 1; token 0 by the prompt's last position.
    later = jnp.take_along_axis(logp[:, :-1], flat_t[:, 1:, None], axis=-1)[..., 0]
    head = jnp.take_along_axis(
      jnp.repeat(first, chunk, axis=0), flat_t[:, :1], axis=-1
    )  # [b*chunk, 1]
    per_token = jnp.concatenate([head, later], axis=1) * flat_m  # [b*chunk, cl]
    return carry, per_token.sum(-1).reshape(b, chunk)

  steps = n // chunk
  toks = cands.reshape(b, steps, chunk, cl).transpose(1, 0, 2, 3)
  masks = cand_mask.reshape(b, steps, chunk, cl).transpose(1, 0, 2, 3)
  _, scores = jax.lax.scan(one_chunk, None, (toks, masks))  # [steps, b, chunk]
  return scores.transpose(1, 0, 2).reshape(b, n)
