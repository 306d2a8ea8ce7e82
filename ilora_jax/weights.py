"""Loads Llama weights from Hugging Face safetensors folders and GGUF files (no torch).

Both sources are first read as numpy arrays in Hugging Face layout (`[out, in]` matrices,
named like 'model.layers.3.self_attn.q_proj.weight'), then converted to the `Llama` param tree
and placed on devices leaf by leaf, each leaf directly with its target sharding.

`shardings` arguments accept None (default device), a pytree of `jax.sharding.Sharding`
matching the params tree, or a function `(path, shape) -> Sharding` where `path` is the leaf's
'/'-joined key path, e.g. 'layers/attn/q/kernel'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from ilora_jax.errors import UserError
from ilora_jax.llama import LlamaConfig

TensorGetter = Callable[[str], np.ndarray]

# (param path inside a layer, HF name suffix inside 'model.layers.{i}.').
_LAYER_TENSORS = (
  (("attn_norm", "scale"), "input_layernorm.weight"),
  (("attn", "q", "kernel"), "self_attn.q_proj.weight"),
  (("attn", "k", "kernel"), "self_attn.k_proj.weight"),
  (("attn", "v", "kernel"), "self_attn.v_proj.weight"),
  (("attn", "o", "kernel"), "self_attn.o_proj.weight"),
  (("mlp_norm", "scale"), "post_attention_layernorm.weight"),
  (("mlp", "gate", "kernel"), "mlp.gate_proj.weight"),
  (("mlp", "up", "kernel"), "mlp.up_proj.weight"),
  (("mlp", "down", "kernel"), "mlp.down_proj.weight"),
)

# GGUF tensor names (llama.cpp) -> HF names.
_GGUF_LAYER_NAMES = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
SUPPORTED_GGUF_TYPES = tuple(
  "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
)


def _hf_to_param(suffix: str, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
  """Converts one HF layer tensor ([out, in] for matrices) to our kernel layout."""
  d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if suffix.endswith("layernorm.weight"):
    return w
  if suffix.startswith("self_attn.q_proj"):
    return w.T.reshape(d, n, h)
  if suffix.startswith(("self_attn.k_proj", "self_attn.v_proj")):
    return w.T.reshape(d, kv, h)
  if suffix.startswith("self_attn.o_proj"):
    return w.T.reshape(n, h, d)
  return w.T  # gate/up [f, d] -> [d, f]; down [d, f] -> [f, d]


def _expected_hf_shape(suffix: str, cfg: LlamaConfig) -> tuple[int, ...]:
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  return {
    "input_layernorm.weight": (d,),
    "post_attention_layernorm.weight": (d,),
    "self_attn.q_proj.weight": (cfg.num_heads * h, d),
    "self_attn.k_proj.weight": (cfg.num_kv_heads * h, d),
    "self_attn.v_proj.weight": (cfg.num_kv_heads * h, d),
    "self_attn.o_proj.weight": (d, cfg.num_heads * h),
    "mlp.gate_proj.weight": (f, d),
    "mlp.up_proj.weight": (f, d),
    "mlp.down_proj.weight": (d, f),
  }[suffix]


def _expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """The HF name and shape of every tensor the model reads, in loading's order (lm_head
  last: a tied model may lack it)."""
  d, v = cfg.hidden_size, cfg.vocab_size
  out = {"model.embed_tokens.weight": (v, d)}
  for _, suffix in _LAYER_TENSORS:
    shape = _expected_hf_shape(suffix, cfg)
    out.update({f"model.layers.{i}.{suffix}": shape for i in range(cfg.num_layers)})
  out["model.norm.weight"] = (d,)
  out["lm_head.weight"] = (v, d)
  return out


def _tensor_error(
  name: str, shape, want, dtype, source: str, shown: Callable = str
) -> UserError | None:
  """The error of a tensor of another shape than `want`, or not floating point, else None."""
  if tuple(shape) != tuple(want):
    return UserError(f"{source}: tensor {shown(name)} has shape {tuple(shape)}, expected {want}")
  if not jax.numpy.issubdtype(dtype, jax.numpy.floating):  # bfloat16 is one too.
    return UserError(
      f"{source}: tensor {shown(name)} holds {dtype} values, not floating point weights"
    )
  return None


def _checked(
  get: TensorGetter, name: str, shape: tuple[int, ...], source: str, shown: Callable = str
) -> np.ndarray:
  w = get(name)
  error = _tensor_error(name, w.shape, shape, w.dtype, source, shown)
  if error is not None:
    raise error
  return w


def _missing_head(source: str) -> UserError:
  return UserError(f"{source}: lm_head.weight missing but word embeddings are not tied")


def check_tensor_table(
  table: dict[str, tuple[tuple[int, ...], Any]],
  cfg: LlamaConfig,
  source: str,
  missing: Callable[[str], UserError],
  read: Callable[[str], Any],
  shown: Callable[[str], str] = str,
) -> None:
  """What `params_from_hf_tensors` checks of a checkpoint's tensors that needs no values,
  from its table {HF name: (shape, dtype)}: every tensor used, each there, of its shape and
  floating point. A UserError, the line loading gives first, for the first that is not;
  `missing(name)` is the error of a body tensor not there; `read(name)` gives the dtype of a
  tensor the table gives none (one loading reads its own way), or loading's refusal of it."""
  _check_all_used(table, cfg, source)
  for name, want in _expected_tensors(cfg).items():
    if name in table:
      shape, dtype = table[name]
      dtype = read(name) if dtype is None else jax.numpy.dtype(dtype)
      error = _tensor_error(name, shape, want, dtype, source, shown)
      if error is not None:
        raise error
    elif name != "lm_head.weight":
      raise missing(name)
    elif not cfg.tie_word_embeddings:
      raise _missing_head(source)


