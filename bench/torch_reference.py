r"""PyTorch reference of the iLoRA train step, for side-by-side timing with `ilora_jax.bench`.

python bench/torch_reference.py --model=llama2-7b --batch_size=8 --seq_len=512 --steps=10 \
    --variant=original

Test-time reference only (the package never imports torch). The model is a Hugging Face
`LlamaForCausalLM` with random weights of a preset's shape (the presets of `ilora_jax.llm`),
frozen, in bf16 on a GPU (float32 on a CPU, as `configs/demo.py` runs there). Each of the seven
projections is wrapped by an instance-wise LoRA:

* `original`: written the way the original system does it, one A_k / B_k Linear pair per
  expert, every expert's full-width output materialised, then a gate-weighted sum;
* `fused`: one A [in, r] and one B [r, out] with the gate scaling the rank components (the
  same math `ilora_jax.lora` uses).

Adapters are float32 (inputs cast, as PEFT does), AdamW on adapters, router and projector; the
hybrid prompt's 30 item positions take projected item embeddings; the loss is the model's own
causal-LM loss with non-target labels at -100. Prints one JSON line with the keys of
`ilora_jax.bench` (step_s, tokens_per_s, compile_s, peak_bytes, mfu, loss, eval_gen_*).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ilora_jax.errors import UserError, cli_main  # noqa: E402

# The shortest prompt `batch` lays out (as `ilora_jax.bench.random_batch`): 30 item
# placeholders between 8 tokens either side.
PROMPT_LEAST = 46


class OriginalMoLoRA(nn.Module):
  """Per-expert Linear pairs; each expert's [b, t, out] output exists before the weighted sum."""

  def __init__(self, base: nn.Linear, rank: int, experts: int, alpha: float, dropout: float):
    super().__init__()
    self.base, self.experts = base, experts
    r = rank // experts
    self.scale = alpha / r
    self.lora_a = nn.ModuleList(
      [nn.Linear(base.in_features, r, bias=False, dtype=torch.float32) for _ in range(experts)]
    )
    self.lora_b = nn.ModuleList(
      [nn.Linear(r, base.out_features, bias=False, dtype=torch.float32) for _ in range(experts)]
    )
    for b in self.lora_b:
      nn.init.zeros_(b.weight)
    self.dropout = nn.Dropout(dropout)
    self.gate: torch.Tensor | None = None  # [batch, experts], set before each forward.

  def forward(self, x):
    out = self.base(x)
    xd = self.dropout(x.to(torch.float32))
    per_expert = torch.stack(
      [b(a(xd)) for a, b in zip(self.lora_a, self.lora_b)], dim=-1
    )  # [b, t, out, E]
    delta = (per_expert * self.gate[:, None, None, :]).sum(-1) * self.scale
    return out + delta.to(out.dtype)


