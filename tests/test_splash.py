"""Splash attention (`llm.attention=splash`, the TPU kernel; on this CPU it runs in Pallas'
interpreter) against the einsum attention it replaces: the same outputs and gradients wherever
a real query reads, with padding on either side, grouped heads, lengths off the kernel's block
size, the remat policy of training, a prefill, and mapped over a device mesh."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from test_llama import CFG, _init

from ilora_jax import llama, lora

T = llama.SPLASH_BLOCK + 22  # Two kernel blocks once padded.


def _lengths_mask(lengths, t, left):
  pos = np.arange(t)[None, :]
  real = pos >= t - lengths[:, None] if left else pos < lengths[:, None]
  return jnp.asarray(real)


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_splash_equals_einsum_attention_and_its_gradients(left):
  rng = np.random.default_rng(0)
  b, n, kv, h = 3, 4, 2, 16
  q, k, v = (jnp.asarray(rng.normal(size=(b, T, heads, h)), jnp.float32) for heads in (n, kv, kv))
  real = _lengths_mask(np.array([T, T - 40, 1]), T, left)  # [b, t]
  causal = jnp.tril(jnp.ones((T, T), bool))
  mask = causal[None] & real[:, None, :]
  weights = jnp.asarray(rng.normal(size=(b, T, n, h)), jnp.float32) * real[:, :, None, None]

  def loss(attend, q, k, v):
    out = attend(q, k, v)
    return jnp.sum(out * weights), out

  einsum = lambda q, k, v: llama.dot_attention(q, k, v, mask, jnp.float32)  # noqa: E731
  splash = lambda q, k, v: llama.splash_attention(q, k, v, real)  # noqa: E731
  (want, want_out), want_grads = jax.value_and_grad(loss, (1, 2, 3), has_aux=True)(einsum, q, k, v)
  (got, got_out), got_grads = jax.jit(
    jax.value_and_grad(lambda *a: loss(splash, *a), (0, 1, 2), has_aux=True)
  )(q, k, v)
  chex.assert_shape(got_out, (b, T, n, h))
  np.testing.assert_allclose(got_out[real], want_out[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Gradients reach real positions only (pads are no query's real key).
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g[real], w[real], rtol=1e-4, atol=1e-5)
  assert float(jnp.max(jnp.abs(want_grads[1]))) > 0


def _close_to_scale(got, want, tol):
  """Every leaf within `tol` of the largest magnitude of its reference leaf."""
  for path, g, w in zip(
    jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got), jax.tree.leaves(want)
  ):
    scale = float(jnp.max(jnp.abs(w)))
    assert scale > 0, path[0]
    err = float(jnp.max(jnp.abs(g - w)))
    assert err <= tol * scale, (jax.tree_util.keystr(path[0]), err, scale)


@pytest.mark.parametrize("adapters", [False, True], ids=["base", "adapters-dropout"])
def test_llama_trains_the_same_with_splash(adapters):
  """Loss and gradients of a right-padded batch with splash attention against einsum
  attention in one pass, under remat 'projections'; with adapters, gates and dropout too."""
  factory = (
    lora.adapter_factory(lora.LoRAConfig(rank=4, num_experts=2, dropout=0.25)) if adapters else None
  )
  params = _init(CFG, factory, num_gates=2 if adapters else None)
  rng = np.random.default_rng(3)
  b = 3
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, T)), jnp.int32)
  mask = _lengths_mask(np.array([T, 70, 5]), T, left=False).astype(jnp.int32)
  gates = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, 2)), jnp.float32)) if adapters else None
  weights = jnp.asarray(rng.normal(size=(b, T, CFG.vocab_size)), jnp.float32)

  def loss_of(attention):
    cfg = CFG.replace(attention=attention, attention_chunks=1, remat_policy="projections")
    module = llama.Llama(cfg, adapter=factory)

    def loss(p):
      logits = module.apply(
        {"params": p}, tokens, mask, gate_weights=gates, deterministic=not adapters,
        rngs={"dropout": jax.random.PRNGKey(5)},
      )  # fmt: skip
      return jnp.sum(logits * weights * mask[..., None])

    return jax.jit(jax.value_and_grad(loss))(params)

  splash, einsum = loss_of("splash"), loss_of("xla")
  # The base model agrees to float32 rounding. The test adapters' B matrices (std 0.2, where
  # training starts them at 0) and dropout's 1/keep scaling make that model ill-conditioned:
  # reordered float32 sums move its gradients by up to 4e-4 of their scale (the causal chunks
  # of the einsum path against one pass: 7e-5). A wrong mask or scale moves them by O(1).
  _close_to_scale(splash, einsum, 1e-3 if adapters else 1e-5)
  if adapters:
    grad = einsum[1]["layers"]["attn"]["k"]["adapter"]["lora_a"]
    assert float(jnp.max(jnp.abs(grad))) > 0


def test_prefill_with_splash_equals_einsum():
  """A left-padded prefill into an empty cache: logits of real positions and the cache."""
  params = _init()
  rng = np.random.default_rng(4)
  b = 3
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, T)), jnp.int32)
  mask = _lengths_mask(np.array([T, T - 70, 3]), T, left=True).astype(jnp.int32)
  outs = []
  for attention in ("splash", "xla"):
    module = llama.Llama(CFG.replace(attention=attention))
    outs.append(
      jax.jit(module.apply, static_argnames="prefill")(
        {"params": params}, tokens, mask, cache=llama.init_cache(CFG, b, T + 1), prefill=True
      )
    )
  real = np.asarray(mask, bool)
  (splash_logits, splash_cache), (einsum_logits, einsum_cache) = outs
  np.testing.assert_allclose(splash_logits[real], einsum_logits[real], rtol=2e-5, atol=2e-5)
  held = np.asarray(einsum_cache.mask)
  for a, e in [(splash_cache.k, einsum_cache.k), (splash_cache.v, einsum_cache.v)]:
    a, e = np.moveaxis(np.asarray(a), 3, 2), np.moveaxis(np.asarray(e), 3, 2)
    np.testing.assert_allclose(a[:, held], e[:, held], rtol=2e-5, atol=2e-5)


MESH_SCRIPT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from ilora_jax import llama

  assert jax.device_count() == 4
  mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
  rng = np.random.default_rng(0)
  b, t, n, kv, h = 4, 150, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, kv, kv))
  real = jnp.asarray(np.arange(t)[None] < np.array([t, 90, 7, 1])[:, None])
  rows = NamedSharding(mesh, P("data"))
  q, k, v, real = (jax.device_put(x, rows) for x in (q, k, v, real))
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & real[:, None, :]
  want = llama.dot_attention(q, k, v, mask, jnp.float32)
  fn = jax.jit(lambda q, k, v, r: llama.splash_attention(q, k, v, r, mesh))
  text = fn.lower(q, k, v, real).as_text()
  assert "manual_computation" in text or "shard_map" in text, text[:2000]  # mapped, not gathered
  got = fn(q, k, v, real)
  m = np.asarray(real)
  np.testing.assert_allclose(np.asarray(got)[m], np.asarray(want)[m], rtol=1e-5, atol=1e-5)
  # Nothing divides (3 rows over 2, 3 heads over 2): still mapped, with replicated specs,
  # since Mosaic lowers the kernel for one device only.
  q3, k3, v3, real3 = q[:3, :, :3], k[:3, :, :1], v[:3, :, :1], real[:3]
  mask3 = jnp.tril(jnp.ones((t, t), bool))[None] & real3[:, None, :]
  want3 = llama.dot_attention(q3, k3, v3, mask3, jnp.float32)
  text3 = fn.lower(q3, k3, v3, real3).as_text()
  assert "manual_computation" in text3 or "shard_map" in text3, text3[:2000]
  got3 = fn(q3, k3, v3, real3)
  m3 = np.asarray(real3)
  np.testing.assert_allclose(np.asarray(got3)[m3], np.asarray(want3)[m3], rtol=1e-5, atol=1e-5)
  print("mesh ok", got.sharding)
  """
)


def test_splash_mapped_over_a_mesh():
  """Rows over `data`, heads over `tensor`, and a batch where neither divides (4 CPU
  devices, in a subprocess)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(4))
  proc = subprocess.run(
    [sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh ok" in proc.stdout
