"""Model-level tests of `ilora_jax.llama` on tiny random configs (no torch needed)."""

from __future__ import annotations

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilora_jax import llama, llm, lora
from ilora_jax import tokenizer as tok_lib

CFG = llama.LlamaConfig(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  rope_theta=10000.0,
  rms_norm_eps=1e-5,
)
B, T = 3, 10


@functools.cache
def _jitted(module):
  return jax.jit(module.apply, static_argnames=("deterministic", "return_hidden", "prefill"))


def _apply(module, variables, *args, **kwargs):
  """`module.apply`, jitted once per module (modules are hashable)."""
  return _jitted(module)(variables, *args, **kwargs)


def _init(cfg=CFG, adapter=None, seed=0, num_gates=None):
  """Random params with numpy (XLA's RNG compiles slowly on CPU) for `cfg`'s param shapes.

  Matrices get std 0.2 (not 0.02) so attention is peaky and mistakes show up; vectors 1 +- 0.1.
  """
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(llama.abstract_params(cfg, adapter, num_gates))

  def draw(path, leaf):
    if path[-1].key == "scale":  # norm (and test adapter) scales
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def params():
  return _init()


def _tokens(seed=1, shape=(B, T)):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def _left_pad_mask():
  lengths = np.array([T, T - 3, 1])
  return jnp.asarray(np.arange(T)[None, :] >= (T - lengths)[:, None], jnp.int32)


