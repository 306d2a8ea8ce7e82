"""A functional Llama decoder in Flax linen, with seams for instance-wise adapters.

Shapes use these letters: b batch, t query time, s key time (cache slots), d embed (hidden),
n query heads, k kv heads, g query heads per kv head (n = k * g), h head_dim, f mlp
(intermediate), v vocab, l layers.

Parameters carry logical axis names ('vocab', 'embed', 'mlp', 'heads', 'kv_heads',
'head_dim', and 'layers' for the scan axis); activations are constrained with
('batch', 'length', 'embed') at residual boundaries. The model never names mesh axes.

Adapter seam: every projection (q, k, v, o, gate, up, down) is a `Projection`. When the
`Llama` module gets an `adapter` factory, each projection calls

  adapter(in_features=..., out_features=..., target='q', name='adapter')

inside its compact scope. The factory returns a linen module (or None to leave that projection
alone) that is called as `delta = module(x, gate_weights, deterministic)` with `x` the
projection's input flattened to [batch, time, in_features]; `delta` [batch, time,
out_features] is added to the base output. `gate_weights` ([batch, experts] or None) and
`deterministic` (a Python bool) are explicit forward arguments, broadcast (not scanned) to
every layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ilora_jax.lora import KEEP_NAME

Array = jax.Array
AdapterFactory = Callable[..., nn.Module | None]

_MASKED = -1e30  # score given to masked keys; finite so fully masked rows stay finite.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "projections")
# What the 'projections' policy keeps of each layer for the backward pass (names given with
# `checkpoint_name`): the rotated q and k and the v projection, the residual stream after
# attention, the gate and up projections of the MLP, and every adapter's dropout mask
# (`lora.KEEP_NAME`, one byte per element). Everything else (norms, attention probabilities
# and output, SwiGLU, the adapters' dropped inputs and low-rank products) is recomputed from
# those, which costs no large matmul and no random bits.
PROJECTIONS_SAVED = ("q", "k", "v", "mid", "mlp_gate", "mlp_up", KEEP_NAME)
ATTENTION_IMPLS = ("xla", "cudnn", "splash")


# The rotary scalings `LlamaConfig.rope_scaling` may hold, with their keys.
ROPE_SCALING_KEYS = {
  "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
  "linear": {"factor"},
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama decoder (hashable, so usable as a static argument).

  `rope_scaling` is None or a mapping of a rotary scaling as transformers names it: with
  'rope_type' 'llama3' (also where the key is absent), 'factor', 'low_freq_factor',
  'high_freq_factor' and 'original_max_position_embeddings' (the last three default to 1, 4
  and 8192); with 'rope_type' 'linear', 'factor' alone (every frequency divided by it).
  `remat_policy` is one of 'none', 'full', 'dots' (save matmul outputs), 'dots_no_batch' or
  'projections' (save the projection outputs and dropout masks, `PROJECTIONS_SAVED`).
  `init_std` is the standard deviation of the matrices drawn by `init_params` (Hugging Face's
  0.02); it only matters for random models, loaded weights replace every matrix.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, float] | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  init_std: float = 0.02
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  # 'xla': einsum attention (any backend); 'cudnn': fused cuDNN attention through
  # `jax.nn.dot_product_attention` for full passes (NVIDIA GPUs, bf16/fp16); 'splash': the
  # Pallas splash-attention kernel for full passes (TPUs; elsewhere it runs in Pallas'
  # interpreter, for tests). Decoding steps with a KV cache always use the einsum path.
  attention: str = "xla"
  # The mesh the splash kernel is mapped over (`jax.shard_map`: batch over the data and fsdp
  # axes, heads over tensor, where they divide); None runs it on whole arrays.
  kernel_mesh: Any = None
  # Query chunks of the einsum path's causal attention without a cache (`causal_chunks`);
  # 1 is one pass over every key.
  attention_chunks: int = 4
  # Ids the head scores: rows at and after it (added by `tokenizer.resize_vocab` to round the
  # vocabulary up for sharding; no token maps to them) get a logit of -1e30, out of every
  # softmax and argmax. None: every row is a token.
  logit_vocab: int | None = None

  def __post_init__(self):
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      kind = scaling.get("rope_type", "llama3")
      if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling type {kind!r} not in {tuple(ROPE_SCALING_KEYS)}")
      unknown = sorted(set(scaling) - ROPE_SCALING_KEYS[kind] - {"rope_type"})
      if unknown:
        raise ValueError(f"rope_scaling of type {kind!r} has no keys {unknown}")
      if not float(scaling.get("factor", 0.0)) > 0:
        raise ValueError(f"rope_scaling needs a factor > 0, got {scaling.get('factor')}")
      object.__setattr__(self, "rope_scaling", flax.core.FrozenDict(scaling))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention {self.attention!r} not in {ATTENTION_IMPLS}")
    if self.attention_chunks < 1:
      raise ValueError(f"attention_chunks must be >= 1, got {self.attention_chunks}")
    if self.logit_vocab is not None and not 0 < self.logit_vocab <= self.vocab_size:
      raise ValueError(f"logit_vocab {self.logit_vocab} not in [1, {self.vocab_size}]")
    if not self.init_std > 0:
      raise ValueError(f"init_std must be > 0, got {self.init_std}")

  def replace(self, **changes) -> LlamaConfig:
    """Returns a copy with `changes` applied."""
    return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class KVCache:
  """Key/value cache for incremental decoding (a pytree).

  Attributes:
    k: cached keys (rotary already applied): for a model with scanned layers one array
      [layers, batch, kv_heads, slots, head_dim]; otherwise a tuple of one array
      [batch, kv_heads, slots, head_dim] per layer, so that each layer's new keys are
      written into their own buffer in place (slicing a stacked cache for each layer and
      stacking it again copied the whole cache at every decode step).
      Heads before slots: each layer's [slots, head_dim] blocks are the contiguous operands
      attention's batched matmuls (batch and heads as batch dimensions) read. With slots
      before heads, XLA transposed the whole cache of every layer at every decode step.
    v: cached values, laid out as `k`.
    mask: [batch, slots] bool, True where a slot holds a real (non-pad) token.
    index: int32 scalar, the next slot to write (same for every row).
    positions: [batch] int32, the rotary position of each row's next real token.
  """

  k: Array
  v: Array
  mask: Array
  index: Array
  positions: Array


def init_cache(config: LlamaConfig, batch: int, slots: int, dtype: Any = None) -> KVCache:
  """Returns an empty cache with `slots` positions per row."""
  dtype = config.dtype if dtype is None else dtype
  shape = (batch, config.num_kv_heads, slots, config.head_dim)
  if config.scan_layers:
    k = jnp.zeros((config.num_layers, *shape), dtype)
    v = jnp.zeros((config.num_layers, *shape), dtype)
  else:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(
    k=k,
    v=v,
    mask=jnp.zeros((batch, slots), bool),
    index=jnp.zeros((), jnp.int32),
    positions=jnp.zeros((batch,), jnp.int32),
  )


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Rotary inverse frequencies [head_dim // 2] (float32), scaled as `rope_scaling` says."""
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  factor = float(scaling["factor"])
  if scaling.get("rope_type") == "linear":
    return (inv_freq / np.float32(factor)).astype(np.float32)
  low = float(scaling.get("low_freq_factor", 1.0))
  high = float(scaling.get("high_freq_factor", 4.0))
  old_len = float(scaling.get("original_max_position_embeddings", 8192))
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotates halves of `x` [b, t, heads, h] by `positions` [b, t] (float32 math)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, h/2]
  cos = jnp.cos(angles)[:, :, None, :]  # [b, t, 1, h/2]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [b, t, heads, h/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis; math in float32."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., d] -> [..., d] in `dtype`."""
    scale = _param(
      self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(jnp.float32) * x32).astype(self.dtype)


