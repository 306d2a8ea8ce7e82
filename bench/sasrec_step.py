"""Times the jitted SASRec train step (the foundation stage) on the local devices.

python bench/sasrec_step.py --n_items=4606 --batch_size=256 --steps=200

Prints a table and, as its last line, one JSON object with step_s, rows_per_s and compile_s:
the step's compilation alone (tracing, lowering and XLA's compile, as `ilora_jax.bench` times
it; JAX's persistent compilation cache is off, so it is never a load from the cache), apart
from the timed steps, which run after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import ml_collections
import numpy as np

from ilora_jax import bench, compile_cache, console, sasrec, sharding
from ilora_jax.errors import UserError, cli_main
from ilora_jax.train_sasrec import (
  jit_train_step,
  make_optimizer,
  make_train_step,
  new_state,
  run_inputs,
)


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # A bad flag: one line, exit 2, as every other input error.
    raise UserError(f"{message} (see --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The flags, each checked (>= 1) before anything is built."""
  parser = _Parser(description=__doc__.split("\n")[0])
  parser.add_argument("--n_items", type=int, default=4606)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args(argv)
  for flag in ("n_items", "batch_size", "steps"):
    if getattr(args, flag) < 1:
      raise UserError(f"--{flag}={getattr(args, flag)}: must be >= 1")
  return args


@cli_main
def main(argv: list[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  compile_cache.enable("")  # compile_s is a real compile, never a load from the cache.
  cfg = sasrec.SASRecConfig(n_items=args.n_items)
  model = sasrec.SASRec(cfg)
  # The stage's own step (`train_sasrec`): batch over every local device, state replicated.
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  sharding.batch_size_per_shard(mesh, args.batch_size)
  params = sasrec.init_params(cfg, jax.random.PRNGKey(0))
  state = jax.device_put(new_state(params, make_optimizer(1e-3, 1e-4)), sharding.replicated(mesh))
  step = jit_train_step(make_train_step(model, 1e-4), state, mesh)
  run = run_inputs(1e-3, 0, mesh)
  rng = np.random.default_rng(0)
  arrays = sharding.global_batch(
    mesh,
    {
      "seq": rng.integers(cfg.n_items, size=(args.batch_size, cfg.max_len)).astype(np.int32),
      "len_seq": np.full((args.batch_size,), cfg.max_len, np.int32),
      "next": rng.integers(cfg.n_items, size=(args.batch_size,)).astype(np.int32),
    },
  )
  batch = (arrays["seq"], arrays["len_seq"], arrays["next"])

  console.info("sasrec_step: compiling the step")
  compiled, times = bench.lower_and_compile(step, state, run, *batch)
  console.info(f"sasrec_step: timing {args.steps} steps")
  state, loss, _ = compiled(state, run, *batch)  # Warm-up, untimed.
  loss.block_until_ready()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, loss, _ = compiled(state, run, *batch)  # The dropout key follows the state's step.
  loss.block_until_ready()
  step_s = (time.perf_counter() - t0) / args.steps
  result = {
    "step_s": step_s,
    "rows_per_s": args.batch_size / step_s,
    "compile_s": times["trace"] + times["xla"],
    "compile_trace_s": times["trace"],
    "compile_xla_s": times["xla"],
    "batch_size": args.batch_size,
    "n_items": args.n_items,
    "device": jax.devices()[0].device_kind,
    "num_devices": jax.device_count(),
  }
  for k, v in result.items():
    print(f"{k:>12}: {v}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
