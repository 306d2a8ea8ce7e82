"""Instance-wise LoRA (iLoRA): one fused low-rank adapter whose rank is split over experts.

A LoRA of total rank r on a projection W: d_in -> d_out, split into E experts of rank r / E,
computes for instance b (REFERENCE.md section 5)

  delta[b] = s * sum_k g[b, k] * B_k (A_k dropout(x[b])),   s = alpha / (r / E),

with A_k the k-th block of r / E columns of A [d_in, r] and B_k the matching rows of
B [r, d_out]. This equals ONE rank-r LoRA whose r rank components are scaled per instance by
the gate, each expert's weight repeated over its r / E components:

  delta[b] = s * ((dropout(x[b]) A) * repeat(g[b], r / E)) B.

`InstanceLoRA` computes exactly that: two thin matmuls and an elementwise scale on the
[batch, time, r] intermediate, so no per-expert full-width output is ever materialised.

Special cases:
  * `gate_weights=None`: every component has weight 1 (a plain rank-r LoRA with scale s).
  * E = 1 with the 'constant' gate (ones): plain LoRA, scale alpha / r.
  * the 'uniform' gate (1 / E each, the "gating removed" ablation): s / E = alpha / r, i.e. a
    plain rank-r LoRA with the standard scale, whatever E is.

The Llama (`ilora_jax.llama`) calls the factory from `adapter_factory` in every projection;
see that module's docstring for the seam.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.extend.random import threefry2x32_p

from ilora_jax import sharding
from ilora_jax.errors import UserError

Array = jax.Array

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
GATES = ("router", "uniform", "constant")
PARAM_NAMES = ("lora_a", "lora_b")
ADAPTER_SCOPE = "adapter"

# Logical axis names of (input side, output side) per target, matching the base kernels in
# `ilora_jax.llama`: q/k/v/gate/up read the residual stream ('embed'), o reads the flattened
# heads (same width as 'embed' in Llama, and kept on the 'embed' name so that both adapter
# matrices of o shard like the residual stream), down reads the MLP hidden ('mlp').
_TARGET_AXES = {
  "q": ("embed", "heads"),
  "k": ("embed", "kv_heads"),
  "v": ("embed", "kv_heads"),
  "o": ("embed", "embed"),
  "gate": ("embed", "mlp"),
  "up": ("embed", "mlp"),
  "down": ("mlp", "embed"),
}
RANK_AXIS = "lora_rank"

# torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) (nn.Linear's default): gain^2 = 2 / (1 + 5) =
# 1/3, bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in) = sqrt(3 * (1/3) / fan_in), which is
# exactly flax's uniform variance scaling with scale 1/3 (fan_in = axis -2 = d_in for [in, r]).
kaiming_uniform_torch = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Hyper-parameters of the instance-wise LoRA (hashable).

  Attributes:
    rank: total rank r over all experts.
    num_experts: E; each expert owns r / E rank components (r must be a multiple of E).
    alpha: scale numerator; the delta is scaled by s = alpha / (r / E).
    dropout: dropout rate on the adapter input (active only when not deterministic).
    targets: projections that get an adapter, a subset of `TARGETS`.
    gate: 'router' (learned, per instance), 'uniform' (1 / E each: gating removed) or
      'constant' (ones; with E = 1 this is plain LoRA). Read by the training code, which
      builds the gate weights; the adapter itself just consumes them.
    dtype: dtype of the adapter params (the math runs in the dtype of the input).
  """

  rank: int = 8
  num_experts: int = 4
  alpha: float = 32.0
  dropout: float = 0.1
  targets: tuple[str, ...] = TARGETS
  gate: str = "router"
  dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    if self.rank <= 0 or self.num_experts <= 0:
      raise UserError(f"lora: rank ({self.rank}) and num_experts ({self.num_experts}) must be > 0")
    if self.rank % self.num_experts:
      raise UserError(f"lora: rank {self.rank} is not a multiple of num_experts {self.num_experts}")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"lora: dropout must be in [0, 1), got {self.dropout}")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      raise UserError(f"lora: unknown targets {unknown}; choose from {list(TARGETS)}")
    if self.gate not in GATES:
      raise UserError(f"lora: unknown gate {self.gate!r}; choose from {list(GATES)}")

  @property
  def expert_rank(self) -> int:
    """Rank components per expert, r / E."""
    return self.rank // self.num_experts

  @property
  def scale(self) -> float:
    """s = alpha / (r / E)."""
    return self.alpha / self.expert_rank


