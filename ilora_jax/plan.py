r"""Memory plan of the iLoRA stage on a mesh, computed from shapes alone (nothing allocated).

  python -m ilora_jax.plan --config=configs/movielens.py --config.llm.name=llama2-7b \
      --config.plan.devices=8 --config.mesh.fsdp=8 --config.mesh.data=1

For `plan.devices` devices (0 = this machine's) and the config's mesh, it abstracts every
array the train step holds with `jax.eval_shape` (frozen LLM and SASRec, LoRA adapters, router,
projector, optimizer state), gives each its `PartitionSpec` from the logical-axis rules exactly
as the run does, and prints the bytes one device holds of each, plus an activation estimate for
one micro-batch. The last line is one JSON object. With `plan.devices=1,8,64` it prints one
table per device count, and the last line is a JSON list of those objects.

Activation estimate (per device, one micro-batch of b rows per data shard, T tokens, L layers,
hidden d, h heads): without rematerialisation L * b * T * (34 d + 5 h T) * bytes / 2, the
per-layer count of Korthikanti et al. (2022, "Reducing Activation Recomputation in Large
Transformer Models") for 16-bit activations, divided over the tensor axis; with `llm.remat`
"full" only each layer's input, L * b * T * d * bytes, plus one layer's working set; "dots"
and "dots_no_batch" keep every matmul output: per token the seven projections' (q, k, v, o,
gate, up, down: h w + 2 k w + 2 d + 2 f values, w the head width, k the KV heads) and each
wrapped projection's adapter output of the same width, plus one layer's working set (with
XLA's attention "dots" also keeps the attention scores, b h T^2 a layer, left out here; for
the 7B shape at batch 8 x 512 the estimate's total is 34.7 GiB, where XLA planned 34.0 and an
H100 reported 34.1 with cuDNN's, bench/README.md); "projections" keeps per token the layer
input, q, k, v, the residual after attention and the MLP's gate and up outputs
(3 d + 2 k w + 2 f values, f the MLP width) plus, when `lora.dropout` > 0, the adapters'
dropout masks (a byte per input element of each wrapped projection: 6 d + f for all seven),
plus one layer's working set. Plus the
float32 logits of the loss's target slots, b * k * vocab * 4 with k = ilora.max_target_tokens
(the cap on the slots; three copies: logits, log-softmax, its gradient).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import jax
import numpy as np
from absl import flags
from jax.sharding import PartitionSpec

from ilora_jax.errors import UserError, cli_main, counted, print_results

GIB = 1024**3


def shard_shape(shape, spec: PartitionSpec, sizes: dict[str, int]) -> tuple[int, ...]:
  """Shape of the largest shard of an array of `shape` laid out by `spec` on `sizes`."""
  dims = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  out = []
  for size, axes in zip(shape, dims):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    out.append(math.ceil(size / int(np.prod([sizes[a] for a in names])) if names else size))
  return tuple(out)


def per_device_bytes(abstract: Any, specs: Any, sizes: dict[str, int]) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs laid out by a tree of specs."""
  leaves = jax.tree.leaves(abstract)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  if len(leaves) != len(spec_leaves):
    raise ValueError(f"{len(leaves)} arrays but {len(spec_leaves)} specs")
  return sum(
    int(np.prod(shard_shape(a.shape, s, sizes))) * np.dtype(a.dtype).itemsize
    for a, s in zip(leaves, spec_leaves)
  )


def total_bytes(abstract: Any) -> int:
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract))


def _replicated(tree: Any) -> Any:
  return jax.tree.map(lambda _: PartitionSpec(), tree)