class Projection(nn.Module):
  """A bias-free linear map written as an einsum, plus an optional adapter delta.

  Attributes:
    spec: einsum of input and kernel, e.g. 'btd,dnh->btnh'.
    shape: kernel shape.
    axes: logical axis names of the kernel.
    target: the projection's name given to the adapter factory ('q', 'k', ..., 'down').
    init_std: std of the kernel's random init (`LlamaConfig.init_std`).
    adapter: None or a factory `(in_features, out_features, target, name) -> Module | None`.
  """

  spec: str
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  target: str
  dtype: Any
  param_dtype: Any
  init_std: float
  adapter: AdapterFactory | None = None

  @nn.compact
  def __call__(self, x: Array, gate_weights: Array | None, deterministic: bool) -> Array:
    """x: [b, t, *in] -> [b, t, *out]; gate_weights: [b, experts] or None."""
    kernel = _param(
      self, "kernel", nn.initializers.normal(self.init_std), self.shape, self.axes, self.param_dtype
    )
    x = x.astype(self.dtype)
    y = jnp.einsum(self.spec, x, kernel.astype(self.dtype))
    if self.adapter is None:
      return y
    b, t = x.shape[:2]
    in_features = math.prod(x.shape[2:])
    out_features = math.prod(y.shape[2:])
    module = self.adapter(
      in_features=in_features, out_features=out_features, target=self.target, name="adapter"
    )
    if module is None:
      return y
    delta = module(x.reshape(b, t, in_features), gate_weights, deterministic)  # [b, t, out]
    return y + delta.reshape(y.shape).astype(y.dtype)