def _sharding_for(shardings: Any, path: tuple[str, ...], shape: tuple[int, ...]):
  if shardings is None:
    return None
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    return shardings("/".join(path), shape)
  if isinstance(shardings, jax.sharding.Sharding):
    return shardings
  node = shardings
  for key in path:
    node = node[key]
  return node


def resolve_shardings(shardings: Any, abstract: Any) -> Any:
  """Turns a `shardings` argument (see the module docstring) into a pytree like `abstract`."""
  if shardings is None:
    return None

  def one(path, leaf):
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return _sharding_for(shardings, keys, tuple(leaf.shape))

  return jax.tree_util.tree_map_with_path(one, abstract)


def place(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """Puts a host array on devices; with a sharding each device receives only its shard."""
  if sharding is None:
    return jax.device_put(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def params_from_hf_tensors(
  get: TensorGetter,
  has: Callable[[str], bool],
  cfg: LlamaConfig,
  *,
  source: str,
  shardings: Any = None,
  names: Iterable[str] | None = None,
  shown: Callable[[str], str] = str,
) -> dict:
  """Builds the `Llama` params tree from HF-named numpy tensors.

  A tensor the model would not use (`names` beyond those the config asks for: a bias, a layer
  past `num_hidden_layers`), a tied model's `lm_head.weight` that differs from its embedding,
  and a weight holding NaN or an infinity are refused by name: the model would compute other
  outputs than the checkpoint's.

  Args:
    get: returns the HF tensor (e.g. 'model.layers.0.mlp.up_proj.weight') as numpy.
    has: whether a tensor name exists.
    cfg: the model config (its `param_dtype`, `scan_layers` and shapes are used).
    source: file or folder name used in error messages.
    shardings: see the module docstring.
    names: every tensor name the checkpoint holds (None: not checked).
    shown: how messages name a tensor (a GGUF file's own name beside the HF one).

  Returns:
    The params tree of jax arrays in `cfg.param_dtype`.
  """
  if names is not None:
    _check_all_used(names, cfg, source)
  dtype = cfg.param_dtype

  def put(path, array):
    array = np.ascontiguousarray(np.asarray(array).astype(dtype, copy=False))
    return place(array, _sharding_for(shardings, path, array.shape))

  def set_path(tree, path, value):
    for key in path[:-1]:
      tree = tree.setdefault(key, {})
    tree[path[-1]] = value

  params: dict = {}

  def checked(name: str, shape: tuple[int, ...]) -> np.ndarray:
    return _checked(get, name, shape, source, shown)

  embed = checked("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
  params["embedding"] = put(("embedding",), embed)
  del embed
  for sub_path, suffix in _LAYER_TENSORS:
    shape = _expected_hf_shape(suffix, cfg)
    per_layer = [
      _hf_to_param(suffix, checked(f"model.layers.{i}.{suffix}", shape), cfg)
      for i in range(cfg.num_layers)
    ]
    if cfg.scan_layers:
      path = ("layers", *sub_path)
      set_path(params, path, put(path, np.stack(per_layer)))
    else:
      for i, w in enumerate(per_layer):
        path = (f"layers_{i}", *sub_path)
        set_path(params, path, put(path, w))
    del per_layer
  norm = checked("model.norm.weight", (cfg.hidden_size,))
  params["final_norm"] = {"scale": put(("final_norm", "scale"), norm)}
  if not cfg.tie_word_embeddings:
    if not has("lm_head.weight"):
      raise _missing_head(source)
    head = checked("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    params["lm_head"] = put(("lm_head",), head.T)
  elif has("lm_head.weight"):
    head = checked("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    if not np.array_equal(head, get("model.embed_tokens.weight")):
      raise UserError(
        f"{source}: the config ties the word embeddings (tie_word_embeddings) but lm_head.weight "
        "differs from model.embed_tokens.weight; set tie_word_embeddings to false to use it"
      )
  _check_finite(params, cfg, source, shown, get)
  return params


# Tensors a checkpoint may hold that the model computes itself (older conversions saved the
# rotary frequencies; llama.cpp's llama3 files their scaled form).
_DERIVED = (".rotary_emb.inv_freq", "rope_freqs.weight")


def _check_all_used(names: Iterable[str], cfg: LlamaConfig, source: str) -> None:
  used = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
  used.update(f"model.layers.{i}.{suffix}" for i in range(cfg.num_layers)
              for _, suffix in _LAYER_TENSORS)  # fmt: skip
  unused = sorted(n for n in names if n not in used and not n.endswith(_DERIVED))
  if unused:
    more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
    raise UserError(
      f"{source}: tensors this Llama config does not use: {', '.join(unused[:3])}{more} "
      f"(num_hidden_layers={cfg.num_layers}, no biases): the model would compute other "
      "outputs than the checkpoint's"
    )


@jax.jit
def _finite_rows(leaves):
  """Per leaf, whether every value is finite: one flag per layer for a stacked leaf."""
  return [jax.numpy.isfinite(x).reshape(x.shape[0], -1).all(axis=1) for x in leaves]


def _check_finite(
  params: dict,
  cfg: LlamaConfig,
  source: str,
  shown: Callable = str,
  get: TensorGetter | None = None,
) -> None:
  """A UserError naming the first tensor that holds NaN or an infinity; one saying it
  overflows `param_dtype` where the checkpoint's own values (`get`) are finite."""
  hf_of = {sub: suffix for sub, suffix in _LAYER_TENSORS}
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(params)[0])
  for path, rows in zip(paths, jax.device_get(_finite_rows(list(leaves)))):
    if rows.all():
      continue
    keys = tuple(str(k.key) for k in path)
    if keys[0] == "layers":
      name = f"model.layers.{int(np.argmin(rows))}.{hf_of[keys[1:]]}"
    elif keys[0].startswith("layers_"):
      name = f"model.layers.{keys[0][len('layers_') :]}.{hf_of[keys[1:]]}"
    else:
      name = {"embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
              "lm_head": "lm_head.weight"}[keys[0]]  # fmt: skip
    stored = None if get is None else np.asarray(get(name), np.float32)
    if stored is not None and np.isfinite(stored).all():
      raise UserError(
        f"{source}: tensor {shown(name)} holds values up to {np.abs(stored).max():g}, beyond "
        f"the range of {cfg.param_dtype.name} (param_dtype): load it in bfloat16 or float32"
      )
    raise UserError(f"{source}: tensor {shown(name)} holds NaN or infinite values")


# ----------------------------------------------------------------------------- HF folders


def hf_config_path(folder: str) -> str:
  """The `config.json` of the model folder `folder`; a UserError where it is not there (or
  the folder cannot be read), naming a GGUF file the folder holds instead."""
  config_path = os.path.join(folder, "config.json")
  if os.path.isfile(config_path):
    return config_path
  if not os.access(folder, os.R_OK | os.X_OK):
    raise UserError(f"cannot read the model folder {folder}: permission denied")
  ggufs = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
  hint = f" (it holds {ggufs[0]}: give that file as the model)" if ggufs else ""
  raise UserError(f"config.json not found in {folder}{hint}")


def read_hf_config(path: str) -> dict:
  """A Hugging Face `config.json` (or `generation_config.json`) as a dict; unreadable or
  malformed is a UserError."""
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    raise UserError(f"{path} is not a readable JSON file: {e}") from None
  if not isinstance(hf, dict):
    raise UserError(f"{path} holds a JSON {type(hf).__name__}, not a model config object")
  return hf


def _positive_int(
  hf: dict, key: str, default: int | None = None, source: str = "config.json"
) -> int:
  """`hf[key]` (or `default` where it is absent or null) as a positive int, else a UserError."""
  value = hf.get(key)
  if value is None and default is not None:
    return default
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise UserError(f"{source}: {key}={value!r} must be a positive integer")
  return int(value)


def _positive_float(
  hf: dict, key: str, default: float, where: str = "", source: str = "config.json"
) -> float:
  """`hf[key]` (or `default` where absent) as a positive finite float, else a UserError."""
  value = hf.get(key, default)
  ok = isinstance(value, int | float) and not isinstance(value, bool)
  if not ok or not np.isfinite(value) or value <= 0:
    raise UserError(f"{source}: {where}{key}={value!r} must be a positive number")
  return float(value)


def config_from_hf(hf: dict, source: str = "Llama config.json", **overrides) -> LlamaConfig:
  """Maps a Hugging Face Llama `config.json` dict to `LlamaConfig` (overrides win).

  Every size must be a positive integer, the heads a multiple of the key/value heads, and a
  rope scaling of the llama3 kind complete; anything else is a UserError naming the field
  (and `source`, the file's path).
  """
  model_type = hf.get("model_type")
  if model_type != "llama":
    raise UserError(
      f"{source}: unsupported architecture {model_type!r}: only Llama models are supported"
    )
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise UserError(f"{source}: unsupported Llama variant: attention_bias/mlp_bias must be false")
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"{source}: unsupported hidden_act {hf.get('hidden_act')!r}: expected silu")
  quantized = hf.get("quantization_config")
  if quantized:
    method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else quantized
    raise UserError(
      f"{source}: quantized checkpoints ({method}) are not supported: give the unquantized weights"
    )
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")  # fmt: skip
  missing = [k for k in required if k not in hf]
  if missing:
    raise UserError(f"{source} lacks required fields: {', '.join(missing)}")
  sizes = {k: _positive_int(hf, k, source=source) for k in required}
  heads = sizes["num_attention_heads"]
  kv_heads = _positive_int(hf, "num_key_value_heads", heads, source=source)
  if heads % kv_heads:
    raise UserError(
      f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
    )
  if hf.get("head_dim") is None and sizes["hidden_size"] % heads:
    raise UserError(
      f"{source}: hidden_size={sizes['hidden_size']} is not a multiple of "
      f"num_attention_heads={heads} (and no head_dim is given)"
    )
  head_dim = _positive_int(hf, "head_dim", sizes["hidden_size"] // heads, source=source)
  if head_dim % 2:
    raise UserError(f"{source}: head_dim={head_dim} must be even (rotary embeddings)")
  for key in ("rope_parameters", "rope_scaling"):
    value = hf.get(key)
    if value is not None and not isinstance(value, dict):
      raise UserError(f"{source}: {key}={value!r} must be an object or null")
  # As transformers reads them: a (non-empty) `rope_scaling` whole, else `rope_parameters`;
  # the rope_theta in that object, else the top-level one, else 10000.
  rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  if "type" in rope:  # The older name of `rope_type`.
    rope.setdefault("rope_type", rope["type"])
  theta_at = next((d for d in (rope, hf) if d.get("rope_theta") is not None), {})
  theta = _positive_float(theta_at, "rope_theta", 10000.0, source=source)
  rope_type = rope.get("rope_type", "default")
  if rope_type in (None, "default"):
    scaling = None
  elif rope_type == "llama3":
    floats = ("factor", "low_freq_factor", "high_freq_factor")
    lacking = [k for k in (*floats, "original_max_position_embeddings") if k not in rope]
    if lacking:
      raise UserError(f"{source}: the llama3 rope scaling lacks {', '.join(lacking)}")
    scaling = {k: _positive_float(rope, k, 0.0, "rope scaling ", source=source) for k in floats}
    scaling["original_max_position_embeddings"] = _positive_int(
      rope, "original_max_position_embeddings", source=source
    )
    scaling["rope_type"] = "llama3"
  elif rope_type == "linear":
    if "factor" not in rope:
      raise UserError(f"{source}: the linear rope scaling lacks factor")
    factor = _positive_float(rope, "factor", 0.0, "rope scaling ", source=source)
    scaling = {"rope_type": "linear", "factor": factor}
  else:
    raise UserError(
      f"{source}: unsupported rope scaling type {rope_type!r}: only llama3 and linear are supported"
    )
  tie = hf.get("tie_word_embeddings")
  if tie is not None and not isinstance(tie, bool):
    raise UserError(f"{source}: tie_word_embeddings={tie!r} must be true, false or null")
  kwargs = dict(
    vocab_size=sizes["vocab_size"],
    hidden_size=sizes["hidden_size"],
    intermediate_size=sizes["intermediate_size"],
    num_layers=sizes["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    rope_theta=theta,
    rope_scaling=scaling,
    rms_norm_eps=_positive_float(hf, "rms_norm_eps", 1e-6, source=source),
    tie_word_embeddings=bool(tie),
    max_position_embeddings=_positive_int(hf, "max_position_embeddings", 2048, source=source),
  )
  kwargs.update(overrides)
  return LlamaConfig(**kwargs)


def _unreadable(path: str, exc: OSError) -> UserError:
  """The one-line error of a model file that is there but cannot be read."""
  return UserError(f"cannot read {path}: {exc.strerror or exc}")


# The safetensors dtypes numpy holds, as numpy names them (bfloat16 through ml_dtypes);
# another (float8, float4) is read to get loading's own refusal of it.
_NUMPY_DTYPES = {
  "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
  "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16",
  "F32": "float32", "F64": "float64",
}  # fmt: skip


# The names a Llama body's tensors begin with, without the causal LM's 'model.' prefix.
_BODY_PREFIXES = ("embed_tokens.", "layers.", "norm.")


class SafetensorsFolder:
  """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint; made, it has
  read the headers (and index) of every file, a UserError for none, a missing or unreadable
  shard, a damaged header or index."""

  def __init__(self, folder: str):
    from safetensors import SafetensorError, safe_open

    self._error = SafetensorError
    self._folder = folder
    index_path = os.path.join(folder, "model.safetensors.index.json")
    listed: list[str] = []
    if os.path.isfile(index_path):
      try:
        with open(index_path, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(
          isinstance(v, str) for v in weight_map.values()
        ):
          raise TypeError("weight_map is not an object of file names")
      except OSError as exc:
        raise _unreadable(index_path, exc) from None
      except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError.
        why = "no weight_map" if isinstance(exc, KeyError) else str(exc).split("\n")[0]
        raise UserError(f"{index_path} is not a safetensors index ({why})") from None
      files = sorted(set(weight_map.values()))
      single = os.path.join(folder, "model.safetensors")
      if "model.safetensors" not in files and os.path.isfile(single):
        # transformers reads that file and leaves the index; this reader the other way round.
        raise UserError(
          f"{folder} holds both model.safetensors and an index of other shards "
          f"({os.path.basename(index_path)}): which are the weights? Remove the one not meant"
        )
      for name in files:  # Shards beside the index: never a file elsewhere on the machine.
        if name in ("", ".", "..") or os.path.basename(name) != name:
          raise UserError(
            f"{index_path} names the shard {name!r}: an index names files in its own folder "
            "(a bare file name)"
          )
    else:
      try:
        listed = os.listdir(folder)
      except OSError as exc:  # Its config.json read, the folder not listed (no read right).
        raise _unreadable(folder, exc) from None
      files = sorted(n for n in listed if n.endswith(".safetensors"))
      if "model.safetensors" in files:  # As transformers reads a folder: that file alone,
        files = ["model.safetensors"]  # not an adapter_model.safetensors beside it.
      weight_map = None
    if not files:
      if weight_map is not None:  # An index of no files: the folder not listed yet.
        with contextlib.suppress(OSError):  # The hint only.
          listed = os.listdir(folder)
      pickled = sorted(n for n in listed if n.endswith((".bin", ".pt", ".pth")))
      hint = (
        f" ({pickled[0]} is not read: a pickle can run code; save the model with "
        "safetensors, as save_pretrained does by default)"
        if pickled
        else ""
      )
      raise UserError(f"no *.safetensors weights found in {folder}{hint}")
    self._handles = {}
    self._where: dict[str, str] = {}
    for name in files:
      path = os.path.join(folder, name)
      if not os.path.isfile(path):
        raise UserError(f"safetensors shard missing: {path}")
      try:
        handle = safe_open(path, framework="numpy")
      except SafetensorError as e:
        raise UserError(f"safetensors file is truncated or corrupt: {path} ({e})") from None
      except OSError as exc:  # It is there: safetensors says "not found" of a denied read too.
        raise _unreadable(path, exc) from None
      self._handles[path] = handle
      for key in handle.keys():
        if key in self._where:  # Which copy the model would get is anyone's guess.
          raise UserError(
            f"{folder}: tensor {key} is in two files, {os.path.basename(self._where[key])} "
            f"and {name}: give each tensor once"
          )
        self._where[key] = path
    if weight_map is not None:
      missing = sorted(k for k in weight_map if k not in self._where)
      if missing:
        raise UserError(f"{folder}: tensors listed in the index are missing: {missing[:3]}")
    # A LlamaModel's save (no head) names its tensors without the causal LM's 'model.'
    # prefix; transformers loads it into the causal LM all the same.
    self._stored = {name: name for name in self._where}
    if not any(k.startswith("model.") for k in self._where) and any(
      k.startswith(_BODY_PREFIXES) for k in self._where
    ):
      self._stored = {
        name if name == "lm_head.weight" else f"model.{name}": name for name in self._where
      }
      self._where = {name: self._where[stored] for name, stored in self._stored.items()}

  def table(self) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """{name: (shape, dtype as numpy names it, None for one numpy does not hold)} from the
    headers (no tensor is read)."""
    out = {}
    for name, path in self._where.items():
      view = self._handles[path].get_slice(self._stored[name])
      out[name] = (tuple(view.get_shape()), _NUMPY_DTYPES.get(view.get_dtype()))
    return out

  def missing(self, name: str) -> UserError:
    return UserError(f"{self._folder}: tensor {name} not found in the safetensors files")

  def has(self, name: str) -> bool:
    return name in self._where

  def names(self) -> list[str]:
    return list(self._where)

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise self.missing(name)
    try:
      return self._handles[self._where[name]].get_tensor(self._stored[name])
    except self._error as e:
      raise UserError(f"cannot read {name} from {self._where[name]}: {e}") from None
    except (AttributeError, TypeError, ValueError) as e:  # A dtype numpy has no type for.
      raise UserError(
        f"cannot read {name} from {self._where[name]} ({e}): float8 and other quantized "
        "weights are not supported"
      ) from None


def load_hf(folder: str, *, shardings: Any = None, **config_overrides) -> tuple[LlamaConfig, dict]:
  """Loads a Hugging Face Llama folder (`config.json` + safetensors, single or sharded).

  Args:
    folder: the checkpoint folder.
    shardings: see the module docstring.
    **config_overrides: `LlamaConfig` fields to set, e.g. dtype, param_dtype, remat_policy.

  Returns:
    (config, params).
  """
  if not os.path.isdir(folder):
    raise UserError(f"model folder not found: {folder}")
  config_path = hf_config_path(folder)
  cfg = config_from_hf(read_hf_config(config_path), config_path, **config_overrides)
  tensors = SafetensorsFolder(folder)
  return cfg, params_from_hf_tensors(
    tensors.get, tensors.has, cfg, source=folder, shardings=shardings, names=tensors.names()
  )


# ----------------------------------------------------------------------------- GGUF files


def open_gguf(path: str) -> GGUFFile:
  """Reads a GGUF file's metadata and tensor table (`GGUFFile`); the tensors stay on disk.

  Raises `UserError` for missing, truncated or corrupt files.
  """
  if not os.path.isfile(path):
    raise UserError(f"GGUF file not found: {path}")
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
  except OSError as exc:
    raise _unreadable(path, exc) from None
  if magic != b"GGUF":
    raise UserError(f"not a GGUF file (bad magic): {path}")
  try:
    return GGUFFile(path)
  except (ValueError, IndexError, KeyError, EOFError, OSError, struct.error) as e:
    raise UserError(f"GGUF file is truncated or corrupt: {path} ({e})") from None


@dataclasses.dataclass(frozen=True)
class GGUFField:
  """One metadata value: `contents()` is the Python value (lists for arrays)."""

  value: Any

  def contents(self) -> Any:
    return self.value


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  """A tensor's table entry: `shape` in GGUF order (fastest axis first), `data` the raw
  (memory-mapped) array as `gguf.quants.dequantize` takes it."""

  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]
  data: np.ndarray


class GGUFFile:
  """A GGUF file (version 2 or 3, little-endian) read as `gguf.GGUFReader` reads it, for the
  parts this package uses: `fields` ({key: GGUFField}), `tensors` and `data` (the memory map).

  `gguf.GGUFReader` wraps every element of every metadata array in a numpy view: for
  SmolLM2-135M's tokenizer (49k tokens, 48k merges) that takes about 7 s on a CPU core, on
  every load. Here the file is parsed with `struct` in about 0.1 s; the quantisation constants
  and dequantisation stay `gguf`'s (`GGML_QUANT_SIZES`, `gguf.quants`). A test compares both
  readers on SmolLM2's file and on files written by `gguf.GGUFWriter`.
  """

  _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
              10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip  # GGUFValueType -> struct format
  _STRING, _ARRAY = 8, 9
  _PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
            "I16": np.int16, "I32": np.int32, "I64": np.int64}  # fmt: skip

  def __init__(self, path: str):
    import gguf

    self.data = np.memmap(path, mode="r")
    self._buf = memoryview(self.data)
    self._offs = 4
    version = self._scalar("<I")
    if version & 0xFFFF == 0:
      raise UserError(f"{path}: a big-endian GGUF file; only little-endian files are supported")
    if version not in (2, 3):
      raise UserError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_fields = self._scalar("<Q"), self._scalar("<Q")
    self.fields: dict[str, GGUFField] = {}
    for _ in range(n_fields):
      key = self._string()
      self.fields[key] = GGUFField(self._value(self._scalar("<I")))
    table = []
    for _ in range(n_tensors):
      name = self._string()
      dims = tuple(self._scalar("<Q") for _ in range(self._scalar("<I")))
      table.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
    align = self.fields.get("general.alignment", GGUFField(32)).value
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
      raise ValueError(f"bad general.alignment {align!r}")
    start = -(-self._offs // align) * align
    self.tensors: list[GGUFTensor] = []
    for name, dims, raw_type, offset in table:
      qtype = gguf.GGMLQuantizationType(raw_type)
      n = int(np.prod(dims, dtype=np.int64))
      np_shape = tuple(reversed(dims))
      plain = self._PLAIN.get(qtype.name)
      if plain is not None:
        dtype, count = np.dtype(plain), n
      else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        dtype, count = np.dtype(np.uint8), n * size // block
        np_shape = gguf.quants.quant_shape_to_byte_shape(np_shape, qtype)
      begin = start + offset
      if begin + count * dtype.itemsize > len(self.data):
        raise EOFError(f"tensor {name} runs past the end of the file")
      data = np.frombuffer(self.data, dtype, count, begin).reshape(np_shape)
      self.tensors.append(GGUFTensor(name, qtype, dims, data))

  def _take(self, n: int) -> memoryview:
    if n < 0 or self._offs + n > len(self._buf):
      raise EOFError("unexpected end of file")
    out = self._buf[self._offs : self._offs + n]
    self._offs += n
    return out

  def _scalar(self, fmt: str) -> Any:
    return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

  def _string(self) -> str:
    return str(self._take(self._scalar("<Q")), "utf-8")

  def _value(self, kind: int) -> Any:
    if kind in self._SCALARS:
      return self._scalar(self._SCALARS[kind])
    if kind == self._STRING:
      return self._string()
    if kind != self._ARRAY:
      raise ValueError(f"unknown GGUF value type {kind}")
    item, count = self._scalar("<I"), self._scalar("<Q")
    if item in self._SCALARS:  # numbers: one read
      fmt = self._SCALARS[item]
      size = struct.calcsize(fmt)
      raw = self._take(size * count)
      dtype = np.dtype(bool if fmt == "<?" else fmt)
      return np.frombuffer(raw, dtype, count).tolist()
    return [self._value(item) for _ in range(count)]


def gguf_field(reader, key: str, default: Any = None) -> Any:
  """The value of metadata `key` (scalars unwrapped, string arrays as lists)."""
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def gguf_name(reader) -> str:
  """The file a GGUF reader reads, for messages."""
  return str(getattr(getattr(reader, "data", None), "filename", "") or "the GGUF file")


def config_from_gguf(reader, **overrides) -> LlamaConfig:
  """Maps GGUF `llama.*` metadata to `LlamaConfig` (overrides win)."""
  name = gguf_name(reader)
  meta = f"{name}: GGUF metadata"
  arch = gguf_field(reader, "general.architecture")
  if arch != "llama":
    raise UserError(f"{name}: unsupported GGUF architecture {arch!r}: only llama is supported")

  def need(key):
    value = gguf_field(reader, key)
    if value is None:
      raise UserError(f"{meta} {key} missing")
    return value

  names = {t.name for t in reader.tensors}
  # As llama.cpp reads it: the type is linear unless given, the factor is scaling.factor,
  # else the older scale_linear, and none (0) or 1 scales nothing; type none ignores it.
  rope_type = gguf_field(reader, "llama.rope.scaling.type", "linear")
  if "rope_freqs.weight" in names or rope_type not in ("none", "linear"):
    raise UserError(
      f"{name}: unsupported GGUF rope scaling (rope_freqs / llama.rope.scaling.type="
      f"{rope_type}): only linear is supported"
    )
  factor_key = "llama.rope.scaling.factor"
  if gguf_field(reader, factor_key) is None:
    factor_key = "llama.rope.scale_linear"
  factor = gguf_field(reader, factor_key, 0.0)
  if factor != 0:
    factor = _positive_float({factor_key: factor}, factor_key, 0.0, source=meta)
  rope_scaling = (
    None if rope_type == "none" or factor in (0, 1) else {"rope_type": "linear", "factor": factor}
  )

  def positive(key, default=None) -> int:
    value = gguf_field(reader, key, default) if default is not None else need(key)
    return _positive_int({key: value}, key, source=meta)

  def positive_float(key, default) -> float:
    return _positive_float({key: gguf_field(reader, key, default)}, key, default, source=meta)

  hidden = positive("llama.embedding_length")
  heads = positive("llama.attention.head_count")
  kv_heads = positive("llama.attention.head_count_kv", heads)
  if heads % kv_heads:
    raise UserError(
      f"{meta} llama.attention.head_count={heads} is not a multiple of "
      f"llama.attention.head_count_kv={kv_heads}"
    )
  vocab = None if gguf_field(reader, "llama.vocab_size") is None else positive("llama.vocab_size")
  if vocab is None:
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else None
  if vocab is None:
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None or len(embd.shape) != 2:
      raise UserError(f"{name}: a GGUF file without llama.vocab_size, tokenizer.ggml.tokens "
                      "or a 2-D token_embd.weight: its vocabulary size is unknown")  # fmt: skip
    vocab = int(embd.shape[1])
  # As llama.cpp reads a llama file: the head size is key_length (else embedding_length /
  # head_count), and the rotary dimensions, where given, must be all of it.
  head_dim = (
    positive("llama.attention.key_length")
    if gguf_field(reader, "llama.attention.key_length") is not None
    else hidden // heads
  )
  for key in ("llama.rope.dimension_count", "llama.attention.value_length"):
    if gguf_field(reader, key) is not None and positive(key) != head_dim:
      raise UserError(
        f"{meta} {key}={positive(key)} differs from the head size {head_dim} "
        "(llama.attention.key_length, else embedding_length / head_count): a llama model "
        "rotates, and its values span, the whole head"
      )
  kwargs = dict(
    vocab_size=int(vocab),
    hidden_size=hidden,
    intermediate_size=positive("llama.feed_forward_length"),
    num_layers=positive("llama.block_count"),
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    rope_theta=positive_float("llama.rope.freq_base", 10000.0),
    rms_norm_eps=positive_float("llama.attention.layer_norm_rms_epsilon", 1e-5),
    tie_word_embeddings="output.weight" not in names,
    max_position_embeddings=positive("llama.context_length", 4096),
    rope_scaling=rope_scaling,
  )
  if kwargs["head_dim"] < 2 or kwargs["head_dim"] % 2 or kwargs["vocab_size"] < 1:
    raise UserError(
      f"{meta}: head size {kwargs['head_dim']} (must be even) or vocabulary "
      f"{kwargs['vocab_size']} is not one of a Llama model"
    )
  kwargs.update(overrides)
  return LlamaConfig(**kwargs)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's rotary row permutation of q/k weights [n_head * head_dim, in]."""
  rows, cols = w.shape
  half = rows // n_head // 2
  # llama.cpp stores rows as [head, half, pair]; HF order is [head, pair, half].
  return w.reshape(n_head, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_by_hf_name(reader) -> tuple[dict, list[str]]:
  """-> ({HF name: GGUF tensor} of the tensors a llama model reads, the others' names)."""
  by_hf_name, others = {}, []
  for t in reader.tensors:
    parts = t.name.split(".", 3)
    if t.name in _GGUF_TOP_NAMES:
      by_hf_name[_GGUF_TOP_NAMES[t.name]] = t
    elif parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_LAYER_NAMES:
      _, layer, kind, rest = parts
      by_hf_name[f"model.layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.{rest}"] = t
    else:
      others.append(t.name)
  return by_hf_name, others


def _gguf_hf_shape(t) -> tuple[int, ...]:
  """A GGUF tensor's shape in the HF order (GGUF lists the fastest dimension first)."""
  return tuple(int(x) for x in reversed(t.shape))


def _gguf_shown(by_hf_name: dict) -> Callable[[str], str]:
  """How messages name a tensor: as the file does, its HF name beside it."""
  return lambda name: f"{by_hf_name[name].name} ({name})" if name in by_hf_name else name


def _gguf_missing(path: str, name: str) -> UserError:
  return UserError(f"{path}: tensor for {name} missing from the GGUF file")


def _gguf_qtype(t, path: str):
  """The tensor's GGML type, a UserError for one this reader does not dequantize."""
  import gguf

  qtype = gguf.GGMLQuantizationType(t.tensor_type)
  if qtype.name not in SUPPORTED_GGUF_TYPES:
    raise UserError(
      f"{path}: tensor {t.name} uses unsupported quantisation {qtype.name} "
      f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})"
    )
  return qtype


def check_gguf_tensors(reader, cfg: LlamaConfig, path: str) -> None:
  """`check_tensor_table` of a GGUF file's tensor table (its types read as loading reads
  them: float32 once dequantized, a type it does not dequantize refused)."""
  by_hf_name, others = _gguf_by_hf_name(reader)
  table = {name: (_gguf_hf_shape(t), None) for name, t in by_hf_name.items()}
  table.update({name: ((), None) for name in others})

  def read(name: str):
    _gguf_qtype(by_hf_name[name], path)
    return np.dtype(np.float32)

  missing = functools.partial(_gguf_missing, path)
  check_tensor_table(table, cfg, path, missing, read, _gguf_shown(by_hf_name))


def gguf_tensor_getter(
  reader, cfg: LlamaConfig, path: str
) -> tuple[TensorGetter, Callable, list[str], Callable[[str], str]]:
  """-> (get, has, names, shown) over HF tensor names, dequantizing GGUF tensors to float32
  on demand; `names` holds the file's other tensors under their GGUF names; `shown` names a
  tensor for messages as the file does, its HF name beside it."""
  import gguf

  by_hf_name, others = _gguf_by_hf_name(reader)

  def get(name: str) -> np.ndarray:
    t = by_hf_name.get(name)
    if t is None:
      raise _gguf_missing(path, name)
    qtype = _gguf_qtype(t, path)
    try:
      w = np.asarray(gguf.quants.dequantize(t.data, qtype), dtype=np.float32)
    except (ValueError, NotImplementedError) as e:
      raise UserError(f"{path}: cannot dequantize {t.name} ({qtype.name}): {e}") from None
    w = w.reshape(_gguf_hf_shape(t))
    if ".self_attn.q_proj." in name:
      w = _unpermute_rows(w, cfg.num_heads)
    elif ".self_attn.k_proj." in name:
      w = _unpermute_rows(w, cfg.num_kv_heads)
    return w

  return get, lambda name: name in by_hf_name, [*by_hf_name, *others], _gguf_shown(by_hf_name)


def load_gguf(path: str, *, shardings: Any = None, **config_overrides) -> tuple[LlamaConfig, dict]:
  """Loads (and dequantizes to float32, then `param_dtype`) a llama GGUF file.

  Args:
    path: the .gguf file.
    shardings: see the module docstring.
    **config_overrides: `LlamaConfig` fields to set, e.g. dtype, param_dtype.

  Returns:
    (config, params).
  """
  reader = open_gguf(path)
  cfg = config_from_gguf(reader, **config_overrides)
  get, has, names, shown = gguf_tensor_getter(reader, cfg, path)
  return cfg, params_from_hf_tensors(
    get, has, cfg, source=path, shardings=shardings, names=names, shown=shown
  )