KEEP_NAME = "lora_keep"  # `checkpoint_name` of the dropout mask.


def dropout(key: Array, x: Array, rate: float) -> Array:
  """Inverted dropout of `x` with 16 random bits per element.

  Each element is kept when a 16-bit uniform integer is at least round(rate * 2**16), and
  kept elements are scaled by 1 / keep_prob with keep_prob the exact (rounded) keep
  probability, so E[dropout(x)] = x exactly in float32. The product is taken in float32 and
  rounded once to x's dtype: a scale rounded to bfloat16 first would shrink every kept
  element alike (1.1094 for 1.1111 at rate 0.1: 0.16% less than evaluation sees). The bits
  come from `uniform16`: four decisions per threefry call, where flax's `nn.Dropout` makes
  one (a 32-bit float per element, and JAX's sharding-friendly threefry spends a whole call
  per 32-bit word); on a CPU, random bits were about a fifth of a SmolLM2-135M adapter step
  before (bench/README.md).

  Args:
    key: a PRNG key.
    x: the array.
    rate: drop probability in [0, 1).

  Returns:
    x with dropped elements zeroed and kept ones scaled, same shape and dtype.
  """
  levels = 1 << 16
  threshold = round(rate * levels)
  if threshold == 0:
    return x
  # Named so that a remat policy can keep the mask (a byte per element) for the backward pass
  # instead of drawing the bits again or storing the dropped input.
  keep = checkpoint_name(uniform16(key, x.shape) >= threshold, KEEP_NAME)
  scale = levels / (levels - threshold)
  scaled = (x.astype(jnp.float32) * jnp.float32(scale)).astype(x.dtype)
  return jnp.where(keep, scaled, jnp.zeros((), x.dtype))