def _projection(cfg: LlamaConfig, adapter: AdapterFactory | None):
  """`Projection` with the config's dtypes and init and the adapter seam filled in."""
  return functools.partial(
    Projection,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    init_std=cfg.init_std,
    adapter=adapter,
  )


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embeddings and an optional cache."""

  config: LlamaConfig
  adapter: AdapterFactory | None = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index, gate_weights, deterministic):
    """Attends over this step's keys, or over the cache after writing them into it.

    Args:
      x: [b, t, d] normed input.
      positions: [b, t] int rotary positions.
      mask: [b, t, s] bool, True where query t may attend to key s.
      layer_cache: None, or (k, v) each [b, k, s, h] for this layer.
      cache_index: int32 scalar slot where this step's keys are written into the cache; or
        None: no cache, or an empty one (a prefill), whose slots [0, t) take this step's keys.
        Without it, attention runs over this step's own keys (`mask` is then [b, t, t] and
        causal), in causal chunks or with cuDNN, like a cache-free pass.
      gate_weights: [b, experts] or None, passed to adapters.
      deterministic: passed to adapters.

    Returns:
      ([b, t, d] output, updated (k, v) or None).
    """
    cfg = self.config
    d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = _projection(cfg, self.adapter)
    q = proj("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), "q", name="q")(
      x, gate_weights, deterministic
    )  # [b, t, n, h]
    k = proj("btd,dkh->btkh", (d, kv, h), ("embed", "kv_heads", "head_dim"), "k", name="k")(
      x, gate_weights, deterministic
    )  # [b, t, k, h]
    v = proj("btd,dkh->btkh", (d, kv, h), ("embed", "kv_heads", "head_dim"), "v", name="v")(
      x, gate_weights, deterministic
    )  # [b, t, k, h]
    inv_freq = rope_inv_freq(cfg)
    q = checkpoint_name(apply_rope(q, positions, inv_freq), "q")
    k = checkpoint_name(apply_rope(k, positions, inv_freq), "k")
    v = checkpoint_name(v, "v")
    new_cache, own = None, None
    if layer_cache is not None:
      cache_k, cache_v = layer_cache[:2]
      start = (0, 0, 0 if cache_index is None else cache_index, 0)
      k_new = k.astype(cache_k.dtype).transpose(0, 2, 1, 3)  # [b, k, t, h]
      v_new = v.astype(cache_v.dtype).transpose(0, 2, 1, 3)  # [b, k, t, h]
      if len(layer_cache) == 3:  # Every layer's cache [l, b, k, s, h] and this layer's index.
        layer = layer_cache[2]
        if k_new.shape[2] > 1:
          # A pass of several tokens (packed candidates): this layer's slice is read, the
          # keys written into it, and the slice written back whole. Writing into the stack
          # and reading the layer back from it, as a decoding step does, let XLA fuse the read
          # with a second copy of the write, so the in-place write needed a copy of the whole
          # stacked value cache (half a cache more at the peak).
          own = tuple(
            jax.lax.dynamic_update_slice(
              jax.lax.dynamic_index_in_dim(c, layer, keepdims=False), c_new, start
            )
            for c, c_new in ((cache_k, k_new), (cache_v, v_new))
          )  # [b, k, s, h] each
          written = (jax.lax.dynamic_update_index_in_dim(cache_k, own[0], layer, 0),
                     jax.lax.dynamic_update_index_in_dim(cache_v, own[1], layer, 0))  # fmt: skip
          new_cache = (*written, layer)
        else:
          new_cache = (
            jax.lax.dynamic_update_slice(cache_k, k_new[None], (layer, *start)),
            jax.lax.dynamic_update_slice(cache_v, v_new[None], (layer, *start)),
            layer,
          )
      else:
        new_cache = (
          jax.lax.dynamic_update_slice(cache_k, k_new, start),
          jax.lax.dynamic_update_slice(cache_v, v_new, start),
        )  # [b, k, s, h] each
    local = cache_index is None  # Attend over this step's keys: no cache, or a prefill.
    t = q.shape[1]
    if cfg.attention == "cudnn" and local:
      # Pad queries also see themselves, so no row is fully masked (their output is unused).
      full = mask | jnp.eye(t, dtype=bool)[None]  # [b, t, s]
      out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=full[:, None], implementation="cudnn"
      )  # [b, t, n, h]
      out = proj("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), "o", name="o")(
        out, gate_weights, deterministic
      )  # [b, t, d]
      return out, new_cache
    if cfg.attention == "splash" and local:
      # The mask is causal & key-is-real (`Llama` builds it so): its diagonal is the
      # key-is-real vector, the kernel's segment ids.
      real = jnp.diagonal(mask, axis1=1, axis2=2)  # [b, t]
      out = splash_attention(q, k, v, real, cfg.kernel_mesh)  # [b, t, n, h]
      out = proj("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), "o", name="o")(
        out, gate_weights, deterministic
      )  # [b, t, d]
      return out, new_cache
    if local:
      # Over this step's own keys the mask is causal (`Llama` builds it so): the queries of
      # chunk [a, e) attend keys [0, e) only, which skips the blocks above the diagonal.
      parts = [
        dot_attention(q[:, a:e], k[:, :e], v[:, :e], mask[:, a:e, :e], cfg.dtype)
        for a, e in causal_chunks(t, cfg.attention_chunks)
      ]  # [b, e - a, n, h] each
      out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    else:
      k, v = new_cache[:2]
      if own is not None:  # This layer's [b, k, s, h], written before the stack.
        k, v = own
      elif len(new_cache) == 3:  # This layer's [b, k, s, h] of the stacked cache.
        k, v = (jax.lax.dynamic_index_in_dim(c, new_cache[2], keepdims=False) for c in (k, v))
      out = dot_attention(q, k, v, mask, cfg.dtype, heads_first=True)  # [b, t, n, h]
    out = proj("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), "o", name="o")(
      out, gate_weights, deterministic
    )  # [b, t, d]
    return out, new_cache


def dot_attention(
  q: Array, k: Array, v: Array, mask: Array, dtype: Any, heads_first: bool = False
) -> Array:
  """Softmax attention of q [b, t, n, h] over k, v [b, s, kv, h] (or [b, kv, s, h], the
  cache's layout, when `heads_first`; n a multiple of kv) where `mask` [b, t, s] is True;
  -> [b, t, n, h]. Scores and softmax in float32."""
  b, t, n, h = q.shape
  kv = k.shape[1 if heads_first else 2]
  kv_spec = "bksh" if heads_first else "bskh"
  q = q.reshape(b, t, kv, n // kv, h)  # [b, t, k, g, h]; query head = kv head * g + group
  # Scores in [b, k, t, g, s], the order dot_general produces (batch dims, then the free
  # dims of each side): any other order makes XLA transpose the largest arrays of the layer
  # (on a CPU, about a twentieth of a SmolLM2-135M train step).
  scores = jnp.einsum(
    f"btkgh,{kv_spec}->bktgs", q, k.astype(q.dtype), preferred_element_type=jnp.float32
  )  # [b, k, t, g, s]
  scores = scores * (1.0 / math.sqrt(h))
  scores = jnp.where(mask[:, None, :, None, :], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [b, k, t, g, s]
  if heads_first:  # The dot's own output order, then the (small: t is 1 in decoding) swap.
    out = jnp.einsum("bktgs,bksh->bktgh", probs, v.astype(dtype)).transpose(0, 2, 1, 3, 4)
  else:
    out = jnp.einsum("bktgs,bskh->btkgh", probs, v.astype(dtype))  # [b, t, k, g, h]
  return out.reshape(b, t, n, h)


SPLASH_BLOCK = 128  # The splash kernel's sequence blocks are multiples of this.


def _splash_kernel(heads: int, length: int, interpret: bool):
  """The splash kernel of a causal pass over `length` positions (a multiple of SPLASH_BLOCK)
  for `heads` query heads, blocks as large as divide the length (up to 512)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as kernel_lib,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as mask_lib,
  )

  block = next(size for size in (512, 256, SPLASH_BLOCK) if length % size == 0)
  sizes = kernel_lib.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length))] * heads)
  # Built in the trace that uses it (its block tables become constants of that trace).
  kernel = kernel_lib.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )
  return kernel, kernel_lib.SegmentIds


