"""XLA's scratch memory of the evaluation programs, from compilation alone (no weights).

  python bench/eval_memory.py --model=smollm2-135m-random --batch=16 --prompt_len=400

Compiles, for abstract weights of a preset and one batch shape, greedy generation alone
(`llm.generate_tokens`), candidate scoring alone (`scoring.candidate_loglik`, packed) and both
from one prefill (`scoring.generate_and_score`, as a validation pass runs them) with the
packed pass writing the prompts' cache in place (`keep_cache=True`, the default) and into a
second cache (`keep_cache=False`, as before 2026-12-02). Prints the KV cache's size and each
program's scratch memory (`temp_size_in_bytes` of XLA's memory analysis: activations and
temporaries besides arguments and outputs, reported on a CPU too); the last line is one JSON
object. Nothing runs, so a 7B shape fits on a laptop; the figures are those of the backend the
script runs on (a GPU's buffer assignment differs in detail).
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from ilora_jax import bench, console, errors, llama, llm, scoring

_MODEL = flags.DEFINE_string("model", "smollm2-135m-random", "a preset of ilora_jax.llm")
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute and weight dtype")
_BATCH = flags.DEFINE_integer("batch", 16, "prompts per batch")
_PROMPT = flags.DEFINE_integer("prompt_len", 400, "prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 32, "generated tokens")
_CANDS = flags.DEFINE_integer("candidates", 20, "candidates per prompt")
_CAND_LEN = flags.DEFINE_integer("candidate_len", 16, "padded tokens per candidate")
_PACKED = flags.DEFINE_integer("packed_len", 160, "packed candidate tokens per prompt")


_FLOATS = ("float32", "bfloat16", "float16")


def check(model: str, dtype: str, sizes: dict[str, int]) -> None:
  """Refuses a model that is no preset, a dtype that is no float dtype, a size below 1 and a
  packed length the candidates cannot have (`check_packed`), naming the flag, before anything
  is compiled or printed."""
  if model not in llm.PRESETS:
    raise errors.UserError(f"--model={model} is not a preset: one of {sorted(llm.PRESETS)}")
  try:
    floating = np.dtype(jnp.dtype(dtype)).name in _FLOATS
  except TypeError:
    floating = False
  if not floating:
    raise errors.UserError(f"--dtype={dtype} is not one of {', '.join(_FLOATS)}")
  for flag, value in sizes.items():
    if value < 1:
      raise errors.UserError(f"--{flag}={value}: must be >= 1")
  check_packed(sizes["candidates"], sizes["candidate_len"], sizes["packed_len"])


def check_packed(n: int, cl: int, packed: int) -> None:
  """Refuses a packed length that cannot be an evaluation's for `n` candidates padded to `cl`
  tokens: the packed pass drops the tokens past it (`scoring.candidate_loglik`), so it must
  hold the least the candidates fill (the longest one's `cl` tokens and at least one token of
  each other); and `scoring.packed_length` never exceeds their `n * cl` slots rounded up to
  its multiple of 32 (every candidate full)."""
  least = cl + n - 1
  most = scoring.packed_length(np.ones((1, n, cl), np.int32))
  if not least <= packed <= most:
    raise errors.UserError(
      f"--packed_len={packed}: {n} candidates of up to {cl} tokens pack into {least} to {most} "
      f"slots (the longest candidate's {cl} and one token of each other, up to every slot "
      "full, rounded up to 32)"
    )


def measure(model: str, dtype: str, b: int, t: int, new: int, n: int, cl: int, packed: int):
  """{program name: scratch bytes} and the cache's bytes for one shape."""
  check(model, dtype, {"batch": b, "prompt_len": t, "new_tokens": new, "candidates": n,
                       "candidate_len": cl, "packed_len": packed})  # fmt: skip
  cfg = llm.config_for(model, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
  module = llama.Llama(cfg)
  params = nn.meta.unbox(llama.abstract_params(cfg))
  spec = jax.ShapeDtypeStruct
  prompt, cands = spec((b, t), jnp.int32), spec((b, n, cl), jnp.int32)
  slots = t + max(new, packed)
  cache_bytes = 2 * cfg.num_layers * b * cfg.num_kv_heads * slots * cfg.head_dim
  cache_bytes *= jnp.dtype(cfg.dtype).itemsize

  def temp(name, jitted, *args, **kwargs) -> int:  # The package's own jitted function.
    console.info(f"eval_memory: compiling {name} ({len(out) + 1} of 4)")
    return bench.temp_bytes(jitted.lower(module, *args, **kwargs).compile())

  gen = dict(max_new_tokens=new, eos_ids=(), pad_id=0)
  args = (params, prompt, prompt, cands, cands)
  out = {}
  out["generate"] = temp("generate", llm.generate_tokens, *args[:3], **gen)
  out["score"] = temp("score", scoring.candidate_loglik, *args, packed_len=packed)
  for keep in (True, False):
    name = f"both_keep_cache_{keep}"
    out[name] = temp(name, scoring.generate_and_score, *args, **gen, packed_len=packed,
                     keep_cache=keep)  # fmt: skip
  return out, cache_bytes


def main(argv):
  del argv
  console.quiet_libraries()
  temps, cache = measure(_MODEL.value, _DTYPE.value, _BATCH.value, _PROMPT.value, _NEW.value,
                         _CANDS.value, _CAND_LEN.value, _PACKED.value)  # fmt: skip
  mib = 2.0**20
  print(f"{_MODEL.value} {_DTYPE.value}, batch {_BATCH.value}, prompts {_PROMPT.value}, "
        f"{_CANDS.value} candidates packed in {_PACKED.value}, {_NEW.value} new tokens on "
        f"{jax.default_backend()}; KV cache {cache / mib:.1f} MiB")  # fmt: skip
  for name, value in temps.items():
    print(f"  {name:<24} scratch {value / mib:9.1f} MiB  ({value / cache:.2f} caches)")
  ratio = temps["both_keep_cache_True"] / temps["both_keep_cache_False"]
  print(f"  both from one prefill, in place / second cache: {ratio:.3f}")
  print(json.dumps({"cache_bytes": cache, **{f"{k}_temp_bytes": v for k, v in temps.items()},
                    "both_ratio": ratio}))  # fmt: skip


if __name__ == "__main__":
  errors.run_script(main)
