"""Times the jitted SASRec train step (the foundation stage) on the local devices.

python bench/sasrec_step.py --n_items=4606 --batch_size=256 --steps=200

Prints a table and, as its last line, one JSON object with step_s, rows_per_s and compile_s.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import ml_collections
import numpy as np

from ilora_jax import sasrec, sharding
from ilora_jax.train_sasrec import (
  jit_train_step,
  make_optimizer,
  make_train_step,
  new_state,
  run_inputs,
)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--n_items", type=int, default=4606)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
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

  t0 = time.perf_counter()
  state, loss, _ = step(state, run, *batch)
  loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, loss, _ = step(state, run, *batch)  # The dropout key follows the state's step.
  loss.block_until_ready()
  step_s = (time.perf_counter() - t0) / args.steps
  result = {
    "step_s": step_s,
    "rows_per_s": args.batch_size / step_s,
    "compile_s": compile_s,
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