def splash_attention(q: Array, k: Array, v: Array, real: Array, mesh=None) -> Array:
  """Causal attention of q [b, t, n, h] over k, v [b, t, kv, h] with Pallas' splash kernel,
  a query attending to keys with its own `real` [b, t] flag (real tokens see real tokens;
  the unused outputs of pads see pads, so no row is empty). The time axis is padded to a
  multiple of SPLASH_BLOCK (as pads). With a `mesh` of several devices, the kernel runs
  under `jax.shard_map` on each device's rows (data, fsdp axes) and heads (tensor axis),
  where those divide (replicated where they do not).
  On a backend other than TPU the kernel runs in Pallas' interpreter (for tests)."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  length = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
  pad = ((0, 0), (0, length - t), (0, 0), (0, 0))
  q = jnp.pad(q * (1.0 / math.sqrt(h)), pad).transpose(0, 2, 1, 3)  # [b, n, T, h]
  k = jnp.pad(k.astype(q.dtype), pad).transpose(0, 2, 1, 3)  # [b, kv, T, h]
  v = jnp.pad(v.astype(q.dtype), pad).transpose(0, 2, 1, 3)
  segments = jnp.pad(real.astype(jnp.int32), ((0, 0), (0, length - t)))  # [b, T]
  interpret = jax.default_backend() != "tpu"
  batch_axes, head_axis = (), None
  if mesh is not None:
    names = dict(mesh.shape)
    batch_axes = tuple(a for a in ("data", "fsdp") if names.get(a, 1) > 1)
    if b % math.prod(names[a] for a in batch_axes):
      batch_axes = ()
    tensor = names.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and n % tensor == 0 and kv % tensor == 0 else None
  local_heads = n // (mesh.shape[head_axis] if head_axis else 1)

  def attend(q, k, v, segments):
    kernel, segment_ids = _splash_kernel(local_heads, length, interpret)
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(q=s, kv=s))  # noqa: E731
    return jax.vmap(one)(q, k, v, segments)

  if mesh is not None and mesh.size > 1:
    # Mapped even where no axis divides (specs replicated): Mosaic lowers the kernel for one
    # device only, so on several it must run inside a manual computation.
    rows = batch_axes or None
    spec = jax.sharding.PartitionSpec(rows, head_axis, None, None)
    attend = jax.shard_map(
      attend,
      mesh=mesh,
      in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(rows, None)),
      out_specs=spec,
      check_vma=False,
    )
  out = attend(q, k, v, segments)  # [b, n, T, h]
  return out.transpose(0, 2, 1, 3)[:, :t]


def causal_chunks(t: int, max_chunks: int = 4) -> list[tuple[int, int]]:
  """[a, e) query chunks of a causal pass over t positions: up to `max_chunks` chunks of at
  least CHUNK_MIN queries. Chunk [a, e) only needs keys [0, e), so the score blocks above
  the diagonal (3/8 of them with 4 chunks) are never computed. On 2 CPU cores this made the
  SmolLM2-135M train step at 256 positions 0.93x as long (bench/README.md); more, smaller
  chunks gained less and compiled slower. A padded query that sees no key at all gets other
  (unused) values than in one pass: its softmax is uniform over its chunk's keys."""
  count = max(1, min(max_chunks, t // CHUNK_MIN))
  size = -(-t // count)
  return [(a, min(a + size, t)) for a in range(0, t, size)]


CHUNK_MIN = 64


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  config: LlamaConfig
  adapter: AdapterFactory | None = None

  @nn.compact
  def __call__(self, x: Array, gate_weights: Array | None, deterministic: bool) -> Array:
    """x: [b, t, d] -> [b, t, d]."""
    cfg = self.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    proj = _projection(cfg, self.adapter)
    gate = proj("btd,df->btf", (d, f), ("embed", "mlp"), "gate", name="gate")(
      x, gate_weights, deterministic
    )  # [b, t, f]
    up = proj("btd,df->btf", (d, f), ("embed", "mlp"), "up", name="up")(
      x, gate_weights, deterministic
    )  # [b, t, f]
    gate = checkpoint_name(gate, "mlp_gate")
    up = checkpoint_name(up, "mlp_up")
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return proj("btf,fd->btd", (f, d), ("mlp", "embed"), "down", name="down")(
      hidden, gate_weights, deterministic
    )  # [b, t, d]


class DecoderLayer(nn.Module):
  """Pre-norm attention block followed by a pre-norm SwiGLU block."""

  config: LlamaConfig
  adapter: AdapterFactory | None = None

  @nn.compact
  def __call__(self, x, layer_cache, positions, mask, cache_index, gate_weights, deterministic):
    """x: [b, t, d] -> ([b, t, d], updated layer cache or None). See `Attention`.

    In a layer scan with a cache, `x` is the carry (x, k, v, layer): the whole stacked cache
    ([l, b, k, s, h] each) rides in the carry and each layer writes its new keys into it in
    place, instead of the scan slicing every layer's cache out and stacking it again (a copy
    of the whole cache at every decoding step); the result is then (that carry, None).
    """
    if isinstance(x, tuple):
      x, cache_k, cache_v, layer = x
      x, (cache_k, cache_v, _) = self._block(
        x, (cache_k, cache_v, layer), positions, mask, cache_index, gate_weights, deterministic
      )
      return (x, cache_k, cache_v, layer + 1), None
    return self._block(x, layer_cache, positions, mask, cache_index, gate_weights, deterministic)

  def _block(self, x, layer_cache, positions, mask, cache_index, gate_weights, deterministic):
    cfg = self.config
    norm = functools.partial(
      RMSNorm, eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
    )
    h = norm(name="attn_norm")(x)
    attn, new_cache = Attention(cfg, self.adapter, name="attn")(
      h, positions, mask, layer_cache, cache_index, gate_weights, deterministic
    )
    x = nn.with_logical_constraint(x + attn, ("batch", "length", "embed"))
    x = checkpoint_name(x, "mid")
    h = norm(name="mlp_norm")(x)
    x = x + MLP(cfg, self.adapter, name="mlp")(h, gate_weights, deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


def _layer_class(config: LlamaConfig) -> type[nn.Module]:
  """DecoderLayer wrapped with remat per `config.remat_policy` (deterministic is static)."""
  if config.remat_policy == "none":
    return DecoderLayer
  policy = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "projections": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS_SAVED),
  }[config.remat_policy]
  # Argument 0 is `self`; 7 is `deterministic`.
  return nn.remat(
    DecoderLayer, policy=policy, prevent_cse=not config.scan_layers, static_argnums=(7,)
  )


class Llama(nn.Module):
  """Llama causal language model.

  Attributes:
    config: the hyper-parameters.
    adapter: None (plain base model) or an adapter factory; see the module docstring.
  """

  config: LlamaConfig
  adapter: AdapterFactory | None = None

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
      (cfg.vocab_size, cfg.hidden_size),
      cfg.param_dtype,
    )
    layer = _layer_class(cfg)
    if cfg.scan_layers:
      scanned = nn.scan(
        layer,
        variable_axes={True: 0},
        split_rngs={True: True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      self.layers = scanned(cfg, self.adapter)
    else:
      self.layers = [layer(cfg, self.adapter) for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param(
        "lm_head",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
        (cfg.hidden_size, cfg.vocab_size),
        cfg.param_dtype,
      )

  def embed(self, tokens: Array) -> Array:
    """tokens: [b, t] int -> token embeddings [b, t, d] in `dtype`."""
    return jnp.take(self.embedding, tokens, axis=0, mode="clip").astype(self.config.dtype)

  def __call__(
    self,
    tokens: Array,
    attention_mask: Array | None = None,
    *,
    gate_weights: Array | None = None,
    deterministic: bool = True,
    replace_mask: Array | None = None,
    replace_embeds: Array | None = None,
    positions: Array | None = None,
    cache: KVCache | None = None,
    return_hidden: bool = False,
    head_positions: Array | None = None,
    prefill: bool = False,
    attend: Array | None = None,
    keep_cache: bool | None = None,
  ):
    """Runs the decoder.

    Args:
      tokens: [b, t] int token ids.
      attention_mask: [b, t] 1 for real tokens, 0 for padding (left or right); default all 1.
      gate_weights: [b, experts] float or None, given to every adapter.
      deterministic: given to every adapter (e.g. to switch dropout off).
      replace_mask: [b, t] bool; where True the token embedding is replaced by...
      replace_embeds: [b, t, d] float, ...the embedding at the same position.
      positions: [b, t] int rotary positions; default computed from the mask (and cache).
      cache: None for a full pass, or a `KVCache` the new keys are appended to.
      return_hidden: return the final normed hidden states [b, t, d] instead of logits.
      head_positions: [b] int or None; when given, logits (or hidden states) only at these
        positions, [b, 1, ...] (a prefill needs the last real position only, and the LM head
        over every position is a large part of its FLOPs for a big vocabulary).
      prefill: static; with `cache`, the cache is empty (a new `init_cache`): this step's
        keys fill its slots [0, t) and attention runs over them alone, as in a cache-free
        pass (causal chunks, or cuDNN), instead of over every slot of the cache.
      attend: [b, t, t] bool or None, for a pass over a non-empty `cache`: which of this
        step's tokens each token attends to (None: the causal mask), besides every real slot
        of the cache before them. Independent continuations packed in one pass (scoring's
        candidates) each see the cache and their own tokens.
      keep_cache: static; with scanned layers and a non-empty `cache`, whether the caller
        continues from the returned cache and drops the given one: the stacked cache then
        rides in the layer scan's carry and is written in place. Otherwise each layer's slice
        of the given cache is read and the written ones are stacked into a new cache (two
        caches at the peak), which is cheaper when the given cache is read again (scoring
        chunks over one prompt cache). Default: True for one-token decoding steps.

    Returns:
      logits [b, t, vocab] float32 (or hidden states), and the updated cache if `cache` given.
    """
    cfg = self.config
    b, t = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if attend is not None and (cache is None or prefill):
      raise ValueError("attend is for a pass over a non-empty cache")
    real = attention_mask.astype(bool)  # [b, t]
    count = jnp.cumsum(real.astype(jnp.int32), axis=1)  # [b, t] real tokens so far
    if positions is None:
      start = 0 if cache is None else cache.positions[:, None]
      positions = start + jnp.maximum(count - 1, 0)  # [b, t]
    kv_in, start = None, 0  # start: the cache slot this step's keys are written to.
    if cache is not None:
      kv_in, start = (cache.k, cache.v), (0 if prefill else cache.index)
      key_valid = jax.lax.dynamic_update_slice(cache.mask, real, (0, start))  # [b, s]
    if cache is None or prefill:  # Attention over this step's keys: a causal [t, t] mask.
      causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [t, s=t]
      mask = causal[None, :, :] & real[:, None, :]  # [b, t, t]
      cache_index = None
    else:  # Over every slot of the cache.
      slots = cache.mask.shape[1]
      causal = (start + jnp.arange(t))[:, None] >= jnp.arange(slots)[None, :]  # [t, s]
      mask = causal[None, :, :] & key_valid[:, None, :]  # [b, t, s]
      if attend is not None:  # The cache's earlier slots, then `attend` over this step's.
        own = jnp.zeros((b, t, slots), bool)
        own = jax.lax.dynamic_update_slice(own, attend & real[:, None, :], (0, 0, start))
        earlier = (jnp.arange(slots) < start)[None, None, :] & cache.mask[:, None, :]
        mask = earlier | own
      cache_index = start

    x = self.embed(tokens)  # [b, t, d]
    if replace_mask is not None:
      x = jnp.where(replace_mask[..., None], replace_embeds.astype(x.dtype), x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    if keep_cache is None:
      keep_cache = t == 1  # A decoding step.
    if cfg.scan_layers and kv_in is not None and not prefill and keep_cache:
      carry = (x, *kv_in, jnp.int32(0))
      carry, _ = self.layers(carry, None, positions, mask, cache_index, gate_weights, deterministic)
      x, kv_out = carry[0], carry[1:3]
    elif cfg.scan_layers:
      x, kv_out = self.layers(x, kv_in, positions, mask, cache_index, gate_weights, deterministic)
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        layer_kv = None if kv_in is None else (kv_in[0][i], kv_in[1][i])
        x, new_kv = layer(x, layer_kv, positions, mask, cache_index, gate_weights, deterministic)
        if new_kv is not None:
          ks.append(new_kv[0])
          vs.append(new_kv[1])
      kv_out = None if kv_in is None else (tuple(ks), tuple(vs))
    if head_positions is not None:
      x = jnp.take_along_axis(x, head_positions[:, None, None].astype(jnp.int32), axis=1)
    x = self.final_norm(x)  # [b, t, d] (or [b, 1, d])
    if return_hidden:
      out = x
    else:
      out = head_logits(cfg, x, self.embedding, getattr(self, "lm_head", None))  # [b, t, v]
    if cache is None:
      return out
    new_cache = KVCache(
      k=kv_out[0],
      v=kv_out[1],
      mask=key_valid,
      index=start + jnp.int32(t),
      positions=cache.positions + count[:, -1],
    )
    return out, new_cache


def head_logits(config: LlamaConfig, x: Array, embedding: Array, lm_head: Array | None) -> Array:
  """Float32 logits [..., v] of normed hidden states x [..., d] through the LM head (lm_head
  [d, v], or the embedding [v, d] when tied); ids at and after `config.logit_vocab` get -1e30."""
  head = embedding.T if config.tie_word_embeddings else lm_head
  logits = jnp.einsum(
    "...d,dv->...v", x, head.astype(config.dtype), preferred_element_type=jnp.float32
  )
  if config.logit_vocab is None or config.logit_vocab >= config.vocab_size:
    return logits
  return jnp.where(jnp.arange(config.vocab_size) < config.logit_vocab, logits, _MASKED)


def _init_inputs(num_gates: int | None) -> dict:
  gates = None if num_gates is None else jnp.zeros((1, num_gates), jnp.float32)
  return dict(tokens=jnp.zeros((1, 1), jnp.int32), gate_weights=gates)


def abstract_params(
  config: LlamaConfig, adapter: AdapterFactory | None = None, num_gates: int | None = None
) -> Any:
  """Boxed (logically partitioned) ShapeDtypeStruct tree of the params; allocates nothing.

  `num_gates` sizes the dummy `gate_weights` [1, num_gates] given to adapters at init.
  Traced once per (config, adapter, num_gates) in a process (tracing the model's init takes
  about 0.2 s even for a tiny model, and setting up a run asks for the tree about seven
  times); each call returns its own containers, so a caller may change the tree it got.
  """
  return _fresh_containers(_abstract_params(config, adapter, num_gates))


@functools.lru_cache(maxsize=32)
def _abstract_params(config: LlamaConfig, adapter: AdapterFactory | None, num_gates: int | None):
  module = Llama(config, adapter)
  variables = jax.eval_shape(
    lambda key: module.init(key, **_init_inputs(num_gates)), jax.random.key(0)
  )
  return variables["params"]


def _fresh_containers(tree: Any) -> Any:
  """The same leaves (immutable boxes and ShapeDtypeStructs) in new dicts."""
  return jax.tree.map(lambda x: x, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def init_params(
  config: LlamaConfig,
  key: Array,
  adapter: AdapterFactory | None = None,
  num_gates: int | None = None,
) -> Any:
  """Random (unboxed) params, initialised under jit; see `abstract_params` for `num_gates`."""
  return _jitted_init(config, adapter, num_gates)(key)


@functools.cache
def _jitted_init(config: LlamaConfig, adapter: AdapterFactory | None, num_gates: int | None):
  # Cached: compiling the initialisers (XLA's RNG) is slow on CPU.
  module = Llama(config, adapter)
  return jax.jit(lambda k: nn.meta.unbox(module.init(k, **_init_inputs(num_gates))["params"]))


def logical_axes(
  config: LlamaConfig, adapter: AdapterFactory | None = None, num_gates: int | None = None
) -> Any:
  """Tree of `PartitionSpec`s of logical axis names, matching the params tree."""
  return nn.get_partition_spec(abstract_params(config, adapter, num_gates))
