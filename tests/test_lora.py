"""Instance-wise LoRA: the fused adapter against unfused numpy formulas, init, seam, helpers."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ilora_jax import llama, lora
from ilora_jax.errors import UserError

D_IN, D_OUT, T = 12, 10, 5


def _module(rank=8, experts=4, alpha=32.0, dropout=0.0, **kw):
  return lora.InstanceLoRA(
    in_features=D_IN,
    out_features=D_OUT,
    rank=rank,
    num_experts=experts,
    alpha=alpha,
    dropout_rate=dropout,
    **kw,
  )


def _random_params(rank, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((D_IN, rank)).astype(np.float32)
  b = rng.standard_normal((rank, D_OUT)).astype(np.float32)
  return a, b


def _x(batch=3, seed=1):
  return np.random.default_rng(seed).standard_normal((batch, T, D_IN)).astype(np.float32)


def _apply(module, a, b, x, gate, deterministic=True, rngs=None):
  params = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
  g = None if gate is None else jnp.asarray(gate)
  return module.apply({"params": params}, jnp.asarray(x), g, deterministic, rngs=rngs)


def _unfused_numpy(x, a, b, gate, alpha, experts):
  """s * sum_k g[b, k] * (x @ A_k) @ B_k, one expert at a time, in float64."""
  rank = a.shape[1]
  per = rank // experts
  s = alpha / per
  x, a, b = (v.astype(np.float64) for v in (x, a, b))
  out = np.zeros(x.shape[:2] + (b.shape[1],))
  for k in range(experts):
    a_k, b_k = a[:, k * per : (k + 1) * per], b[k * per : (k + 1) * per]
    out += gate[:, k, None, None] * ((x @ a_k) @ b_k)
  return s * out


def test_delta_is_exactly_zero_at_init():
  module = _module()
  x = jnp.asarray(_x())
  gate = jax.nn.softmax(jax.random.normal(jax.random.key(3), (3, 4)))
  variables = module.init(jax.random.key(0), x, gate, True)
  delta = module.apply(variables, x, gate, True)
  chex.assert_shape(delta, (3, T, D_OUT))
  np.testing.assert_array_equal(np.asarray(delta), 0.0)
  params = nn.meta.unbox(variables["params"])
  chex.assert_shape(params["lora_a"], (D_IN, 8))
  chex.assert_shape(params["lora_b"], (8, D_OUT))
  assert np.abs(np.asarray(params["lora_a"])).max() > 0


def test_lora_a_init_matches_torch_kaiming_uniform_bound():
  fan_in = 512
  # torch.nn.init.kaiming_uniform_(w, a=sqrt(5)): gain = sqrt(2 / (1 + a^2)), bound =
  # gain * sqrt(3 / fan_in); written out here, or taken from torch itself when installed.
  bound = math.sqrt(2.0 / (1.0 + 5.0)) * math.sqrt(3.0 / fan_in)
  try:
    import torch

    w = torch.empty(256, fan_in)  # torch layout [out = rank, in]
    torch.manual_seed(0)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    assert abs(w.abs().max().item() - bound) < 0.01 * bound
  except ImportError:
    pass
  module = lora.InstanceLoRA(in_features=fan_in, out_features=4, rank=256, num_experts=4)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 1, fan_in)), None, True)
  a = np.asarray(nn.meta.unbox(variables["params"])["lora_a"])  # [in, rank]
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.99 * bound
  np.testing.assert_allclose(a.std(), bound / math.sqrt(3.0), rtol=0.02)


def test_one_expert_constant_gate_is_plain_lora():
  rank, alpha = 8, 16.0
  a, b = _random_params(rank)
  x = _x()
  gate = np.asarray(lora.fixed_gate("constant", 3, 1))
  delta = _apply(_module(rank=rank, experts=1, alpha=alpha), a, b, x, gate)
  expected = x.astype(np.float64) @ a @ b * alpha / rank
  np.testing.assert_allclose(np.asarray(delta), expected, rtol=1e-5, atol=1e-4)


def test_four_experts_equal_the_unfused_per_expert_sum():
  rank, experts, alpha = 8, 4, 32.0
  a, b = _random_params(rank, seed=2)
  x = _x(batch=4)
  logits = np.random.default_rng(5).standard_normal((4, experts))
  gate = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
  delta = _apply(_module(rank=rank, experts=experts, alpha=alpha), a, b, x, gate)
  expected = _unfused_numpy(x, a, b, gate, alpha, experts)
  np.testing.assert_allclose(np.asarray(delta), expected, rtol=1e-5, atol=1e-4)


def test_none_gate_weights_every_component_one():
  a, b = _random_params(8, seed=3)
  x = _x()
  delta = _apply(_module(), a, b, x, None)
  expected = _unfused_numpy(x, a, b, np.ones((3, 4)), 32.0, 4)
  np.testing.assert_allclose(np.asarray(delta), expected, rtol=1e-5, atol=1e-4)


def test_uniform_gate_is_plain_lora_with_standard_scale():
  rank, alpha = 8, 32.0
  a, b = _random_params(rank, seed=4)
  x = _x()
  gate = np.asarray(lora.fixed_gate("uniform", 3, 4))
  np.testing.assert_allclose(gate, 0.25)
  delta = _apply(_module(rank=rank, experts=4, alpha=alpha), a, b, x, gate)
  expected = x.astype(np.float64) @ a @ b * alpha / rank
  np.testing.assert_allclose(np.asarray(delta), expected, rtol=1e-5, atol=1e-4)


def test_gates_act_per_instance():
  a, b = _random_params(8, seed=6)
  row = _x(batch=1)
  x = np.concatenate([row, row], axis=0)  # the same input for both instances
  gate = np.asarray([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]], np.float32)
  delta = np.asarray(_apply(_module(), a, b, x, gate))
  assert np.abs(delta[0] - delta[1]).max() > 1e-2
  same = np.asarray(_apply(_module(), a, b, x, np.stack([gate[0], gate[0]])))
  np.testing.assert_array_equal(same[0], same[1])
  np.testing.assert_allclose(same[0], delta[0], rtol=1e-6)


def test_dropout_only_when_not_deterministic():
  a, b = _random_params(8, seed=7)
  x = _x()
  gate = np.full((3, 4), 0.25, np.float32)
  module = _module(dropout=0.5)
  reference = _unfused_numpy(x, a, b, gate, 32.0, 4)
  rngs = {"dropout": jax.random.key(0)}
  eval_delta = np.asarray(_apply(module, a, b, x, gate, True, rngs))
  np.testing.assert_allclose(eval_delta, reference, rtol=1e-5, atol=1e-4)
  train_1 = np.asarray(_apply(module, a, b, x, gate, False, rngs))
  train_2 = np.asarray(_apply(module, a, b, x, gate, False, {"dropout": jax.random.key(1)}))
  assert np.abs(train_1 - reference).max() > 1e-2
  assert np.abs(train_1 - train_2).max() > 1e-2
  # With identity-like A (one input feature per rank component) and B, dropout's effect is
  # visible per feature: kept features are scaled by 1 / (1 - rate), dropped ones are 0.
  a_id = np.zeros((D_IN, 8), np.float32)
  a_id[np.arange(8), np.arange(8)] = 1.0
  b_id = np.zeros((8, D_OUT), np.float32)
  b_id[np.arange(8), np.arange(8)] = 1.0
  out = np.asarray(_apply(module, a_id, b_id, x, gate, False, rngs))[..., :8]
  ratio = out / (32.0 / 2 * 0.25 * x[..., :8])
  assert set(np.round(np.unique(ratio), 4)) <= {0.0, 2.0}
  assert 0.2 < np.mean(ratio == 0) < 0.8


@pytest.mark.parametrize("shape", [(7, 33, 100), (7, 33, 101)])  # 4 draws per call; fallback
def test_dropout_rate_scale_and_independence(shape):
  x = jnp.ones(shape, jnp.float32)
  for rate in (0.05, 0.1, 0.5):
    out = np.asarray(lora.dropout(jax.random.key(3), x, rate))
    threshold = round(rate * 65536)
    keep_prob = 1 - threshold / 65536
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1 / keep_prob, rtol=1e-6)  # E[out] = x exactly
    n = out.size
    # Binomial(n, rate): the dropped fraction within 5 standard deviations of the rate.
    assert abs((~kept).mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
  a = np.asarray(lora.dropout(jax.random.key(0), x, 0.5)) != 0
  b = np.asarray(lora.dropout(jax.random.key(1), x, 0.5)) != 0
  assert 0.4 < (a == b).mean() < 0.6  # independent masks agree on about half the elements
  # Neighbouring elements share a 32-bit word, groups of four one threefry call, rows the
  # flat counter: all uncorrelated.
  flat = a.reshape(-1)
  for lag in (1, 2, 3, shape[-1]):  # element 4j against element 4j + lag
    first, other = flat[0::4], flat[lag::4]
    m = min(len(first), len(other))
    assert abs(np.corrcoef(first[:m], other[:m])[0, 1]) < 0.03, lag
  assert lora.dropout(jax.random.key(0), x, 0.0) is x


def test_bfloat16_dropout_keeps_the_mean():
  """In bfloat16 the kept elements are x / keep_prob rounded once: over many random values
  their sum is sum(x) / keep_prob (float64, numpy) to rounding noise, where a scale rounded to
  bfloat16 first (1.109375 for 1/0.9) would leave them 0.16% short."""
  x = jax.random.uniform(jax.random.key(5), (64, 4096), jnp.float32, 0.5, 2.0).astype(jnp.bfloat16)
  out = np.asarray(lora.dropout(jax.random.key(6), x, 0.1), np.float64)
  kept = out != 0
  ratio = out[kept].sum() / np.asarray(x, np.float64)[kept].sum()
  keep_prob = 1 - round(0.1 * 65536) / 65536
  assert abs(ratio * keep_prob - 1) < 2e-4, ratio * keep_prob


def test_uniform16_is_threefry_in_counter_mode():
  """Each group of four last-axis elements holds the two output words of one threefry2x32
  call on the counter (flat group index, 0), low half first: JAX's own threefry as the
  reference, for raw and typed keys."""
  from jax.extend.random import threefry_2x32

  shape = (3, 5, 8)  # 30 groups of four
  for key in (jax.random.PRNGKey(7), jax.random.key(7)):
    got = np.asarray(lora.uniform16(key, shape)).reshape(-1, 4)
    raw = jax.random.PRNGKey(7)
    for i in range(got.shape[0]):
      words = np.asarray(threefry_2x32(raw, jnp.array([i, 0], jnp.uint32)), np.uint32)
      expected = [w >> s & 0xFFFF for w in words for s in (0, 16)]
      assert got[i].tolist() == expected, i
  other = np.asarray(lora.uniform16(jax.random.PRNGKey(8), shape))
  assert (other != got.reshape(shape)).mean() > 0.99
  # Another generator's key, or a last axis not divisible by 4: JAX's bits, the same shape.
  for key, shp in ((jax.random.key(7, impl="rbg"), shape), (jax.random.PRNGKey(7), (3, 5, 7))):
    u = lora.uniform16(key, shp)
    assert u.shape == shp and u.dtype == jnp.uint16 and 0.4 < np.asarray(u).mean() / 65535 < 0.6


def test_gradients_match_the_unfused_per_expert_sum():
  a, b = _random_params(8, seed=11)
  x = _x(batch=2)
  gate = np.random.default_rng(2).dirichlet(np.ones(4), size=2).astype(np.float32)
  module = _module()
  cot = np.random.default_rng(4).standard_normal((2, T, D_OUT)).astype(np.float32)

  def fused(a, b, x, g):
    return jnp.sum(module.apply({"params": {"lora_a": a, "lora_b": b}}, x, g, True) * cot)

  def unfused(a, b, x, g):  # s * sum_k g_k (x A_k) B_k, each expert on its own
    per = 2
    total = 0.0
    for k in range(4):
      block = jnp.einsum(
        "btd,dr,re->bte", x, a[:, k * per : (k + 1) * per], b[k * per : (k + 1) * per]
      )
      total = total + g[:, k, None, None] * block
    return jnp.sum(32.0 / per * total * cot)

  args = tuple(jnp.asarray(v) for v in (a, b, x, gate))
  got = jax.grad(fused, argnums=(0, 1, 2, 3))(*args)
  want = jax.grad(unfused, argnums=(0, 1, 2, 3))(*args)
  for g, w in zip(got, want):
    chex.assert_trees_all_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(48, 8), (8, 40), (8, 8)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_thin_matmul_gradients_are_the_matmul_formulas(shape, dtype):
  # Its custom gradient (CPU) writes x^T g as (small)^T (large); numpy gives the formulas.
  rng = np.random.default_rng(5)
  x = rng.standard_normal((24, shape[0])).astype(np.float32)
  w = rng.standard_normal(shape).astype(np.float32)
  g = rng.standard_normal((24, shape[1])).astype(np.float32)
  xs, ws = jnp.asarray(x, dtype), jnp.asarray(w, dtype)

  def loss(x, w):
    return jnp.sum(lora.thin_matmul(x, w).astype(jnp.float32) * g)

  y = jax.jit(lora.thin_matmul)(xs, ws)
  g_x, g_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, ws)
  chex.assert_shape(y, (24, shape[1]))
  assert y.dtype == g_x.dtype == g_w.dtype == dtype
  x, w = np.asarray(xs, np.float32), np.asarray(ws, np.float32)  # the values after rounding
  tol = 1e-4 if dtype == jnp.float32 else 0.1
  np.testing.assert_allclose(np.asarray(y, np.float32), x @ w, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(g_x, np.float32), g @ w.T, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(g_w, np.float32), x.T @ g, rtol=tol, atol=tol)


def test_thin_matmul_rejects_batched_operands():
  # Its gradient formulas transpose 2-D operands; a batched x would be silently wrong.
  with pytest.raises(ValueError, match="2-D operands"):
    lora.thin_matmul(jnp.ones((2, 3, 8)), jnp.ones((8, 4)))


def test_compute_dtype_follows_the_input():
  a, b = _random_params(8, seed=8)
  x = _x()
  gate = np.full((3, 4), 0.25, np.float32)
  delta = _apply(_module(), a, b, x.astype(jnp.bfloat16), gate)
  assert delta.dtype == jnp.bfloat16
  expected = _unfused_numpy(x, a, b, gate, 32.0, 4)
  np.testing.assert_allclose(np.asarray(delta, np.float32), expected, rtol=0.05, atol=0.5)


def test_bad_gate_shape_is_rejected():
  a, b = _random_params(8)
  with pytest.raises(ValueError, match="experts"):
    _apply(_module(), a, b, _x(), np.ones((3, 2), np.float32))
  with pytest.raises(ValueError, match="batch"):
    _apply(_module(), a, b, _x(), np.ones((2, 4), np.float32))


def test_jitted_apply_does_not_retrace():
  module = _module()
  a, b = _random_params(8)
  params = {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def apply(params, x, gate):
    return module.apply({"params": params}, x, gate, True)

  gate = jnp.full((3, 4), 0.25)
  apply(params, jnp.asarray(_x(seed=1)), gate)
  apply(params, jnp.asarray(_x(seed=2)), gate * 2)
  chex.clear_trace_counter()


def test_config_validation_and_fixed_gate_errors():
  assert lora.LoRAConfig().scale == 16.0
  assert lora.LoRAConfig(targets=["q", "v"]).targets == ("q", "v")
  with pytest.raises(UserError, match="multiple"):
    lora.LoRAConfig(rank=6, num_experts=4)
  with pytest.raises(UserError, match="targets"):
    lora.LoRAConfig(targets=("q", "lm_head"))
  with pytest.raises(UserError, match="gate"):
    lora.LoRAConfig(gate="topk")
  with pytest.raises(UserError, match="dropout"):
    lora.LoRAConfig(dropout=1.0)
  with pytest.raises(UserError, match="fixed gate"):
    lora.fixed_gate("router", 2, 4)
  np.testing.assert_array_equal(np.asarray(lora.fixed_gate("constant", 2, 3)), np.ones((2, 3)))


def test_factory_targets_and_logical_axes():
  cfg = lora.LoRAConfig(targets=("q", "k", "o", "gate", "down"))
  factory = lora.adapter_factory(cfg)
  assert factory == lora.adapter_factory(lora.LoRAConfig(targets=("q", "k", "o", "gate", "down")))
  assert hash(factory) == hash(lora.adapter_factory(cfg))
  assert factory(in_features=4, out_features=4, target="v", name="adapter") is None
  expected = {
    "q": (("embed", "lora_rank"), ("lora_rank", "heads")),
    "k": (("embed", "lora_rank"), ("lora_rank", "kv_heads")),
    "o": (("embed", "lora_rank"), ("lora_rank", "embed")),
    "gate": (("embed", "lora_rank"), ("lora_rank", "mlp")),
    "down": (("mlp", "lora_rank"), ("lora_rank", "embed")),
  }
  for target, (a_axes, b_axes) in expected.items():
    module = factory(in_features=6, out_features=10, target=target, name="adapter")
    variables = jax.eval_shape(
      lambda key, x, g, m=module: m.init(key, x, g, True),
      jax.random.key(0),
      jnp.zeros((1, 1, 6)),
      jnp.ones((1, 4)),
    )
    spec = nn.get_partition_spec(variables)["params"]
    assert tuple(spec["lora_a"]) == a_axes, target
    assert tuple(spec["lora_b"]) == b_axes, target
    assert module.dropout_rate == cfg.dropout and module.param_dtype == jnp.float32


def test_is_lora_param_and_count_params():
  tree = {
    "layers": {
      "attn": {"q": {"kernel": np.zeros((4, 2, 3)), "adapter": {"lora_a": np.zeros((4, 8))}}},
      "mlp": {"up": {"adapter": {"lora_b": np.zeros((8, 5))}}},
    },
    "lora_a": np.zeros(3),  # not under an adapter scope
  }
  flat = traverse_util.flatten_dict(tree)
  selected = sorted("/".join(k) for k in flat if lora.is_lora_param(k))
  assert selected == ["layers/attn/q/adapter/lora_a", "layers/mlp/up/adapter/lora_b"]
  assert lora.is_lora_param("x/adapter/lora_b") and not lora.is_lora_param("x/adapter/kernel")
  mask = lora.lora_mask(tree)
  assert mask["layers"]["attn"]["q"]["adapter"]["lora_a"] is True
  assert mask["layers"]["attn"]["q"]["kernel"] is False and mask["lora_a"] is False
  assert lora.count_params(tree) == 24 + 32 + 40 + 3
  assert lora.count_params(tree, lora.is_lora_param) == 32 + 40
  # Boxed params (leaf paths end in `.value`) and abstract shapes work too.
  module = _module()
  boxed = jax.eval_shape(
    lambda key: module.init(key, jnp.zeros((1, 1, D_IN)), None, True), jax.random.key(0)
  )
  assert lora.count_params({"adapter": boxed["params"]}, lora.is_lora_param) == 8 * (D_IN + D_OUT)


TINY_LLAMA = llama.LlamaConfig(
  vocab_size=48,
  hidden_size=16,
  intermediate_size=24,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=4,
  max_position_embeddings=32,
)


def test_through_the_llama_seam():
  config = TINY_LLAMA
  factory = lora.adapter_factory(lora.LoRAConfig(dropout=0.0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 7)), jnp.int32)
  gate = jnp.asarray([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]], jnp.float32)
  model = llama.Llama(config, adapter=factory)
  # Abstract init (no RNG compile), then numpy-filled params: random base weights and A, B = 0.
  abstract = jax.eval_shape(lambda key: model.init(key, tokens), jax.random.key(0))["params"]
  spec = traverse_util.flatten_dict(nn.get_partition_spec(abstract))
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract))
  adapter_keys = [k for k in flat if lora.is_lora_param(k)]
  layers = 1 if config.scan_layers else config.num_layers
  assert len(adapter_keys) == 2 * 7 * layers
  down_a = [k for k in adapter_keys if "down" in k and k[-1] == "lora_a"][0]
  assert tuple(spec[down_a])[-2:] == ("mlp", "lora_rank")
  rng = np.random.default_rng(1)
  flat = {
    k: jnp.zeros(v.shape, v.dtype)
    if k[-1] == "lora_b"
    else jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype)
    for k, v in flat.items()
  }
  base = traverse_util.unflatten_dict({k: v for k, v in flat.items() if "adapter" not in k})
  plain = jax.jit(lambda p: llama.Llama(config).apply({"params": p}, tokens))(base)
  run = jax.jit(lambda p, g: model.apply({"params": p}, tokens, gate_weights=g))
  at_init = run(traverse_util.unflatten_dict(flat), gate)
  np.testing.assert_array_equal(np.asarray(at_init), np.asarray(plain))
  # Non-zero B: the adapters change the logits, per instance through the gate.
  for k in adapter_keys:
    if k[-1] == "lora_b":
      flat[k] = jnp.asarray(0.05 * rng.standard_normal(flat[k].shape), jnp.float32)
  params = traverse_util.unflatten_dict(flat)
  out = run(params, gate)
  assert np.abs(np.asarray(out) - np.asarray(plain)).max() > 1e-3
  # Independent of the adapter code: row i's logits are the plain model's with every wrapped
  # kernel W replaced by W + s A diag(g_i repeated over each expert's r / E components) B.
  s, per_expert = 32.0 / (8 / 4), 8 // 4
  for i in range(len(gate)):
    g = np.repeat(np.asarray(gate[i], np.float64), per_expert)
    folded = {k: np.asarray(v, np.float64) for k, v in flat.items() if "adapter" not in k}
    for k in adapter_keys:
      if k[-1] == "lora_a":
        a, b = np.asarray(flat[k], np.float64), np.asarray(flat[k[:-1] + ("lora_b",)], np.float64)
        kernel = k[:-2] + ("kernel",)
        delta = s * np.einsum("...ir,r,...ro->...io", a, g, b)  # [(layers,) d_in, d_out]
        folded[kernel] = folded[kernel] + delta.reshape(folded[kernel].shape)
    folded = traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in folded.items()}
    )
    want = llama.Llama(config).apply({"params": folded}, tokens[i : i + 1])
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(want[0]), rtol=1e-4, atol=1e-4)


def test_dropout_keeps_exactly_the_draws_at_or_above_the_threshold():
  """An element is kept iff its 16-bit draw (threefry2x32 in counter mode, from JAX's own
  threefry) is >= round(rate * 2**16): with the rate set to one element's draw, that element
  is kept and every draw below it dropped; kept ones are scaled by 2**16 / (2**16 - threshold)."""
  from jax.extend.random import threefry_2x32

  shape = (2, 8)  # four groups of four
  raw = jax.random.PRNGKey(11)
  draws = np.array(
    [
      w >> s & 0xFFFF
      for i in range(4)
      for w in np.asarray(threefry_2x32(raw, jnp.array([i, 0], jnp.uint32)), np.uint32)
      for s in (0, 16)
    ],
    np.int64,
  ).reshape(shape)
  x = np.random.default_rng(0).uniform(1.0, 2.0, shape).astype(np.float32)
  for threshold in np.unique(draws)[[1, 7, -1]]:  # each one element's draw
    out = np.asarray(lora.dropout(raw, jnp.asarray(x), int(threshold) / 65536))
    keep = draws >= threshold
    assert keep.sum() and (~keep).sum()
    np.testing.assert_array_equal(out != 0, keep)
    np.testing.assert_allclose(out[keep], x[keep] * 65536 / (65536 - threshold), rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"rank": 0, "num_experts": 1}, "must be > 0"),
    ({"rank": 8, "num_experts": 0}, "must be > 0"),
    ({"rank": -4, "num_experts": 2}, "must be > 0"),
    ({"dropout": -0.1}, "dropout"),
  ],
  ids=["zero_rank", "zero_experts", "negative_rank", "negative_dropout"],
)
def test_config_refuses_empty_ranks_and_negative_dropout(kwargs, match):
  with pytest.raises(UserError, match=match):
    lora.LoRAConfig(**kwargs)


def test_factory_adapters_follow_the_config():
  """Rank, experts, alpha, dropout and dtype of the config (none of them the module's
  defaults) reach the adapter: its delta is the unfused numpy formula with that config's
  scale alpha / (r / E) = 9 / 2; an unknown target is refused."""
  cfg = lora.LoRAConfig(rank=6, num_experts=3, alpha=9.0, dropout=0.25, dtype=jnp.bfloat16)
  factory = lora.adapter_factory(cfg)
  module = factory(in_features=D_IN, out_features=D_OUT, target="up", name="adapter")
  assert (module.rank, module.num_experts, module.alpha) == (6, 3, 9.0)
  assert module.dropout_rate == 0.25 and module.param_dtype == jnp.bfloat16
  a, b = _random_params(6, seed=12)
  x = _x(batch=2)
  gate = np.asarray([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], np.float32)
  delta = _apply(module, a, b, x, gate)
  expected = _unfused_numpy(x, a, b, gate, 9.0, 3)
  np.testing.assert_allclose(np.asarray(delta), expected, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="unknown adapter target"):
    factory(in_features=4, out_features=4, target="lm_head", name="adapter")


def test_one_gate_row_is_broadcast_over_the_batch():
  """gate_weights [1, E] weight every instance alike: the unfused formula with that row
  repeated for each instance."""
  a, b = _random_params(8, seed=13)
  x = _x(batch=3)
  gate = np.asarray([[0.5, 0.3, 0.15, 0.05]], np.float32)
  delta = _apply(_module(), a, b, x, gate)
  expected = _unfused_numpy(x, a, b, np.repeat(gate, 3, axis=0), 32.0, 4)
  np.testing.assert_allclose(np.asarray(delta), expected, rtol=1e-5, atol=1e-4)


def test_module_refuses_a_rank_not_split_over_experts_and_a_wrong_input():
  a, b = _random_params(6)
  with pytest.raises(ValueError, match="multiple of num_experts"):
    _apply(_module(rank=6, experts=4), a, b, _x(), None)  # no gate: would scale by 32 / 1
  a, b = _random_params(8)
  with pytest.raises(ValueError, match="x must be"):
    _apply(_module(), a, b, _x()[:, 0], None)  # [batch, in] without the time axis
  with pytest.raises(ValueError, match="x must be"):
    _apply(_module(), a, b, np.ones((3, T, D_IN + 1), np.float32), None)
