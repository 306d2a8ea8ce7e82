r"""Benchmark of the full iLoRA train step and of greedy generation, on random batches.

python -m ilora_jax.bench --config=configs/movielens.py --config.llm.name=llama2-7b \
    --config.bench.batch_size=8 --config.bench.seq_len=512 --config.bench.steps=10

Builds exactly what the `ilora` stage trains (frozen Llama with the vocabulary grown by the
special tokens, instance-wise LoRA on the configured projections, router, projector, a random
frozen SASRec) and times the same jitted, sharded, donated train step after compilation and a
warm-up, blocking on the results. No data files are read. Prints a table and, as its last line,
one JSON object:

  step_s, tokens_per_s, compile_s, peak_bytes, mfu, loss, eval_gen_* for generation,
  eval_score_* for candidate scoring and eval_both_* for both from one prefill (as a
  validation pass runs them). compile_s splits into compile_trace_s (tracing and
  lowering, in Python) and compile_xla_s (XLA itself); temp_bytes is XLA's scratch memory of
  the step (a memory figure where the backend reports no peak, as on a CPU). A figure that
  was not measured is null (the train step's with bench.train=False), and the table says why.
  Progress lines go to stderr.

With --config.bench.eval_data=True it instead times the two evaluation modes on real prompts:
the split `bench.eval_split` of config.data with the run's candidates, greedy generation of up
to `ilora.max_new_tokens` (early stop at the newline) against the shared-prefill scoring of the
candidates, each over `bench.eval_rows` rows twice (the first pass compiles), in batches of
`ilora.eval_batch_size` as training's evaluation (its `eval_batch_size` key; giving
`--config.bench.eval_batch_size` there is refused, as are the other bench fields but
eval_rows and eval_split; the train step's keys are null). Keys:
eval_data_generate_prompts_per_s, eval_data_score_prompts_per_s, eval_data_score_speedup, ...

  python -m ilora_jax.bench --config=configs/movielens.py --config.llm.name=smollm2-135m \
      --config.data.dir=DATA --config.sasrec.init_from=movielens.pt --config.bench.eval_data=True

MFU counts the model FLOPs of a frozen-base step, 4 N per token for the N matmul weights of the
layers (forward, plus the backward pass to the activations; no weight gradients of the base)
plus 12 L d T per token for attention (forward and backward), over `bench.peak_flops` per device.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from ilora_jax.errors import UserError, cli_main, expanded_argv, print_results

_NO_WORKDIR = "<none>"

# The shortest prompt `random_batch` lays out: 30 item placeholders between 8 tokens either side.
PROMPT_LEAST = 46
PROMPT_WHAT = (
  f"{PROMPT_LEAST} tokens, its 10 history and 20 candidate placeholders and 8 tokens either side"
)

# The numeric `config.bench` fields and their least values (`check_config`).
_LEAST = {
  "batch_size": 1,
  "seq_len": PROMPT_LEAST + 1,  # The prompt and at least one target token.
  "grad_accum": 1,
  "steps": 1,
  "warmup": 0,
  "target_tokens": 1,
  "eval_batch_size": 1,
  "eval_prompt_len": PROMPT_LEAST + 1,  # The prompt and its last token.
  "eval_new_tokens": 1,
  "eval_candidates": 0,
  "eval_candidate_len": 1,
  "eval_rows": 0,  # 0: every row of the split.
}


def check_config(config) -> None:
  """Refuses impossible `config.bench` values before any work, naming the field."""
  bc = config.bench
  for key, least in _LEAST.items():
    value = bc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      why = (
        f" (a prompt: {PROMPT_WHAT}, then a token)" if key in ("seq_len", "eval_prompt_len") else ""
      )
      raise UserError(f"config.bench.{key}={value!r} must be an integer >= {least}{why}")
  peak = bc.get("peak_flops")  # At least 1: a smaller one made an MFU of Infinity (no JSON).
  if isinstance(peak, bool) or not isinstance(peak, int | float) or not 1 <= peak < math.inf:
    raise UserError(f"config.bench.peak_flops={peak!r} must be a number of FLOP/s, at least 1")
  if bc.target_tokens >= bc.seq_len:
    raise UserError(
      f"config.bench.target_tokens={bc.target_tokens} must be smaller than "
      f"config.bench.seq_len={bc.seq_len}"
    )
  # `random_batch`'s prompts: 8 tokens, the 30 item placeholders, 8 tokens, then the targets.
  if bc.seq_len - bc.target_tokens < PROMPT_LEAST:  # Every caller's train batches.
    raise UserError(
      f"config.bench.seq_len={bc.seq_len} leaves {bc.seq_len - bc.target_tokens} prompt tokens "
      f"before the config.bench.target_tokens={bc.target_tokens} targets: a prompt needs "
      f"{PROMPT_WHAT}"
    )
  if not (bc.train or bc.eval or bc.eval_data or bc.get("check_attention")):
    raise UserError(
      "config.bench.train and config.bench.eval are both False (and eval_data and "
      "check_attention too): nothing to time"
    )
  from ilora_jax.data import SPLITS

  if bc.eval_split not in SPLITS:
    raise UserError(f"config.bench.eval_split={bc.eval_split!r} must be one of {', '.join(SPLITS)}")


# What `bench.eval_data` reads of config.bench; the random-batch benchmark reads the rest.
EVAL_DATA_FIELDS = ("eval_data", "eval_rows", "eval_split")


def check_eval_data_overrides(config, argv: list[str], workdir: str | None) -> None:
  """Refuses `--config.bench.*` overrides (--flagfile lines too) that the chosen mode does
  not read, and a --workdir without `bench.eval_data` (the only mode that reads one): each
  would be ignored in silence. `eval_batch_size` with eval_data says what to set instead:
  that mode batches by `ilora.eval_batch_size`, as training's evaluation does."""
  from absl import flags

  argv = expanded_argv(flags.FLAGS, argv)
  given = [a.split("=", 1)[0].removeprefix("--config.bench.") for a in argv[1:]
           if a.startswith("--config.bench.")]  # fmt: skip
  eval_data = config.bench.eval_data
  if eval_data and "eval_batch_size" in given:
    raise UserError(
      "config.bench.eval_batch_size is not read with config.bench.eval_data=True: the "
      f"evaluation batches by config.ilora.eval_batch_size (now {config.ilora.eval_batch_size}); "
      "set that instead"
    )
  for key in given:
    if (key in EVAL_DATA_FIELDS) != bool(eval_data) and key != "eval_data":
      raise UserError(
        f"config.bench.{key} is not read with config.bench.eval_data={bool(eval_data)}: "
        + ("that mode times real prompts, reading only config.bench.eval_rows and eval_split "
           "of config.bench (and config.ilora.*, config.data.*)" if eval_data else
           "it is a field of the real-prompt benchmark (config.bench.eval_data=True)")
      )  # fmt: skip
  if workdir is not None and not eval_data:
    raise UserError(
      f"--workdir={workdir} is read only with config.bench.eval_data=True (a run whose SASRec "
      "the real-prompt benchmark uses); the random-batch benchmark reads no files"
    )