def test_shapes_and_logical_axes(params):
  module = llama.Llama(CFG)
  logits = _apply(module, {"params": params}, _tokens())
  chex.assert_shape(logits, (B, T, CFG.vocab_size))
  chex.assert_type(logits, jnp.float32)
  hidden = _apply(module, {"params": params}, _tokens(), return_hidden=True)
  chex.assert_shape(hidden, (B, T, CFG.hidden_size))
  chex.assert_shape(params["layers"]["attn"]["q"]["kernel"], (2, 32, 4, 8))
  chex.assert_shape(params["layers"]["attn"]["k"]["kernel"], (2, 32, 2, 8))
  chex.assert_shape(params["layers"]["attn"]["o"]["kernel"], (2, 4, 8, 32))
  chex.assert_shape(params["layers"]["mlp"]["down"]["kernel"], (2, 48, 32))
  axes = llama.logical_axes(CFG)
  assert tuple(axes["embedding"]) == ("vocab", "embed")
  assert tuple(axes["lm_head"]) == ("embed", "vocab")
  assert tuple(axes["layers"]["attn"]["q"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
  assert tuple(axes["layers"]["attn"]["k"]["kernel"]) == (
    "layers",
    "embed",
    "kv_heads",
    "head_dim",
  )
  assert tuple(axes["layers"]["mlp"]["gate"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(axes["layers"]["mlp_norm"]["scale"]) == ("layers", "embed")


def test_padding_does_not_change_real_positions(params):
  module = llama.Llama(CFG)
  tokens, mask = _tokens(), _left_pad_mask()
  padded = _apply(module, {"params": params}, tokens, mask)
  other_pads = jnp.where(mask.astype(bool), tokens, (tokens * 7 + 3) % CFG.vocab_size)
  repadded = _apply(module, {"params": params}, other_pads, mask)
  for b in range(B):
    n = int(mask[b].sum())
    alone = _apply(module, {"params": params}, tokens[b : b + 1, T - n :])  # unpadded row
    np.testing.assert_allclose(padded[b, T - n :], alone[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(repadded[b, T - n :], alone[0], rtol=2e-5, atol=2e-5)
  assert np.all(np.isfinite(padded))


def test_head_positions_select_the_same_logits(params):
  """Logits only at given positions equal those positions of the full logits."""
  module = llama.Llama(CFG)
  tokens, mask = _tokens(), _left_pad_mask()
  full = _apply(module, {"params": params}, tokens, mask)
  where = jnp.asarray(np.random.default_rng(0).integers(0, T, B), jnp.int32)
  picked = _apply(module, {"params": params}, tokens, mask, head_positions=where)
  chex.assert_shape(picked, (B, 1, CFG.vocab_size))
  np.testing.assert_allclose(picked[:, 0], full[np.arange(B), np.asarray(where)], rtol=1e-5,
                             atol=1e-5)  # fmt: skip


def test_right_padding_matches_too(params):
  module = llama.Llama(CFG)
  tokens = _tokens()
  mask = jnp.asarray(np.arange(T)[None, :] < np.array([[T], [4], [6]]), jnp.int32)
  padded = _apply(module, {"params": params}, tokens, mask)
  alone = _apply(module, {"params": params}, tokens[1:2, :4])
  np.testing.assert_allclose(padded[1, :4], alone[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_kv_cache_decoding_equals_full_recomputation(params, scan):
  cfg = CFG.replace(scan_layers=scan)
  variables = {"params": params if scan else llm.unstack_layers(params, CFG.num_layers)}
  module = llama.Llama(cfg)
  tokens, mask = _tokens(), _left_pad_mask()
  full = _apply(module, variables, tokens, mask)
  cache = llama.init_cache(cfg, B, T + 2)
  layer_shape = (B, CFG.num_kv_heads, T + 2, CFG.head_dim)  # heads before slots
  if scan:  # One stacked array; unrolled layers: one buffer per layer.
    chex.assert_shape([cache.k, cache.v], (CFG.num_layers, *layer_shape))
  else:
    assert len(cache.k) == len(cache.v) == CFG.num_layers
    chex.assert_shape([*cache.k, *cache.v], layer_shape)
  prefix = 6  # A prefill (attention over its own keys) for the scanned model, not unrolled.
  step_logits, cache = _apply(
    module, variables, tokens[:, :prefix], mask[:, :prefix], cache=cache, prefill=scan
  )
  parts = [step_logits]
  for t in range(prefix, T):
    step_logits, cache = _apply(
      module, variables, tokens[:, t : t + 1], mask[:, t : t + 1], cache=cache
    )
    parts.append(step_logits)
  assert isinstance(cache.k, tuple) is not scan
  chex.assert_shape(cache.mask, (B, T + 2))
  assert int(cache.index) == T
  np.testing.assert_array_equal(cache.positions, mask.sum(1))
  incremental = jnp.concatenate(parts, axis=1)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(incremental[real], full[real], rtol=2e-5, atol=2e-5)


def test_prefill_over_its_own_keys_equals_attending_over_the_cache(params):
  """`prefill=True` attends over the step's own keys in causal chunks; without it, the same
  pass attends over every slot of the (empty) cache. Logits, cache and the next step agree."""
  module = llama.Llama(CFG)
  t = 2 * llama.CHUNK_MIN + 5  # Two query chunks.
  assert len(llama.causal_chunks(t, CFG.attention_chunks)) == 2
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, t)), jnp.int32)
  lengths = np.array([t, t - 70, 3])  # Left padding, one row shorter than the first chunk.
  mask = jnp.asarray(np.arange(t)[None, :] >= t - lengths[:, None], jnp.int32)
  outs = [
    _apply(module, {"params": params}, tokens, mask, cache=llama.init_cache(CFG, B, t + 1),
           prefill=prefill)
    for prefill in (True, False)
  ]  # fmt: skip
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(outs[0][0][real], outs[1][0][real], rtol=2e-5, atol=2e-5)
  (_, fast), (_, slow) = outs
  np.testing.assert_array_equal(fast.mask, slow.mask)
  assert int(fast.index) == int(slow.index) == t
  np.testing.assert_array_equal(fast.positions, slow.positions)
  held = np.asarray(fast.mask)  # [b, s]; pad slots hold other (masked, unused) values.
  for a, b in [(fast.k, slow.k), (fast.v, slow.v)]:  # [layers, b, k, s, h]
    a, b = np.moveaxis(np.asarray(a), 3, 2), np.moveaxis(np.asarray(b), 3, 2)
    np.testing.assert_allclose(a[:, held], b[:, held], rtol=2e-5, atol=2e-5)
  nxt = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, 1)), jnp.int32)
  one = jnp.ones((B, 1), jnp.int32)
  steps = [_apply(module, {"params": params}, nxt, one, cache=c)[0] for _, c in outs]
  np.testing.assert_allclose(steps[0], steps[1], rtol=2e-5, atol=2e-5)


def _naive_greedy(module, params, row_tokens, steps):
  """Greedy decoding by full recomputation over a fixed-size right-padded buffer."""
  size = len(row_tokens) + steps
  apply = jax.jit(lambda seq, mask: _apply(module, {"params": params}, seq, mask))
  seq = np.zeros((1, size), np.int32)
  seq[0, : len(row_tokens)] = row_tokens
  for n in range(len(row_tokens), size):
    mask = (np.arange(size) < n).astype(np.int32)[None]
    seq[0, n] = int(jnp.argmax(apply(seq, mask)[0, n - 1]))
  return seq[0, len(row_tokens) :].tolist()


def test_generate_tokens_matches_naive_greedy(params):
  module = llama.Llama(CFG)
  tokens, mask = _tokens(), _left_pad_mask()
  out, lengths = llm.generate_tokens(
    module, params, tokens, mask, max_new_tokens=5, eos_ids=(), pad_id=0
  )
  chex.assert_shape(out, (B, 5))
  np.testing.assert_array_equal(lengths, [5, 5, 5])
  for b in range(B):
    n = int(mask[b].sum())
    assert out[b].tolist() == _naive_greedy(module, params, tokens[b, T - n :].tolist(), 5)


def test_generate_stops_at_eos_and_pads(params):
  module = llama.Llama(CFG)
  tokens, mask = _tokens(), _left_pad_mask()
  free, _ = llm.generate_tokens(
    module, params, tokens, mask, max_new_tokens=6, eos_ids=(), pad_id=0
  )
  stop = int(free[0, 2])  # row 0 produces this at step 2 (or earlier)
  out, lengths = llm.generate_tokens(
    module, params, tokens, mask, max_new_tokens=6, eos_ids=(stop,), pad_id=-1
  )
  for b in range(B):
    row = free[b].tolist()
    n = row.index(stop) + 1 if stop in row else 6
    assert int(lengths[b]) == n
    assert out[b, :n].tolist() == row[:n]
    assert (out[b, n:] == -1).all()


def _answer_length(row, eos, line_end, blank):
  """Where the original's answer ends, token by token: its output is stripped, then cut at
  the first newline, so a line end ends it only after a token of text; end of text anywhere."""
  started = False
  for i, t in enumerate(row):
    if t in eos or (started and t in line_end):
      return i + 1
    started = started or t not in {*eos, *line_end, *blank}
  return len(row)


def _free_run(params, new: int):
  """(module, tokens, mask, free): the test batch's `new` greedy tokens with no stop ids."""
  module = llama.Llama(CFG)
  tokens, mask = _tokens(), _left_pad_mask()
  free, _ = llm.generate_tokens(
    module, params, tokens, mask, max_new_tokens=new, eos_ids=(), pad_id=0
  )
  return module, tokens, mask, np.asarray(free)


def _check_answers(run, free, line_end, blank) -> list[int]:
  """Each row of `run` (tokens padded with -1, lengths) generated with `line_end`/`blank` ids
  is the free row cut at `_answer_length`; returns those lengths."""
  out, lengths = run
  cuts = []
  for b in range(B):
    n = _answer_length(free[b].tolist(), (), line_end, blank)
    assert int(lengths[b]) == n, (b, free[b], line_end, blank)
    assert out[b, :n].tolist() == free[b, :n].tolist() and (np.asarray(out[b, n:]) == -1).all()
    cuts.append(n)
  return cuts


def test_generation_ends_an_answer_at_a_line_end_after_its_text(params):
  """`line_end_ids` end a row only after a token that is not blank (leading blank lines are
  skipped); with `min_new_tokens=1` an end-of-text id cannot be the first token, which is then
  the best other one (Hugging Face's `min_new_tokens`)."""
  new = 8
  module, tokens, mask, free = _free_run(params, new)
  lead = int(free[0, 0])  # Row 0's first token, made a line end and a blank.
  k = next(k for k in range(2, new) if free[0, k] != lead and (free[0, 1:k] != lead).any())
  line_end, blank = (lead, int(free[0, k])), (lead,)
  run = llm.generate_tokens(
    module, params, tokens, mask, max_new_tokens=new, eos_ids=(), pad_id=-1,
    line_end_ids=line_end, blank_ids=blank,
  )  # fmt: skip
  cuts = _check_answers(run, free, line_end, blank)
  assert 1 < cuts[0] < new  # Not ended by the line end first; ended by the later one.
  # The first token as an end of text, barred as the first token: the best other token.
  barred, _ = llm.generate_tokens(
    module, params, tokens, mask, max_new_tokens=2, eos_ids=(lead,), pad_id=0, min_new_tokens=1
  )
  n = int(mask[0].sum())
  logits = np.array(_apply(module, {"params": params}, tokens[:1, T - n :], mask[:1, T - n :]))
  logits[0, -1, lead] = -np.inf
  assert int(barred[0, 0]) == int(np.argmax(logits[0, -1])) != lead
  for b in range(1, B):
    if free[b, 0] != lead:
      assert int(barred[b, 0]) == int(free[b, 0])


def test_line_ends_before_an_answers_text_do_not_end_it(params):
  """An output that opens with "\\n\\n" or " \\n" before its text: the original strips it and
  keeps the first line, so neither the first token nor a line end right after it (the
  second) may end the row. Row 0's first two free tokens are scripted as two line ends, then
  as a blank and a line end; the row must run on past its text to the next line end."""
  new = 8
  module, tokens, mask, free = _free_run(params, new)
  t0, t1 = int(free[0, 0]), int(free[0, 1])
  assert t0 != t1  # The script needs two different leading tokens.
  for line_end, blank in (((t0, t1), ()), ((t1,), (t0,))):
    run = llm.generate_tokens(
      module, params, tokens, mask, max_new_tokens=new, eos_ids=(), pad_id=-1,
      line_end_ids=line_end, blank_ids=blank,
    )  # fmt: skip
    cuts = _check_answers(run, free, line_end, blank)
    assert 2 < cuts[0] < new, (free[0], line_end, blank)  # Text, then a line end, in budget.


def test_end_of_text_is_barred_for_the_first_min_new_tokens(params):
  """With `min_new_tokens=3`, end-of-text ids cannot be any of the first three tokens (the
  decode loop's own bar, not only the first token's) and end a row from the fourth on:
  against a token-by-token greedy reference that recomputes the whole sequence (no cache),
  with the same ids masked before the fourth token."""
  module = llama.Llama(CFG)
  tokens, mask = _tokens(), _left_pad_mask()
  new, least = 7, 3
  free, _ = llm.generate_tokens(
    module, params, tokens, mask, max_new_tokens=new, eos_ids=(), pad_id=0
  )
  free = np.asarray(free)
  # End-of-text ids the free generation writes early: the bar must change those rows.
  eos = tuple(sorted({int(free[0, 1]), int(free[1, 2]), int(free[2, 4])}))
  out, lengths = llm.generate_tokens(
    module, params, tokens, mask, max_new_tokens=new, eos_ids=eos, pad_id=-1,
    min_new_tokens=least,
  )  # fmt: skip
  out, lengths = np.asarray(out), np.asarray(lengths)
  width = T + new  # Right-padded to one width: one compile; causal, so padding changes nothing.
  changed = 0
  for b in range(B):
    n = int(mask[b].sum())
    seq = list(np.asarray(tokens[b, T - n :]))
    want = []
    for k in range(new):
      ids = np.zeros((1, width), np.int32)
      ids[0, : len(seq)] = seq
      real = (np.arange(width) < len(seq)).astype(np.int32)[None]
      logits = np.array(_apply(module, {"params": params}, jnp.asarray(ids), jnp.asarray(real)))
      step = logits[0, len(seq) - 1]
      if k < least:
        step[list(eos)] = -np.inf
      tok = int(np.argmax(step))
      want.append(tok)
      seq.append(tok)
      if tok in eos:
        break
    assert int(lengths[b]) == len(want), (b, want, out[b])
    assert out[b, : len(want)].tolist() == want and (out[b, len(want) :] == -1).all()
    assert not set(want[:least]) & set(eos)
    changed += want != free[b, : len(want)].tolist()
  assert changed >= 2  # The bar decided rows 0 and 1 (their free tokens 1 and 2 are barred).


def test_generate_does_not_retrace_for_same_shapes(params):
  raw = llm.generate_tokens.__wrapped__
  gen = jax.jit(
    chex.assert_max_traces(raw, n=1),
    static_argnames=("module", "max_new_tokens", "eos_ids", "pad_id", "cache_dtype"),
  )
  module = llama.Llama(CFG)
  tokens, mask = _tokens(), _left_pad_mask()
  kw = dict(max_new_tokens=3, eos_ids=(5,), pad_id=0)
  gen(module, params, tokens, mask, **kw)
  gen(module, _init(seed=7), _tokens(seed=9), jnp.ones_like(mask), **kw)  # same shapes
  chex.clear_trace_counter()


def test_llm_generate_compiles_once_per_shape():
  model = llm.load("tiny")
  model.generate(["hello", "a longer prompt here"], max_new_tokens=4)
  cache_size = llm.generate_tokens._cache_size  # jit's count of compiled executables
  size = cache_size()
  assert size >= 1
  texts = model.generate(["other", "words in the same bucket"], max_new_tokens=4)
  assert cache_size() == size  # no new compilation
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  logits = model.logits(np.array([[1, 2, 3]]))
  assert logits.shape == (1, 3, model.config.vocab_size) and logits.dtype == np.float32


def test_init_std_sets_the_std_of_every_random_matrix():
  for std in (0.02, 0.125):
    params = llm.load("tiny", init_std=std).params
    flat = jax.tree_util.tree_leaves_with_path(params)
    is_scale = [getattr(p[-1], "key", "") == "scale" for p, _ in flat]
    matrices = [np.asarray(x, np.float64) for (p, x), sc in zip(flat, is_scale) if not sc]
    scales = [np.asarray(x) for (p, x), sc in zip(flat, is_scale) if sc]
    assert len(matrices) >= 8 and scales
    for m in matrices:  # embedding and every projection (per-matrix sample std)
      assert abs(m.std() / std - 1) < 0.05, (m.shape, m.std())
    for sc in scales:  # RMSNorm scales stay ones
      np.testing.assert_array_equal(sc, 1.0)
  with pytest.raises(ValueError, match="init_std"):
    llama.LlamaConfig(init_std=0.0)


class ConstAdapter(nn.Module):
  """Test adapter: delta = scale * sum(gate_weights) (+1 if not deterministic), per row."""

  in_features: int
  out_features: int
  target: str

  @nn.compact
  def __call__(self, x, gate_weights, deterministic):
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.constant(0.5), ("mlp",)),
      (self.out_features,),
    )
    chex.assert_shape(x, (None, None, self.in_features))
    g = jnp.sum(gate_weights, axis=-1)[:, None, None]  # [b, 1, 1]
    if not deterministic:
      g = g + 1.0
    return jnp.broadcast_to(g * scale, x.shape[:2] + (self.out_features,))