def uniform16(key: Array, shape: tuple[int, ...]) -> Array:
  """Uniform uint16 integers of `shape`, four from each threefry2x32 call.

  Threefry-2x32 (Salmon et al. 2011, the generator of JAX's default keys) maps a 64-bit
  counter to 64 random bits under the key. The last axis is cut into groups of four; group
  number i (its flat index) gets the counter (i, 0), and the call's two output words, split
  into 16-bit halves (low first), are the group's four integers. The counters are laid out
  like the array, so a sharded array draws its own shard's bits; up to 2**34 elements
  before the 32-bit counter repeats. Keys of other generators, and shapes whose last axis
  is not a multiple of 4, take `jax.random.bits` (two integers per 32-bit word).
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(key) if _is_threefry(key) else None
  else:
    data = key  # a raw key of the default generator
  size = math.prod(shape)
  if data is None or data.shape != (2,) or not shape or shape[-1] % 4:
    words = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size].reshape(shape)
  groups = (*shape[:-1], shape[-1] // 4)
  counter = jnp.zeros(groups, jnp.uint32)
  for axis, n in enumerate(groups):  # the flat index, built per axis so it shards like x
    counter = counter * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, groups, axis)
  words = threefry2x32_p.bind(data[0], data[1], counter, jnp.zeros_like(counter))
  # Each word's halves by shifts (element-wise, so the draw fuses into its consumer) rather
  # than a bitcast of the stacked words, which XLA materialises (the stacked uint32 words:
  # 32 MiB per adapter and layer at the 7B shape, batch 8 x 512, on an H100).
  halves = [(w >> s).astype(jnp.uint16) for w in words for s in (0, 16)]
  return jnp.stack(halves, axis=-1).reshape(shape)  # [..., last / 4, 4] -> shape


def _is_threefry(key: Array) -> bool:
  return jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(0, impl="threefry2x32"))


def thin_matmul(x: Array, w: Array) -> Array:
  """x @ w for a 2-D x [rows, k] and an adapter matrix w [k, n] with k or n the (small) rank.

  On a CPU its gradient is computed by `_thin_matmul`, whose weight gradient
  x^T @ g_y [k, n] is written as (small operand)^T @ (large operand) with the small one's
  transpose materialised: XLA:CPU hands a matmul to its fast YNNPACK kernels only when the
  left operand contracts its last axis, and autodiff's x^T @ g_y contracts the rows of both,
  which falls back to a plain loop nest (4.4 ms instead of 0.31 ms for SmolLM2's down
  adapter, [1024, 1536]^T @ [1024, 8], on one core; about 5% of its train step,
  bench/README.md). Other backends keep autodiff's gradient. Same values either way.
  Being a `jax.custom_vjp` on a CPU, it has no forward-mode derivative there (`jax.jvp`,
  `jax.jacfwd` through the adapters fail on a CPU); reverse mode is what training uses.
  """
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(f"thin_matmul takes 2-D operands, got {x.shape} @ {w.shape}")
  if sharding.backend() == "cpu":
    return _thin_matmul(x, w)
  return x @ w


@jax.custom_vjp
def _thin_matmul(x: Array, w: Array) -> Array:
  return x @ w


def _thin_matmul_fwd(x: Array, w: Array):
  return x @ w, (x, w)


def _thin_matmul_bwd(residuals, g_y: Array):
  x, w = residuals
  barrier = jax.lax.optimization_barrier  # keeps XLA from folding the transposes back
  if w.shape[0] <= w.shape[1]:  # w [r, n], x [rows, r] thin: g_w = (x^T) @ g_y, [r, n]
    g_w = barrier(x.T) @ g_y
  else:  # w [k, r], g_y [rows, r] thin: g_w = ((g_y^T) @ x)^T, [k, r]
    g_w = barrier(barrier(g_y.T) @ x).T
  g_x = g_y @ w.T
  return g_x.astype(x.dtype), g_w.astype(w.dtype)


_thin_matmul.defvjp(_thin_matmul_fwd, _thin_matmul_bwd)


class InstanceLoRA(nn.Module):
  """Fused instance-wise LoRA delta for one projection.

  Params: `lora_a` [in_features, rank] (torch nn.Linear default init, bound 1 / sqrt(in)) and
  `lora_b` [rank, out_features] (zeros, so the delta is exactly 0 at init), both in
  `param_dtype` and logically partitioned as (in_axis, rank_axis) and (rank_axis, out_axis).

  Attributes:
    in_features: width of the input x.
    out_features: width of the delta.
    rank: total rank r.
    num_experts: E (r must be a multiple of E).
    alpha: the delta is scaled by alpha / (r / E).
    dropout_rate: dropout on x, applied when `deterministic` is False (rng 'dropout').
    param_dtype: dtype of the params.
    in_axis, out_axis, rank_axis: logical axis names for partitioning.
  """

  in_features: int
  out_features: int
  rank: int = 8
  num_experts: int = 4
  alpha: float = 32.0
  dropout_rate: float = 0.0
  param_dtype: Any = jnp.float32
  in_axis: str = "embed"
  out_axis: str = "embed"
  rank_axis: str = RANK_AXIS

  @nn.compact
  def __call__(self, x: Array, gate_weights: Array | None, deterministic: bool) -> Array:
    """Computes the delta added to the base projection.

    Args:
      x: [batch, time, in_features] in the compute dtype.
      gate_weights: [batch, num_experts] float, or None for weight 1 on every component.
      deterministic: a Python bool; when False, dropout is applied to x.

    Returns:
      delta: [batch, time, out_features] in the dtype of x.
    """
    if self.rank % self.num_experts:
      raise ValueError(f"rank {self.rank} is not a multiple of num_experts {self.num_experts}")
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must be [batch, time, {self.in_features}], got {x.shape}")
    a = self.param(
      "lora_a",
      nn.with_logical_partitioning(kaiming_uniform_torch, (self.in_axis, self.rank_axis)),
      (self.in_features, self.rank),
      self.param_dtype,
    )  # [in, r]
    b = self.param(
      "lora_b",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.rank_axis, self.out_axis)),
      (self.rank, self.out_features),
      self.param_dtype,
    )  # [r, out]
    dtype = x.dtype
    scale = self.alpha / (self.rank // self.num_experts)
    if self.dropout_rate > 0.0 and not deterministic:
      x = dropout(self.make_rng("dropout"), x, self.dropout_rate)
    batch, time = x.shape[:2]
    # Both products as 2-D matmuls over the flattened rows: with [b, t, .] einsums, the
    # gradient of B came out as [out, r] plus a transpose that XLA:CPU fused into the producer
    # of the incoming gradient as a strided copy, about a fifth of a SmolLM2-135M train step
    # on 2 CPU cores (bench/README.md). `thin_matmul` writes their weight gradients in the
    # form XLA:CPU's fast matmuls take.
    h = thin_matmul(x.reshape(batch * time, self.in_features), a.astype(dtype)).reshape(
      batch, time, self.rank
    )  # [batch, time, rank]
    if gate_weights is None:
      h = h * jnp.asarray(scale, dtype)
    else:
      if gate_weights.ndim != 2 or gate_weights.shape[1] != self.num_experts:
        raise ValueError(
          f"gate_weights must be [batch, experts={self.num_experts}], got {gate_weights.shape}"
        )
      if gate_weights.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"gate_weights batch {gate_weights.shape[0]} != x batch {x.shape[0]}")
      coef = scale * jnp.repeat(
        gate_weights.astype(jnp.float32), self.rank // self.num_experts, axis=-1
      )  # [batch, rank]: expert k's weight on components k*r/E .. (k+1)*r/E - 1
      h = h * coef.astype(dtype)[:, None, :]  # [batch, time, rank]
    delta = thin_matmul(h.reshape(batch * time, self.rank), b.astype(dtype))  # [b * t, out]
    return delta.reshape(batch, time, self.out_features)


@dataclasses.dataclass(frozen=True)
class AdapterFactory:
  """The Llama adapter seam: `factory(in_features=, out_features=, target=, name=)`.

  Returns an `InstanceLoRA` for targets in `cfg.targets`, None otherwise. Hashable and compared
  by value, so a `Llama` module holding it stays a valid static argument.
  """

  cfg: LoRAConfig

  def __call__(
    self, *, in_features: int, out_features: int, target: str, name: str | None = ADAPTER_SCOPE
  ) -> InstanceLoRA | None:
    if target not in TARGETS:
      raise ValueError(f"unknown adapter target {target!r}; expected one of {TARGETS}")
    if target not in self.cfg.targets:
      return None
    in_axis, out_axis = _TARGET_AXES[target]
    return InstanceLoRA(
      in_features=in_features,
      out_features=out_features,
      rank=self.cfg.rank,
      num_experts=self.cfg.num_experts,
      alpha=self.cfg.alpha,
      dropout_rate=self.cfg.dropout,
      param_dtype=self.cfg.dtype,
      in_axis=in_axis,
      out_axis=out_axis,
      name=name,
    )


def adapter_factory(cfg: LoRAConfig) -> AdapterFactory:
  """The adapter factory to give `llama.Llama(config, adapter=...)`."""
  return AdapterFactory(cfg)


def fixed_gate(kind: str, batch: int, num_experts: int, dtype: Any = jnp.float32) -> Array:
  """Gate weights that do not depend on the instance: [batch, num_experts].

  Args:
    kind: 'uniform' (1 / E each: the gating-removed ablation, equal to plain LoRA with scale
      alpha / r) or 'constant' (ones: with E = 1, plain LoRA).
    batch: number of instances.
    num_experts: E.
    dtype: dtype of the result.
  """
  if kind == "uniform":
    return jnp.full((batch, num_experts), 1.0 / num_experts, dtype)
  if kind == "constant":
    return jnp.ones((batch, num_experts), dtype)
  raise UserError(f"lora: no fixed gate {kind!r}; choose 'uniform' or 'constant'")


def _key_name(entry: Any) -> str:
  """One element of a param path (a string, or a jax tree-path key) as a string."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def is_lora_param(path: Sequence[Any] | str) -> bool:
  """Whether a param path names an adapter matrix: 'lora_a' or 'lora_b' inside 'adapter'.

  Args:
    path: a tuple of names (as from `flax.traverse_util.flatten_dict`), a jax tree path (as
      given by `jax.tree_util.tree_map_with_path`, boxed `.value` suffix allowed), or a
      '/'-joined string.
  """
  names = path.split("/") if isinstance(path, str) else [_key_name(p) for p in path]
  if names and names[-1] == "value":  # a boxed (nn.Partitioned) leaf
    names = names[:-1]
  return len(names) >= 2 and names[-1] in PARAM_NAMES and names[-2] == ADAPTER_SCOPE


def lora_mask(tree: Any) -> Any:
  """Tree of bools, True on adapter params (e.g. for `optax.masked`)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: is_lora_param(path), tree)


def count_params(tree: Any, predicate=None) -> int:
  """Number of scalars in a tree of arrays (or ShapeDtypeStructs, boxed or not).

  Args:
    tree: the params.
    predicate: optional `path -> bool` (e.g. `is_lora_param`) selecting the leaves counted.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return sum(
    math.prod(getattr(leaf, "shape", ()))
    for path, leaf in leaves
    if predicate is None or predicate(path)
  )