def writable_folder(flag: str, path: str) -> str:
  """The output folder `path` of `--flag`, created, or refused as one line when it is a file
  or cannot be created or written: checked before anything is compiled or run."""
  import os
  import tempfile

  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--{flag}={path} is not a folder")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as exc:
    raise UserError(f"--{flag}={path}: cannot write there ({exc.strerror or exc})") from None
  return path


def _peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  value = stats.get("peak_bytes_in_use")
  return None if value is None else int(value)


def layer_matmul_params(cfg) -> int:
  """Weights of the seven projections over all layers (what each token multiplies through)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  attn = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return cfg.num_layers * (attn + 3 * d * f)


def train_flops_per_token(cfg, seq_len: int) -> float:
  return 4.0 * layer_matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (
    seq_len
  )


def build(config, mesh):
  """Parts, frozen params and initial train state of a random-data iLoRA setup."""
  from ilora_jax import llm, lora, optim, sharding, train_ilora
  from ilora_jax import tokenizer as tok_lib
  from ilora_jax.sasrec import init_params
  from ilora_jax.train_sasrec import model_config

  rules = sharding.rules(config)
  lora_cfg = train_ilora.lora_config(config)
  base = llm.load(
    config.llm.name, mesh=mesh, rules=rules, **train_ilora.model_options(config, mesh)
  )
  special = 5  # [PH] [HistoryEmb] [CansEmb] [ItemEmb] and the pad token.
  params, llama_cfg = tok_lib.resize_vocab(
    base.params, base.config, base.config.vocab_size + special, multiple_of=128
  )
  from ilora_jax import plan

  plan.warn_mesh(config.llm.name, llama_cfg, mesh, rules)
  params = jax.device_put(params, llm.mesh_shardings(llama_cfg, mesh, rules))
  model = llm.LLM(llama_cfg, params, base.tokenizer, adapter=lora.adapter_factory(lora_cfg))
  n_items = 1000
  sas_cfg = model_config(config, n_items)
  sas_params = jax.device_put(
    init_params(sas_cfg, jax.random.PRNGKey(1)), sharding.replicated(mesh)
  )
  parts = train_ilora.make_parts(config, model, sas_cfg, None, n_items, config.bench.target_tokens)
  trainable, stats = train_ilora.init_trainable(parts, mesh, rules, 0)
  make_tx = optim.for_run(train_ilora.labels_of(trainable), 1e-5, config.ilora.train.clip_norm)
  run = train_ilora.run_inputs(1e-4, 1000, 0, mesh)
  frozen = {"llm": model.params, "sasrec": sas_params, "run": run}
  opt_state = train_ilora.init_opt_state(make_tx(run), trainable, mesh)
  repl = sharding.replicated(mesh)
  state = {
    "trainable": trainable,
    "stats": stats,
    "opt_state": opt_state,
    "step": jax.device_put(jnp.zeros((), jnp.int32), repl),
  }
  return parts, frozen, state, make_tx


def ordinary_vocab(parts) -> int:
  """Ids below this are the base model's own tokens (not the iLoRA tokens or rounding rows)."""
  return parts.model.config.vocab_size - 128


def random_batch(parts, accum: int, batch: int, seq_len: int, target_tokens: int, seed: int = 0):
  """An unpadded batch shaped like the stage's: [accum, batch, ...] numpy arrays."""
  if seq_len - target_tokens < PROMPT_LEAST:  # `check_config` names the config's fields.
    raise UserError(f"a prompt of {seq_len - target_tokens} tokens: it needs {PROMPT_LEAST}")
  rng = np.random.default_rng(seed)
  vocab = ordinary_vocab(parts)
  shape = (accum, batch, seq_len)
  input_ids = rng.integers(0, vocab, shape, dtype=np.int32)
  loss_mask = np.zeros(shape, np.int32)
  loss_mask[..., seq_len - target_tokens :] = 1
  item_ids = np.full(shape, parts.n_items, np.int32)
  # 10 history and 20 candidate placeholders spread over the prompt, 8 tokens before the first
  # and after the last (the last at position prompt - 9).
  slots = np.linspace(8, seq_len - target_tokens - 9, 30).astype(int)  # 30 distinct slots
  item_ids[..., slots] = rng.integers(0, parts.n_items, (accum, batch, 30))
  seq = rng.integers(0, parts.n_items, (accum, batch, 10), dtype=np.int32)
  return {
    "input_ids": input_ids,
    "attention": np.ones(shape, np.int32),
    "loss_mask": loss_mask,
    "item_ids": item_ids,
    "seq": seq,
    "len_seq": np.full((accum, batch), 10, np.int32),
  }


