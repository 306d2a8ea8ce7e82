"""The iLoRA optimizer against hand-written formulas."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ilora_jax import optim


def _expected_lr(lr, total, step):
  """REFERENCE.md: warm-up for total/20 steps linear from lr/100, then cosine to lr/100 (the
  original's warm-up length is the integer max_steps // 20: 20 steps or fewer have none)."""
  warmup = total // 20
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


def test_warmup_length_is_the_originals_integer_division_at_any_total():
  """warmup_steps and the schedule's values around the end of the warm-up against the
  original's max_steps // 20 at totals that are not multiples of 20 (the schedule tests
  above use 400 and 100 only, where rounding up or down agree: a warm-up rounded up, one step
  longer, went unnoticed)."""
  for total in range(1, 2001):
    assert optim.warmup_steps(total) == total // 20, total
  for lr, total in ((1e-3, 6), (3e-4, 19), (2e-4, 21), (5e-4, 39), (7e-4, 41), (5e-4, 1547)):
    warm = total // 20  # 0, 0, 1, 1, 2, 77
    assert optim.run_values(lr, total)["warmup_steps"] == warm
    sched = optim.schedule(lr, total)
    for step in sorted({0, 1, *range(max(warm - 2, 0), warm + 3), total - 1, total}):
      want = _expected_lr(lr, total, step)
      close = {"rel_tol": 1e-5, "abs_tol": 1e-6 * lr}
      assert math.isclose(float(sched(step)), want, **close), (total, step)
      got = float(optim.learning_rates(lr, total, step)["lr/lora"])
      assert math.isclose(got, want, **close), (total, step)


def test_schedule_equals_optax_and_takes_traced_inputs():
  """The array form (lr, length and warm-up may be traced) against the library's schedule,
  and one compiled program for runs of different learning rates and lengths."""
  import optax

  for lr, total in ((7e-4, 400), (1e-3, 6), (3e-4, 19), (2e-4, 21), (1e-2, 1), (5e-4, 1547)):
    warm = optim.warmup_steps(total)
    lib = optax.warmup_cosine_decay_schedule(lr / 100, lr, warm, max(total, warm + 1), lr / 100)
    traced = jax.jit(lambda lr, t, w, c: optim.schedule(lr, t, w)(c))
    for step in sorted({0, 1, warm - 1, warm, warm + 1, total // 2, total - 1, total, total + 5}):
      if step < 0:
        continue
      # optax interpolates as (init - end) * frac + end: float32 cancellation near the ends,
      # so the comparison is to a millionth of the peak.
      want, close = float(lib(step)), {"rel_tol": 1e-6, "abs_tol": 1e-6 * lr}
      assert math.isclose(float(optim.schedule(lr, total)(step)), want, **close), (total, step)
      run = optim.run_values(lr, total)
      got = float(traced(run["lr"], run["total_steps"], run["warmup_steps"], step))
      assert math.isclose(got, want, **close), (lr, total, step)
  # The optimizer built from traced run inputs updates as the one built from numbers.
  params = _params()
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  make = optim.for_run(_labels, weight_decay=0.5, clip_norm=1.0)
  counted = chex.assert_max_traces(n=1)(lambda run, state: make(run).update(grads, state, params))
  update = jax.jit(counted)
  for lr, total in ((1e-2, 100), (3e-3, 40)):  # A second run: the same program.
    ref = optim.make(_labels, lr=lr, total_steps=total, weight_decay=0.5, clip_norm=1.0)
    state = ref.init(params)
    for _ in range(3):
      want, state_ref = ref.update(grads, state, params)
      got, state_got = update(optim.run_values(lr, total), state)
      chex.assert_trees_all_close(got, want, rtol=1e-6)
      chex.assert_trees_all_close(state_got, state_ref, rtol=1e-6)
      state = state_ref


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


def _global_norm(grads: dict) -> float:
  return math.sqrt(sum(float(np.sum(g**2)) for g in grads.values()))


def test_two_clipped_adam_steps_match_numpy():
  """optim.make's updates against Adam in numpy on gradients clipped by their global norm (over
  all groups at once): a first gradient of norm 30, then one of norm 0.1. Adam's first step is
  the same with or without clipping; the second shows it (its moments hold the first)."""
  rng = np.random.default_rng(3)
  params = _params()
  grads = []
  for norm in (30.0, 0.1):
    g = {k: rng.standard_normal(3) for k in params}
    grads.append({k: v * norm / _global_norm(g) for k, v in g.items()})
  tx = optim.make(_labels, lr=1e-2, total_steps=100, weight_decay=0.0, clip_norm=1.0)
  state = tx.init(params)
  got = []
  for g in grads:
    tree = {k: {"w": jnp.asarray(v, jnp.float32)} for k, v in g.items()}
    updates, state = tx.update(tree, state, params)
    got.append({k: np.asarray(u["w"]) for k, u in updates.items()})
  m = {k: np.zeros(3) for k in params}
  v = {k: np.zeros(3) for k in params}
  b1, b2, eps = 0.9, 0.999, 1e-8
  for t, g in enumerate(grads):
    scale = min(1.0, 1.0 / _global_norm(g))
    for k in params:
      c = g[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * c
      v[k] = b2 * v[k] + (1 - b2) * c**2
      mhat, vhat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
      lr = _expected_lr(1e-2, 100, t) * (optim.ROUTER_LR_SCALE if k == "router" else 1.0)
      want = -lr * mhat / (np.sqrt(vhat) + eps)
      np.testing.assert_allclose(got[t][k], want, rtol=1e-4, atol=1e-9, err_msg=f"{k} {t}")


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