def _path(keys) -> tuple:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def optimizer_specs(opt_abstract: Any, params_abstract: Any, param_specs: Any) -> Any:
  """Optimizer leaves take the spec of the parameter they mirror (moments are zeros_like of
  their parameter, so they keep its sharding); counters and the like are replicated."""
  by_path = {}
  spec_leaves = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (keys, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params_abstract), spec_leaves):
    by_path[_path(keys)] = (leaf.shape, spec)

  def spec_of(keys, leaf):
    path = _path(keys)
    for start in range(len(path)):
      hit = by_path.get(path[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_of, opt_abstract)


def _output_widths(cfg) -> dict[str, int]:
  """Each wrapped projection's output width."""
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  d, f = cfg.hidden_size, cfg.intermediate_size
  return {"q": q, "k": kv, "v": kv, "o": d, "gate": f, "up": f, "down": d}


def adapter_output_values(cfg, targets) -> int:
  """Values per token and layer of the adapters' outputs (kept by the 'dots' policies)."""
  return sum(_output_widths(cfg)[t] for t in targets)


def mask_bytes_per_token(cfg, targets, dropout: float) -> int:
  """Bytes of the adapters' kept dropout masks per token and layer (one per input element)."""
  if dropout <= 0:
    return 0
  return sum(cfg.intermediate_size if t == "down" else cfg.hidden_size for t in targets)


def activation_bytes(
  cfg,
  micro_per_shard: int,
  seq_len: int,
  remat: str,
  tensor: int,
  masks: int = 0,
  target_slots: int | None = None,
  adapter_outputs: int = 0,
) -> int:
  """The estimate in the module docstring, for one device; `masks` is
  `mask_bytes_per_token` (kept by the 'projections' policy only), `target_slots` the
  positions per row that reach the LM head (all `seq_len` when None), `adapter_outputs`
  `adapter_output_values` (kept by the 'dots' policies only)."""
  b, t, d, h, L = micro_per_shard, seq_len, cfg.hidden_size, cfg.num_heads, cfg.num_layers
  itemsize = np.dtype(cfg.dtype).itemsize
  per_layer_full = b * t * (34 * d + 5 * h * t) * itemsize / 2 / tensor
  if remat == "full":
    layers = L * b * t * d * itemsize + per_layer_full
  elif remat in ("dots", "dots_no_batch"):
    outputs = sum(_output_widths(cfg).values()) + adapter_outputs
    layers = L * b * t * outputs * itemsize / tensor + per_layer_full
  elif remat == "projections":
    kv = cfg.num_kv_heads * cfg.head_dim
    values = 3 * d + 2 * kv + 2 * cfg.intermediate_size
    layers = L * b * t * (values * itemsize + masks) / tensor + per_layer_full
  else:
    layers = L * per_layer_full
  rows = t if target_slots is None else min(t, target_slots)
  logits = 3 * b * rows * cfg.vocab_size * 4 / tensor
  return int(layers + logits)


def activation_tensor_shards(cfg, tensor: int) -> int:
  """How many ways the tensor axis splits the activations: its size where it divides the
  heads, the key/value heads and the MLP width, else 1 (the sharding rules then leave those
  axes whole, `llm.partition_specs`, and each device holds every activation)."""
  sizes = (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size)
  return tensor if all(n % tensor == 0 for n in sizes) else 1


def model_config(config):
  """The LlamaConfig the run would build: config dtypes, vocabulary grown by the 5 special
  tokens and rounded up to 128 (the tokenizer is assumed to have `vocab_size` entries)."""
  from ilora_jax import llm, train_ilora

  cfg = llm.config_for(
    config.llm.name,
    dtype=train_ilora.DTYPES[config.llm.dtype],
    param_dtype=train_ilora.DTYPES[config.llm.param_dtype],
    remat_policy=config.llm.remat,
  )
  grown = -(-(cfg.vocab_size + 5) // 128) * 128
  return cfg.replace(vocab_size=max(cfg.vocab_size, grown))


def plan(config, devices: int, llama_cfg=None, n_items: int | None = None) -> dict:
  """Per-device bytes of everything the iLoRA train step holds on `devices` devices."""
  from ilora_jax import configuration, llm, lora, optim, router, sharding, train_ilora
  from ilora_jax.projector import Projector
  from ilora_jax.sasrec import init_params as sasrec_init
  from ilora_jax.train_sasrec import model_config as sasrec_config

  shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  sizes = dict(zip(sharding.MESH_AXES, shape))
  rules = sharding.rules(config)
  cfg = llama_cfg if llama_cfg is not None else model_config(config)
  lora_cfg = train_ilora.lora_config(config)
  factory = lora.adapter_factory(lora_cfg)

  llm_abs = llm.abstract_params(cfg)
  llm_specs = llm.partition_specs(cfg, sizes, rules)
  lora_abs = train_ilora._adapter_only(llm.abstract_params(cfg, factory))
  lora_specs = train_ilora._adapter_only(llm.partition_specs(cfg, sizes, rules, factory))

  n_items = int(n_items if n_items is not None else config.data.n_items or 1)
  sas_cfg = sasrec_config(config, n_items)
  sas_abs = jax.eval_shape(lambda: sasrec_init(sas_cfg, jax.random.PRNGKey(0)))
  rtr = router.make_router(config.router.kind, lora_cfg.num_experts, config.router.hidden,
                           **train_ilora.router_kwargs(config))  # fmt: skip
  key = jax.random.PRNGKey(0)
  rtr_abs, proj_abs, stats = jax.eval_shape(
    lambda: train_ilora.init_router_projector(
      rtr, Projector(cfg.hidden_size), sas_cfg.hidden, key, key
    )
  )
  trainable = {"lora": lora_abs, "router": rtr_abs, "projector": proj_abs}
  trainable_specs = {"lora": lora_specs, "router": _replicated(rtr_abs),
                     "projector": _replicated(proj_abs)}  # fmt: skip
  tc = config.ilora.train
  tx = optim.make(train_ilora.labels_of(trainable), tc.lr, 1000, tc.weight_decay, tc.clip_norm)
  opt_abs = jax.eval_shape(tx.init, trainable)
  opt_specs = optimizer_specs(opt_abs, trainable, trainable_specs)

  micro = int(config.train.batch_size or tc.batch_size)
  per_shard = sharding.batch_size_per_shard(
    sizes, micro, configuration.batch_field(config, "ilora")
  )
  seq_len = int(config.plan.seq_len)
  if seq_len < 1:
    raise UserError(f"config.plan.seq_len={seq_len} must be positive")
  parts = {
    "frozen_llm": per_device_bytes(llm_abs, llm_specs, sizes),
    "frozen_sasrec": per_device_bytes(sas_abs, _replicated(sas_abs), sizes),
    "trainable": per_device_bytes(trainable, trainable_specs, sizes)
    + per_device_bytes(stats, _replicated(stats), sizes),
    "optimizer": per_device_bytes(opt_abs, opt_specs, sizes),
    "activations_estimate": activation_bytes(
      cfg,
      per_shard,
      seq_len,
      config.llm.remat,
      activation_tensor_shards(cfg, sizes["tensor"]),
      mask_bytes_per_token(cfg, config.lora.targets, config.lora.dropout),
      config.ilora.max_target_tokens,
      adapter_output_values(cfg, config.lora.targets),
    ),  # fmt: skip
  }
  return {
    "model": config.llm.name,
    "devices": devices,
    "mesh": sizes,
    "micro_batch": micro,
    "seq_len": seq_len,
    "remat": config.llm.remat,
    "params_total": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(llm_abs)),
    "trainable_total": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainable)),
    **{f"{k}_bytes": v for k, v in parts.items()},
    "total_bytes": sum(parts.values()),
  }


