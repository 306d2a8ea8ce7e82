"""Times the jitted SASRec train step (the foundation stage) on the local devices.

python bench/sasrec_step.py --n_items=4606 --batch_size=256 --steps=200

Prints a table and, as its last line, one JSON object with step_s, rows_per_s and compile_s.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilora_jax import sasrec
from ilora_jax.train_sasrec import make_optimizer


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--n_items", type=int, default=4606)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  cfg = sasrec.SASRecConfig(n_items=args.n_items)
  model = sasrec.SASRec(cfg)
  params = sasrec.init_params(cfg, jax.random.PRNGKey(0))
  opt = make_optimizer(1e-3, 1e-4)
  state = (params, opt.init(params))
  rng = np.random.default_rng(0)
  seq = jnp.asarray(rng.integers(cfg.n_items, size=(args.batch_size, cfg.max_len)), jnp.int32)
  lens = jnp.full((args.batch_size,), cfg.max_len, jnp.int32)
  nxt = jnp.asarray(rng.integers(cfg.n_items, size=(args.batch_size,)), jnp.int32)

  @jax.jit
  def step(state, key):
    params, opt_state = state

    def loss_fn(p):
      logits = model.apply({"params": p}, seq, lens, deterministic=False, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, nxt).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  t0 = time.perf_counter()
  state, loss = step(state, jax.random.PRNGKey(0))
  loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(args.steps):
    state, loss = step(state, jax.random.PRNGKey(i))
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