SEEN: dict[str, tuple[int, int]] = {}


def const_adapter_factory(*, in_features, out_features, target, name):
  SEEN[target] = (in_features, out_features)
  if target not in ("v", "down"):
    return None
  return ConstAdapter(in_features, out_features, target, name=name)


def _overlay(tree, base):
  """`tree` with every leaf that `base` also has taken from `base`."""
  return {
    k: (_overlay(v, base[k]) if isinstance(v, dict) else base[k]) if k in base else v
    for k, v in tree.items()
  }


def _strip(tree):
  """`tree` without its 'adapter' subtrees."""
  return {k: _strip(v) if isinstance(v, dict) else v for k, v in tree.items() if k != "adapter"}


@pytest.mark.parametrize("remat_policy, scan", [("none", True), ("full", True), ("dots", False)])
def test_adapter_seam(params, remat_policy, scan):
  cfg = CFG.replace(remat_policy=remat_policy, scan_layers=scan)
  module = llama.Llama(cfg, adapter=const_adapter_factory)
  tokens = _tokens()
  adapted = _init(cfg, const_adapter_factory, num_gates=4)
  assert SEEN["q"] == (32, 32) and SEEN["k"] == (32, 16) and SEEN["o"] == (32, 32)
  assert SEEN["gate"] == (32, 48) and SEEN["down"] == (48, 32)
  if scan:
    chex.assert_shape(adapted["layers"]["attn"]["v"]["adapter"]["scale"], (2, 16))
    assert "adapter" not in adapted["layers"]["attn"]["q"]
    assert tuple(
      llama.logical_axes(cfg, const_adapter_factory, 4)["layers"]["attn"]["v"]["adapter"]["scale"]
    ) == ("layers", "mlp")
    base = _overlay(adapted, params)  # base weights plus the adapter's own params
    plain_params = params
  else:
    base = adapted
    plain_params = _strip(adapted)
  reference = _apply(llama.Llama(cfg), {"params": plain_params}, tokens)
  run = functools.partial(_apply, module, {"params": base}, tokens)
  zero = run(gate_weights=jnp.zeros((B, 4)))
  np.testing.assert_allclose(zero, reference, rtol=1e-5, atol=1e-5)
  gates = jnp.zeros((B, 4)).at[1].set(0.25)  # only row 1 gets a non-zero gate
  mixed = run(gate_weights=gates)
  np.testing.assert_allclose(mixed[0], reference[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mixed[2], reference[2], rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(mixed[1] - reference[1])) > 1e-2
  stochastic = run(gate_weights=jnp.zeros((B, 4)), deterministic=False)
  assert np.max(np.abs(stochastic - reference)) > 1e-2
  if remat_policy != "none":
    return
  # The seam also works in cached generation, with the gate in prefill and decode steps.
  out, _ = llm.generate_tokens(
    module,
    base,
    tokens,
    jnp.ones_like(tokens),
    max_new_tokens=3,
    eos_ids=(),
    pad_id=0,
    gate_weights=jnp.zeros((B, 4)),
  )
  plain, _ = llm.generate_tokens(
    llama.Llama(cfg),
    plain_params,
    tokens,
    jnp.ones_like(tokens),
    max_new_tokens=3,
    eos_ids=(),
    pad_id=0,
  )
  np.testing.assert_array_equal(out, plain)


def test_llm_wrapper_forward_with_adapter(params):
  adapted = _overlay(_init(CFG, const_adapter_factory, num_gates=4), params)
  model = llm.LLM(CFG, params, tok_lib.byte_level_tokenizer(), adapter=const_adapter_factory)
  tokens, gates = _tokens(), jnp.full((B, 4), 0.25)
  direct = _apply(model.module, {"params": adapted}, tokens, gate_weights=gates)
  np.testing.assert_allclose(
    model.forward(tokens, params=adapted, gate_weights=gates), direct, rtol=1e-5, atol=1e-5
  )
  plain = _apply(llama.Llama(CFG), {"params": params}, tokens)
  np.testing.assert_allclose(model.logits(tokens), plain, rtol=1e-5, atol=1e-5)  # base model


def test_replacement_embeddings(params):
  module = llama.Llama(CFG)
  tokens = _tokens()
  other = (tokens + 11) % CFG.vocab_size
  replace_mask = jnp.zeros((B, T), bool).at[:, 2].set(True).at[0, 7].set(True)
  embeds = jnp.take(params["embedding"], other, axis=0)  # [b, t, d]
  swapped = _apply(
    module, {"params": params}, tokens, replace_mask=replace_mask, replace_embeds=embeds
  )
  expected = _apply(module, {"params": params}, jnp.where(replace_mask, other, tokens))
  np.testing.assert_allclose(swapped, expected, rtol=1e-5, atol=1e-5)
  plain = _apply(module, {"params": params}, tokens)
  np.testing.assert_allclose(swapped[:, :2], plain[:, :2], rtol=1e-5, atol=1e-5)
  # In prefill: generation from replaced embeddings equals generation from the tokens.
  mask = jnp.ones_like(tokens)
  kw = dict(max_new_tokens=3, eos_ids=(), pad_id=0)
  a, _ = llm.generate_tokens(
    module, params, tokens, mask, replace_mask=replace_mask, replace_embeds=embeds, **kw
  )
  b, _ = llm.generate_tokens(module, params, jnp.where(replace_mask, other, tokens), mask, **kw)
  np.testing.assert_array_equal(a, b)


def test_remat_and_unscanned_layers_agree(params):
  tokens = _tokens()
  base = _apply(llama.Llama(CFG), {"params": params}, tokens)
  loss = lambda p, m: jnp.mean(m.apply({"params": p}, tokens) ** 2)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  grads = grad(params, llama.Llama(CFG))
  for policy in ("full", "dots", "dots_no_batch", "projections"):
    module = llama.Llama(CFG.replace(remat_policy=policy))
    np.testing.assert_allclose(_apply(module, {"params": params}, tokens), base, atol=1e-5)
    if policy == "dots":  # one remat gradient check keeps the test fast
      chex.assert_trees_all_close(grad(params, module), grads, rtol=1e-4, atol=1e-6)
  unscanned = {k: v for k, v in params.items() if k != "layers"}
  for i in range(CFG.num_layers):
    unscanned[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  module = llama.Llama(CFG.replace(scan_layers=False))
  np.testing.assert_allclose(_apply(module, {"params": unscanned}, tokens), base, atol=1e-5)


def test_causal_chunks_give_the_gradients_of_one_pass(params):
  """Chunked causal attention (t >= 2 * CHUNK_MIN) against one pass over all keys
  (`attention_chunks=1`): the same loss and gradients wherever a real query reads (padded
  queries are left out of the loss). The one pass itself is checked against transformers in
  test_llm_weights, with chunks too."""
  t = 2 * llama.CHUNK_MIN + 3
  assert llama.causal_chunks(t, CFG.attention_chunks) == [(0, 66), (66, t)]
  assert llama.causal_chunks(t, 1) == [(0, t)]
  assert llama.causal_chunks(8 * llama.CHUNK_MIN, 4) == [(a, a + 128) for a in (0, 128, 256, 384)]
  tokens = _tokens(shape=(B, t))
  lengths = np.array([t, t - llama.CHUNK_MIN - 5, 1])  # row 1: padding beyond the first chunk
  mask = jnp.asarray(np.arange(t)[None, :] >= (t - lengths)[:, None], jnp.int32)
  weights = jnp.asarray(np.random.default_rng(4).normal(size=(B, t, CFG.vocab_size)))

  def loss(p, module):
    logits = module.apply({"params": p}, tokens, mask)
    return jnp.sum(logits * weights * mask[..., None])

  chunked = jax.value_and_grad(loss)(params, llama.Llama(CFG))
  one_pass = jax.value_and_grad(loss)(params, llama.Llama(CFG.replace(attention_chunks=1)))
  chex.assert_trees_all_close(chunked, one_pass, rtol=1e-4, atol=1e-4)  # gradients up to ~100
  with pytest.raises(ValueError, match="attention_chunks"):
    CFG.replace(attention_chunks=0)


def _residual_shapes(capsys, f, *args) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, shape) of every residual the VJP of f saves (from `print_saved_residuals`)."""
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(f, *args)
  found = []
  for line in capsys.readouterr().out.splitlines():
    dtype, _, dims = line.split(" ", 1)[0].partition("[")
    found.append((dtype, tuple(int(n) for n in dims.rstrip("]").split(",") if n)))
  return found


def test_projections_remat_keeps_masks_recomputes_attention_same_gradients(capsys):
  """The 'projections' policy: the gradients of 'none' (dropout active, same key), no stored
  attention probabilities or dropped inputs, the dropout masks stored as booleans."""
  factory = lora.adapter_factory(lora.LoRAConfig(rank=4, num_experts=2, dropout=0.25))
  params = _init(CFG, factory, num_gates=2)
  tokens = _tokens()
  gates = jax.nn.softmax(jnp.asarray(np.random.default_rng(3).normal(size=(B, 2)), jnp.float32))
  key = jax.random.PRNGKey(5)

  def loss_of(policy):
    module = llama.Llama(CFG.replace(remat_policy=policy), adapter=factory)

    def loss(p):
      out = module.apply(
        {"params": p}, tokens, gate_weights=gates, deterministic=False, rngs={"dropout": key}
      )
      return jnp.mean(out**2)

    return loss

  grads = {p: jax.jit(jax.grad(loss_of(p)))(params) for p in ("none", "projections")}
  chex.assert_trees_all_close(grads["projections"], grads["none"], rtol=1e-5, atol=1e-7)
  adapter_grad = grads["none"]["layers"]["attn"]["q"]["adapter"]["lora_a"]
  assert float(jnp.max(jnp.abs(adapter_grad))) > 0  # the comparison covers the adapters

  L, d, kv = CFG.num_layers, CFG.hidden_size, CFG.num_kv_heads
  probs = (L, B, kv, T, CFG.num_heads // kv, T)  # stacked attention probabilities
  none = _residual_shapes(capsys, loss_of("none"), params)
  kept = _residual_shapes(capsys, loss_of("projections"), params)
  assert ("f32", probs) in none and ("f32", probs) not in kept
  # 'none' stores each adapter's dropped input ([b * t, d] floats, one per adapter reading
  # the residual stream); 'projections' stores the masks instead.
  assert ("f32", (L, B * T, d)) in none and ("f32", (L, B * T, d)) not in kept
  assert ("bool", (L, B, T, d)) in kept and ("bool", (L, B, T, CFG.intermediate_size)) in kept
  size = lambda found: sum(np.prod(shape) * (1 if dt == "bool" else 4) for dt, shape in found)
  assert size(kept) < size(none) / 2
  # The memory plan's count of those masks: a byte per input element of each wrapped projection.
  from ilora_jax import plan

  masks = sum(np.prod(shape) for dt, shape in kept if dt == "bool" and shape[:3] == (L, B, T))
  assert masks == L * B * T * plan.mask_bytes_per_token(CFG, lora.TARGETS, 0.25) > 0
  assert plan.mask_bytes_per_token(CFG, lora.TARGETS, 0.0) == 0


def test_tied_embeddings_and_llama3_rope():
  cfg = CFG.replace(
    tie_word_embeddings=True,
    rope_scaling={
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    },
  )
  params = _init(cfg)
  assert "lm_head" not in params
  hash(cfg)  # usable as a static argument
  inv = llama.rope_inv_freq(cfg)
  plain = llama.rope_inv_freq(CFG)
  assert inv[0] == plain[0] and np.isclose(inv[-1], plain[-1] / 8.0)
  logits = _apply(llama.Llama(cfg), {"params": params}, _tokens())
  hidden = _apply(llama.Llama(cfg), {"params": params}, _tokens(), return_hidden=True)
  np.testing.assert_allclose(
    logits, jnp.einsum("btd,vd->btv", hidden, params["embedding"]), rtol=1e-5, atol=1e-5
  )


def test_llama2_7b_abstract_params_allocate_nothing():
  cfg = llm.config_for("llama2-7b")
  shapes = llm.abstract_params("llama2-7b")
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert count == 6_738_415_616, count  # Llama-2-7B's parameter count
  assert shapes["layers"]["attn"]["q"]["kernel"].shape == (32, 4096, 32, 128)
  assert cfg.num_layers == 32 and not cfg.tie_word_embeddings
  assert set(llm.names()) >= {"smollm2-135m", "smollm2-135m-random", "llama2-7b", "tiny"}


def test_resize_vocab_untied(params):
  tokenizer = tok_lib.byte_level_tokenizer()
  ids = tok_lib.add_ilora_tokens(tokenizer)
  assert ids["[PAD]"] == 259 and len(tokenizer) == 264
  cfg = CFG.replace(vocab_size=259)
  base = _init(cfg)
  grown, new_cfg = tok_lib.resize_vocab(base, cfg, len(tokenizer), multiple_of=8)
  assert new_cfg.vocab_size == 264
  chex.assert_shape(grown["embedding"], (264, 32))
  chex.assert_shape(grown["lm_head"], (32, 264))
  tokens = jnp.asarray([[1, 2, 3, 40]])
  before = _apply(llama.Llama(cfg), {"params": base}, tokens)
  after = _apply(llama.Llama(new_cfg), {"params": grown}, tokens)
  np.testing.assert_allclose(after[..., :259], before, rtol=1e-5, atol=1e-5)
  same, same_cfg = tok_lib.resize_vocab(base, cfg, 100)
  assert same is base and same_cfg is cfg


def test_rows_added_for_rounding_are_out_of_the_softmax():
  """Rounded up to 128 for sharding, the vocabulary gains rows no token maps to: their logits
  are -1e30, so the log-softmax over all rows is numpy's over the token rows alone."""
  tokenizer = tok_lib.byte_level_tokenizer()
  tok_lib.add_ilora_tokens(tokenizer)
  cfg = CFG.replace(vocab_size=259)
  for tied in (False, True):
    c = cfg.replace(tie_word_embeddings=tied)
    padded, pad_cfg = tok_lib.resize_vocab(_init(c), c, len(tokenizer), multiple_of=128)
    assert (pad_cfg.vocab_size, pad_cfg.logit_vocab) == (384, 264)
    again, again_cfg = tok_lib.resize_vocab(padded, pad_cfg, 300, multiple_of=128)
    assert again is padded and again_cfg.logit_vocab == 264  # nothing to grow: unchanged
    tokens = jnp.asarray([[1, 2, 3, 40, 262]])
    out = np.asarray(_apply(llama.Llama(pad_cfg), {"params": padded}, tokens))
    assert np.all(out[..., 264:] == -1e30) and np.all(np.abs(out[..., :264]) < 1e3)
    rows = out[..., :264].astype(np.float64)
    shifted = rows - rows.max(-1, keepdims=True)
    ref = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    got = np.asarray(jax.nn.log_softmax(jnp.asarray(out), axis=-1))
    np.testing.assert_allclose(got[..., :264], ref, rtol=1e-5, atol=1e-5)
    hidden = _apply(llama.Llama(pad_cfg), {"params": padded}, tokens, return_hidden=True)
    logits = llama.head_logits(pad_cfg, hidden, padded["embedding"], padded.get("lm_head"))
    np.testing.assert_allclose(np.asarray(logits), out, rtol=1e-5, atol=1e-5)


def test_unrolled_decoding_gives_the_same_tokens():
  from ilora_jax import llm as llm_lib

  model = llm_lib.load("tiny", seed=3)
  tokens = np.random.default_rng(0).integers(0, 1000, (2, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[0, :4] = 0  # one left-padded row
  outs = [
    llm_lib.generate_tokens(
      model.module, model.params, tokens, mask, max_new_tokens=6, eos_ids=(), pad_id=0, unroll=u
    )
    for u in (False, True)
  ]
  np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
  np.testing.assert_array_equal(np.asarray(outs[0][1]), np.asarray(outs[1][1]))


def _loop_converts(jaxpr, inside=False) -> list:
  """(input dtype, shape) of every convert_element_type inside a while loop's body."""
  found = []
  for eqn in jaxpr.eqns:
    if inside and eqn.primitive.name == "convert_element_type":
      aval = eqn.invars[0].aval
      found.append((str(aval.dtype), tuple(aval.shape)))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _loop_converts(sub, inside or eqn.primitive.name == "while")
  return found


def test_decoding_casts_the_adapters_to_the_compute_dtype_once_before_the_loop():
  """bf16 weights and activations, float32 adapters (the product's default): the decode
  loop's steps get the adapter matrices in bf16 (cast before the loop, `llm.adapters_in`)
  instead of casting each matrix in each step, scanned or unrolled; the tokens are those of
  the model that casts inside."""
  import jax.extend  # noqa: F401

  from ilora_jax import llm as llm_lib

  cfg = CFG.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  factory = lora.adapter_factory(lora.LoRAConfig(rank=4, num_experts=2))
  params = _init(cfg, factory, num_gates=2)
  params["layers"]["mlp"]["down"]["adapter"]["lora_b"] += 0.3  # a delta that is not zero
  module = llama.Llama(cfg, adapter=factory)
  tokens = np.random.default_rng(0).integers(0, 97, (2, 6)).astype(np.int32)
  gates = jnp.asarray([[0.3, 0.7], [0.9, 0.1]], jnp.float32)
  adapters = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if lora.is_lora_param(p)]
  shapes = {tuple(x.shape[1:]) for x in adapters}  # one layer's
  assert adapters and all(x.dtype == jnp.float32 for x in adapters)
  # The tokens of the module run step by step with its own casts (no decode loop); jitted,
  # since op by op every new length compiles each of the model's small ops again.
  apply = jax.jit(lambda p, ids: module.apply({"params": p}, ids, gate_weights=gates))
  ids = jnp.asarray(tokens)
  for _ in range(5):
    nxt = jnp.argmax(apply(params, ids)[:, -1], axis=-1).astype(jnp.int32)
    ids = jnp.concatenate([ids, nxt[:, None]], axis=1)
  want = np.asarray(ids[:, tokens.shape[1] :])
  for unroll in (False, True):

    def run(p, unroll=unroll):
      first, cache = llm_lib.prefill(module, p, tokens, np.ones_like(tokens), 12,
                                     gate_weights=gates)  # fmt: skip
      return llm_lib.greedy_decode(module, p, first, cache, max_new_tokens=5, eos_ids=(),
                                   pad_id=0, gate_weights=gates, unroll=unroll)  # fmt: skip

    converts = _loop_converts(jax.make_jaxpr(run)(params).jaxpr)
    adapter_casts = [c for c in converts if c[0] == "float32" and c[1] in shapes]
    assert not adapter_casts, (unroll, adapter_casts)
    out, _ = jax.jit(run)(params)
    np.testing.assert_array_equal(np.asarray(out[:, :5]), want)


# --- Independent references (numpy, float64) for the mutation audit of llama.py ---


def _np_rms(x, scale, eps):
  return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _np_inv_freq(head_dim, theta):
  """RoFormer/Hugging Face: 1 / theta^(2i / head_dim), i < head_dim / 2."""
  return 1.0 / theta ** (2.0 * np.arange(head_dim // 2) / head_dim)


def _np_rope(x, pos, inv_freq):
  """Hugging Face's rotate_half convention: x [t, heads, h] at positions pos [t]; pair i is
  (x_i, x_{i + h/2}), rotated by pos * inv_freq[i]."""
  ang = np.concatenate([pos[:, None] * inv_freq] * 2, axis=-1)[:, None, :]  # [t, 1, h]
  half = x.shape[-1] // 2
  rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * np.cos(ang) + rotated * np.sin(ang)


def _np_llama(p, cfg, ids):
  """Logits [t, v] of a float64 numpy Llama (Hugging Face LlamaForCausalLM's math: pre-norm
  blocks, rotary q and k, kv head i // g for query head i, SwiGLU) over one unpadded row."""
  f64 = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  lay, t = f64["layers"], len(ids)
  x = f64["embedding"][np.asarray(ids)]
  pos, inv = np.arange(t, dtype=np.float64), _np_inv_freq(cfg.head_dim, cfg.rope_theta)
  groups = cfg.num_heads // cfg.num_kv_heads
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg.num_layers):
    attn, mlp = lay["attn"], lay["mlp"]
    h = _np_rms(x, lay["attn_norm"]["scale"][i], cfg.rms_norm_eps)
    q = _np_rope(np.einsum("td,dnh->tnh", h, attn["q"]["kernel"][i]), pos, inv)
    k = _np_rope(np.einsum("td,dnh->tnh", h, attn["k"]["kernel"][i]), pos, inv)
    v = np.einsum("td,dnh->tnh", h, attn["v"]["kernel"][i])
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)  # HF's repeat_kv
    scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(cfg.head_dim)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("nts,snh->tnh", probs, v)
    x = x + np.einsum("tnh,nhd->td", out, attn["o"]["kernel"][i])
    h = _np_rms(x, lay["mlp_norm"]["scale"][i], cfg.rms_norm_eps)
    gate, up = h @ mlp["gate"]["kernel"][i], h @ mlp["up"]["kernel"][i]
    x = x + (gate / (1.0 + np.exp(-gate)) * up) @ mlp["down"]["kernel"][i]
  x = _np_rms(x, f64["final_norm"]["scale"], cfg.rms_norm_eps)
  return x @ (f64["embedding"].T if cfg.tie_word_embeddings else f64["lm_head"])


def test_forward_matches_a_numpy_llama(params):
  """Each padded row's real logits are those of a float64 numpy Llama over its real tokens
  alone (left and right padding; untied and tied heads)."""
  tokens = _tokens()
  left = _left_pad_mask()
  right = jnp.asarray(np.arange(T)[None, :] < np.array([[T], [4], [6]]), jnp.int32)
  for cfg, p in ((CFG, params), (CFG.replace(tie_word_embeddings=True), None)):
    p = _init(cfg, seed=2) if p is None else p
    module = llama.Llama(cfg)
    for mask in (left, right) if p is params else (left,):
      logits = np.asarray(_apply(module, {"params": p}, tokens, mask))
      for b in range(B):
        real = np.asarray(mask[b], bool)
        want = _np_llama(p, cfg, np.asarray(tokens[b])[real])
        np.testing.assert_allclose(logits[b][real], want, rtol=1e-4, atol=1e-4)


def test_rope_inv_freq_matches_the_llama3_reference():
  """Plain 1 / theta^(2i/h); Llama 3 scaling against Meta's `apply_scaling` loop (high
  frequencies kept, low ones divided by the factor, a smooth blend between), with
  low_freq_factor 1, high_freq_factor 4 and 8192 original positions as the defaults."""

  def meta(freqs, factor, low, high, old_len):
    out = []
    for freq in freqs:
      wavelen = 2 * np.pi / freq
      if wavelen < old_len / high:
        out.append(freq)
      elif wavelen > old_len / low:
        out.append(freq / factor)
      else:
        smooth = (old_len / wavelen - low) / (high - low)
        out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)

  plain = _np_inv_freq(CFG.head_dim, CFG.rope_theta)
  np.testing.assert_allclose(llama.rope_inv_freq(CFG), plain, rtol=1e-6)
  # head_dim 8: wavelengths 6.3, 63, 628, 6283 against bands 128 / 4 = 32 and 128 / 2 = 64:
  # one kept, one blended, two divided.
  scaling = dict(factor=8.0, low_freq_factor=2.0, high_freq_factor=4.0,
                 original_max_position_embeddings=128)  # fmt: skip
  got = llama.rope_inv_freq(CFG.replace(rope_scaling=scaling))
  want = meta(plain, 8.0, 2.0, 4.0, 128)
  assert np.isclose(want, plain).sum() == 1 and np.isclose(want, plain / 8).sum() == 2
  np.testing.assert_allclose(got, want, rtol=1e-6)
  chex.assert_type(got, np.float32)
  cfg = CFG.replace(head_dim=128, rope_theta=500000.0, rope_scaling={"factor": 8.0})
  full = _np_inv_freq(128, 500000.0)
  want = meta(full, 8.0, 1.0, 4.0, 8192)
  kept, divided = np.isclose(want, full), np.isclose(want, full / 8)
  assert kept.any() and divided.any() and (~kept & ~divided).any()  # every band in play
  np.testing.assert_allclose(llama.rope_inv_freq(cfg), want, rtol=1e-5)


def test_linear_rope_scaling_divides_every_frequency_and_other_kinds_are_refused():
  plain = _np_inv_freq(CFG.head_dim, CFG.rope_theta)
  got = llama.rope_inv_freq(CFG.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
  np.testing.assert_allclose(got, plain / 4, rtol=1e-6)
  # A kind or key the rotary maths does not apply is refused (an audit's linear scaling,
  # passed to llm.load, got Llama 3's maths: frequency ratios from 1 to 0.25, not 0.25).
  for scaling, message in (({"rope_type": "yarn", "factor": 4.0}, "type 'yarn' not in"),
                           ({"rope_type": "linear", "factor": 4.0, "low_freq_factor": 1.0},
                            "type 'linear' has no keys ['low_freq_factor']"),
                           ({"factor": 8.0, "beta_fast": 32}, "has no keys ['beta_fast']"),
                           ({"rope_type": "linear"}, "needs a factor > 0, got None"),
                           ({"factor": 0.0}, "needs a factor > 0, got 0.0")):  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
      CFG.replace(rope_scaling=scaling)


def test_apply_rope_rotates_pairs_of_halves_by_absolute_positions():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)  # [b, t, heads, h]
  pos = np.array([[0, 1, 2, 3, 4], [7, 7, 8, 20, 100]])
  inv = llama.rope_inv_freq(CFG)
  got = np.asarray(llama.apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
  for b in range(2):
    want = _np_rope(x[b].astype(np.float64), pos[b].astype(np.float64), _np_inv_freq(8, 1e4))
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
  half = jnp.asarray(x, jnp.bfloat16)
  out = llama.apply_rope(half, jnp.asarray(pos), inv)
  chex.assert_type(out, jnp.bfloat16)  # float32 math, the input's dtype out


def test_rms_norm_matches_numpy_with_eps_inside_the_root():
  """Inputs of size 1e-3 (mean square 1e-6, below eps 1e-5): eps must sit under the root.
  bf16 input: float32 math, rounded to bf16 once (numpy's value, rounded)."""
  rng = np.random.default_rng(6)
  x = (1e-3 * rng.normal(size=(2, 3, 64))).astype(np.float32)
  scale = (1 + 0.1 * rng.normal(size=64)).astype(np.float32)
  norm = llama.RMSNorm(1e-5, jnp.float32, jnp.float32)
  got = norm.apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x))
  want = _np_rms(x.astype(np.float64), scale.astype(np.float64), 1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  x16 = jnp.asarray(10 * rng.normal(size=(4, 8, 256)), jnp.bfloat16)
  norm16 = llama.RMSNorm(1e-5, jnp.bfloat16, jnp.float32)
  got16 = norm16.apply({"params": {"scale": jnp.asarray(np.ones(256, np.float32))}}, x16)
  chex.assert_type(got16, jnp.bfloat16)
  x64 = np.asarray(x16, np.float64)
  want16 = np.asarray(jnp.asarray(_np_rms(x64, 1.0, 1e-5), jnp.float32).astype(jnp.bfloat16))
  assert np.mean(np.asarray(got16, np.float32) != want16.astype(np.float32)) < 0.002


class _DenseAdapter(nn.Module):
  """Test adapter: delta = x @ w, w of ones times 0.01 (in the input's dtype)."""

  in_features: int
  out_features: int

  @nn.compact
  def __call__(self, x, gate_weights, deterministic):
    w = self.param("w", nn.initializers.constant(0.01), (self.in_features, self.out_features))
    return x @ w.astype(x.dtype)


def test_projection_adds_the_adapter_delta_in_the_compute_dtype():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 3, 6)).astype(np.float32)
  kernel = rng.normal(size=(6, 2, 4)).astype(np.float32)
  factory = lambda **kw: _DenseAdapter(kw["in_features"], kw["out_features"], name=kw["name"])  # noqa: E731
  proj = llama.Projection("btd,dnh->btnh", (6, 2, 4), ("embed", "heads", "head_dim"), "q",
                          jnp.float32, jnp.float32, 0.02, factory)  # fmt: skip
  variables = {"params": {"kernel": kernel, "adapter": {"w": np.full((6, 8), 0.01, np.float32)}}}
  got = proj.apply(variables, jnp.asarray(x), None, True)
  delta = (x.astype(np.float64) @ np.full((6, 8), 0.01)).reshape(2, 3, 2, 4)
  want = np.einsum("btd,dnh->btnh", x.astype(np.float64), kernel) + delta
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # bf16 compute with float32 params and a float32 input: both cast, bf16 out.
  proj16 = proj.clone(dtype=jnp.bfloat16, adapter=None)
  out = proj16.apply({"params": {"kernel": kernel}}, jnp.asarray(x), None, True)
  chex.assert_type(out, jnp.bfloat16)