class FusedMoLoRA(nn.Module):
  """One rank-r pair; the gate scales the rank components (no per-expert full-width outputs)."""

  def __init__(self, base: nn.Linear, rank: int, experts: int, alpha: float, dropout: float):
    super().__init__()
    self.base, self.experts, self.rank = base, experts, rank
    self.scale = alpha / (rank // experts)
    self.lora_a = nn.Parameter(torch.empty(base.in_features, rank))
    nn.init.kaiming_uniform_(self.lora_a.T, a=5**0.5)
    self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features))
    self.dropout = nn.Dropout(dropout)
    self.gate: torch.Tensor | None = None

  def forward(self, x):
    out = self.base(x)
    h = self.dropout(x.to(torch.float32)) @ self.lora_a  # [b, t, r]
    coef = self.gate.repeat_interleave(self.rank // self.experts, dim=-1) * self.scale  # [b, r]
    delta = (h * coef[:, None, :]) @ self.lora_b
    return out + delta.to(out.dtype)


TARGETS = {
  "q_proj": "self_attn",
  "k_proj": "self_attn",
  "v_proj": "self_attn",
  "o_proj": "self_attn",
  "gate_proj": "mlp",
  "up_proj": "mlp",
  "down_proj": "mlp",
}


def build(args, device, dtype):
  from transformers import LlamaConfig, LlamaForCausalLM

  from ilora_jax.llm import PRESETS

  p = PRESETS[args.model]
  cfg = LlamaConfig(
    vocab_size=p.vocab_size + 5,
    hidden_size=p.hidden_size,
    intermediate_size=p.intermediate_size,
    num_hidden_layers=p.num_layers,
    num_attention_heads=p.num_heads,
    num_key_value_heads=p.num_kv_heads,
    head_dim=p.head_dim,
    rope_theta=p.rope_theta,
    tie_word_embeddings=p.tie_word_embeddings,
    max_position_embeddings=p.max_position_embeddings,
    rms_norm_eps=p.rms_norm_eps,
  )
  torch.manual_seed(0)
  previous = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  with torch.device(device):
    model = LlamaForCausalLM(cfg)
  torch.set_default_dtype(previous)
  model.requires_grad_(False)
  wrap = OriginalMoLoRA if args.variant == "original" else FusedMoLoRA
  adapters = []
  with torch.device(device):
    for layer in model.model.layers:
      for name, parent in TARGETS.items():
        holder = getattr(layer, parent)
        module = wrap(getattr(holder, name), args.rank, args.experts, 32.0, 0.1)
        setattr(holder, name, module)
        adapters.append(module)
    router = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, args.experts))
    projector = nn.Sequential(
      nn.Linear(64, p.hidden_size), nn.GELU(), nn.Linear(p.hidden_size, p.hidden_size)
    )
  # Its name since transformers 5.x (the old one warns of its removal); older ones, the old.
  getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
  model.train()
  return model, cfg, adapters, router, projector


def batch(cfg, b, t, targets, device, seed=0):
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(0, cfg.vocab_size - 5, (b, t), generator=g)
  labels = torch.full((b, t), -100)
  labels[:, t - targets :] = ids[:, t - targets :]
  slots = torch.linspace(8, t - targets - 9, 30).long()  # 8 tokens before and after them.
  items = torch.randn(b, 30, 64, generator=g)
  user = torch.randn(b, 64, generator=g)
  return [x.to(device) for x in (ids, labels, slots, items, user)]


def flops_per_token(cfg, t):
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  attn = d * h * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
  n = cfg.num_hidden_layers * (attn + 3 * d * f)
  return 4.0 * n + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * h * t


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # A bad flag: one line, exit 2, as every other input error.
    raise UserError(f"{message} (see --help)")


def check_args(args) -> None:
  """Refuses impossible flags before anything is built, one line naming the flag."""
  from ilora_jax.llm import PRESETS

  if args.model not in PRESETS:
    raise UserError(f"--model={args.model} is not a preset: one of {sorted(PRESETS)}")
  least = {"batch_size": 1, "steps": 1, "warmup": 0, "target_tokens": 1, "rank": 1,
           "experts": 1, "eval_batch_size": 1, "eval_new_tokens": 1}  # fmt: skip
  for flag, value in least.items():
    if getattr(args, flag) < value:
      raise UserError(f"--{flag}={getattr(args, flag)}: must be >= {value}")
  if args.rank % args.experts:  # As ilora_jax.lora.LoRAConfig: r / E components per expert.
    raise UserError(f"--rank={args.rank} is not a multiple of --experts={args.experts}")
  if args.seq_len - args.target_tokens < PROMPT_LEAST:
    raise UserError(
      f"--seq_len={args.seq_len} leaves {args.seq_len - args.target_tokens} prompt tokens "
      f"before the --target_tokens={args.target_tokens} targets: a prompt needs {PROMPT_LEAST} "
      "(30 item placeholders and 8 tokens either side)"
    )
  if args.eval and args.eval_prompt_len - 1 < PROMPT_LEAST:
    raise UserError(
      f"--eval_prompt_len={args.eval_prompt_len}: must be >= {PROMPT_LEAST + 1} (a prompt "
      "of 30 item placeholders and 8 tokens either side, and its last token)"
    )
  if not 1 <= args.peak_flops < math.inf:  # A smaller one: an MFU of Infinity, no JSON.
    raise UserError(f"--peak_flops={args.peak_flops}: must be a number of FLOP/s, at least 1")
  # Hugging Face computes rotary positions for any position (no table to run past): timed as
  # given, with a warning that the model was not trained there.
  most = PRESETS[args.model].max_position_embeddings
  reach = {"--seq_len": (args.seq_len, args.seq_len)}
  if args.eval:
    reach["--eval_prompt_len"] = (args.eval_prompt_len, args.eval_prompt_len + args.eval_new_tokens)
  for flag, (value, last) in reach.items():
    if last > most:
      print(f"warning: {flag}={value} reaches position {last}, past {args.model}'s "
            f"max_position_embeddings={most}: timed as given, but the model was not trained "
            "at those positions", file=sys.stderr)  # fmt: skip