def parse_variants(
  text: str | None, example: str = "llm.remat=none;"
) -> list[tuple[str, list[str]]]:
  """(name, overrides) of each variant in `bench/ab_step.py --variants`: variants are
  ';'-separated, each a whitespace-separated list of `key=value` items (shell quoting
  applies, so a value may hold spaces or commas). `example`: the script's own, for the
  error without any."""
  if not text:
    raise UserError(f"--variants is required, e.g. --variants='{example}'")
  variants = []
  for part in text.split(";"):
    try:
      items = shlex.split(part)
    except ValueError as exc:
      raise UserError(f"variant {part!r}: {exc}") from None
    for item in items:
      if "=" not in item:
        raise UserError(f"variant item {item!r} is not key=value")
    variants.append((" ".join(items) or "(config)", items))
  if len(variants) < 2:  # Nothing to compare one variant against.
    raise UserError(
      f"--variants={text!r} is one variant: give two or more, ';'-separated (an empty one is "
      "the config itself: --variants='KEY=VALUE;')"
    )
  return variants


# The settings `bench/ab_eval.py` variants may change: those `train_ilora.Evaluator` reads on
# each call (batching, row order, the modes and their form, the decode budget) and the decode
# loop (`llm.unroll_decode`, the same weights). Everything else is the same for every variant
# or has no effect there: the rows (`ilora.eval_rows`), the shared parts
# (`ilora.max_target_tokens`, `ilora.pad_multiple`, the model, data and SASRec), training's
# settings (`ilora.train.*`, `bucket_window`, `prefetch`, ...) and the final evaluations'
# baselines (`ilora.eval_base`; ab_eval evaluates the adapted model only).
EVAL_VARIANT_KEYS = (
  "ilora.eval_batch_size",
  "ilora.eval_generate",
  "ilora.eval_score",
  "ilora.eval_shared_prefill",
  "ilora.eval_sort",
  "ilora.score_packed",
  "ilora.score_chunk",
  "ilora.max_new_tokens",
  "llm.unroll_decode",
)


def check_eval_variants(variants: list[tuple[str, list[str]]]) -> None:
  """Refuses a `bench/ab_eval.py` variant item outside `EVAL_VARIANT_KEYS`: one that would
  change the rows evaluated, or that the shared parts fix or only training reads (it would
  be ignored, and two variants that differ in nothing would be compared)."""
  for _, items in variants:
    for item in items:
      key = item.split("=", 1)[0].strip()
      if key not in EVAL_VARIANT_KEYS:  # Keys as --config.KEY names them ("config." left out).
        raise UserError(
          f"variant item {item!r}: a variant may change only the settings each evaluator "
          f"reads ({', '.join(EVAL_VARIANT_KEYS)}); the rows, data, model and the parts built "
          "from them are shared (set other keys for all variants with --config.KEY=VALUE)"
        )


