"""Candidate log-likelihoods from one shared prefill equal full forward passes per candidate."""

import flax
import jax
import numpy as np
import pytest
from test_lora import TINY_LLAMA  # The adapter tests' tiny Llama (2 layers, hidden 16).

from ilora_jax import llama, llm, lora, scoring


def _brute_force(model, prompt_ids, cand_ids):
  """log p(cand | prompt) from one uncached forward pass over prompt + candidate."""
  ids = np.asarray([prompt_ids + cand_ids], np.int32)
  logits = np.asarray(model.logits(ids), np.float64)[0]  # [T, v]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  start = len(prompt_ids)
  return sum(logp[start + j - 1, tok] for j, tok in enumerate(cand_ids))


def _left_padded(prompts):
  """Token lists -> (ids, mask) [rows, longest] int32, padded on the left."""
  t = max(map(len, prompts))
  ids = np.zeros((len(prompts), t), np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    ids[i, t - len(p) :] = p
    mask[i, t - len(p) :] = 1
  return ids, mask


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_shared_prefill_scores_equal_independent_passes(scan):
  model = llm.load("tiny", seed=5)
  assert model.config.scan_layers
  module, params = model.module, model.params
  if not scan:  # Per-layer cache buffers, repeated per candidate like the stacked cache.
    module = llama.Llama(model.config.replace(scan_layers=False))
    params = llm.unstack_layers(params, model.config.num_layers)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 500, n).tolist() for n in (9, 5)]
  cands = [  # Rows of other candidate lengths: 10 and 6 tokens packed.
    [rng.integers(0, 500, n).tolist() for n in lengths] for lengths in ((1, 3, 4, 2), (2, 1, 2, 1))
  ]
  prompt, mask = _left_padded(prompts)
  tokens, cmask = scoring.pad_candidates(cands, pad_id=0, multiple_of=4)
  want = np.array([[_brute_force(model, p, c) for c in row] for p, row in zip(prompts, cands)])
  for chunk in (2, 4):
    got = np.asarray(
      scoring.candidate_loglik(module, params, prompt, mask, tokens, cmask, chunk=chunk)
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Packed: each row's candidate tokens end to end in 10 or 16 slots (padding after them).
  assert scoring.packed_length(cmask, multiple_of=8) == 16
  for length in (10, 16):
    got = np.asarray(
      scoring.candidate_loglik(module, params, prompt, mask, tokens, cmask, packed_len=length)
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert jax.numpy.isfinite(got).all()


@pytest.mark.parametrize(
  "length, most, piece",
  [(12, 4, 4), (10, 4, 2), (7, 4, 1), (13, 8, 8), (13, 64, 13)],
  ids=["3_pieces", "5_pieces", "7_pieces", "2_pieces_padded", "1_piece"],
)
def test_next_token_logp_in_pieces_equals_the_full_log_softmax(length, most, piece):
  """The LM head in pieces of at most `most` positions gives each position's log-probability
  of its target as a log-softmax over the whole [b, L, vocab] logits does; a length with no
  divisor of at least `most // 4` (13, prime) is padded to whole pieces of `most`, one no
  longer than `most` is one piece."""
  model = llm.load("tiny", seed=2)
  tokens = np.random.default_rng(3).integers(0, 500, (2, length)).astype(np.int32)
  logits = np.asarray(model.logits(tokens), np.float64)  # [b, L, v]
  hidden = model.module.apply({"params": model.params}, tokens, return_hidden=True)
  targets = np.roll(tokens, -1, axis=1)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  want = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  assert scoring.head_piece(length, most) == piece
  got = scoring.next_logp(model.config, model.params, hidden, targets, most=most)
  assert got.shape == (2, length)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _greedy(model, prompt_ids, steps):
  """Greedy tokens by uncached forward passes over the growing sequence."""
  ids = list(prompt_ids)
  for _ in range(steps):
    ids.append(int(np.argmax(model.logits(np.asarray([ids], np.int32))[0, -1])))
  return ids[len(prompt_ids) :]


@pytest.fixture(scope="module")
def references():
  """A tiny model, three left-padded prompts with four candidates each, and the references:
  scores of full forward passes and 14 greedy tokens of uncached decoding per prompt."""
  model = llm.load("tiny", seed=7)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 500, n).tolist() for n in (6, 10, 8)]
  cands = [  # Rows of other candidate lengths: 11, 8 and 12 tokens packed.
    [rng.integers(0, 500, n).tolist() for n in lengths]
    for lengths in ((2, 5, 1, 3), (4, 1, 1, 2), (3, 3, 5, 1))
  ]
  prompt, mask = _left_padded(prompts)
  scores = np.array([[_brute_force(model, p, c) for c in row] for p, row in zip(prompts, cands)])
  greedy = np.array([_greedy(model, p, 14) for p in prompts])
  return model, prompt, mask, cands, scores, greedy