@cli_main
def main(argv: list[str] | None = None):
  ap = _Parser(description=__doc__.split("\n")[0], allow_abbrev=False)  # --batch: refused.
  ap.add_argument("--model", default="smollm2-135m-random")
  ap.add_argument("--variant", choices=("original", "fused"), default="fused")
  ap.add_argument("--batch_size", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--target_tokens", type=int, default=16)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--experts", type=int, default=4)
  ap.add_argument("--peak_flops", type=float, default=989e12)
  ap.add_argument("--eval", action="store_true", help="also time greedy generation")
  ap.add_argument("--eval_batch_size", type=int, default=16)
  ap.add_argument("--eval_prompt_len", type=int, default=400)
  ap.add_argument("--eval_new_tokens", type=int, default=32)
  args = ap.parse_args(sys.argv[1:] if argv is None else argv)
  check_args(args)
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  dtype = torch.bfloat16 if cuda else torch.float32
  model, cfg, adapters, router, projector = build(args, device, dtype)
  params = [p for a in adapters for p in a.parameters() if p.requires_grad]
  params += list(router.parameters()) + list(projector.parameters())
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5)
  ids, labels, slots, items, user = batch(
    cfg, args.batch_size, args.seq_len, args.target_tokens, device
  )
  embed = model.get_input_embeddings()

  def step():
    gate = torch.softmax(router(user), dim=-1)
    for a in adapters:
      a.gate = gate
    x = embed(ids)
    x = x.index_copy(1, slots, projector(items).to(x.dtype))
    loss = model(inputs_embeds=x, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def sync():
    if cuda:
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    step()
  sync()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  sync()
  step_s = (time.perf_counter() - t0) / args.steps
  tokens = args.batch_size * args.seq_len
  result = {
    "impl": f"torch-{args.variant}",
    "model": args.model,
    "device": torch.cuda.get_device_name() if cuda else "cpu",
    "threads": torch.get_num_threads(),
    "batch_size": args.batch_size,
    "seq_len": args.seq_len,
    "step_s": step_s,
    "tokens_per_s": tokens / step_s,
    "compile_s": None,  # Eager PyTorch compiles nothing.
    "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    "mfu": flops_per_token(cfg, args.seq_len) * tokens / step_s / args.peak_flops,
    "loss": float(loss.detach()),
  }
  if args.eval:
    model.eval()
    b, t, new = args.eval_batch_size, args.eval_prompt_len, args.eval_new_tokens
    g_ids, _, _, _, g_user = batch(cfg, b, t, 1, device, seed=1)
    with torch.no_grad():
      gate = torch.softmax(router(g_user), dim=-1)
      for a in adapters:
        a.gate = gate
      kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
      model.generate(g_ids, attention_mask=torch.ones_like(g_ids), **kwargs)
      sync()
      t0 = time.perf_counter()
      for _ in range(3):
        model.generate(g_ids, attention_mask=torch.ones_like(g_ids), **kwargs)
      sync()
    batch_s = (time.perf_counter() - t0) / 3
    result.update(
      eval_gen_batch_s=batch_s,
      eval_gen_prompts_per_s=b / batch_s,
      eval_gen_tokens_per_s=b * new / batch_s,
    )
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