def test_config_validation_dtypes_and_llama2_defaults():
  bad = [
    (dict(num_heads=4, num_kv_heads=3), "num_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(attention="flash"), "attention"),
    (dict(logit_vocab=0), "logit_vocab"),
    (dict(logit_vocab=CFG.vocab_size + 1), "logit_vocab"),
    (dict(init_std=-0.1), "init_std"),
  ]
  for change, match in bad:
    with pytest.raises(ValueError, match=match):
      CFG.replace(**change)
  for ok in (1, CFG.vocab_size):
    assert CFG.replace(logit_vocab=ok).logit_vocab == ok
  assert CFG.replace(attention_chunks=1).attention_chunks == 1
  named = CFG.replace(dtype="bfloat16", param_dtype="float32")
  assert named == CFG.replace(dtype=jnp.bfloat16) and hash(named) == hash(
    CFG.replace(dtype=jnp.bfloat16)
  )
  assert isinstance(named.dtype, np.dtype) and isinstance(named.param_dtype, np.dtype)
  # The defaults are Llama-2-7B's (its Hugging Face config.json).
  d = llama.LlamaConfig()
  assert (d.vocab_size, d.hidden_size, d.intermediate_size, d.num_layers) == (
    32000,
    4096,
    11008,
    32,
  )
  assert (d.num_heads, d.num_kv_heads, d.head_dim, d.max_position_embeddings) == (32, 32, 128, 4096)
  assert (d.rope_theta, d.rms_norm_eps, d.tie_word_embeddings, d.rope_scaling) == (
    1e4,
    1e-5,
    False,
    None,
  )
  assert (d.init_std, d.remat_policy, d.attention, d.attention_chunks) == (0.02, "none", "xla", 4)


def test_init_cache_is_empty_in_the_given_dtype():
  for scan in (True, False):
    cfg = CFG.replace(scan_layers=scan)
    cache = llama.init_cache(cfg, 2, 5, dtype=jnp.bfloat16)
    for a in jax.tree.leaves((cache.k, cache.v)):
      chex.assert_type(a, jnp.bfloat16)
      chex.assert_shape(a, ((CFG.num_layers,) if scan else ()) + (2, CFG.num_kv_heads, 5, 8))
      assert not np.asarray(a, np.float32).any()
    chex.assert_type(jax.tree.leaves(llama.init_cache(cfg, 2, 5).k)[0], cfg.dtype)
    np.testing.assert_array_equal(cache.mask, np.zeros((2, 5), bool))
    np.testing.assert_array_equal(cache.positions, [0, 0])
    assert cache.index.shape == () and int(cache.index) == 0


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_passes_of_several_tokens_over_a_cache_equal_full_recomputation(params, scan):
  """After a left-padded prompt pass: a 3-token continuation (keep_cache True and False) and a
  decoding step after it; then two 2-token candidates packed in one pass with `attend` and
  their own positions (each sees the prompt's real slots and itself, as scoring packs them);
  then a pad inside the packed tokens: each equals the full pass."""
  cfg = CFG.replace(scan_layers=scan)
  variables = {"params": params if scan else llm.unstack_layers(params, CFG.num_layers)}
  module = llama.Llama(cfg)
  n, extra = 5, 4
  tokens, mask = _tokens(shape=(B, n + extra)), _left_pad_mask()[:, T - n - extra :]
  mask = mask.at[:, n:].set(1)
  full = np.asarray(_apply(module, variables, tokens, mask))
  slots = n + extra + 1
  run = jax.jit(module.apply, static_argnames=("prefill", "keep_cache"))
  first, cache = run(variables, tokens[:, :n], mask[:, :n], cache=llama.init_cache(cfg, B, slots))
  for keep in (True, False):
    more, after = run(variables, tokens[:, n : n + 3], mask[:, n : n + 3], cache=cache,
                      keep_cache=keep)  # fmt: skip
    last, _ = run(variables, tokens[:, n + 3 : n + 4], mask[:, n + 3 : n + 4], cache=after)
    steps = np.concatenate([first, more, last], axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(steps[real], full[real], rtol=2e-5, atol=2e-5)
  # Candidates (a, b) and (c, d) after the prompt, packed as [a, b, c, d].
  cand = tokens[:, n : n + 4]
  attend = jnp.asarray(np.kron(np.eye(2), np.tril(np.ones((2, 2)))), bool)[None].repeat(B, 0)
  for keep in (True, False):
    packed, _ = run(variables, cand, jnp.ones((B, 4), jnp.int32), cache=cache, attend=attend,
                    positions=cache.positions[:, None] + jnp.asarray([0, 1, 0, 1]),
                    keep_cache=keep)  # fmt: skip
    for j, pair in enumerate((cand[:, :2], cand[:, 2:])):
      seq = jnp.concatenate([tokens[:, :n], pair], axis=1)
      alone = np.asarray(_apply(module, variables, seq, mask[:, : n + 2]))
      np.testing.assert_allclose(packed[:, 2 * j : 2 * j + 2], alone[:, n:], rtol=2e-5, atol=2e-5)
  # Padding inside the packed pass: a pad candidate token is seen by no one.
  pad_mask = jnp.ones((B, 4), jnp.int32).at[:, 2].set(0)
  both = jnp.asarray(np.tril(np.ones((4, 4))), bool)[None].repeat(B, 0)
  packed, _ = run(variables, cand, pad_mask, cache=cache, attend=both)
  seq = jnp.concatenate([tokens[:, :n], cand[:, :2], cand[:, 3:]], axis=1)
  alone = np.asarray(_apply(module, variables, seq, mask[:, : n + 3]))
  np.testing.assert_allclose(packed[:, 3], alone[:, n + 2], rtol=2e-5, atol=2e-5)
  for kw in (dict(), dict(cache=cache, prefill=True)):
    with pytest.raises(ValueError, match="attend"):
      module.apply(variables, cand, attend=attend, **kw)


def test_dot_attention_groups_heads_and_masks_with_a_huge_negative():
  """Query head i reads kv head i // g (Hugging Face's repeat_kv); a masked key is out even
  when every visible score is very negative; bf16 compute gives bf16 out."""
  rng = np.random.default_rng(8)
  b, t, s, n, kv, h = 2, 3, 4, 4, 2, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, s, kv, h)).astype(np.float32)
  v = rng.normal(size=(b, s, kv, h)).astype(np.float32)
  mask = rng.random((b, t, s)) < 0.6
  mask[..., 0] = True
  got = llama.dot_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                            jnp.float32)  # fmt: skip
  kk, vv = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
  scores = np.where(mask[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, np.einsum("bnts,bsnh->btnh", probs, vv), rtol=1e-5, atol=1e-5)
  heads_first = llama.dot_attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 1, 3)),
                                    jnp.asarray(v.transpose(0, 2, 1, 3)), jnp.asarray(mask),
                                    jnp.float32, heads_first=True)  # fmt: skip
  np.testing.assert_allclose(heads_first, got, rtol=1e-6, atol=1e-6)
  # One visible key scoring -1000: it alone is read, not the masked keys (scores 0).
  far = np.zeros((1, 1, 1, h), np.float32)
  far[..., 0] = 1000.0
  keys = np.zeros((1, 2, 1, h), np.float32)
  keys[0, 0, 0, 0] = -np.sqrt(h)
  vals = np.arange(2 * h, dtype=np.float32).reshape(1, 2, 1, h)
  one = llama.dot_attention(jnp.asarray(far), jnp.asarray(keys), jnp.asarray(vals),
                            jnp.asarray([[[True, False]]]), jnp.float32)  # fmt: skip
  np.testing.assert_allclose(one[0, 0, 0], vals[0, 0, 0])
  half = llama.dot_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)),
                             jnp.asarray(mask), jnp.bfloat16)  # fmt: skip
  chex.assert_type(half, jnp.bfloat16)


