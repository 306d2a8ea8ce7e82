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
  cands = [[rng.integers(0, 500, n).tolist() for n in (1, 3, 4, 2)] for _ in prompts]
  t = max(map(len, prompts))
  prompt = np.zeros((2, t), np.int32)
  mask = np.zeros((2, t), np.int32)
  for i, p in enumerate(prompts):  # left padding
    prompt[i, t - len(p) :] = p
    mask[i, t - len(p) :] = 1
  tokens, cmask = scoring.pad_candidates(cands, pad_id=0, multiple_of=4)
  for chunk in (2, 4):
    got = np.asarray(
      scoring.candidate_loglik(module, params, prompt, mask, tokens, cmask, chunk=chunk)
    )
    want = np.array([[_brute_force(model, p, c) for c in row] for p, row in zip(prompts, cands)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert jax.numpy.isfinite(got).all()