@pytest.mark.parametrize("unroll", [False, True], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("new", [3, 14], ids=["fewer_new_tokens", "more_new_tokens"])
@pytest.mark.parametrize("packed", [False, True], ids=["chunked", "packed"])
def test_generation_and_scores_from_one_prefill_equal_each_mode_alone(
  references, unroll, new, packed
):
  """The evaluation's shared prefill (a cache of max(new tokens, candidate slots) free slots:
  3 fewer, 14 more than the candidates' 8 chunked or 12 packed; read, and in the packed form
  written, by the candidates' passes, then written by decoding) gives each mode's own results:
  the scores of full forward passes and the tokens of uncached greedy decoding."""
  model, prompt, mask, cands, want, greedy = references
  tokens, cmask = scoring.pad_candidates(cands, pad_id=0, multiple_of=4)  # 5 -> 8 slots
  packed_len = scoring.packed_length(cmask, multiple_of=4) if packed else None
  assert packed_len in (None, 12)
  out, lengths, scores = scoring.generate_and_score(
    model.module, model.params, prompt, mask, tokens, cmask,
    max_new_tokens=new, eos_ids=(), pad_id=0, chunk=2, unroll=unroll, packed_len=packed_len,
  )  # fmt: skip
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out), greedy[:, :new])
  np.testing.assert_array_equal(np.asarray(lengths), [new] * 3)
  alone, _ = llm.generate_tokens(
    model.module, model.params, prompt, mask, max_new_tokens=new, eos_ids=(), pad_id=0
  )
  np.testing.assert_array_equal(np.asarray(out), np.asarray(alone))
  if packed and not unroll and new == 14:  # The packed pass into a second cache: the same.
    out2, _, scores2 = scoring.generate_and_score(
      model.module, model.params, prompt, mask, tokens, cmask, max_new_tokens=new, eos_ids=(),
      pad_id=0, chunk=2, packed_len=packed_len, keep_cache=False,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(scores2), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out2), greedy[:, :new])


def test_candidate_padding_lengths_and_ragged_rows():
  """[rows][cands][tokens] -> tokens and mask right-padded to the longest rounded up to
  `multiple_of`, or to `at_least` where that is longer; rows of other candidate counts are
  refused."""
  cands = [[[5, 6, 7], [8]], [[9], [1, 2]]]
  tokens, mask = scoring.pad_candidates(cands, pad_id=3, multiple_of=2)
  np.testing.assert_array_equal(
    tokens, [[[5, 6, 7, 3], [8, 3, 3, 3]], [[9, 3, 3, 3], [1, 2, 3, 3]]]
  )
  np.testing.assert_array_equal(mask, [[[1, 1, 1, 0], [1, 0, 0, 0]], [[1, 0, 0, 0], [1, 1, 0, 0]]])
  assert tokens.dtype == mask.dtype == np.int32
  assert scoring.pad_candidates(cands, pad_id=0, multiple_of=8)[0].shape == (2, 2, 8)
  assert scoring.pad_candidates(cands, pad_id=0, multiple_of=2, at_least=6)[0].shape == (2, 2, 6)
  assert scoring.pad_candidates(cands, pad_id=0, multiple_of=4, at_least=2)[0].shape == (2, 2, 4)
  with pytest.raises(ValueError, match="row 1 has 1 candidates, expected 2"):
    scoring.pad_candidates([[[1], [2]], [[3]]], pad_id=0)


def test_chunk_and_packed_length_helpers():
  """`chunk_for`: the largest divisor of n up to `most` (1 where most < 1); `packed_length`:
  the most real tokens of one row, rounded up."""
  cases = {(20, 5): 5, (20, 8): 5, (20, 20): 20, (20, 64): 20, (7, 4): 1, (12, 6): 6, (6, 0): 1}
  for (n, most), want in cases.items():
    assert scoring.chunk_for(n, most) == want, (n, most)
  mask = np.zeros((3, 4, 6), np.int32)
  mask[0, :, :2] = 1  # 8 real tokens
  mask[1, 0, :6] = 1  # 6 + 3 * 1 = 9 (its one long candidate)
  mask[1, 1:, :1] = 1
  mask[2, :, :1] = 1  # 4
  assert scoring.packed_length(mask, multiple_of=1) == 9
  assert scoring.packed_length(mask, multiple_of=4) == 12
  assert scoring.packed_length(mask) == 32


