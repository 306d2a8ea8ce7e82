"""The `ilora` stage: train instance-wise LoRA, router and projector on a frozen LLM.

One optimizer step is one `jax.jit` with declared shardings: the frozen base weights
(LLM and SASRec) are a separate argument, sharded by the logical-axis rules and neither
differentiated nor donated; the trainable state (adapters, router, projector, router
BatchNorm statistics, optimizer state, step) is donated. Gradient accumulation runs
inside the step as a `lax.scan` over micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from ilora_jax import (
  checkpointing,
  configuration,
  console,
  interrupts,
  llama,
  llm,
  lora,
  optim,
  prefetch,
  prompts,
  report,
  router,
  scoring,
  sharding,
)
from ilora_jax import tokenizer as tok_lib
from ilora_jax.configuration import selection_metric, stage_train
from ilora_jax.data import (
  Dataset,
  Split,
  load_from_config,
  sample_candidates,
  split_fingerprint,
  titles_fingerprint,
)
from ilora_jax.errors import UserError, counted
from ilora_jax.files import atomic_write, checkpoint_folder
from ilora_jax.metrics import (
  MetricsLog,
  generation_metrics,
  match_generation,
  plain,
  ranking_metrics,
  target_ranks,
  warn_nonfinite,
)
from ilora_jax.projector import Projector
from ilora_jax.sasrec import SASRec, params_from_torch
from ilora_jax.train_sasrec import check_trained_as as sasrec_check_trained_as
from ilora_jax.train_sasrec import model_config as sasrec_model_config
from ilora_jax.train_sasrec import other_training_data as sasrec_other_training_data
from ilora_jax.train_sasrec import restore_target as sasrec_restore_target

STAGE = "ilora"
BEST = "ilora_best"  # checkpoints/ilora_best: the weights `ilora.select_by` picked.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def lora_config(config) -> lora.LoRAConfig:
  """The adapter settings of a run config (`config.lora`)."""
  return lora.LoRAConfig(
    rank=config.lora.rank,
    num_experts=config.lora.num_experts,
    alpha=config.lora.alpha,
    dropout=config.lora.dropout,
    targets=tuple(config.lora.targets),
  )


# ----------------------------------------------------------------------------- frozen parts


def load_sasrec(config, workdir: str, dataset: Dataset, mesh):
  """Frozen SASRec params: the workdir's sasrec checkpoint, else `config.sasrec.init_from`.

  `init_from` is an original `.pt` checkpoint or another workdir whose SASRec stage has
  finished (the experiment runner shares one SASRec between the variants of a seed). A
  SASRec stage that stopped before its last step (`train.stop_after_steps`, a kill), in
  either folder, is refused when iLoRA training starts (an iLoRA trained on a half-trained
  SASRec would be silently worse); a run already trained on one (by older code) keeps it for
  its resume, evaluation and recommendations, with a warning. The workdir's own SASRec wins
  over a workdir given as `init_from`; the ilora stage says so as it starts. A SASRec whose
  recorded training rows are not the config's is refused the same way (it would rank and
  route this data's users from another data set's item table), also by a resumed run when it
  is the workdir's own (the config's rows changed mid-run), and only warned of later.
  """
  cfg = sasrec_model_config(config, dataset.n_items)
  init_from = config.sasrec.init_from
  ckpt = checkpointing.StageCheckpoints(
    workdir, "sasrec", config.checkpoint.max_to_keep, False, read_only=True
  )
  latest = ckpt.latest_step()
  init_dir = bool(init_from) and os.path.isdir(init_from)  # Another workdir's SASRec.
  borrowed = latest is None and init_dir
  if borrowed:
    ckpt.close()
    ckpt = checkpointing.StageCheckpoints(
      init_from, "sasrec", config.checkpoint.max_to_keep, False, read_only=True
    )
    latest = ckpt.latest_step()
    if latest is None:
      ckpt.close()
      raise UserError(
        f"config.sasrec.init_from={init_from} is a folder without a SASRec checkpoint: "
        "give a workdir where --config.stage=sasrec has run, or an original .pt file"
      )
  trains = config.stage in ("ilora", "pipeline")
  starting = trains and latest_step(workdir) is None
  if init_dir and not borrowed and starting and config.stage == "ilora":
    console.info(
      f"warning: config.sasrec.init_from={init_from} is not used: this workdir has its own "
      f"SASRec ({ckpt.directory}), which the ilora stage uses; use a new workdir to start "
      "from init_from"
    )
  repl = sharding.replicated(mesh)
  if latest is not None:
    meta = sasrec_check_trained_as(ckpt, latest, cfg)
    total = meta["settings"].get("total_steps")
    if total is not None and int(meta["step"]) < int(total):
      stopped = (
        f"the SASRec in {ckpt.directory} stopped at step {int(meta['step'])} of {int(total)}"
      )
      if not starting:
        console.info(f"warning: {stopped}; it is used as it is")
      else:
        ckpt.close()
        where = f"that workdir, {init_from}," if borrowed else "this workdir"
        raise UserError(
          f"{stopped}: finish it first (--config.stage=sasrec in {where}, with its settings, "
          "resumes it)"
        )
    other = sasrec_other_training_data(meta, dataset, ckpt.directory)
    # Refused where iLoRA trains on it: a run starting, or one resuming on the workdir's own
    # SASRec (the config's rows changed since the run began; refused by their digest too,
    # where its checkpoint records one). A run begun on a borrowed SASRec of other rows (by
    # older code) keeps it, as evaluations do, with a warning.
    if other and not (starting or (trains and not borrowed)):
      console.info(f"warning: {other}; it is used as it is")
    elif other:
      ckpt.close()
      raise UserError(
        f"{other}: iLoRA freezes a SASRec trained on its own training rows; give the data.* "
        "settings that SASRec was trained with, or a SASRec trained on this data (a new "
        "workdir with --config.stage=pipeline trains both)"
      )
    restored, _ = ckpt.restore(latest, sasrec_restore_target(cfg, repl))
    ckpt.close()
    console.info(f"iLoRA: SASRec from {ckpt.directory} step {latest}")
    return cfg, restored["params"]
  ckpt.close()
  if init_from:
    console.info(f"iLoRA: SASRec from {init_from}")
    return cfg, jax.device_put(params_from_torch(init_from, cfg), repl)
  recorded = (configuration.saved(workdir) or {}).get("sasrec")
  trained_on = recorded.get("init_from") if isinstance(recorded, dict) else None
  if trained_on and isinstance(trained_on, str) and has_weights(workdir):
    raise UserError(  # Training a SASRec here would give the run another one than its own.
      f"this run's iLoRA was trained on the SASRec of config.sasrec.init_from={trained_on} (its "
      f"config.json): give --config.sasrec.init_from={trained_on}"
    )
  raise UserError(
    "the ilora stage needs a trained SASRec: run --config.stage=sasrec in this "
    "workdir first, or give --config.sasrec.init_from=/path/to/<dataset>.pt"
  )


@dataclasses.dataclass
class Parts:
  """Everything the step functions close over (static) plus the frozen arrays."""

  model: llm.LLM  # Llama with the adapter seam filled, vocab grown by the special tokens.
  sasrec: SASRec
  router: nn.Module
  projector: Projector
  builder: prompts.PromptBuilder
  lora_cfg: lora.LoRAConfig
  n_items: int
  max_target_tokens: int  # Target slots the loss gathers per row (`target_slots`).
  newline_ids: tuple[int, ...]
  eligible: np.ndarray | None = None  # Sorted item ids with a title: the candidate pool.
  unroll_train: bool = False  # Loss and gradients through unrolled layers (`llm.unroll_train`).

  def __post_init__(self):
    if self.eligible is None and self.builder is not None:  # Once, not on every step.
      titled = (i for i in self.builder.titles if 0 <= i < self.n_items)
      self.eligible = np.array(sorted(titled))


def _merge(base: dict, adapter: dict) -> dict:
  """Adapter leaves inserted into the base param tree (a restructure, no copy under jit)."""
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(adapter))
  return traverse_util.unflatten_dict(flat)


def _adapter_only(params: dict) -> dict:
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if "adapter" in k})


def router_kwargs(config) -> dict:
  return {"shortcut": config.router.shortcut} if config.router.kind == "resnet1d" else {}


def attention_impl(config) -> str:
  """'auto' picks splash attention on TPUs, cuDNN attention on NVIDIA GPUs in half precision,
  einsum attention elsewhere."""
  impl = config.llm.attention
  backend = sharding.backend()
  if impl == "auto":
    if backend == "tpu":
      return "splash"
    half = config.llm.dtype in ("bfloat16", "float16")
    return "cudnn" if half and backend == "gpu" else "xla"
  if impl not in llama.ATTENTION_IMPLS:
    raise UserError(f"config.llm.attention={impl!r} is not auto, xla, cudnn or splash")
  if impl == "cudnn" and backend != "gpu":
    raise UserError(
      f"config.llm.attention=cudnn is an NVIDIA GPU kernel and this run's devices are "
      f"{backend.upper()}s: use auto (which picks it on a GPU) or xla"
    )
  if impl == "splash" and backend == "gpu":
    raise UserError(
      "config.llm.attention=splash is a TPU kernel (on a CPU it runs interpreted, for tests);"
      " on a GPU use cudnn or auto"
    )
  return impl


def splash_mesh(impl: str, mesh):
  """The mesh splash attention is mapped over (several devices), else None."""
  return mesh if impl == "splash" and mesh is not None and mesh.size > 1 else None


def model_options(config, mesh=None) -> dict:
  """`llm.load` options of the model's numerics and kernels (the run and the benchmark);
  splash attention is mapped over `mesh`."""
  impl = attention_impl(config)
  return dict(
    dtype=DTYPES[config.llm.dtype],
    param_dtype=DTYPES[config.llm.param_dtype],
    attention=impl,
    kernel_mesh=splash_mesh(impl, mesh),
    remat_policy=config.llm.remat,
    attention_chunks=config.llm.attention_chunks,
  )


@dataclasses.dataclass
class PromptInputs:
  """What the prompts and a resume's settings need, read before the LLM's weights: the
  tokenizer (with the iLoRA tokens), the prompt builder, the frozen SASRec, the longest
  answer in tokens and the tokens of a line end."""

  tokenizer: Any
  builder: prompts.PromptBuilder
  sas_cfg: Any
  sas_params: Any
  longest: int
  newline: tuple[int, ...]


def check_llm(config):
  """The LLM's tokenizer, after checking what can be checked without its weights: the name,
  its config (architecture, sizes), its stop ids and its tokenizer (a UserError for each).
  The pipeline runs this, and `llm.check_weight_files`, before training SASRec, so a
  mistyped model is named before the slow parts."""
  llm.check_init_std(config.llm.name, config.llm.init_std)
  llm.config_for(config.llm.name)
  llm.stop_ids_of(config.llm.name)
  try:
    tokenizer = llm.load_tokenizer(config.llm.name, strict=True)
  except tok_lib.NoTokenizer as exc:
    raise UserError(f"{exc}: the ilora stage writes its prompts") from None
  if tokenizer is None:
    raise UserError(f"{config.llm.name} has no tokenizer: the ilora stage writes its prompts")
  return tokenizer


def prompt_inputs(
  config, workdir: str, dataset: Dataset, mesh, generates: bool = True
) -> PromptInputs:
  """Everything of the frozen parts but the LLM's weights (`build` reads those); `generates`
  as `setup` takes it."""
  tokenizer = check_llm(config)
  special = tok_lib.add_ilora_tokens(tokenizer)
  sas_cfg, sas_params = load_sasrec(config, workdir, dataset, mesh)
  builder = prompts.PromptBuilder(
    lambda text: tokenizer.encode(text, add_special_tokens=False),
    special,
    pad_id=special[tok_lib.PAD_TOKEN],
    titles=dataset.titles,
    n_items=dataset.n_items,
    dataset=dataset.name,
    bos_id=prompt_bos(config, tokenizer),
    multiple_of=int(config.ilora.pad_multiple),
    encode_title=lambda text: tokenizer.encode(
      text, add_special_tokens=False, split_special_tokens=True
    ),
  )
  lengths = [len(builder.target_tokens(i)) for i in dataset.titles]
  longest, cap = max(lengths), int(config.ilora.max_target_tokens)
  if longest > cap:
    console.info(
      f"warning: {sum(n > cap for n in lengths)} of {len(lengths)} titles have more than "
      f"config.ilora.max_target_tokens={cap} tokens (the longest {longest}): the loss scores "
      f"their first {cap}"
    )
  new_tokens = int(config.ilora.max_new_tokens)
  if generates and config.ilora.eval_generate and longest - 1 > new_tokens:  # Newline left out.
    console.info(
      f"warning: {sum(n - 1 > new_tokens for n in lengths)} of {len(lengths)} titles have more "
      f"than config.ilora.max_new_tokens={new_tokens} tokens (the longest {longest - 1}): "
      "generation cannot write them whole, so their rows are never generation hits"
    )
  newline = tuple(builder.encode_in_text("\n"))  # what ends a generated answer
  return PromptInputs(tokenizer, builder, sas_cfg, sas_params, longest, newline)


def build(config, dataset: Dataset, mesh, inputs: PromptInputs):
  """Loads the LLM's weights (the slow part: a 7B model's 13 GB) and assembles the frozen
  parts around `inputs`; -> (parts, frozen, the loaded weights' `checkpointing.fingerprint`,
  None for a random preset). The run records that fingerprint: it notices other weights
  under the same name (a folder whose files were replaced), and knows its own under another
  (a moved folder, a trailing slash)."""
  rules = sharding.rules(config)
  base = llm.load(
    config.llm.name,
    mesh=mesh,
    rules=rules,
    init_std=config.llm.init_std,
    with_tokenizer=False,  # `inputs` holds it.
    **model_options(config, mesh),
  )
  loaded = checkpointing.fingerprint(base.params) if llm.loads_weights(config.llm.name) else None
  # Rows for the special tokens, the vocabulary rounded up to 128 so it shards evenly.
  params, llama_cfg = tok_lib.resize_vocab(
    base.params, base.config, len(inputs.tokenizer), multiple_of=128
  )
  from ilora_jax import plan

  plan.warn_mesh(config.llm.name, llama_cfg, mesh, rules)
  params = jax.device_put(params, llm.mesh_shardings(llama_cfg, mesh, rules))
  model = llm.LLM(
    llama_cfg,
    params,
    inputs.tokenizer,
    adapter=lora.adapter_factory(lora_config(config)),
    unroll_decode=config.llm.unroll_decode,
    stop_ids=base.stop_ids,
  )
  newline = inputs.newline if len(inputs.newline) == 1 else ()
  parts = make_parts(
    config, model, inputs.sas_cfg, inputs.builder, dataset.n_items, inputs.longest, newline
  )
  frozen = {"llm": model.params, "sasrec": inputs.sas_params}
  return parts, frozen, loaded


def prompt_bos(config, tokenizer) -> int | None:
  """The id every prompt starts with (`config.llm.bos`), or None.

  A run saved before that setting existed (its config.json, which `recommend` reads, lacks
  it) was trained with the tokenizer's BOS whenever it had one, and keeps it.
  """
  rule = config.llm.get("bos")
  if rule is None:
    return tokenizer.bos_token_id
  return tok_lib.prompt_bos(tokenizer, rule)


def make_parts(config, model, sas_cfg, builder, n_items: int, longest: int, newline=()) -> Parts:
  """`Parts` of `config` around a loaded LLM; `longest` is the longest answer in tokens."""
  lora_cfg = lora_config(config)
  return Parts(
    model,
    SASRec(sas_cfg),
    router.make_router(
      config.router.kind, lora_cfg.num_experts, config.router.hidden, **router_kwargs(config)
    ),
    Projector(model.config.hidden_size),
    builder,
    lora_cfg,
    n_items,
    target_slots(longest, config.ilora.max_target_tokens),
    tuple(newline),
    unroll_train=bool(config.llm.unroll_train),
  )


def target_slots(longest: int, cap: int) -> int:
  """Target positions the loss gathers per row: the longest answer of the data (its tokens,
  here the longest title's) rounded up to 8, at most `cap` (`ilora.max_target_tokens`).
  Fewer slots than the cap means fewer rows through the LM head, with the same loss."""
  return max(1, min(cap, -(-longest // 8) * 8))


def init_trainable(parts: Parts, mesh, rules, seed: int):
  """Adapter, router and projector params plus router statistics, placed with their shardings."""
  key_lora, key_router, key_proj = jax.random.split(jax.random.PRNGKey(seed), 3)
  cfg = parts.model.config
  adapter = parts.model.module.adapter
  adapter_sh = _adapter_only(llm.mesh_shardings(cfg, mesh, rules, adapter))
  # Only the adapter leaves are returned, so XLA never materialises the base weights.
  init_adapter = jax.jit(
    lambda k: _adapter_only(llama.init_params(cfg, k, adapter)), out_shardings=adapter_sh
  )
  adapters = init_adapter(key_lora)
  init_small = functools.partial(
    init_router_projector, parts.router, parts.projector, parts.sasrec.cfg.hidden
  )  # One program, not one per initialiser op.
  repl = sharding.replicated(mesh)
  router, projector, stats = jax.jit(init_small, out_shardings=repl)(key_router, key_proj)
  return {"lora": adapters, "router": router, "projector": projector}, stats


def init_router_projector(router_module, projector, hidden: int, key_router, key_proj):
  """Router params, projector params and router statistics (`ilora_jax.plan` takes their
  shapes from this too)."""
  router_vars = router_module.init(key_router, jnp.zeros((2, hidden), jnp.float32), train=False)
  proj = projector.init(key_proj, jnp.zeros((1, hidden)))["params"]
  return router_vars["params"], proj, router_vars.get("batch_stats", {})


def labels_of(trainable) -> dict:
  return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in trainable.items()}


# ----------------------------------------------------------------------------- the model math


def gate_weights(parts: Parts, trainable, stats, frozen, seq, len_seq, train: bool, gate_kind: str):
  """Per-instance expert weights [batch, E] and updated router statistics."""
  user = parts.sasrec.apply({"params": frozen["sasrec"]}, seq, len_seq, method="user_vector")
  user = jax.lax.stop_gradient(user)  # [batch, hidden]
  e = parts.lora_cfg.num_experts
  if gate_kind != "router":
    return lora.fixed_gate(gate_kind, seq.shape[0], e), stats
  variables = {"params": trainable["router"]}
  if stats:
    variables["batch_stats"] = stats
  if train and stats:
    gate, updates = parts.router.apply(variables, user, train=True, mutable=["batch_stats"])
    return gate, updates["batch_stats"]
  return parts.router.apply(variables, user, train=False), stats


def replacement(parts: Parts, trainable, frozen, item_ids):
  """Projected SASRec item embeddings at placeholder positions: (mask [b, t], embeds [b, t, d])."""
  table = frozen["sasrec"]["item_embeddings"]["embedding"]  # [n_items + 1, hidden]
  embeds = parts.projector.apply({"params": trainable["projector"]}, table[item_ids])
  return item_ids != parts.n_items, embeds


def target_nll(parts: Parts, gate_kind: str, trainable, stats, frozen, batch, key, train: bool):
  """Per-token negative log-likelihood of the first `parts.max_target_tokens` target tokens.

  Returns (nll [b, k], valid [b, k] bool, new router stats, gate [b, E]).
  """
  gate, new_stats = gate_weights(
    parts, trainable, stats, frozen, batch["seq"], batch["len_seq"], train, gate_kind
  )
  mask, embeds = replacement(parts, trainable, frozen, batch["item_ids"])
  params = _merge(frozen["llm"], trainable["lora"])
  module = parts.model.module
  # Same params unrolled; the layers draw other dropout masks than the scan's split keys.
  if parts.unroll_train and module.config.scan_layers:
    module = llama.Llama(module.config.replace(scan_layers=False), module.adapter)
    params = llm.unstack_layers(params, module.config.num_layers)
  hidden = module.apply(
    {"params": params},
    batch["input_ids"],
    batch["attention"],
    gate_weights=gate,
    deterministic=not train,
    replace_mask=mask,
    replace_embeds=embeds,
    return_hidden=True,
    rngs={"dropout": key},
  )  # [b, t, d]
  # Predict token t+1 from position t, only where t+1 is a target token (explicit spans).
  target = batch["loss_mask"][:, 1:].astype(bool)  # [b, t-1]
  k = parts.max_target_tokens
  order = jnp.argsort(~target, axis=1, stable=True)[:, :k]  # first k target positions
  valid = jnp.take_along_axis(target, order, axis=1)  # [b, k]
  h = jnp.take_along_axis(hidden[:, :-1], order[..., None], axis=1)  # [b, k, d]
  labels = jnp.take_along_axis(batch["input_ids"][:, 1:], order, axis=1)  # [b, k]
  cfg = parts.model.config
  logits = llama.head_logits(cfg, h, params["embedding"], params.get("lm_head"))  # [b, k, v]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # [b, k]
  return nll, valid, new_stats, gate


def loss_fn(parts: Parts, gate_kind: str, trainable, stats, frozen, batch, key, train: bool):
  """Mean cross-entropy over target tokens; aux: (new router stats, gate [b, E])."""
  nll, valid, new_stats, gate = target_nll(
    parts, gate_kind, trainable, stats, frozen, batch, key, train
  )
  loss = jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)
  return loss, (new_stats, gate)


def run_inputs(lr: float, total_steps: int, seed: int, mesh) -> dict:
  """The run's settings that the train step reads as inputs, not as constants compiled into
  it: the schedule's learning rate, length and warm-up (`optim.run_values`) and the dropout
  seed's key. Runs that differ only in them (the seeds and learning rates of a sweep, a
  longer run) share one compiled step, from JAX's persistent cache across processes.
  Replicated arrays, kept in `frozen["run"]`."""
  run = optim.run_values(lr, total_steps)
  with jax.ensure_compile_time_eval():  # Also when traced for shapes (`bench/gpu_plan.py`).
    run["key"] = np.asarray(jax.random.PRNGKey(seed))  # Raw uint32[2], the dropout's key.
  return jax.device_put(run, sharding.replicated(mesh))


def make_train_step(parts: Parts, make_tx, gate_kind: str):
  """One optimizer update over `grad_accum` micro-batches ([accum, micro, ...] arrays).

  `make_tx`: run -> the optimizer (`optim.for_run`), applied to `frozen["run"]`
  (`run_inputs`), whose key also seeds the dropout masks.
  """

  def step(state, frozen, batch):
    tx = make_tx(frozen["run"])
    step_key = jax.random.fold_in(frozen["run"]["key"], state["step"])

    def micro(carry, inputs):
      grads_acc, stats, loss_acc = carry
      index, mb = inputs
      key = jax.random.fold_in(step_key, index)
      grad_fn = jax.value_and_grad(
        lambda t, s: loss_fn(parts, gate_kind, t, s, frozen, mb, key, True), has_aux=True
      )
      (loss, (stats, gate)), grads = grad_fn(state["trainable"], stats)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, stats, loss_acc + loss), gate

    accum = batch["input_ids"].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
    (grads, stats, loss_sum), gates = jax.lax.scan(
      micro, (zeros, state["stats"], jnp.zeros((), jnp.float32)), (jnp.arange(accum), batch)
    )
    grads = jax.tree.map(lambda g: g / accum, grads)
    loss = loss_sum / accum
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    # A step is bad when its loss is not finite or optax skipped its update (a non-finite
    # gradient or update, which a finite loss can have): the router statistics of that step
    # stay out of the state too, and the loop counts it towards `ilora.max_bad_steps`.
    finite = jnp.isfinite(loss) & opt_state.last_finite
    trainable = jax.tree.map(lambda p, u: p + u, state["trainable"], updates)
    stats = jax.tree.map(lambda new, old: jnp.where(finite, new, old), stats, state["stats"])
    gates = gates.reshape(-1, gates.shape[-1])  # [accum * micro, E]
    probs = jnp.clip(gates, 1e-9, 1.0)
    metrics = {
      "loss": loss,
      "grad_norm": optim.global_norm(grads),
      "gate_entropy": jnp.mean(-jnp.sum(probs * jnp.log(probs), axis=-1)),
      "gate_mean": jnp.mean(gates, axis=0),
      "skipped": optim.skipped_updates(opt_state),
      "finite": finite,
    }
    new_state = {
      "trainable": trainable,
      "stats": stats,
      "opt_state": opt_state,
      "step": state["step"] + 1,
    }
    return new_state, metrics

  return step


def rows_for(split: Split, idx: np.ndarray, candidates: np.ndarray, with_target: bool):
  rows = []
  for j, r in enumerate(idx):
    history = split.seq[r, : split.len_seq[r]].tolist()
    rows.append((history, candidates[j].tolist(), int(split.next[r]) if with_target else None))
  return rows


def train_batch(
  parts: Parts,
  config,
  split: Split,
  idx: np.ndarray,
  epoch: int,
  step: int,
  total_steps: int,
  seed: int,
  accum: int,
  length: int | None = None,
) -> dict[str, np.ndarray]:
  """Host-side batch of one optimizer step: [accum, micro, ...] arrays.

  Each micro-batch (a batch of the original, which accumulates gradients over its batches)
  draws its own template and hybrid or text-only form (hybrid with probability step /
  total_steps, the curriculum), from the seed, the optimizer step and its index in the step."""
  sub = Split(split.name, split.seq[idx], split.len_seq[idx], split.next[idx])
  rows = rows_for(split, idx, train_candidates(parts, config, sub, epoch, seed, idx), True)
  micro = len(rows) // accum
  encoded = []
  for a in range(accum):
    draw = np.random.default_rng([seed, 7, step, a])
    template = int(draw.integers(len(parts.builder.templates)))
    hybrid = bool(draw.random() < step / max(total_steps, 1))
    encoded.append(parts.builder.batch(rows[a * micro : (a + 1) * micro], template, hybrid, length))
  # Each micro-batch rounded its own length up (unless `length`): all padded to the longest.
  longest = max(e.input_ids.shape[-1] for e in encoded)
  padded = [
    pad_time(
      {k: v[None] for k, v in e.as_dict().items()}, longest, parts.builder.pad_id, parts.n_items
    )
    for e in encoded
  ]
  tokens = {k: np.concatenate([m[k] for m in padded]) for k in padded[0]}
  shaped = lambda v: v.reshape(accum, -1, *v.shape[1:])  # noqa: E731
  return dict(tokens, seq=shaped(split.seq[idx]), len_seq=shaped(split.len_seq[idx]))


def train_candidates(parts: Parts, config, split: Split, epoch: int, seed: int, row_ids=None):
  """The candidates of training rows in `epoch` (each row's own draw: `sample_candidates`);
  `split` holds the rows `row_ids` of the training split (default: all of it)."""
  cands, _ = sample_candidates(
    split,
    parts.n_items,
    config.data.num_candidates,
    seed=seed * 1000 + epoch,
    eligible=parts.eligible,
    row_ids=row_ids,
  )
  return cands


def prompt_sizes(parts: Parts, config, split: Split, epoch: int, seed: int) -> np.ndarray:
  """Each row's prompt length as `prompt_key` counts it, with the candidates `train_batch`
  draws for the row in `epoch`. What `bucketed_order` sorts by."""
  return prompt_key(parts, split, train_candidates(parts, config, split, epoch, seed))


def eval_template(config) -> int:
  """`ilora.eval_template` (a run's saved config of older code, without it, read template 0)."""
  return int(config.ilora.get("eval_template", 0))


def val_settings(config, dataset: Dataset) -> dict:
  """What the val metrics of a run's epochs depend on besides the run's settings: the prompt
  template, the rows scored (their count and the split's digest), the modes and generation's
  length. A resume after val was compared must keep them: the epochs' values select the
  weights, and form one curve."""
  rows = len(dataset.val)
  generate = bool(config.ilora.eval_generate)
  return {
    "ilora.eval_template": eval_template(config),
    "ilora.eval_rows": rows if config.ilora.eval_rows <= 0 else min(config.ilora.eval_rows, rows),
    "val split": f"{split_fingerprint(dataset.val)} ({counted(rows, 'row')})",
    "ilora.eval_generate": generate,
    "ilora.eval_score": bool(config.ilora.eval_score),
    "ilora.max_new_tokens": int(config.ilora.max_new_tokens) if generate else None,
  }


def _check_same_val(saved: dict, mine: dict, latest: int) -> None:
  """Refuses a resume whose val evaluations would differ from those its epochs were compared
  on (`val_settings`; a checkpoint of older code records the template alone)."""
  for key, read in saved.items():
    if key not in mine or mine[key] == read:
      continue
    if key == "val split":
      fix = "resume with the data the run was started with"
    else:  # The row count read: the same rows, eval_rows=0 (all) or any number above.
      fix = f"resume with --config.{key}={read}"
    raise UserError(
      f"this run's val evaluations were made with {key}={read}, this config's with "
      f"{mine[key]}: {fix} (the epochs before step {latest} were compared on them; "
      "stage=evaluate may use others)"
    )


def prompt_key(parts: Parts, split: Split, cands: np.ndarray) -> np.ndarray:
  """Each row's prompt length in tokens, given its candidates [rows, n]: the tokens of its
  history's and candidates' titles plus one per history item (the hybrid form's item token).
  Short of the real length by a constant and by the separators between history items (',',
  one token each), which the key leaves out: kept so, as counting them would reorder the
  rest of an epoch for a run resumed in it."""
  titles = np.zeros(parts.n_items + 1, np.int64)  # The padding id last, of length 0.
  for item in parts.builder.titles:
    if 0 <= item < parts.n_items:
      titles[item] = len(parts.builder.target_tokens(item))
  history = np.where(
    np.arange(split.seq.shape[1]) < split.len_seq[:, None], split.seq, parts.n_items
  )
  return titles[history].sum(1) + split.len_seq + titles[cands].sum(1)


def bucketed_order(
  order: np.ndarray, sizes: np.ndarray, rows_per_step: int, window: int, rng: np.random.Generator
) -> np.ndarray:
  """`order` regrouped so that each optimizer step holds rows of similar prompt length.

  Every `window` consecutive steps' rows (of the epoch's random `order`) are sorted by
  `sizes`, cut into steps, and those steps shuffled, as are the rows inside each step. The
  steps are padded to their longest prompt, so less of them is padding; each row is still
  seen once per epoch, in a step drawn from its window. `window` 1 keeps `order`. The rows
  after the epoch's last whole step (never trained in this epoch) stay where they are.
  """
  if window <= 1:
    return order
  out = order.copy()
  n_steps = len(order) // rows_per_step
  for first in range(0, n_steps, window):
    count = min(window, n_steps - first)
    span = slice(first * rows_per_step, (first + count) * rows_per_step)
    rows = order[span][np.argsort(sizes[order[span]], kind="stable")]
    steps = rows.reshape(count, rows_per_step)[rng.permutation(count)]
    out[span] = rng.permuted(steps, axis=1).reshape(-1)
  return out


def epoch_order(
  parts: Parts, config, split: Split, epoch: int, seed: int, rows_per_step: int, window: int
) -> np.ndarray:
  """The training rows in the order of `epoch`: a random permutation, bucketed by prompt
  length over `window` steps (`bucketed_order`; 1 = the permutation as is)."""
  order = np.random.default_rng([seed, epoch]).permutation(len(split))
  if window <= 1:
    return order
  sizes = prompt_sizes(parts, config, split, epoch, seed)
  rng = np.random.default_rng([seed, epoch, 1])
  return bucketed_order(order, sizes, rows_per_step, window, rng)


def pad_time(batch: dict[str, np.ndarray], length: int, pad_id: int, n_items: int) -> dict:
  """Right-pads the token arrays ([accum, rows, time]) of a train batch to `length`."""
  fill = {"input_ids": pad_id, "attention": 0, "loss_mask": 0, "item_ids": n_items}
  out = dict(batch)
  for key, value in fill.items():
    extra = length - batch[key].shape[-1]
    if extra > 0:
      out[key] = np.pad(batch[key], ((0, 0), (0, 0), (0, extra)), constant_values=value)
  return out


def host_rows(idx: np.ndarray, accum: int, micro: int) -> np.ndarray:
  """This process's rows of a step's global rows `idx` (accum x micro): its `host_slice` of
  every micro-batch. Template, curriculum and candidates are drawn from the global step and
  the row ids, so the prompts built per process agree with a single-process run."""
  return idx.reshape(accum, micro)[:, sharding.host_slice(micro)].reshape(-1)


def past_positions(host: dict, limit: int | None) -> str | None:
  """A warning when a training batch holds a prompt with answer longer than the model's
  `max_position_embeddings` (`limit`; None: unknown): rotary positions are computed for any
  position, so the step runs, but the model was never trained that far."""
  if limit is None or "attention" not in host:
    return None
  longest = int(np.max(np.sum(np.asarray(host["attention"]) > 0, axis=-1)))
  if longest <= limit:
    return None
  return (
    f"warning: a training prompt with its answer has {longest} tokens, past the LLM's "
    f"max_position_embeddings={limit}: it trains as given, but the model was never trained at "
    "those positions (fewer or shorter titles: data.max_len)"
  )


def agree_length(host: dict, parts: Parts) -> dict:
  """Pads this process's batch to the longest prompt of all processes (one small all-gather)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    lengths = multihost_utils.process_allgather(np.int32(host["input_ids"].shape[-1]))
    host = pad_time(host, int(np.max(lengths)), parts.builder.pad_id, parts.n_items)
  return host


# ----------------------------------------------------------------------------- evaluation


class EvalStopped(Exception):
  """An evaluation abandoned between batches because its `stop` said so (a signal)."""


@dataclasses.dataclass
class Evaluator:
  """Val/test evaluation: target loss, the paper's generation metric and candidate scoring.

  Candidates are fixed by `config.data.candidate_seed`, so every run (iLoRA, plain LoRA, the
  baselines) ranks the same 20 titles per row; `fingerprint` names that candidate set.
  After a call, `timings` holds its wall seconds per mode (generate, score, or both in one
  as generate+score with `ilora.eval_shared_prefill`; the base model's; the loss's own pass
  when not scoring), for the benchmark, and `scores` the candidate log-likelihoods [rows, n]
  per model.

  The baselines (SASRec and the base LLM) read only the frozen weights, so a call with
  `baselines` reuses the outcomes of the last such call on the same `frozen` tree (the same
  object) instead of running them again (their timings are then absent): a run whose final
  weights are an earlier epoch's evaluates val with baselines twice, for the last weights
  and for the selected ones.

  With a `mesh`, each batch's rows are split over its data and fsdp axes (the batch is padded
  to a multiple of those shards), so data-parallel devices evaluate different rows; the
  results are gathered to every process. Without one, the arrays stay where JAX puts them.
  """

  parts: Parts
  config: Any
  split: Split
  gate_kind: str
  mesh: Any = None

  def __post_init__(self):
    cfg = self.config
    rows = (
      len(self.split) if cfg.ilora.eval_rows <= 0 else min(cfg.ilora.eval_rows, len(self.split))
    )
    self.idx = np.arange(rows)
    self.cands, self.target = sample_candidates(
      self.split,
      self.parts.n_items,
      cfg.data.num_candidates,
      cfg.data.candidate_seed,
      self.parts.eligible,
    )
    chosen = eval_template(cfg)  # Each row's prompt template.
    self.templates = np.full(len(self.split), max(chosen, 0), np.int64)
    if chosen < 0:
      count = len(self.parts.builder.templates)
      draw = np.random.default_rng([int(cfg.data.candidate_seed), 11])
      self.templates = draw.integers(count, size=len(self.split))
    digest = hashlib.sha1(np.ascontiguousarray(self.cands[self.idx], np.int64).tobytes())
    digest.update(np.ascontiguousarray(self.target[self.idx], np.int64).tobytes())
    # Each row's template and the templates' wording: other prompts, other results (the
    # records of code before 2026-12-07, whose templates were others, pair with none of these).
    digest.update(np.ascontiguousarray(self.templates[self.idx], np.int64).tobytes())
    digest.update(prompts.templates_digest(cfg.data.name).encode())
    self.fingerprint = digest.hexdigest()[:16]
    # The order the rows are evaluated in: by prompt length, so each batch pads less.
    self.order = np.arange(rows)
    if cfg.ilora.eval_sort:
      key = prompt_key(self.parts, self.split, self.cands)[self.idx]
      self.order = np.argsort(key, kind="stable")
    self.timings: dict[str, float] = {}
    self.scores: dict[str, np.ndarray] = {}
    self.generated_tokens = 0  # Tokens the adapted model generated in the last call.
    self.gates: np.ndarray | None = None  # Gate weights [rows, E] of the last call.
    self._outcomes: tuple[dict, dict] = ({}, {})  # The last call's per-row (outcomes, ranks).
    self.rows_per_device = 0  # Rows of the last scored batch each device computed.
    self._title_slots: int | None = None  # Packed scoring's padded title length (host).
    # (frozen, base LLM outcomes, SASRec scores) of the last call with baselines, per batch.
    self._baselines: tuple | None = None
    parts = self.parts

    def prepare(trainable, stats, frozen, batch):
      gate, _ = gate_weights(
        parts, trainable, stats, frozen, batch["seq"], batch["len_seq"], False, self.gate_kind
      )
      mask, embeds = replacement(parts, trainable, frozen, batch["item_ids"])
      return _merge(frozen["llm"], trainable["lora"]), gate, mask, embeds

    self._prepare = jax.jit(prepare)

    def nll_sum(trainable, stats, frozen, batch, rows):
      nll, valid, _, _ = target_nll(
        parts, self.gate_kind, trainable, stats, frozen, batch, jax.random.PRNGKey(0), False
      )
      valid = valid & (jnp.arange(nll.shape[0]) < rows)[:, None]  # Padding rows left out.
      return jnp.sum(nll * valid), jnp.sum(valid)

    self._nll_sum = jax.jit(nll_sum)

    def sasrec_scores(frozen, seq, len_seq, cands):
      logits = parts.sasrec.apply({"params": frozen["sasrec"]}, seq, len_seq)  # [b, n_items]
      return jnp.take_along_axis(logits, cands, axis=1)

    self._sasrec_scores = jax.jit(sasrec_scores)

  @property
  def row_shards(self) -> int:
    """Devices a batch's rows are split over: the mesh's data x fsdp, or 1."""
    return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def _put(self, tree):
    """Host arrays with a leading row axis -> global arrays split by rows over the mesh."""
    if self.mesh is None:
      return tree
    return jax.tree.map(lambda x: sharding.replicated_rows(self.mesh, x), tree)

  def _time(self, mode: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    self.timings[mode] = self.timings.get(mode, 0.0) + time.perf_counter() - t0
    return out

  @functools.cached_property
  def _stop(self) -> dict:
    """Where a generated answer ends (`llm.greedy_decode`): at the tokenizer's end of text,
    never as the first token (the original generates with `min_new_tokens=1`), or at a
    newline after the answer's text: the original keeps the first line of the stripped
    output, so leading blank lines do not end it."""
    model = self.parts.model
    return {
      "eos_ids": tuple(model.eos_ids),
      "line_end_ids": self.parts.newline_ids,
      "blank_ids": tok_lib.blank_ids(model.tokenizer) if self.parts.newline_ids else (),
      "min_new_tokens": 1,
    }

  def _scoring_inputs(self, prompt, cands, gate, mask, embeds):
    """What `scoring` reads for a batch: the prompts and the candidate titles (+ newline)
    [b, n, l] with their masks on the mesh, and the keyword arguments: gates, embedding
    replacement and the form of the candidates' pass, packed (`ilora.score_packed`, with
    its packed length) or in chunks."""
    builder, ic = self.parts.builder, self.config.ilora
    packed = bool(ic.get("score_packed", True))
    if packed and self._title_slots is None:
      # Packed, the titles' padded length only shapes the host arrays: one length for the
      # split's candidates, so it adds no compilations (the packed length varies, as
      # prompt lengths do).
      split_cands = np.unique(self.cands[self.idx])
      longest = max(len(builder.target_tokens(int(c))) for c in split_cands)
      self._title_slots = -(-longest // 8) * 8
    token_lists = [[builder.target_tokens(int(c)) for c in row] for row in cands]
    at_least = self._title_slots if packed else 0
    ctoks, cmask = scoring.pad_candidates(token_lists, builder.pad_id, at_least=at_least)
    arrays = self._put((prompt.input_ids, prompt.attention, ctoks, cmask))
    kwargs = dict(
      gate_weights=gate,
      replace_mask=mask,
      replace_embeds=embeds,
      chunk=scoring.chunk_for(ctoks.shape[1], ic.score_chunk),
      packed_len=scoring.packed_length(cmask) if packed else None,
    )
    return arrays, kwargs

  def _score(self, module, params, gate, mask, embeds, prompt, cands) -> np.ndarray:
    """Log-likelihood of every candidate title (+ newline) after the prompt: [b, n]."""
    arrays, kwargs = self._scoring_inputs(prompt, cands, gate, mask, embeds)
    scores = scoring.candidate_loglik(module, params, *arrays, **kwargs)
    self.rows_per_device = scores.sharding.shard_shape(scores.shape)[0]
    return sharding.to_host(scores)

  def _generate_and_score(self, module, params, gate, mask, embeds, prompt, cands):
    """`_generate` and `_score` from one prefill of the prompts: (ids, lengths, scores)."""
    model = self.parts.model
    arrays, kwargs = self._scoring_inputs(prompt, cands, gate, mask, embeds)
    out, lengths, scores = scoring.generate_and_score(
      module,
      params,
      *arrays,
      max_new_tokens=int(self.config.ilora.max_new_tokens),
      **self._stop,
      pad_id=model.pad_id,
      unroll=model.unroll_decode,
      **kwargs,
    )
    self.rows_per_device = scores.sharding.shard_shape(scores.shape)[0]
    return sharding.to_host(out), sharding.to_host(lengths), sharding.to_host(scores)

  def _generate(self, params, gate, mask, embeds, prompt, base: bool):
    ids, attention = self._put((prompt.input_ids, prompt.attention))
    return self.parts.model.generate_ids(
      ids,
      attention,
      self.config.ilora.max_new_tokens,
      params=params,
      gate_weights=gate,
      replace_mask=mask,
      replace_embeds=embeds,
      **self._stop,
      base=base,
    )

  def _match(self, out, lengths, cands, idx, take, outcome: dict) -> None:
    """Decodes each real row's answer and appends its text, validity and hit to `outcome`."""
    parts = self.parts
    for j in range(take):
      text = parts.model.tokenizer.decode(out[j, : lengths[j]].tolist(), skip_special_tokens=True)
      titles = [parts.builder.titles[int(c)] for c in cands[j]]
      v, h = match_generation(text, titles, int(self.target[idx[j]]))
      outcome["text"].append(text)
      outcome["valid"].append(v)
      outcome["hit"].append(h)

  @property
  def batch_size(self) -> int:
    """Rows of each evaluation batch: `ilora.eval_batch_size`, at most the rows evaluated,
    rounded up to a multiple of the row shards."""
    wanted = min(int(self.config.ilora.eval_batch_size), max(len(self.idx), 1))
    return -(-wanted // self.row_shards) * self.row_shards

  def batch_rows(self) -> list[tuple[np.ndarray, int]]:
    """The evaluation batches: each one's row ids, in `order` and padded to the batch size
    (a multiple of the row shards) by repeating its rows, so every batch has one compiled
    shape, with the count of its real rows. A batch size above the rows evaluated is cut to
    them (rounded up to the shards): its padding rows would be computed for nothing."""
    bs, in_order = self.batch_size, self.idx[self.order]
    batches = [in_order[start : start + bs] for start in range(0, len(in_order), bs)]
    return [(np.resize(rows, bs), len(rows)) for rows in batches]

  def prompts(self, idx: np.ndarray, hybrid: bool = True):
    """The left-padded prompts (each row's template, no answer) of the rows `idx` as
    evaluation reads them: hybrid for the adapted model, text-only for the base model."""
    rows = rows_for(self.split, idx, self.cands[idx], False)
    return self.parts.builder.batch(rows, self.templates[idx], hybrid, pad_left=True)

  def __call__(
    self, trainable, stats, frozen, progress: bool, baselines: bool = False, stop=None
  ) -> dict[str, float]:
    """Metrics of the split.

    `baselines` adds, on the same candidates, SASRec's ranking (`sasrec/...`) and, when
    `config.ilora.eval_base`, the base LLM without adapters on text-only prompts (`base/...`).
    `stop(i)`, asked before batch i (0, 1, ...) where given, abandons the evaluation with
    `EvalStopped` when it says so.
    """
    cfg, parts = self.config, self.parts
    gen, score = bool(cfg.ilora.eval_generate), bool(cfg.ilora.eval_score)
    shared = bool(cfg.ilora.eval_shared_prefill)
    with_base = baselines and bool(cfg.ilora.eval_base) and (gen or score)
    kept = self._baselines if baselines else None
    kept = kept if kept is not None and kept[0] is frozen else None
    self.timings, self.generated_tokens = {}, 0
    nll_total, tokens = 0.0, 0
    out = {name: {"text": [], "valid": [], "hit": [], "scores": []} for name in ("model", "base")}
    sas_scores, gates = [], []
    batches = console.bar(
      self.batch_rows(), desc=f"eval {self.split.name}", leave=False, enabled=progress
    )
    for i, (idx, take) in enumerate(batches):
      if stop is not None and stop(i):
        batches.close()
        raise EvalStopped(f"the evaluation of {self.split.name} stopped before batch {i}")
      cands = self.cands[idx]
      seq, len_seq = self.split.seq[idx], self.split.len_seq[idx]
      if not score:  # With scoring, the loss comes from the target's score (below).
        with_target = parts.builder.batch(
          rows_for(self.split, idx, cands, True), self.templates[idx], True
        )
        batch = self._put(dict(with_target.as_dict(), seq=seq, len_seq=len_seq))
        total, count = self._time("loss", self._nll_sum, trainable, stats, frozen, batch, take)
        nll_total, tokens = nll_total + float(total), tokens + int(count)
      if baselines and kept is None:
        users = self._put({"seq": seq, "len_seq": len_seq, "cands": cands})
        sas = self._sasrec_scores(frozen, users["seq"], users["len_seq"], users["cands"])
        sas_scores.append(sharding.to_host(sas)[:take])
      if not (gen or score):
        continue
      prompt = self.prompts(idx)
      pbatch = self._put(dict(prompt.as_dict(), seq=seq, len_seq=len_seq))
      params, gate, mask, embeds = self._time(
        "prepare", self._prepare, trainable, stats, frozen, pbatch
      )
      gates.append(sharding.to_host(gate)[:take])
      runs = [("model", parts.model.module, params, gate, mask, embeds, prompt)]
      if with_base and kept is None:  # The frozen LLM alone reads the text-only prompt.
        text = self.prompts(idx, hybrid=False)
        runs.append(("base", parts.model.base_module, frozen["llm"], None, None, None, text))
      for name, module, p, g, m, e, pr in runs:
        prefix = "" if name == "model" else "base_"
        if gen and score and shared:  # One prefill of the prompts for both modes.
          ids, lengths, s = self._time(
            prefix + "generate+score", self._generate_and_score, module, p, g, m, e, pr, cands
          )
        else:
          if score:
            s = self._time(prefix + "score", self._score, module, p, g, m, e, pr, cands)
          if gen:
            ids, lengths = self._time(
              prefix + "generate", self._generate, p, g, m, e, pr, name == "base"
            )
        if score:
          out[name]["scores"].append(s[:take])
          if name == "model":  # The target is a candidate: its score is minus its NLL sum.
            real = idx[:take]
            nll_total -= float(np.sum(s[np.arange(take), self.target[real]], dtype=np.float64))
            tokens += sum(len(parts.builder.target_tokens(int(self.split.next[r]))) for r in real)
        if gen:
          self._match(ids, lengths, cands, idx, take, out[name])
          if name == "model":
            self.generated_tokens += int(np.sum(lengths[:take]))
    if kept is not None:
      out["base"], sas_scores = {k: list(v) for k, v in kept[1].items()}, list(kept[2])
    elif baselines:
      self._baselines = (frozen, {k: list(v) for k, v in out["base"].items()}, list(sas_scores))
    # Per-row outputs back in the split's order.
    back = np.argsort(self.order)
    unsort = lambda rows: np.concatenate(rows)[back]  # noqa: E731
    for o in out.values():
      o.update({k: np.asarray(o[k])[back].tolist() for k in ("text", "valid", "hit") if o[k]})
    target = self.target[self.idx]
    result: dict[str, float] = {}
    self.scores = {n: unsort(o["scores"]) for n, o in out.items() if o["scores"]}
    # Per-row outcomes: target ranks under each scorer, generation validity and hits.
    ranks = {n: target_ranks(s, target) for n, s in self.scores.items()}
    bad: dict[str, dict] = {n: {} for n in ("model", "base", "sasrec")}
    advice = {
      "model": ("the adapted LLM", "its adapters, router or projector diverged (a new run with "
                "a lower config.ilora.train.lr) or the LLM overflows its dtype (llm.dtype)"),
      "base": ("the base LLM", "its weights hold NaN or overflow config.llm.dtype; try "
               "llm.dtype=float32 or another checkpoint"),
    }  # fmt: skip
    for n, s in self.scores.items():
      warn_nonfinite(s, advice[n][0], bad[n], advice[n][1])
    if sas_scores:
      ranks["sasrec"] = target_ranks(unsort(sas_scores), target)
      warn_nonfinite(unsort(sas_scores), "the frozen SASRec", bad["sasrec"],
                     "its weights are broken; retrain it (config.stage=sasrec)")  # fmt: skip
    for name, prefix in (("model", ""), ("base", "base/")):
      o = out[name]
      metrics = generation_metrics(np.array(o["valid"]), np.array(o["hit"])) if o["valid"] else {}
      if name in ranks:  # Candidates ranked by the model's likelihood of their titles.
        metrics.update(ranking_metrics(ranks[name]), **bad[name])
      result.update({prefix + k: v for k, v in metrics.items()})
      if name == "model":
        # Mean NLL per answer token (` title` and newline) after the hybrid prompt. With
        # scoring, from the target's score (every token); without, from a pass of its own
        # (the first `max_target_tokens` tokens of each answer, as training counts them).
        result["loss"] = nll_total / max(tokens, 1)
    if "sasrec" in ranks:
      sas = {**ranking_metrics(ranks["sasrec"]), **bad["sasrec"]}
      result.update({f"sasrec/{k}": v for k, v in sas.items()})
    self.gates = unsort(gates) if gates else None
    self._outcomes = (out, ranks)  # Turned into `rows` only when asked (final evaluations).
    if self.split.group is not None:
      result.update(self._group_metrics(out["model"], ranks))
    return result

  @property
  def rows(self) -> list[dict]:
    """One dict per row of the last call (the split's order): its row (of the split's file,
    where it has one), the next item and its
    title, and what each scorer made of it: the answer generated, whether valid and a hit,
    and the target's 0-based rank among the candidates (by likelihood; SASRec's too)."""
    out, ranks = self._outcomes
    if not out:
      return []
    rows = []
    for i, r in enumerate(self.idx):
      item = int(self.split.next[r])
      at = r if self.split.file_row is None else self.split.file_row[r]  # The file's row.
      row = {"row": int(at), "next": item, "title": self.parts.builder.titles[item]}
      for name, prefix in (("model", ""), ("base", "base/")):
        o = out[name]
        if o["valid"]:
          row.update({prefix + "generated": o["text"][i], prefix + "valid": bool(o["valid"][i]),
                      prefix + "hit": bool(o["hit"][i])})  # fmt: skip
      for name, prefix in (("model", ""), ("base", "base/"), ("sasrec", "sasrec/")):
        if name in ranks:
          row[prefix + "rank"] = int(ranks[name][i])
      rows.append(row)
    return rows

  def _group_metrics(self, model_out: dict, ranks: dict) -> dict[str, float]:
    """Metrics and mean gate weights per user group (`group/<g>/...`), where groups are known.

    `model_out` holds the adapted model's per-row generation outcomes, `ranks` the per-row
    target ranks by scorer ('model', 'sasrec', ...) computed by `__call__`.
    """
    group = self.split.group[self.idx]
    per_row: dict[str, np.ndarray] = {}
    if "model" in ranks:
      per_row["rank"] = ranks["model"]
    if model_out["valid"]:
      per_row["valid"] = np.array(model_out["valid"])
      per_row["hit"] = np.array(model_out["hit"])
    if "sasrec" in ranks:
      per_row["sasrec_rank"] = ranks["sasrec"]
    result: dict[str, float] = {}
    for g in np.unique(group):
      rows = group == g
      metrics = {"rows": int(np.sum(rows))}  # A count, kept one: summary.md shows "2".
      if "rank" in per_row:
        metrics.update(ranking_metrics(per_row["rank"][rows]))
      if "hit" in per_row:
        metrics.update(generation_metrics(per_row["valid"][rows], per_row["hit"][rows]))
      if "sasrec_rank" in per_row:
        sas = ranking_metrics(per_row["sasrec_rank"][rows])
        metrics.update({f"sasrec/{k}": v for k, v in sas.items()})
      if self.gates is not None:
        means = self.gates[rows].mean(axis=0)
        metrics.update({f"gate/{e}": float(v) for e, v in enumerate(means)})
      result.update(
        {f"group/{int(g)}/{k}": v if k == "rows" else float(v) for k, v in metrics.items()}
      )
    return result


def save_gate_table(
  parts: Parts,
  trainable,
  stats,
  frozen,
  split: Split,
  gate_kind: str,
  workdir: str,
  batch: int = 256,
) -> None:
  """Gate weights and SASRec user vectors of a split's users -> `W/report/gates.npz`."""

  @jax.jit
  def gates_and_users(seq, len_seq):
    user = parts.sasrec.apply({"params": frozen["sasrec"]}, seq, len_seq, method="user_vector")
    gate, _ = gate_weights(parts, trainable, stats, frozen, seq, len_seq, False, gate_kind)
    return gate, user

  gates, users = [], []
  rows = len(split)
  for start in range(0, rows, batch):
    idx = np.arange(start, start + batch) % rows  # One compiled shape.
    g, u = gates_and_users(split.seq[idx], split.len_seq[idx])
    keep = min(batch, rows - start)
    gates.append(np.asarray(g)[:keep])
    users.append(np.asarray(u)[:keep])
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  extra = {} if split.group is None else {"groups": split.group}  # Known user groups.
  np.savez(
    os.path.join(out, "gates.npz"),
    gates=np.concatenate(gates),
    users=np.concatenate(users),
    **extra,
  )


# ----------------------------------------------------------------------------- the stage


def _fmt(metrics: dict[str, float]) -> str:
  shown = (f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
  return " ".join(s for s in shown if not s.startswith("group/"))  # Groups: metrics.jsonl.


@dataclasses.dataclass
class Setup:
  """What both training and `evaluate` need: data, frozen parts and the state template."""

  dataset: Dataset
  parts: Parts
  frozen: dict
  state: dict
  make_tx: Any  # run -> optimizer (`optim.for_run`); `frozen["run"]` holds the run's inputs.
  mesh: Any
  micro: int
  accum: int
  steps_per_epoch: int
  total_steps: int
  seed: int
  lr: float
  gate_kind: str
  settings: dict  # `run_settings`: what a checkpoint records and a resume must match.


@jax.jit
def _abs_sums(leaves):
  return [jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves]


def sasrec_fingerprint(sas_params) -> str:
  """A short summary of the frozen SASRec's weights (shapes and sum of magnitudes).

  Four significant digits: another SASRec (another checkpoint, another seed) differs, while
  the float32 sums of one SASRec's weights on different backends or layouts agree.
  """
  leaves = jax.tree.leaves(sas_params)
  sums = _abs_sums(leaves)
  total = sum(float(s) for s in sums)  # Summed on the host in float64, leaf by leaf, as ever.
  return f"{sum(int(x.size) for x in leaves)} weights, |w| sum {total:.4g}"


_FINGERPRINT = re.compile(r"(\d+) weights, \|w\| sum (\S+)")


def same_sasrec(a, b) -> bool:
  """Whether two `sasrec_fingerprint`s name one SASRec: the same weight count, and sums
  within one unit of their fourth significant digit (one SASRec's float32 sums on two
  backends, say a GPU where it trained and a CPU that recommends, may round to neighbouring
  four-digit values)."""
  if a == b:
    return True
  ma, mb = (_FINGERPRINT.fullmatch(str(x)) for x in (a, b))
  if not (ma and mb) or ma[1] != mb[1]:
    return False
  x, y = float(ma[2]), float(mb[2])
  unit = 10.0 ** (math.floor(math.log10(max(abs(x), abs(y), 1e-30))) - 3)
  return abs(x - y) <= unit * 1.001


def _same_llm(a, b) -> bool:
  """Whether two `run_settings` LLM names may name one model: equal, or both loaded from
  files (not random presets), whose `llm_weights` fingerprints then decide."""
  return a == b or not any(str(x).split(" (init_std")[0] in llm.PRESETS for x in (a, b))


def _same_weights(a, b) -> bool:
  """`llm_weights` before the weights are read (None) matches any."""
  return a == b or a is None or b is None


# Settings compared by more than `==` (`checkpointing.check_same_settings`).
SAME_SETTINGS = {"sasrec": same_sasrec, "llm": _same_llm, "llm_weights": _same_weights}


def router_read(saved: dict, current: dict) -> tuple[dict, dict]:
  """`saved` and `current` settings without the router fields that neither one's kind reads
  (`hidden` is the mlp router's, `shortcut` the resnet1d one's): another value of one is the
  same model, for a resume and an evaluation alike; where the kinds differ, that is named."""
  kinds = {s["router"].get("kind") for s in (saved, current) if isinstance(s.get("router"), dict)}
  unread = ({"hidden"} if "mlp" not in kinds else set()) | (
    {"shortcut"} if "resnet1d" not in kinds else set()
  )

  def without(settings: dict) -> dict:
    router = settings.get("router")
    if not isinstance(router, dict):
      return settings
    return {**settings, "router": {k: v for k, v in router.items() if k not in unread}}

  return without(saved), without(current)


def same_settings(saved: dict) -> dict:
  """`SAME_SETTINGS` for a checkpoint's `saved` settings: a checkpoint of older code, without
  the LLM's fingerprint, compares the LLM's name strictly, as that code did."""
  if "llm_weights" in saved:
    return SAME_SETTINGS
  return {k: v for k, v in SAME_SETTINGS.items() if k != "llm"}


# The settings' key of the prompt templates' digest (`prompts.templates_digest`).
PROMPTS = "prompt templates"


def run_prompts(saved: dict) -> str | None:
  """The prompt templates' digest a checkpoint's `saved` settings record; for one of older
  code, which records none, that of the templates that code wrote (None: unknown)."""
  return saved.get(PROMPTS, prompts.OLDER_DIGESTS.get(saved.get("data")))


def _other_prompts(saved: dict, settings: dict) -> str | None:
  """`run_prompts(saved)` where it is known and differs from the running `settings`' digest,
  else None."""
  theirs, ours = run_prompts(saved), settings.get(PROMPTS)
  return theirs if None not in (theirs, ours) and theirs != ours else None


# What the refusal and the warning say of a run trained on templates other than this code's.
_OLDER_TEMPLATES = "code before 2026-12-07 wrote its own, this code the original's"


def _check_same_prompts(saved: dict, settings: dict, directory: str, finished: bool) -> None:
  """Refuses to resume a run trained on prompt templates of other wording than this code's
  (`run_prompts`): the rest of it would train and select on other prompts. `finished`: the
  checkpoint is the run's last step (its command only evaluates again)."""
  theirs = _other_prompts(saved, settings)
  if theirs is not None:
    workdir = os.path.dirname(os.path.dirname(directory))
    advice = (
      f"the run has finished: python -m ilora_jax.report --workdir={workdir} rebuilds its "
      "report, --config.stage=evaluate scores it on this code's prompts"
      if finished
      # A grid's run is started anew by removing its folder: no other --workdir there.
      else "finish the run with the code that started it, or start it anew (another "
      f"--workdir, or remove {workdir})"
    )
    raise UserError(
      f"the checkpoint in {directory} was trained on prompt templates of other wording "
      f"(digest {theirs}) than this code writes ({settings[PROMPTS]}; {_OLDER_TEMPLATES}): "
      f"{advice}"
    )


def _check_resumable(
  saved: dict, settings: dict, directory: str, unknown: dict, finished: bool
) -> None:
  """A resume's check of the `saved` settings of a checkpoint in `directory` against the
  running `settings`: the prompt templates first (`_check_same_prompts`, with their own
  advice), then every setting (`check_same_settings`; `unknown`: its `added`)."""
  _check_same_prompts(saved, settings, directory, finished)
  checkpointing.check_same_settings(
    *router_read(saved, settings), directory, unknown, same_settings(saved)
  )


def _rope_settings(config) -> list:
  """[rope_theta, rope_scaling] of the config's LLM, as its files are read (its config)."""
  cfg = llm.config_for(config.llm.name)
  return [cfg.rope_theta, None if cfg.rope_scaling is None else dict(cfg.rope_scaling)]


def numerics_settings(
  config, bos, slots: int, sas_params, titles: dict[int, str], prompt_tokens: str | None = None
) -> dict:
  """Settings beyond the model's shape that a resumed run must share with its checkpoint:
  the prompt's first token (`bos`, the prompt builder's), the items' `titles` (a digest: the
  prompts name them) and the tokens the prompts are made of (`prompt_tokens`, the builder's
  `tokens_digest`), the LLM's rotary settings, the compute and weight dtypes, the loss's
  target `slots`, the optimizer's clip and decay, which SASRec is frozen (and its heads),
  the step order's bucketing, the padding multiple and the layer scan (both move the dropout
  masks), and the candidates: how many each prompt lists (the training prompts hold them)
  and the seed of the evaluation's fixed sets (the val metric that selects the weights
  compares epochs on one set), and the prompt templates' wording (`PROMPTS`)."""
  return checkpointing.jsonable(
    {
      "bos": bos,
      PROMPTS: prompts.templates_digest(config.data.name),
      "data.titles": titles_fingerprint(titles),
      "prompt tokens": prompt_tokens,
      "llm.rope": _rope_settings(config),
      "llm.dtype, param_dtype": [config.llm.dtype, config.llm.param_dtype],
      "target_slots": slots,
      "ilora.train.clip_norm": config.ilora.train.clip_norm,
      "weight_decay": stage_train(config, STAGE).weight_decay,
      "sasrec": sasrec_fingerprint(sas_params),
      # The LLM's weights (their fingerprint), filled in once `build` has read them.
      "llm_weights": None,
      # Heads split the same weights differently: the fingerprint cannot tell them apart.
      "sasrec.num_heads": config.sasrec.num_heads,
      "ilora.bucket_window": config.ilora.bucket_window,
      # The adapters' dropout masks are drawn over the padded batch, per layer of the scan or
      # of the unrolled layers: either setting gives a resume other masks.
      "ilora.pad_multiple": config.ilora.pad_multiple,
      "llm.unroll_train": bool(config.llm.unroll_train),
      "data.num_candidates": config.data.num_candidates,
      "data.candidate_seed": config.data.candidate_seed,
    }
  )


def run_settings(config, dataset: Dataset, batch, total_steps: int, numerics: dict) -> dict:
  """What a checkpoint records of its run and a resume must match (`check_same_settings`):
  the model, adapters, router, data (its name, training rows and their digest), batch
  [micro, accum], schedule, seed and `numerics`."""
  tc = stage_train(config, STAGE)
  return checkpointing.jsonable(
    {
      "llm": config.llm.name
      + ("" if config.llm.init_std == 0.02 else f" (init_std {config.llm.init_std})"),
      "lora": config.lora.to_dict(),
      "router": config.router.to_dict(),
      "data": dataset.name,
      "batch": list(batch),
      "total_steps": total_steps,
      "seed": int(tc.seed),
      "lr": float(tc.lr),
      "train_rows": len(dataset.train),
      # Other rows of as many (another seed, filter or file): a resume would train on them.
      "data.train": split_fingerprint(dataset.train),
      **numerics,
    }
  )


# What checkpoints saved before `numerics_settings` were made with, where known (the step
# order's bucketing came later); its other settings, and the training rows' digest, are
# compared only with checkpoints that record them.
OLDER_NUMERICS = {"ilora.bucket_window": 1, "data.train": checkpointing.UNKNOWN}


def setup(
  config,
  workdir: str,
  check=None,
  dataset: Dataset | None = None,
  generates: bool = True,
  trains: bool = True,
) -> Setup:
  """Data, frozen parts, trainable state and the run's settings (`run_settings`).

  `check(settings, numerics)`, when given, sees the settings before the LLM's weights are
  read (a resume's check: a refused run stops before the slow part). `dataset`, when given,
  is the config's data set already loaded (`load_from_config`). `generates`: False where
  nothing is generated (`recommend` ranks by likelihood), so titles too long to generate
  whole are no warning. `trains`: False where nothing is trained (`evaluate`, `recommend`,
  the evaluation benchmarks), so a training batch the devices do not divide, or one larger
  than the training split, is no error.
  """
  dataset = load_from_config(config, workdir) if dataset is None else dataset
  tc = stage_train(config, STAGE)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  micro, accum = int(tc.batch_size), int(tc.grad_accum)
  if trains:
    sharding.batch_size_per_shard(mesh, micro, configuration.batch_field(config, STAGE))
  steps_per_epoch = len(dataset.train) // (micro * accum)
  if steps_per_epoch == 0 and trains:
    raise UserError(
      f"the training split has {len(dataset.train)} rows, fewer than one step of {micro} x {accum}"
    )
  total_steps = int(tc.steps) if tc.steps is not None else int(tc.epochs) * steps_per_epoch
  if config.ilora.eval_generate and int(config.ilora.max_new_tokens) < 1:
    raise UserError(f"config.ilora.max_new_tokens={config.ilora.max_new_tokens}: must be >= 1")
  inputs = prompt_inputs(config, workdir, dataset, mesh, generates)
  slots = target_slots(inputs.longest, config.ilora.max_target_tokens)
  numerics = numerics_settings(
    config,
    inputs.builder.bos,
    slots,
    inputs.sas_params,
    dataset.titles,
    inputs.builder.tokens_digest(),
  )
  settings = run_settings(config, dataset, (micro, accum), total_steps, numerics)
  if check is not None:
    check(settings, numerics)
  parts, frozen, loaded = build(config, dataset, mesh, inputs)
  if loaded is not None:  # The weights read, checked against the run's as soon as they are.
    numerics["llm_weights"] = settings["llm_weights"] = loaded
    if check is not None:
      check(settings, numerics)
  trainable, stats = init_trainable(parts, mesh, rules, tc.seed)
  make_tx = optim.for_run(labels_of(trainable), tc.weight_decay, config.ilora.train.clip_norm)
  frozen["run"] = run_inputs(tc.lr, total_steps, tc.seed, mesh)
  tx = make_tx(frozen["run"])  # For its state's structure and zeros.
  # Optimizer moments follow their parameters' shardings (propagated through the jit).
  state = {
    "trainable": trainable,
    "stats": stats,
    "opt_state": init_opt_state(tx, trainable, mesh),
    "step": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh)),
  }
  return Setup(
    dataset,
    parts,
    frozen,
    state,
    make_tx,
    mesh,
    micro,
    accum,
    steps_per_epoch,
    total_steps,
    int(tc.seed),
    float(tc.lr),
    config.lora.gate,
    settings,
  )


