"""The iLoRA optimizer against hand-written formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilora_jax import optim


def _expected_lr(lr, total, step):
  """REFERENCE.md: warm-up for total/20 steps linear from lr/100, then cosine to lr/100."""
  warmup = int(total * 0.05)
  lo = lr / 100
  if step < warmup:
    return lo + (lr - lo) * step / warmup
  progress = (step - warmup) / (total - warmup)
  return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def test_schedule_matches_the_formula():
  sched = optim.schedule(7e-4, 400)
  for step in (0, 5, 19, 20, 21, 100, 250, 399, 400):
    assert math.isclose(
      float(sched(step)), _expected_lr(7e-4, 400, step), rel_tol=1e-5, abs_tol=1e-12
    ), step


def _params():
  return {
    "projector": {"w": jnp.ones((3,))},
    "router": {"w": jnp.ones((3,))},
    "lora": {"w": jnp.ones((3,))},
  }


def _labels(params):
  return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}


def test_groups_get_their_learning_rates_and_decay():
  params = _params()
  tx = optim.make(_labels, lr=1e-2, total_steps=100, weight_decay=0.5, clip_norm=None)
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, state, params)
  # Zero gradients: only the coupled L2 moves projector and router; Adam's first step
  # normalises g = wd * p to a step of size lr_t (sign of g), LoRA (no decay) stays put.
  lr0 = _expected_lr(1e-2, 100, 0)
  np.testing.assert_allclose(updates["projector"]["w"], -lr0, rtol=1e-4)
  np.testing.assert_allclose(updates["router"]["w"], -0.3 * lr0, rtol=1e-4)
  np.testing.assert_allclose(updates["lora"]["w"], 0.0)


def test_clipping_bounds_the_global_norm():
  params = _params()
  tx = optax.chain(optax.clip_by_global_norm(1.0))
  grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p), params)
  clipped, _ = tx.update(grads, tx.init(params))
  assert math.isclose(float(optax.tree.norm(clipped)), 1.0, rel_tol=1e-5)
  full = optim.make(_labels, lr=1e-2, total_steps=100, weight_decay=0.0, clip_norm=1.0)
  updates, _ = full.update(grads, full.init(params), params)
  assert np.all(np.isfinite(jax.tree.leaves(updates)[0]))


def test_non_finite_gradients_are_skipped_and_counted():
  params = _params()
  tx = optim.make(_labels, lr=1e-2, total_steps=100, weight_decay=0.0, clip_norm=1.0)
  state = tx.init(params)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  updates, state = tx.update(bad, state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert int(optim.skipped_updates(state)) == 1
  good = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(good, state, params)
  assert int(optim.skipped_updates(state)) == 1
  assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(updates))