def test_head_logits_read_the_head_in_the_compute_dtype_into_float32():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(2, 3, 32)).astype(np.float32)
  emb = rng.normal(size=(97, 32)).astype(np.float32)
  head = rng.normal(size=(32, 97)).astype(np.float32)
  np.testing.assert_allclose(llama.head_logits(CFG, jnp.asarray(x), emb, head), x @ head,
                             rtol=1e-5, atol=1e-4)  # fmt: skip
  tied = CFG.replace(tie_word_embeddings=True)
  np.testing.assert_allclose(llama.head_logits(tied, jnp.asarray(x), emb, None), x @ emb.T,
                             rtol=1e-5, atol=1e-4)  # fmt: skip
  np.testing.assert_allclose(llama.head_logits(CFG.replace(logit_vocab=97), jnp.asarray(x), emb,
                                               head), x @ head, rtol=1e-5, atol=1e-4)  # fmt: skip
  # bf16 compute: bf16 hidden states times the bf16-rounded head, summed in float32.
  cfg16 = CFG.replace(dtype=jnp.bfloat16)
  x16 = jnp.asarray(x, jnp.bfloat16)
  got = llama.head_logits(cfg16, x16, emb, head)
  chex.assert_type(got, jnp.float32)
  rounded = np.asarray(jnp.asarray(head, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(got, np.asarray(x16, np.float64) @ rounded, rtol=1e-5, atol=1e-4)


def test_params_random_per_layer_in_param_dtype_and_fresh_trees():
  cfg = CFG.replace(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  shapes = nn.meta.unbox(llama.abstract_params(cfg))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  got = llama.init_params(CFG, jax.random.key(0))
  assert not any(isinstance(x, nn.meta.AxisMetadata) for x in jax.tree.leaves(
    got, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)))  # fmt: skip
  for kernel in jax.tree.leaves(got["layers"]["attn"]) + jax.tree.leaves(got["layers"]["mlp"]):
    assert not np.allclose(kernel[0], kernel[1])  # each layer drawn on its own
  tree = llama.abstract_params(CFG)
  tree["layers"].pop("attn")
  assert "attn" in llama.abstract_params(CFG)["layers"]  # the cached tree is not the caller's
  module = llama.Llama(cfg)
  emb = module.apply({"params": _init(cfg)}, _tokens(), method="embed")
  chex.assert_type(emb, jnp.bfloat16)
  # Ids past the vocabulary read its last row (clipped), never NaN.
  v = CFG.vocab_size
  rows = module.apply({"params": _init(cfg)}, jnp.asarray([[v - 1, v, v + 5]]), method="embed")
  np.testing.assert_array_equal(rows[0, 1:], rows[0, :1].repeat(2, 0))


def test_projections_remat_saves_the_named_projections_and_the_mid_layer_stream(params, capsys):
  """`PROJECTIONS_SAVED` of each layer (no adapters): the rotated q and k, v, the gate and up
  projections, and the residual stream after attention ('mid'), beside the layer's input
  (the scan's carry); attention probabilities and norms are recomputed."""
  module = llama.Llama(CFG.replace(remat_policy="projections"))
  tokens = _tokens()
  found = _residual_shapes(capsys, lambda p: jnp.mean(module.apply({"params": p}, tokens) ** 2),
                           params)  # fmt: skip
  L, d, n, kv, h = CFG.num_layers, CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
  assert found.count(("f32", (L, B, T, d))) == 2  # the layer's input and 'mid'
  assert found.count(("f32", (L, B, T, n, h))) == 1  # q
  assert found.count(("f32", (L, B, T, kv, h))) == 2  # k and v
  assert found.count(("f32", (L, B, T, CFG.intermediate_size))) == 2  # gate and up
  assert not [s for _, s in found if len(s) == 6]  # no attention probabilities