def _and(items) -> str:
  items = [str(i) for i in items]
  return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _near_divisors(n: int, size: int) -> list[int]:
  """The divisors of `n` above 1 nearest `size` from below and from above."""
  divisors = [d for d in range(2, n + 1) if n % d == 0]
  below = [d for d in divisors if d < size][-1:]
  above = [d for d in divisors if d > size][:1]
  return below + above


def warnings_for(config, cfg, results: list[dict]) -> list[str]:
  """The `warning:` lines of a plan: one for `plan.seq_len` past the model's
  `max_position_embeddings`, and one per mesh axis of size > 1 that divides none of the
  weight dimensions the rules give it at some planned count (`llm.unsplit_axes`: the
  weights stay whole on every device, which the figures count). An axis that fails at
  several counts gets one line naming them all; one that divides only some of its
  dimensions (e.g. tensor=64: the MLP but not 32 heads) gets none."""
  from ilora_jax import sharding

  name = config.llm.name
  lines = []
  seq_len, max_positions = int(config.plan.seq_len), int(cfg.max_position_embeddings)
  if seq_len > max_positions:
    lines.append(
      f"warning: config.plan.seq_len={seq_len} reaches position {seq_len}, past {name}'s "
      f"max_position_embeddings={max_positions}: planned as given, but the model was not "
      "trained at those positions"
    )
  meshes = [(result["devices"], result["mesh"]) for result in results]
  return lines + axis_warnings(name, cfg, sharding.rules(config), meshes)