@pytest.fixture(scope="module")
def adapted():
  """A tiny Llama with instance-wise adapters (2 experts, non-zero B), two left-padded
  prompts with embedding replacement at some real positions and very different gates per
  row, four candidates each, and the references from uncached full passes over each prompt
  and continuation, right-padded to one length (with that row's gate and replacement): the
  candidates' log-likelihoods and 8 greedy tokens."""
  module = llama.Llama(TINY_LLAMA, lora.adapter_factory(lora.LoRAConfig(rank=4, num_experts=2)))
  abstract = jax.eval_shape(
    lambda key: module.init(key, jax.numpy.zeros((1, 4), jax.numpy.int32)), jax.random.key(0)
  )["params"]
  rng = np.random.default_rng(8)
  params = jax.tree.map(
    lambda v: jax.numpy.asarray(0.4 * rng.standard_normal(v.shape), v.dtype),
    flax.core.meta.unbox(abstract),
  )
  prompts = [rng.integers(0, 48, n).tolist() for n in (6, 4)]
  cands = [
    [rng.integers(0, 48, n).tolist() for n in lengths] for lengths in ((2, 4, 1, 3), (3, 1, 2, 2))
  ]
  prompt, mask = _left_padded(prompts)
  replace = np.zeros(prompt.shape, bool)
  replace[0, [1, 4]] = True  # real positions of both rows (row 1 starts at column 2)
  replace[1, [3]] = True
  embeds = (0.5 * rng.standard_normal(prompt.shape + (TINY_LLAMA.hidden_size,))).astype(np.float32)
  gates = np.asarray([[0.95, 0.05], [0.05, 0.95]], np.float32)
  steps, t = 8, prompt.shape[1]
  length = t + 4 + steps

  @jax.jit
  def full(ids, real, gate, where, what):
    return module.apply(
      {"params": params}, ids, real, gate_weights=gate, replace_mask=where, replace_embeds=what
    )

  def inputs(rows, seqs):
    """Right-padded sequences [prompt row's real tokens + continuation] with the row's gate
    and replacement, for one full pass."""
    ids = np.zeros((len(seqs), length), np.int32)
    real = np.zeros((len(seqs), length), np.int32)
    where = np.zeros((len(seqs), length), bool)
    what = np.zeros((len(seqs), length, TINY_LLAMA.hidden_size), np.float32)
    for k, (i, seq) in enumerate(zip(rows, seqs)):
      start = t - len(prompts[i])
      ids[k, : len(seq)], real[k, : len(seq)] = seq, 1
      where[k, : len(prompts[i])] = replace[i, start:]
      what[k, : len(prompts[i])] = embeds[i, start:]
    return ids, real, gates[list(rows)], where, what

  rows = [i for i in range(2) for _ in range(4)]
  seqs = [prompts[i] + c for i in range(2) for c in cands[i]]
  logits = np.asarray(full(*inputs(rows, seqs)), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  scores = np.zeros((2, 4))
  for k, i in enumerate(rows):
    start = len(prompts[i])
    scores[i, k % 4] = sum(logp[k, start + j - 1, tok] for j, tok in enumerate(cands[i][k % 4]))
  greedy = [list(p) for p in prompts]
  for _ in range(steps):
    out = np.asarray(full(*inputs([0, 1], greedy)))
    for i, seq in enumerate(greedy):
      seq.append(int(np.argmax(out[i, len(seq) - 1])))
  greedy = np.array([seq[len(p) :] for seq, p in zip(greedy, prompts)])
  kwargs = dict(gate_weights=gates, replace_mask=replace, replace_embeds=embeds)
  return module, params, prompt, mask, cands, kwargs, scores, greedy


@pytest.mark.parametrize("chunk", [2, 3], ids=["chunks_of_2", "chunk_not_dividing_falls_back"])
def test_chunked_scores_follow_gates_and_replaced_embeddings(adapted, chunk):
  """With adapters, per-row gates and replaced prompt embeddings, the chunked candidates'
  scores are the full passes' (each candidate in a chunk with its own row's gate); a chunk
  that does not divide the 4 candidates scores them one at a time."""
  module, params, prompt, mask, cands, kwargs, want, _ = adapted
  tokens, cmask = scoring.pad_candidates(cands, pad_id=0, multiple_of=4)
  got = scoring.candidate_loglik(module, params, prompt, mask, tokens, cmask, chunk=chunk, **kwargs)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  if chunk == 3:
    return
  # The gates and the replacement matter here: without them the scores are far off.
  plain = scoring.candidate_loglik(module, params, prompt, mask, tokens, cmask, chunk=chunk)
  assert np.abs(np.asarray(plain) - want).max() > 1e-2


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "chunked"])
def test_generation_and_scores_follow_gates_and_replaced_embeddings(adapted, packed):
  """`generate_and_score` with adapters, per-row gates and replaced prompt embeddings: the
  scores and greedy tokens of full passes with that gate and replacement; chunked, the 8 new
  tokens need more free cache slots than the candidates' 4."""
  module, params, prompt, mask, cands, kwargs, want, greedy = adapted
  tokens, cmask = scoring.pad_candidates(cands, pad_id=0, multiple_of=4)
  packed_len = scoring.packed_length(cmask, multiple_of=4) if packed else None
  new = 4 if packed else 8
  out, lengths, scores = scoring.generate_and_score(
    module, params, prompt, mask, tokens, cmask, max_new_tokens=new, eos_ids=(), pad_id=0,
    chunk=2, packed_len=packed_len, **kwargs,
  )  # fmt: skip
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out), greedy[:, :new])
  np.testing.assert_array_equal(np.asarray(lengths), [new, new])