def jit_train_step(config, mesh, parts, frozen, state, make_tx):
  """(the run's train step jitted with the shardings of `state` and `frozen` (arrays, or
  ShapeDtypeStructs with shardings), state donated; the batch's sharding)."""
  from ilora_jax import sharding, train_ilora

  state_sh = jax.tree.map(lambda x: x.sharding, state)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  batch_sh = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))
  step = jax.jit(
    train_ilora.make_train_step(parts, make_tx, config.lora.gate),
    in_shardings=(state_sh, frozen_sh, batch_sh),
    out_shardings=(state_sh, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return step, batch_sh


def compile_train_step(config, mesh, parts, frozen, state, make_tx):
  """The run's jitted train step (sharded, state donated) compiled for a random batch of the
  `bench` shape; -> (compiled step, device batch, compile seconds as `lower_and_compile`)."""
  bc = config.bench
  step, batch_sh = jit_train_step(config, mesh, parts, frozen, state, make_tx)
  host = random_batch(parts, bc.grad_accum, bc.batch_size, bc.seq_len, bc.target_tokens)
  batch = {k: jax.device_put(v, batch_sh) for k, v in host.items()}
  compiled, times = lower_and_compile(step, state, frozen, batch)
  return compiled, batch, times


def lower_and_compile(jitted, *args, **kwargs):
  """(compiled program, seconds): `jitted` traced and lowered for the arguments, then
  compiled by XLA. Seconds: 'trace' (tracing the Python function and lowering it to
  StableHLO, the host's part) and 'xla' (XLA's compilation: its passes, code generation and,
  on GPUs, autotuning); the compile time is their sum."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, {"trace": t1 - t0, "xla": time.perf_counter() - t1}


def roofline_s(compiled, loop_trips: int = 1, kind: str | None = None) -> float | None:
  """The roofline estimate (`ilora_jax.roofline`) of a compiled program's seconds on this
  machine's GPU (or the device `kind`), beside its measured time in the benchmark's JSON so
  that each run on a card checks the model; None on a device without a model (CPUs).
  `loop_trips`: the iterations counted for a loop of unknown length (greedy decoding: new
  tokens - 1). A failure of the model is a warning on stderr and None: the measured figures
  are kept."""
  from ilora_jax import roofline

  device = roofline.device_for(jax.devices()[0].device_kind if kind is None else kind)
  if device is None:
    return None
  try:
    text = compiled.as_text()
    return roofline.estimate(text, device, unknown_trip_count=loop_trips)["seconds"]
  except Exception as exc:  # noqa: BLE001 - a model's failure must not lose the measurement.
    from ilora_jax import console

    console.info(f"warning: no roofline estimate ({type(exc).__name__}: {exc})")
    return None


def temp_bytes(compiled) -> int | None:
  """XLA's scratch memory of a compiled program (activations and temporaries, besides its
  arguments and outputs), on every backend; None where it reports none."""
  memory = compiled.memory_analysis()
  return None if memory is None else int(memory.temp_size_in_bytes)


def loop_census(hlo_text: str) -> list[dict]:
  """What each loop body of a compiled (optimized) HLO module writes per iteration, by kind:
  one dict per `while` with `body`, `trip_count` (None where XLA does not know it) and bytes
  and counts of its top-level ops' outputs: `slice_copies` (dynamic-slice and slice fusions:
  a layer's weights cut out of the stacked ones is a copy), `concat_copies` (concatenations:
  XLA merging matmuls that share an operand concatenates their weights), `matmuls` (cuBLAS
  calls, GPU GEMM fusions, XLA:CPU's YNNPACK / oneDNN / dot fusions, plain dots), `in_place`
  (dynamic-update-slice fusions, written in place: their full output size, not traffic) and
  `other` (the remaining fusions). The copies are memory traffic a layer loop adds besides
  its matmuls' own reads. The module is read by `roofline.parse`."""
  from ilora_jax import roofline

  comps, _ = roofline.parse(hlo_text)
  counted = {"fusion", "custom-call", "dot", "copy", "concatenate", "dynamic-slice", "slice",
             "transpose"}  # fmt: skip
  out = []
  for instrs in comps.values():
    for loop in instrs:
      body = roofline.called(loop, "body") if loop.opcode == "while" else None
      if body not in comps:
        continue
      row = {"body": body, "trip_count": roofline.trip_count(loop)}
      row.update({f"{k}_{u}": 0 for k in ("slice_copies", "concat_copies", "matmuls", "in_place",
                                           "other") for u in ("bytes", "count")})  # fmt: skip
      for op in comps[body]:
        if op.opcode not in counted or op.root:
          continue
        name, kind = op.name, op.opcode
        target = re.search(r'custom_call_target="([^"]+)"', op.attrs)
        if (kind == "dot" or re.match(r"(ynn|gemm|dot|onednn)\w*fusion", name)
            or (target and re.search(r"matmul|gemm", target.group(1), re.I))):  # fmt: skip
          key = "matmuls"
        elif "dynamic_update_slice" in name or "dynamic-update-slice" in name:
          key = "in_place"
        elif "slice" in name or kind in ("dynamic-slice", "slice"):
          key = "slice_copies"
        elif "concatenate" in name or kind == "concatenate":
          key = "concat_copies"
        else:
          key = "other"
        # A custom call's output without its workspace: the first array of its tuple.
        shape = op.shape.split("{")[0] if kind == "custom-call" else op.shape
        row[key + "_bytes"] += roofline.shape_bytes(shape)
        row[key + "_count"] += 1
      out.append(row)
  return out


def train_mesh(config):
  """The mesh of `config`'s benchmark train step, after `check_config` and the check that its
  batch divides over the mesh's data shards (as `run` makes): refused before anything is
  built."""
  from ilora_jax import sharding

  check_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.batch_size_per_shard(mesh, config.bench.batch_size, "bench.batch_size")
  return mesh


def train_stepper(config):
  """(compiled train step, `step()`): `step()` runs one step of `config`'s benchmark setup on
  its own mesh to completion, carrying the state (the scripts in bench/ time or trace it)."""
  mesh = train_mesh(config)
  parts, frozen, state, make_tx = build(config, mesh)
  compiled, batch, _ = compile_train_step(config, mesh, parts, frozen, state, make_tx)
  holder = [state]

  def step() -> None:
    holder[0], metrics = compiled(holder[0], frozen, batch)
    jax.block_until_ready((holder[0], metrics))

  return compiled, step


def bench_train(config, mesh, parts, frozen, state, make_tx) -> tuple[dict, dict]:
  from ilora_jax import console

  bc = config.bench
  console.info(f"bench: compiling the train step (batch {bc.batch_size} x {bc.seq_len})")
  compiled, batch, compile_times = compile_train_step(config, mesh, parts, frozen, state, make_tx)
  compile_s = compile_times["trace"] + compile_times["xla"]
  console.info(f"bench: compiled in {compile_s:.1f} s; warm-up, {bc.warmup} steps")
  for _ in range(bc.warmup):
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(state)
  console.info(f"bench: timing {bc.steps} train steps")
  t0 = time.perf_counter()
  for _ in range(bc.steps):
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / max(bc.steps, 1)
  console.info(f"bench: train step {step_s:.3f} s")
  tokens = bc.grad_accum * bc.batch_size * bc.seq_len
  flops = train_flops_per_token(parts.model.config, bc.seq_len) * tokens
  result = {
    "step_s": step_s,
    "tokens_per_s": tokens / step_s,
    "compile_s": compile_s,
    "compile_trace_s": compile_times["trace"],
    "compile_xla_s": compile_times["xla"],
    "peak_bytes": _peak_bytes(),
    # XLA's scratch memory of the step: where a CPU reports no peak, the figure to compare.
    "temp_bytes": temp_bytes(compiled),
    "mfu": flops / step_s / (bc.peak_flops * mesh.size),
    "loss": float(metrics["loss"]),
    "roofline_step_s": roofline_s(compiled),  # On a GPU with a model; None elsewhere.
  }
  return result, state


def generation_runner(config, parts, frozen, state) -> types.SimpleNamespace:
  """Greedy generation for a random prompt batch of the `bench.eval_*` shape, as attributes:
  `batch` (host arrays); `inputs()`: the adapters merged into the params, the gates and item
  embeddings, as (params, ids, attention) and generate's keyword arguments; `run(unroll, new)`
  generates `new` tokens (no early stop), blocking on the result; `compile(unroll, new)` gives
  (compiled generation, a `run()` of that compiled program alone, on inputs prepared once, its
  compile seconds as `lower_and_compile` gives them); `run` reuses that compiled program."""
  from ilora_jax import llm, train_ilora

  bc = config.bench
  host = random_batch(parts, 1, bc.eval_batch_size, bc.eval_prompt_len, 1, seed=1)
  batch = {k: v[0] for k, v in host.items()}
  ids, attention = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention"])

  @jax.jit
  def prepare(trainable, stats, frozen, batch):
    gate, _ = train_ilora.gate_weights(
      parts, trainable, stats, frozen, batch["seq"], batch["len_seq"], False, config.lora.gate
    )
    mask, embeds = train_ilora.replacement(parts, trainable, frozen, batch["item_ids"])
    return train_ilora._merge(frozen["llm"], trainable["lora"]), gate, mask, embeds

  def inputs():
    params, gate, mask, embeds = prepare(state["trainable"], state["stats"], frozen, batch)
    kwargs = dict(gate_weights=gate, replace_mask=mask, replace_embeds=embeds)
    return (params, ids, attention), kwargs

  def static(unroll: bool, new: int) -> dict:
    return dict(max_new_tokens=new, eos_ids=(), pad_id=0, unroll=unroll)

  def run(unroll: bool, new: int):
    args, kwargs = inputs()
    out, _ = llm.generate_tokens(parts.model.module, *args, **kwargs, **static(unroll, new))
    return jax.block_until_ready(out)

  def compile(unroll: bool, new: int):
    args, kwargs = inputs()
    compiled, times = lower_and_compile(
      llm.generate_tokens, parts.model.module, *args, **kwargs, **static(unroll, new)
    )
    jax.block_until_ready((args, kwargs))

    def run_compiled():  # The compiled generation alone, on the inputs prepared once.
      return jax.block_until_ready(compiled(*args, **kwargs))

    return compiled, run_compiled, times

  return types.SimpleNamespace(batch=batch, inputs=inputs, run=run, compile=compile)


def generate_stepper(config):
  """(compiled generation, `run()`): `run()` generates `bench.eval_new_tokens` tokens for a
  random batch of `config`'s benchmark setup with the configured decode loop (no early stop;
  the profiler in bench/ traces it)."""
  from ilora_jax import sharding

  if int(config.bench.eval_new_tokens) < 2:
    raise UserError("bench.eval_new_tokens must be at least 2: one prefill, then decode steps")
  check_config(config)
  mesh = sharding.make_mesh(config.mesh)
  parts, frozen, state, _ = build(config, mesh)
  runner = generation_runner(config, parts, frozen, state)
  compiled, run, _ = runner.compile(
    bool(config.llm.unroll_decode), int(config.bench.eval_new_tokens)
  )
  return compiled, run


def _timed(fn, reps: int = 3):
  """(last output, seconds of the first call, mean seconds of `reps` calls after it)."""
  t0 = time.perf_counter()
  out = fn()
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(reps):
    out = fn()
  return out, first_s, (time.perf_counter() - t0) / reps


def _compiled_pass(prefix: str, rows: int, jitted, static: dict, module, *args, **kwargs) -> dict:
  """`jitted(module, *args, **kwargs, **static)` compiled, then timed (`_timed`): the keys
  `prefix` + batch_s, prompts_per_s (`rows` per call), compile_s, compile_xla_s, temp_bytes
  (its scratch memory: activations, logits, the cache) and roofline_s (`roofline_s`)."""
  compiled, times = lower_and_compile(jitted, module, *args, **kwargs, **static)
  _, _, batch_s = _timed(lambda: jax.block_until_ready(compiled(*args, **kwargs)))
  trips = max(int(static.get("max_new_tokens", 2)) - 1, 1)  # A decode loop's steps, if any.
  return {
    prefix + "batch_s": batch_s,
    prefix + "prompts_per_s": rows / batch_s,
    prefix + "compile_s": times["trace"] + times["xla"],
    prefix + "compile_xla_s": times["xla"],
    prefix + "temp_bytes": temp_bytes(compiled),
    prefix + "roofline_s": roofline_s(compiled, trips),
  }


def decode_step_s(batch_s: float, prefill_s: float, new: int) -> float | None:
  """Seconds per decode step: a generation's time less its prefill's, over its `new` - 1
  decode steps; None where there are none or the difference of the two separately timed means
  is not positive (the decode steps too short to tell from the timings' noise), never a
  negative or clamped figure."""
  if new < 2 or not batch_s > prefill_s:
    return None
  return (batch_s - prefill_s) / (new - 1)


# The train step's figures: null where no train step ran (`run`).
TRAIN_KEYS = ("step_s", "tokens_per_s", "compile_s", "compile_trace_s", "compile_xla_s",
              "peak_bytes", "temp_bytes", "mfu", "loss", "roofline_step_s")  # fmt: skip
# The scoring figures of the random-batch evaluation: null where no candidates are scored.
SCORE_KEYS = tuple(
  f"eval_{mode}_{key}"
  for mode in ("score", "both")
  for key in ("batch_s", "prompts_per_s", "compile_s", "compile_xla_s", "temp_bytes", "roofline_s")
)
SCORE_KEYS += ("eval_score_candidates", "eval_score_packed", "eval_score_speedup")
# The generation figures of one decode loop (`bench_generate`), each `eval_gen_<field>` and,
# with `bench.decode_both`, `eval_gen_alt_<field>` for the other loop.
GEN_FIELDS = ("unroll", "batch_s", "prefill_s", "decode_step_s", "prompts_per_s", "tokens_per_s",
              "compile_s", "compile_xla_s", "roofline_s")  # fmt: skip


def eval_keys(decode_both: bool) -> tuple[str, ...]:
  """The random-batch evaluation's figures (`bench_generate`): null where it did not run."""
  loops = ("eval_gen_", "eval_gen_alt_") if decode_both else ("eval_gen_",)
  gen = tuple(prefix + field for prefix in loops for field in GEN_FIELDS)
  return gen + (("eval_gen_same_tokens",) if decode_both else ()) + SCORE_KEYS


# The shape of the random-batch evaluation figures: null where no evaluation ran (`run`).
EVAL_SHAPE_KEYS = ("eval_batch_size", "eval_prompt_len", "eval_new_tokens", "eval_candidates",
                   "eval_candidate_len")  # fmt: skip


def _null_note(key: str, result: dict) -> str:
  """What the null figure `key` of `run`'s `result` means, shown in its table."""
  if key in TRAIN_KEYS and "eval_data" in result:
    return "null: bench.eval_data times the evaluations of real prompts alone"
  if key.startswith("eval_") and result.get("eval_batch_size") is None:
    return "null: no evaluation ran (bench.eval=False)"
  if key in ("batch_size", "grad_accum", "seq_len") or (
    key in TRAIN_KEYS and result.get("step_s") is None
  ):
    return "null: no train step ran (bench.train=False)"
  if key in SCORE_KEYS and not result.get("eval_candidates"):
    return "null: no candidates scored (bench.eval_candidates=0)"
  if key.endswith("roofline_s") or key == "roofline_step_s":
    return "null: no roofline model of this device (ilora_jax.roofline), or its failure above"
  if key == "peak_bytes":
    return "null: the backend reports no peak memory (a CPU's: see temp_bytes)"
  if key.endswith("temp_bytes"):
    return "null: XLA reports no memory analysis of this program"
  if key.endswith("decode_step_s"):
    if (result.get("eval_new_tokens") or 0) < 2:
      return "null: one new token (bench.eval_new_tokens=1) is the prefill alone: no decode step"
    return "null: the generation was not slower than its prefill alone (decode below the noise)"
  if key.startswith("eval_data_") and key.endswith("_compile_s"):
    return "null: the compile pass was not slower than the timed pass (compile below the noise)"
  if key == "eval_candidate_len":
    return "null: no candidates scored (bench.eval_candidates=0)"
  return "null"


def bench_generate(config, parts, frozen, state) -> dict:
  from ilora_jax import console

  bc = config.bench
  b, new = bc.eval_batch_size, bc.eval_new_tokens
  runner = generation_runner(config, parts, frozen, state)

  result = {}
  modes = [bool(config.llm.unroll_decode)]
  if bc.decode_both:
    modes.append(not modes[0])
  outputs = []
  loop = {False: "scanned", True: "unrolled"}
  for unroll in modes:
    prefix = "eval_gen_" if unroll == modes[0] else "eval_gen_alt_"
    # Timed as scoring is below: the compiled program alone, on inputs prepared once (the
    # gates, merged adapters and item embeddings of `runner.inputs` are not in the times).
    what = f"generation ({loop[unroll]} decode, batch {b}, {new} new tokens)"
    console.info(f"bench: compiling {what}")
    compiled, run_compiled, compile_times = runner.compile(unroll, new)
    console.info(f"bench: timing {what}, 4 calls")
    out, _, batch_s = _timed(run_compiled)
    outputs.append(np.asarray(out[0]))
    # The prefill alone (one new token), so that the decode steps' own time is visible.
    console.info("bench: compiling and timing its prefill alone, 4 calls")
    _, run_prefill, _ = runner.compile(unroll, 1)
    _, _, prefill_s = _timed(run_prefill)
    figures = {
      "unroll": unroll,
      "batch_s": batch_s,
      "prefill_s": prefill_s,
      "decode_step_s": decode_step_s(batch_s, prefill_s, new),
      "prompts_per_s": b / batch_s,
      "tokens_per_s": b * new / batch_s,
      "compile_s": compile_times["trace"] + compile_times["xla"],
      "compile_xla_s": compile_times["xla"],
      "roofline_s": roofline_s(compiled, max(new - 1, 1)),
    }
    result.update({prefix + field: figures[field] for field in GEN_FIELDS})
  if len(outputs) == 2:  # Both loops decode the same tokens (greedy; ties aside).
    result["eval_gen_same_tokens"] = float(np.mean(outputs[0] == outputs[1]))

  # Scoring: the same prompts, `eval_candidates` random continuations each.
  from ilora_jax import scoring

  n, cl = bc.eval_candidates, bc.eval_candidate_len
  if n <= 0:  # Its keys null, as the train step's are when it does not run.
    result.update(dict.fromkeys(SCORE_KEYS))
    return result
  rng = np.random.default_rng(3)
  ctoks = jnp.asarray(rng.integers(0, ordinary_vocab(parts), (b, n, cl)), jnp.int32)
  cmask = jnp.ones((b, n, cl), jnp.int32)
  chunk = scoring.chunk_for(n, config.ilora.score_chunk)
  packed_len = scoring.packed_length(cmask) if config.ilora.score_packed else None
  args, kwargs = runner.inputs()  # (params, ids, attention); gates, item embeddings
  args, module = (*args, ctoks, cmask), parts.model.module
  score = dict(chunk=chunk, packed_len=packed_len)
  console.info(f"bench: compiling and timing candidate scoring ({n} candidates), 4 calls")
  result.update(_compiled_pass("eval_score_", b, scoring.candidate_loglik, score, module, *args,
                               **kwargs))  # fmt: skip
  result["eval_score_candidates"] = n
  result["eval_score_packed"] = packed_len is not None
  result["eval_score_speedup"] = result["eval_gen_batch_s"] / result["eval_score_batch_s"]
  # Both modes from one prefill, as a validation pass runs them (`ilora.eval_shared_prefill`).
  both = dict(max_new_tokens=new, eos_ids=(), pad_id=0, unroll=modes[0], **score)
  console.info("bench: compiling and timing both from one prefill, 4 calls")
  result.update(_compiled_pass("eval_both_", b, scoring.generate_and_score, both, module, *args,
                               **kwargs))  # fmt: skip
  return result


def bench_eval_data(config, workdir: str) -> dict:
  """Both evaluation modes on real prompts of a data split: prompts per second."""
  from ilora_jax import console, train_ilora

  bc = config.bench
  cfg = config.copy_and_resolve_references()
  cfg.ilora.eval_rows, cfg.ilora.eval_base = int(bc.eval_rows), False
  su = train_ilora.setup(cfg, workdir, trains=False)
  split = su.dataset.split(bc.eval_split)
  st = su.state
  result = {"eval_data": su.dataset.name, "eval_data_split": split.name}
  for mode in ("generate", "score"):
    cfg.ilora.eval_generate, cfg.ilora.eval_score = mode == "generate", mode == "score"
    ev = train_ilora.Evaluator(su.parts, cfg, split, su.gate_kind, su.mesh)
    rows, result["eval_batch_size"] = len(ev.idx), ev.batch_size  # At most the rows.
    passes = []
    for label in ("compile pass", "timed pass"):  # The first compiles (lengths are bucketed).
      console.info(f"bench: {mode}, {rows} rows of {split.name}: {label}")
      metrics = ev(st["trainable"], st["stats"], su.frozen, config.progress)
      passes.append(dict(ev.timings))
    # The mode's passes with the prepare step's (gate, merge, projector), in both figures; the
    # loss's own pass (generation alone computes one) is in neither.
    first, seconds = (timings[mode] + timings.get("prepare", 0.0) for timings in passes)
    compile_s = first - seconds
    result.update(
      {
        f"eval_data_{mode}_s": seconds,
        f"eval_data_{mode}_prompts_per_s": rows / seconds,
        # The compile pass's extra seconds; null (never clamped) where it was not slower.
        f"eval_data_{mode}_compile_s": compile_s if compile_s > 0 else None,
      }
    )
    if mode == "generate":
      result["eval_data_generated_tokens_per_row"] = ev.generated_tokens / rows
      result["eval_data_valid_ratio"] = metrics["valid_ratio"]
    else:
      result["eval_data_hr@1"] = metrics["hr@1"]
    console.info(f"bench: {mode} {rows} rows in {seconds:.2f} s")
  result["eval_data_rows"] = rows
  result["eval_data_max_new_tokens"] = int(cfg.ilora.max_new_tokens)
  result["eval_data_score_speedup"] = result["eval_data_generate_s"] / result["eval_data_score_s"]
  return result


def check_attention(config, mesh, parts, frozen, state) -> dict:
  """Loss of one batch with einsum attention and with the fused kernel of the accelerator:
  cuDNN attention on a GPU, splash attention on a TPU (anywhere else, interpreted)."""
  import dataclasses

  from ilora_jax import console, llm, train_ilora

  bc = config.bench
  host = random_batch(parts, 1, bc.batch_size, bc.seq_len, bc.target_tokens, seed=2)
  batch = {k: v[0] for k, v in host.items()}
  # One right-padded row, its targets before the padding (pad queries' outputs are unused,
  # and each kernel fills them differently).
  real = bc.seq_len - bc.seq_len // 4
  batch["attention"][0, real:] = 0
  batch["loss_mask"][0] = 0
  batch["loss_mask"][0, real - bc.target_tokens : real] = 1
  losses = {}
  fused = "cudnn" if jax.default_backend() == "gpu" else "splash"
  for impl in ("xla", fused):
    console.info(f"bench: attention check, the loss of one batch with {impl} attention")
    kernel_mesh = train_ilora.splash_mesh(impl, mesh)
    cfg = parts.model.config.replace(attention=impl, kernel_mesh=kernel_mesh)
    model = llm.LLM(cfg, parts.model.params, parts.model.tokenizer, parts.model.module.adapter)
    p = dataclasses.replace(parts, model=model)
    fn = jax.jit(
      lambda t, s, f, b, p=p: train_ilora.loss_fn(
        p, config.lora.gate, t, s, f, b, jax.random.PRNGKey(0), False
      )[0]
    )
    losses[impl] = float(fn(state["trainable"], state["stats"], frozen, batch))
  return {
    "attention_loss_xla": losses["xla"],
    f"attention_loss_{fused}": losses[fused],
    "attention_rel_diff": abs(losses["xla"] - losses[fused]) / abs(losses["xla"]),
  }


def run(config, workdir: str | None = None) -> dict:
  from ilora_jax import console, sharding

  if config.bench.eval_data:
    result = {"model": config.llm.name, "device": jax.devices()[0].device_kind,
              "devices": jax.device_count(), "eval_batch_size": config.ilora.eval_batch_size,
              "dtype": config.llm.dtype, **dict.fromkeys(TRAIN_KEYS)}  # fmt: skip
    if workdir:
      result.update(bench_eval_data(config, workdir))
    elif not config.sasrec.init_from:
      raise UserError(
        "config.bench.eval_data needs a trained SASRec: give --workdir=DIR of a run that has "
        "one, or --config.sasrec.init_from (an original .pt or such a workdir)"
      )
    else:  # A scratch workdir (SASRec from config.sasrec.init_from), removed afterwards.
      import tempfile

      with tempfile.TemporaryDirectory(prefix="ilora_bench_") as scratch:
        result.update(bench_eval_data(config, scratch))
    _print(result)
    return result
  bc = config.bench
  mesh = sharding.make_mesh(config.mesh)
  if bc.train:  # Only the train step shards its batch over the data shards.
    sharding.batch_size_per_shard(mesh, bc.batch_size, "bench.batch_size")
  console.info(f"bench: building {config.llm.name}")
  t0 = time.perf_counter()
  parts, frozen, state, make_tx = build(config, mesh)
  jax.block_until_ready(frozen)
  console.info(f"bench: built {config.llm.name} in {time.perf_counter() - t0:.1f} s")
  warn_positions(config, parts.model.config.max_position_embeddings)
  trained = bc.train or bc.check_attention  # The runs that use the train batch's shape.
  evaluated = bc.eval  # Null where nothing ran at that shape.
  result = {
    "model": config.llm.name,
    "device": jax.devices()[0].device_kind,
    "devices": jax.device_count(),
    "batch_size": bc.batch_size if trained else None,
    "grad_accum": bc.grad_accum if trained else None,
    "seq_len": bc.seq_len if trained else None,
    "attention": parts.model.config.attention,
    "remat": config.llm.remat,
    "dtype": config.llm.dtype,
    # The shape the eval_* figures were timed at.
    "eval_batch_size": bc.eval_batch_size if evaluated else None,
    "eval_prompt_len": bc.eval_prompt_len if evaluated else None,
    "eval_new_tokens": bc.eval_new_tokens if evaluated else None,
    "eval_candidates": bc.eval_candidates if evaluated else None,
    "eval_candidate_len": bc.eval_candidate_len if evaluated and bc.eval_candidates else None,
  }
  if config.bench.train:
    train, state = bench_train(config, mesh, parts, frozen, state, make_tx)
    result.update(train)
  else:
    result.update(dict.fromkeys(TRAIN_KEYS))
  # After the train step: its peak_bytes (the device's peak so far, which JAX cannot reset)
  # holds no pass of this check.
  if config.bench.check_attention:
    result.update(check_attention(config, mesh, parts, frozen, state))
  if config.bench.eval:
    result.update(bench_generate(config, parts, frozen, state))
  else:  # Its keys null, as the train step's are when it does not run.
    result.update(dict.fromkeys(eval_keys(bc.decode_both)))
  _print(result)
  return result


def warn_positions(config, max_positions: int) -> None:
  """One warning line on stderr for each benchmark shape that runs past the model's
  `max_position_embeddings`: rotary positions are computed for any position (no table to
  overflow), so the run goes on, but the model was not trained there."""
  from ilora_jax import console

  bc = config.bench
  shapes = []
  if bc.train or bc.check_attention:
    shapes.append(("config.bench.seq_len", bc.seq_len, bc.seq_len))
  if bc.eval and not bc.eval_data:
    extra = max(bc.eval_new_tokens, bc.eval_candidate_len if bc.eval_candidates else 0)
    shapes.append(("config.bench.eval_prompt_len", bc.eval_prompt_len, bc.eval_prompt_len + extra))
  for name, value, reach in shapes:
    if reach > max_positions:
      console.info(
        f"warning: {name}={value} reaches position {reach}, past {config.llm.name}'s "
        f"max_position_embeddings={max_positions}: timed as given, but the model was not "
        "trained at those positions"
      )


def _print(result: dict) -> None:
  width = max(len(k) for k in result)
  lines = []
  for key, value in result.items():
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    if value is None:
      shown = _null_note(key, result)
    lines.append(f"{key:<{width}}  {shown}")
  print_results("\n".join([*lines, json.dumps(result)]))


@cli_main
def main(argv: list[str] | None = None) -> None:
  from ilora_jax import main as main_lib

  flags.FLAGS.set_default("workdir", _NO_WORKDIR)  # Optional here: only eval_data reads one.
  workdir_flag = flags.FLAGS["workdir"]
  workdir_flag.help = (
    "Optional: a run whose SASRec stage finished, read with --config.bench.eval_data=True only."
  )
  argv = list(sys.argv if argv is None else argv)
  config, workdir = main_lib.parse(argv)
  workdir = None if workdir == _NO_WORKDIR else workdir
  check_config(config)
  check_eval_data_overrides(config, argv, workdir)
  from ilora_jax import compile_cache, configuration, console

  configuration.validate(config)
  console.quiet_libraries()
  compile_cache.enable("")  # compile_s is a real compile, never a load from the cache.
  run(config, workdir)


if __name__ == "__main__":
  main()