def jit_train_step(su: Setup, step=None):
  """The train step as one jit: declared shardings, trainable state donated, frozen not.

  Returns (jitted step, batch sharding). `step` defaults to `make_train_step(...)`.
  """
  repl = sharding.replicated(su.mesh)
  state_sh = jax.tree.map(lambda x: x.sharding, su.state)
  frozen_sh = jax.tree.map(lambda x: x.sharding, su.frozen)
  batch_sh = NamedSharding(su.mesh, PartitionSpec(None, sharding.BATCH_AXES))
  step = step or make_train_step(su.parts, su.make_tx, su.gate_kind)
  jitted = jax.jit(
    step,
    in_shardings=(state_sh, frozen_sh, batch_sh),
    out_shardings=(state_sh, repl),
    donate_argnums=(0,),
  )
  return jitted, batch_sh


def init_opt_state(tx, trainable, mesh):
  """Optimizer state on the mesh: moments sharded like their parameters, counters replicated."""
  opt_state = tx.init(trainable)  # Eager: zeros_like keeps each parameter's sharding.
  repl = sharding.replicated(mesh)

  def place(x):
    if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
      return x
    return jax.device_put(x, repl)

  return jax.tree.map(place, opt_state)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def run(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the iLoRA stage; returns the final val metrics."""
  with contextlib.ExitStack() as owned:  # Closes the selected weights' folder on every exit.
    return _run(config, workdir, owned)


def _run(config, workdir: str, owned: contextlib.ExitStack) -> dict[str, float]:
  # The weights `ilora.select_by` picks. A resume's checks run inside the setup, before the
  # LLM's weights are read and before anything is restored or truncated, so a refused resume
  # stops early and leaves the run's records as they were.
  select = selection_metric(config)
  dataset = load_from_config(config, workdir)
  val = val_settings(config, dataset)  # What val's metrics depend on (`Evaluator`).
  best_step = best_value = None  # The selected weights' step and val value (None: none yet).

  def check(settings: dict, numerics: dict) -> None:
    nonlocal best_step, best_value
    unknown = {**dict.fromkeys(numerics, checkpointing.UNKNOWN), **OLDER_NUMERICS}
    with contextlib.closing(
      checkpointing.StageCheckpoints(workdir, STAGE, 1, False, read_only=True)
    ) as found:
      latest = found.latest_step()
      if latest is not None:
        latest_meta = found.restore_meta(latest)
        finished = latest >= settings["total_steps"]
        _check_resumable(latest_meta["settings"], settings, found.directory, unknown, finished)
        # Checkpoints of older code (no select_by recorded) selected nothing: from here on.
        chosen_by = latest_meta.get("select_by", select)
        # Before the first epoch's val no val was compared: another metric may take over.
        # (Older checkpoints do not record the epoch's length: compared, to be safe.)
        epoch = latest_meta.get("steps_per_epoch")
        first_val = None if epoch is None else min(epoch, settings["total_steps"])
        compared = (
          first_val is None
          or latest > first_val
          or (latest == first_val and not latest_meta.get("val_pending", False))
        )
        # Older checkpoints record the template alone (0 before that): compared by it.
        saved = latest_meta.get(
          "val_settings", {"ilora.eval_template": latest_meta.get("eval_template", 0)}
        )
        if compared:  # Before the selection metric's check: a mode switched off is named.
          _check_same_val(saved, val, latest)
        if chosen_by != select and compared:
          raise UserError(
            f"this run selects its final weights by val "
            f"{chosen_by or 'nothing (the last step)'}: resume with "
            f"--config.ilora.select_by={chosen_by!r} (the epochs before step {latest} were "
            "compared by it)"
          )
    best_step, best_value = _kept_selection(workdir, select, settings, unknown)

  su = setup(config, workdir, check, dataset=dataset)
  # Where the selected weights are kept, opened for writing only now: a run that fails in its
  # setup leaves no new folder.
  best = checkpointing.StageCheckpoints(workdir, BEST, 1, False) if select else None
  if best is not None:  # Saved synchronously: closing loses nothing, and never masks an error.
    owned.callback(_quietly, best.close)
  dataset, parts, frozen, state = su.dataset, su.parts, su.frozen, su.state
  train, total_steps, steps_per_epoch = dataset.train, su.total_steps, su.steps_per_epoch
  micro, accum, gate_kind = su.micro, su.accum, su.gate_kind
  step_fn, batch_sh = jit_train_step(su)
  base_count = _count(frozen["llm"])
  sizes = {k: _count(v) for k, v in state["trainable"].items()}
  # A fixed gate (plain LoRA, uniform) leaves the router in the state but out of the model.
  unused = {"router"} if gate_kind != "router" else set()
  used = sum(v for k, v in sizes.items() if k not in unused)
  console.info(
    "iLoRA: trainable "
    + ", ".join(f"{k} {v:,}" for k, v in sizes.items() if k not in unused)
    + f" = {used:,} ({100 * used / base_count:.3f}% of the {base_count:,} base parameters)"
    + "".join(f"; {k} {sizes[k]:,} unused (lora.gate={gate_kind})" for k in sorted(unused))
  )

  if config.llm.dtype == "float16":
    console.info(
      "warning: llm.dtype=float16 trains without loss scaling (none is done): gradients can "
      "underflow to 0 or overflow (skipped steps); bfloat16 has float32's range"
    )
  log = MetricsLog(workdir, enabled=jax.process_index() == 0)
  settings = su.settings
  ckpt = checkpointing.StageCheckpoints(
    workdir, STAGE, config.checkpoint.max_to_keep, config.checkpoint.async_save
  )
  step, bad_streak = 0, 0  # The steps so far, and the bad (skipped) steps in a row at its end.
  val_pending = False  # Whether the val of the epoch that ended at `step` is still to run.
  interval: list[dict] = []  # Train metrics of the steps since the last train record.
  latest = ckpt.latest_step()
  if latest is not None:
    state, meta = ckpt.restore(latest, checkpointing.abstract_like(state))
    step = int(meta["step"])
    log.truncate(STAGE, meta["metrics_records"])
    interval = list(meta.get("train_interval", []))  # So a resumed record means the same.
    # So a run preempted more often than every `max_bad_steps` steps still stops.
    bad_streak = int(meta.get("bad_streak", 0))
    # Saved at an epoch's end whose val a signal stopped: that val comes first.
    val_pending = bool(meta.get("val_pending", False))
    console.info(f"iLoRA: resumed from step {step} of {total_steps}")
  else:
    log.truncate(STAGE, 0)  # An attempt killed before its first checkpoint left records.
  if jax.process_index() == 0:  # After the check: a refused resume leaves the run's settings.
    configuration.save(config, workdir)  # For `python -m ilora_jax.recommend --workdir=...`.
  val_eval = Evaluator(parts, config, dataset.val, gate_kind, su.mesh)

  def record(split: str, metrics: dict, **extra) -> None:
    log.write({"run": STAGE, "stage": STAGE, "split": split, "step": step, **extra, **metrics})

  def checkpoint_meta(at: int, **extra) -> dict:
    """A checkpoint's meta: what a resume checks and where its records end."""
    return {"step": at, "settings": settings, "metrics_records": log.count(STAGE),
            "select_by": select, "train_interval": list(interval), "bad_streak": bad_streak,
            "steps_per_epoch": steps_per_epoch, "val_settings": val,
            "val_pending": val_pending, **extra}  # fmt: skip

  def save(at: int) -> None:
    ckpt.save(at, state, checkpoint_meta(at))

  def keep_if_best(metrics: dict) -> bool:
    """Saves this step's weights as the selected ones when its val `select` metric is the
    best so far (before the step's own checkpoint: a kill between the two re-evaluates the
    epoch on resume and finds the same value, kept already). Returns whether it did."""
    nonlocal best_step, best_value
    if best is None or not better(select, metrics[select], best_value):
      return False
    if best_step is not None and best_step >= step:  # Saved before a resume reached it again.
      return False
    best_step, best_value = step, float(metrics[select])
    best.save(step, state, checkpoint_meta(step, value=best_value))
    return True

  stop_at = (
    total_steps
    if config.train.stop_after_steps is None
    else min(total_steps, int(config.train.stop_after_steps))
  )
  sharding.host_slice(micro)  # Checks the batch divides over the processes.
  bar = console.bar(total=total_steps, initial=step, desc="ilora train", enabled=config.progress)
  last_val: dict[str, float] = {}
  log_every = int(stage_train(config, STAGE).log_every_steps)  # Train records' interval.
  # Wall time of the steps, evaluation left out, and of those that compiled the step for a
  # new prompt length apart (bucketing gives a few lengths).
  steps_s, timed, lengths_seen, compile_steps = 0.0, 0, set(), 0
  model = getattr(parts, "model", None)  # None in tests that fake the parts.
  limit = None if model is None else int(model.config.max_position_embeddings)
  orders: dict[int, np.ndarray] = {}  # The epoch's row order (used by one thread only).
  # Seconds spent ordering epochs' rows (each epoch's prompt sizes: a tokenisation of every
  # row): all of them, and the part inside the batches' builds. Shown apart from the batches'
  # time per step, over which one epoch's ordering was spread (1,106 ms "built per step" on a
  # 2-step run).
  ordering = {"s": 0.0, "in_batches_s": 0.0, "epochs": 0}

  def speed() -> None:
    if timed:
      console.info(
        f"iLoRA: {1000 * steps_s / timed:.0f} ms per step ({counted(compile_steps, 'step')} "
        f"that compiled a new prompt length left out); "
        + batches.summary(apart_s=ordering["in_batches_s"])
        + f"; rows ordered in {ordering['s']:.1f} s apart ({counted(ordering['epochs'], 'epoch')})"
      )

  def order_of(epoch: int) -> np.ndarray:
    if epoch not in orders:
      start = time.perf_counter()
      orders.clear()
      orders[epoch] = epoch_order(
        parts, config, train, epoch, su.seed, micro * accum, config.ilora.bucket_window
      )
      ordering["s"] += time.perf_counter() - start
      ordering["epochs"] += 1
    return orders[epoch]

  def host_batch(at: int) -> dict[str, np.ndarray]:
    """This process's rows of optimizer step `at`: a pure function of (seed, epoch, step)."""
    epoch, pos = divmod(at, steps_per_epoch)
    before = ordering["s"]
    idx = order_of(epoch)[pos * micro * accum : (pos + 1) * micro * accum]
    ordering["in_batches_s"] += ordering["s"] - before
    mine = host_rows(idx, accum, micro)
    return train_batch(parts, config, train, mine, epoch, at, total_steps, su.seed, accum)

  def validate() -> None:
    """The val of the epoch that ended at `step`: recorded, printed and compared (the best
    weights kept). A signal stops it between batches, leaving it pending (`val_pending`):
    the step's checkpoint, saved next, holds the epoch's steps (a preempted run's grace
    period may be shorter than a val, about 190 s for LastFM's on 2 CPU cores), and a
    resume runs the val first. In a multi-process run the processes agree on stopping
    before each batch."""
    nonlocal last_val, val_pending
    try:
      last_val = val_eval(state["trainable"], state["stats"], frozen, config.progress,
                          stop=lambda i: stop.agree((step, i)))  # fmt: skip
    except EvalStopped:
      val_pending = True
      return
    val_pending = False
    record("val", last_val, epoch=step // steps_per_epoch, candidates=val_eval.fingerprint)
    console.info(f"iLoRA step {step} val " + _fmt(last_val))
    keep_if_best(last_val)

  if step < stop_at:  # Before the batches' thread, so that the first step does not wait on it.
    order_of(step // steps_per_epoch)
  batches = prefetch.Prefetch(host_batch, range(step, stop_at), config.ilora.prefetch, "batches")
  started = time.perf_counter()
  with interrupts.Graceful() as stop, ckpt.guard(), batches:
    # Resumed: the val a signal stopped (stopped again, its checkpoint stands). A resume that
    # stops here (`train.stop_after_steps`) leaves it to the next: no checkpoint would record
    # it, and the next resume would run it again.
    if val_pending and step < stop_at:
      validate()
      if val_pending:
        ckpt.leave(step, stop, bar, saved=False)
    for host in batches:
      epoch = step // steps_per_epoch
      host = agree_length(host, parts)  # A collective: stays in this thread, in step order.
      # Each process feeds only its rows of the global [accum, micro, ...] batch.
      batch = {
        k: jax.make_array_from_process_local_data(batch_sh, v, (v.shape[0], micro, *v.shape[2:]))
        for k, v in host.items()
      }
      state, metrics = step_fn(state, frozen, batch)
      step += 1
      metrics = jax.device_get(metrics)
      length = host["input_ids"].shape[-1]
      if length in lengths_seen:
        steps_s, timed = steps_s + time.perf_counter() - started, timed + 1
      else:
        lengths_seen.add(length)
        compile_steps += 1
        if limit is not None and (past := past_positions(host, limit)):
          console.info(past)
          limit = None  # Once a run.
      loss = float(metrics["loss"])
      bad_streak = 0 if metrics["finite"] else bad_streak + 1
      if bad_streak >= config.ilora.max_bad_steps:
        raise UserError(
          f"{bad_streak} optimizer steps in a row had a non-finite loss or gradient (last at "
          f"step {step}); {configuration.lower_lr_advice(STAGE, workdir, (STAGE, BEST))}, or "
          "check the data"
        )
      interval.append(
        {
          "loss": loss,
          "grad_norm": float(metrics["grad_norm"]),
          "gate_entropy": float(metrics["gate_entropy"]),
          "skipped_updates": int(metrics["skipped"]),
          **{f"gate_mean/{e}": float(v) for e, v in enumerate(metrics["gate_mean"])},
        }
      )
      if step % log_every == 0 or step == total_steps:
        # The steps since the last record: their mean values; the run's skipped updates so
        # far (optax's running count, as the SASRec records hold theirs).
        lrs = optim.learning_rates(su.lr, total_steps, step - 1)
        means = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
        means["skipped_updates"] = interval[-1]["skipped_updates"]
        record("train", {**means, "lr": float(lrs["lr/lora"])}, epoch=epoch)
        interval.clear()
      bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      bar.update(1)  # Drawn with this step's loss beside its count.
      epoch_end = step % steps_per_epoch == 0 or step == total_steps
      if epoch_end and step < total_steps:  # The last one is the final evaluation below.
        validate()
      boundary = epoch_end or step % config.checkpoint.every_steps == 0 or step == stop_at
      if stop.agree(step):  # `after_step` leaves the run (every process): the speed line first.
        bar.close()
        speed()
      ckpt.after_step(step, save, boundary, stop, bar)
      started = time.perf_counter()
  bar.close()
  ckpt.close()
  speed()
  if step < total_steps:
    log.settle()  # A resume that stopped at once: its cut written all the same.
    console.info(
      f"iLoRA: stopped at step {step} of {total_steps} (train.stop_after_steps); re-run "
      "without it, or with a later step, to resume"
    )
    return last_val
  log.hold()  # Written together at the end: see `MetricsLog.hold`.
  val_metrics = val_eval(state["trainable"], state["stats"], frozen, config.progress, True)
  selected = {}  # Which weights the final evaluations use, where `ilora.select_by` picks them.
  if best is not None:
    chosen = step if keep_if_best(val_metrics) else (best_step or step)
    if chosen != step:
      # The last weights' val evaluation is one of the epochs' (not final) ...
      last_epoch = (step - 1) // steps_per_epoch + 1
      record("val", val_metrics, epoch=last_epoch, candidates=val_eval.fingerprint)
      console.info(f"iLoRA step {step} val " + _fmt(val_metrics))  # As every epoch's.
      # ... and the selected weights are evaluated again, the baselines beside them.
      state, _ = best.restore(chosen, checkpointing.abstract_like(state))
      console.info(
        f"iLoRA: the final evaluations use the weights of step {chosen} (val {select} "
        f"{best_value:.4f}, the best of the epochs; step {step}: {val_metrics[select]:.4f}"
        + (
          ", a tie, which keeps the earlier weights)" if val_metrics[select] == best_value else ")"
        )  # fmt: skip
      )
      val_metrics = val_eval(state["trainable"], state["stats"], frozen, config.progress, True)
    best.close()  # Done with it (also closed on any earlier exit, by `run`).
    selected = {"selected_step": chosen, "selected_by": select}
  result = {}
  for split in ("val", "test"):
    if split == "test" and dataset.test is None:
      console.info(f"test evaluation skipped: {dataset.test_missing_reason}")
      log.write(
        {
          "run": STAGE,
          "stage": STAGE,
          "split": "test",
          "step": step,
          "skipped": dataset.test_missing_reason,
        }
      )
      continue
    if split == "val":
      evaluator, metrics = val_eval, val_metrics
    else:
      evaluator = Evaluator(parts, config, dataset.test, gate_kind, su.mesh)
      metrics = evaluator(state["trainable"], state["stats"], frozen, config.progress, True)
    log.write(
      {
        "run": STAGE,
        "stage": STAGE,
        "split": split,
        "step": step,
        "final": True,
        "candidates": evaluator.fingerprint,
        "rows": len(evaluator.idx),
        **selected,
        **metrics,
      }
    )
    if jax.process_index() == 0:
      write_predictions(workdir, split, evaluator, metrics)
    chosen = selected.get("selected_step", step)
    weights = "" if chosen == step else f" (weights of step {chosen})"
    console.result(
      f"ilora {split} step {step}{weights}, {counted(len(evaluator.idx), 'row')}: " + _fmt(metrics)
    )
    if split == "val":
      result = metrics
  log.release()
  if jax.process_index() == 0:
    save_gate_table(
      parts, state["trainable"], state["stats"], frozen, dataset.val, gate_kind, workdir
    )
    console.info(f"report: {report.write(workdir, config.report.compare)}")
  return result


def write_predictions(workdir: str, split: str, evaluator: Evaluator, metrics: dict) -> None:
  """DIR/predictions/<split>.jsonl (`report.predictions_path`): a first line naming the rows'
  candidate fingerprint and the final metrics, then one line per row (`Evaluator.rows`)."""
  path = report.predictions_path(workdir, split)
  rows = evaluator.rows
  head = {"split": split, "candidates": evaluator.fingerprint, "rows": len(rows)}
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as f:
      f.write(json.dumps({**head, "metrics": {k: plain(v) for k, v in metrics.items()}}) + "\n")
      for row in rows:
        f.write(json.dumps(row) + "\n")
  except OSError as exc:
    raise UserError(f"cannot write {path}: {exc}; the final metrics are in metrics.jsonl") from None


def _kept_selection(workdir: str, select: str, settings: dict, unknown: dict):
  """(step, value) of the weights `ilora.select_by` kept in checkpoints/ilora_best ((None,
  None) before any), after checking they were selected by `select` under these settings (with
  `select` '', nothing selected, a kept folder refuses the run). Reads only."""
  with contextlib.closing(
    checkpointing.StageCheckpoints(workdir, BEST, 1, False, read_only=True)
  ) as best:
    at = best.latest_step()
    if at is None:
      return None, None
    kept = best.restore_meta(at)
    if kept.get("select_by") != select:
      raise UserError(
        f"{best.directory} holds the weights this run selected by val "
        f"{kept.get('select_by')}: resume with --config.ilora.select_by="
        f"{kept.get('select_by')!r}, or remove that folder to select anew"
      )
    _check_resumable(kept["settings"], settings, best.directory, unknown, False)
    return at, float(kept["value"])


def _quietly(close) -> None:
  """`close()`, its own failure dropped: an exit's cleanup never replaces the error that
  stopped the run."""
  with contextlib.suppress(Exception):
    close()


def better(metric: str, new: float, old: float | None) -> bool:
  """Whether the val `metric` value `new` beats `old` (None: no weights selected yet): the
  lowest loss wins, the highest of every other metric; a non-finite value never wins, and a
  tie keeps the earlier weights."""
  if not np.isfinite(new):
    return False
  if old is None:
    return True
  return new < old if metric == "loss" else new > old


# What a checkpoint's settings (`run_settings`) say of the model its arrays fit: adapters,
# router, data set (the dropout rates are of training only), the frozen SASRec whose
# embeddings the projector and router learned to read, and the LLM's weights (their
# fingerprint). Not the LLM's name: one model goes by several (a registered name, the path of
# its file, a moved folder), so another name only warns, where no fingerprints tell.
_MODEL_SETTINGS = (
  "lora",
  "router",
  "data",
  "train_rows",
  "sasrec",
  "sasrec.num_heads",
  "llm_weights",
)


def _check_model_settings(ckpt, step: int, settings: dict | None) -> None:
  """A UserError naming each model setting (`_MODEL_SETTINGS`) checkpoint `step` of `ckpt`
  was made with that differs from `settings` (the running config's; None: no check); a
  warning when the LLM goes by another name than the run's."""
  if settings is None:
    return
  saved = ckpt.restore_meta(step).get("settings", {})

  def model(s: dict) -> dict:
    out = {}
    for key in _MODEL_SETTINGS:
      value = s.get(key)
      if isinstance(value, dict):
        out.update({f"{key}.{k}": v for k, v in value.items() if k != "dropout"})
      elif key in s:
        out[key] = value
    return out

  theirs, ours = (model(s) for s in router_read(saved, settings))
  diffs = checkpointing.setting_diffs(theirs, ours, sorted(theirs), SAME_SETTINGS)
  if diffs:
    if any(d.startswith("sasrec ") for d in diffs):
      advice = (
        "the run was trained on another SASRec: give it back (the workdir's checkpoints/sasrec "
        "as it was, or the config.sasrec.init_from the run had)"
      )
    elif any(d.startswith(("data ", "train_rows ")) for d in diffs):
      advice = "the run was trained on other data: give the config.data.* it was trained with"
    elif any(d.startswith("llm_weights ") for d in diffs):
      kept, now = (s.get("llm.dtype, param_dtype", [None, None])[1] for s in (saved, settings))
      advice = (
        f"the run was trained on other LLM weights ({saved.get('llm')!r} as it was then): "
        "its adapters fit those only"
        if None in (kept, now) or kept == now
        else f"the run kept the LLM's weights in {kept}, this config in {now} "
        "(llm.param_dtype), and their fingerprint is of the weights as kept: give "
        f"--config.llm.param_dtype={kept}"
      )
    else:
      advice = "set them as the run had them"
    raise UserError(
      f"checkpoint {step} in {ckpt.directory} was made with other model settings "
      f"({'; '.join(diffs)}); {advice}"
    )
  if _other_prompts(saved, settings) is not None:
    console.info(
      f"warning: checkpoint {step} in {ckpt.directory} was trained on prompt templates of "
      f"other wording than this code writes ({_OLDER_TEMPLATES}): it reads this code's now, "
      "so its metrics and rankings may differ from the run's own"
    )
  if saved.get("data.titles") not in (None, settings.get("data.titles")):
    console.info(
      f"warning: checkpoint {step} in {ckpt.directory} was trained with other item titles "
      "than the data's titles file holds now: its prompts and answers name them as the file "
      "does now"
    )
  # Numerics an evaluation may choose, but whose change moves its metrics from the run's own.
  for key, name in (("llm.dtype, param_dtype", "llm.dtype, param_dtype"), ("bos", "llm.bos")):
    if key in saved and key in settings and saved[key] != settings[key]:
      console.info(
        f"warning: checkpoint {step} in {ckpt.directory} was trained with {name} "
        f"{saved[key]!r}, this config gives {settings[key]!r}: its metrics may differ from "
        "the run's own (give the run's settings to score it as it was trained)"
      )
  fingerprinted = None not in (saved.get("llm_weights"), settings.get("llm_weights"))
  if saved.get("llm") not in (None, settings.get("llm")) and not fingerprinted:
    console.info(
      f"warning: checkpoint {step} in {ckpt.directory} was trained with llm {saved['llm']!r}, "
      f"this config gives {settings.get('llm')!r}: its adapters fit that model's weights only"
    )


def latest_step(workdir: str, stage: str = STAGE) -> int | None:
  """The step of `stage`'s (ilora or its selected weights', BEST) latest checkpoint in
  `workdir`, None without one (read only: creates no folder)."""
  with contextlib.closing(
    checkpointing.StageCheckpoints(workdir, stage, 1, False, read_only=True)
  ) as ckpt:
    return ckpt.latest_step()


def has_weights(workdir: str) -> bool:
  """Whether `workdir` holds iLoRA weights: a checkpoint of the stage, latest or selected."""
  return latest_step(workdir) is not None or latest_step(workdir, BEST) is not None


def require_checkpoint(workdir: str) -> None:
  """Refuses a workdir without an ilora checkpoint (latest or selected) before the model is
  built: `restore_for_use`'s error, without minutes of loading an LLM first."""
  if not has_weights(workdir):
    raise _no_checkpoint(checkpoint_folder(workdir, STAGE), workdir)


def _no_checkpoint(directory: str, workdir: str) -> UserError:
  """The error for a run without ilora checkpoints, its advice by the stage the run's
  config.json names: a pipeline short of its iLoRA stage goes on by its own command."""
  try:
    ours = [r for r in report.read_records(workdir) if r.get("run") == STAGE]
  except (UserError, OSError):  # Words only: a damaged log gives the advice below.
    ours = []
  if any(r.get("final") for r in ours):  # It finished: its checkpoints were there.
    return UserError(
      f"no ilora checkpoint in {directory}, though {workdir}'s metrics.jsonl holds its iLoRA "
      "stage's final evaluations: its checkpoints were removed, or not copied with the run"
    )
  if ours:
    return UserError(
      f"no ilora checkpoint in {directory}, though {workdir}'s metrics.jsonl holds iLoRA "
      "training records: the run stopped before its first checkpoint (re-run its command to "
      "start it again), or its checkpoints were removed"
    )
  stage = (configuration.saved(workdir) or {}).get("stage")  # None, damaged: no advice of it.
  advice = {
    "pipeline": "the run (stage=pipeline) has not reached its iLoRA stage: re-run its command "
    "to go on",
    "sasrec": "the run trained SASRec alone (stage=sasrec): train iLoRA on it with "
    "--config.stage=ilora",
  }.get(stage if isinstance(stage, str) else None, "train with --config.stage=ilora")
  return UserError(f"no ilora checkpoint in {directory}: {advice}")


def unfinished(workdir: str, total_steps: int) -> str:
  """ " (an unfinished run: ...)" when the run's latest checkpoint is short of its steps
  (stopped early, or still training), for the words naming the weights used; else "". The
  run's steps are those its latest checkpoint records, so that an evaluation's other train.*
  or data.* settings do not make a finished run unfinished; `total_steps` (the config's)
  stands in where that record cannot be read."""
  latest = latest_step(workdir)
  if latest is None:
    return ""
  try:
    with contextlib.closing(
      checkpointing.StageCheckpoints(workdir, STAGE, 1, False, read_only=True)
    ) as ckpt:
      total_steps = int(ckpt.restore_meta(latest)["settings"].get("total_steps", total_steps))
  except (UserError, OSError, KeyError, TypeError, ValueError):  # Words only: never a refusal.
    pass
  if latest >= total_steps:
    return ""
  return f" (an unfinished run: trained {latest} of {total_steps} steps)"


def _recorded_selection(workdir: str) -> tuple[int, str] | None:
  """(step, metric) of the weights the run's last final record says `ilora.select_by` picked,
  None where it names none (or there is none)."""
  chosen = None
  for r in report.read_records(workdir):  # The last final record decides.
    if r.get("run") == STAGE and r.get("final"):
      chosen = (
        (int(r["selected_step"]), str(r.get("selected_by"))) if "selected_step" in r else None
      )
  return chosen


def restore_for_use(
  workdir: str,
  abstract_state,
  weights: str = "selected",
  keep: int = 2,
  settings=None,
  on_lost=None,
):
  """(state, step, how, selected_by) of an ilora run's weights for an evaluation or a
  recommendation: with `weights` "selected", those the run's `ilora.select_by` picked
  (checkpoints/ilora_best; `selected_by` names that metric) where it has them, else the latest
  checkpoint (`selected_by` None); `how` names which, for a message. With `settings` (the
  running config's `run_settings`), a checkpoint of another model shape is refused by name
  before its arrays are read. Selected weights that the run's records name but that are gone
  (ilora_best removed) and are not the latest checkpoint's: a UserError, or with `on_lost`,
  the latest checkpoint after `on_lost(what is gone)`."""
  best_dir = None
  if weights == "selected":
    with contextlib.closing(
      checkpointing.StageCheckpoints(workdir, BEST, 1, False, read_only=True)
    ) as best:
      at = best.latest_step()
      if at is not None:
        _check_model_settings(best, at, settings)
        state, meta = best.restore(at, abstract_state)
        how = f"the weights of step {at}, selected by val {meta.get('select_by')}"
        return state, at, how, meta.get("select_by")
      best_dir = best.directory
  with contextlib.closing(
    checkpointing.StageCheckpoints(workdir, STAGE, keep, False, read_only=True)
  ) as ckpt:
    latest = ckpt.latest_step()
    if latest is None:
      raise _no_checkpoint(ckpt.directory, workdir)
    recorded = _recorded_selection(workdir) if best_dir else None
    if recorded is not None and recorded[0] != latest:
      lost = (
        f"the weights of step {recorded[0]}, which val {recorded[1]} selected (metrics.jsonl), "
        f"are not in {best_dir}"
      )
      if on_lost is None:
        raise UserError(
          f"{lost}: evaluate the latest checkpoint (step {latest}) with "
          "--config.eval.weights=latest"
        )
      on_lost(lost)
    _check_model_settings(ckpt, latest, settings)
    state, _ = ckpt.restore(latest, abstract_state)
  return state, latest, f"the latest checkpoint, step {latest}", None


def evaluate(config, workdir: str) -> dict[str, float]:
  """The `evaluate` stage for iLoRA: restore the run's selected weights (`eval.weights`) or
  its latest checkpoint and score `eval.split`."""
  require_checkpoint(workdir)
  dataset = load_from_config(config, workdir)
  split = dataset.split(config.eval.split)  # A missing test split: before the LLM loads.
  su = setup(config, workdir, dataset=dataset, trains=False)
  state, latest, how, selected_by = restore_for_use(
    workdir, checkpointing.abstract_like(su.state), config.eval.weights,
    config.checkpoint.max_to_keep, su.settings,
  )  # fmt: skip
  console.info(f"iLoRA: evaluating {how}{unfinished(workdir, su.total_steps)}")
  evaluator = Evaluator(su.parts, config, split, su.gate_kind, su.mesh)
  metrics = evaluator(
    state["trainable"], state["stats"], su.frozen, config.progress, baselines=True
  )
  # Printed first: a metrics.jsonl or predictions/ that cannot be written loses no result.
  rows = counted(len(evaluator.idx), "row")
  console.result(f"ilora {config.eval.split} step {latest}, {rows}: " + _fmt(metrics))
  MetricsLog(workdir, jax.process_index() == 0, MetricsLog.EVALUATION).write(
    {
      "run": "evaluate",
      "stage": STAGE,
      "split": config.eval.split,
      "step": latest,
      "final": True,
      "candidates": evaluator.fingerprint,
      "rows": len(evaluator.idx),
      **({} if selected_by is None else {"selected_step": latest, "selected_by": selected_by}),
      **metrics,
    }
  )
  if jax.process_index() == 0:  # Beside the record it matches (the split's latest final).
    write_predictions(workdir, config.eval.split, evaluator, metrics)
    compare = report.run_compare(workdir, config.report.compare)  # The run's comparison kept.
    console.info(f"report: {report.write(workdir, compare)}")  # With the record.
  return metrics
