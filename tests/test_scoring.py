"""Candidate log-likelihoods from one shared prefill equal full forward passes per candidate."""

import jax
import numpy as np
import pytest

from ilora_jax import llama, llm, scoring


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