def axis_warnings(name: str, cfg, rules, meshes) -> list[str]:
  """One `warning:` line per mesh axis of size > 1 that divides none of the weight dimensions
  the rules give it (`llm.unsplit_axes`) on any of `meshes`, (device count, {axis: size})
  pairs: the plan's counts, or a run's one mesh."""
  from ilora_jax import llm

  failing: dict[str, dict] = {}  # axis -> {size: [device counts]}, the dimensions left whole.
  dims: dict[str, tuple[int, ...]] = {}
  for devices, mesh_sizes in meshes:
    for unsplit in llm.unsplit_axes(cfg, mesh_sizes, rules):
      if not unsplit.split:
        counts = failing.setdefault(unsplit.axis, {}).setdefault(unsplit.size, [])
        counts.append(devices)
        dims[unsplit.axis] = unsplit.whole
  lines = []
  for axis, by_size in failing.items():
    where = _and(f"{size} at {_and(counts)} devices" for size, counts in by_size.items())
    whole = dims[axis]
    divisors = _near_divisors(math.gcd(*whole), min(by_size))
    advice = (
      f"pick a size that divides them, e.g. {' or '.join(map(str, divisors))}"
      if divisors
      else "no size above 1 divides them all"
    )
    lines.append(
      f"warning: mesh axis {axis} (size {where}) divides none of the {name} weight "
      f"dimensions it shards ({_and(whole)}): they stay whole on every device; {advice}"
    )
  return lines


def warn_mesh(name: str, cfg, mesh, rules) -> None:
  """`axis_warnings` of a run's mesh, on stderr (process 0): a mesh axis that shards none of
  the weights it was meant to leaves the whole model on every device, without a word."""
  from ilora_jax import console

  for line in axis_warnings(name, cfg, rules, [(mesh.devices.size, dict(mesh.shape))]):
    console.info(line)


def _table(result: dict) -> list[str]:
  mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
  rows = f"micro-batch {result['micro_batch']} x {result['seq_len']} tokens"
  lines = [f"{result['model']} on {counted(result['devices'], 'device')} ({mesh}), {rows}, "
           f"remat {result['remat']}"]  # fmt: skip
  for key in ("frozen_llm", "frozen_sasrec", "trainable", "optimizer", "activations_estimate",
              "total"):  # fmt: skip
    lines.append(f"  {key:<22} {result[key + '_bytes'] / GIB:10.3f} GiB per device")
  return lines


@cli_main
def main(argv: list[str] | None = None) -> None:
  from ilora_jax import main as main_lib

  flags.FLAGS.set_default("workdir", "<none>")  # Not used: nothing is written.
  flags.FLAGS["workdir"].help = "Not read: the plan reads no run and writes nothing."
  config, _ = main_lib.parse(list(sys.argv if argv is None else argv))
  from ilora_jax import configuration

  configuration.validate(config)
  try:
    counts = [int(c) for c in str(config.plan.devices).replace(" ", "").split(",") if c]
  except ValueError:
    counts = []
  if not counts or any(c < 0 for c in counts):
    raise UserError(f"config.plan.devices must be device counts like 8 or 1,8,64 (0: this "
                    f"host's devices), got {config.plan.devices!r}")  # fmt: skip
  # Every count planned (and refused, where one cannot be) before anything is printed.
  cfg = model_config(config)

  def planned(count: int) -> dict:
    try:
      return plan(config, count or jax.device_count(), cfg)
    except UserError as exc:
      if len(counts) == 1:
        raise
      raise UserError(f"config.plan.devices entry {count}: {exc}") from None  # Which one.

  results = [planned(count) for count in counts]
  from ilora_jax import console

  for line in warnings_for(config, cfg, results):
    console.info(line)
  lines = [line for result in results for line in _table(result)]
  print_results("\n".join([*lines, json.dumps(results if len(results) > 1 else results[0])]))


if __name__ == "__main__":
  main()
