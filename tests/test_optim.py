"""The iLoRA optimizer against hand-written formulas."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  # Zero gradients: only the coupled L2 moves the router; Adam's first step normalises
  # g = wd * p to a step of size lr_t (sign of g). LoRA (no decay) stays put, and so does the
  # projector, whose all-zero gradients mean a step without hybrid prompts (`unless_no_gradient`).
  lr0 = _expected_lr(1e-2, 100, 0)
  np.testing.assert_allclose(updates["projector"]["w"], 0.0)
  np.testing.assert_allclose(updates["router"]["w"], -0.3 * lr0, rtol=1e-4)
  np.testing.assert_allclose(updates["lora"]["w"], 0.0)
  grads["projector"]["w"] = jnp.asarray([0.0, 2.0, 0.0])  # Some gradient: decayed, as before.
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["projector"]["w"], -lr0, rtol=1e-4)


def _global_norm(grads: dict) -> float:
  return math.sqrt(sum(float(np.sum(g**2)) for g in grads.values()))


@pytest.mark.parametrize("clip_norm", [1.0, 0.0, None])
def test_two_clipped_adam_steps_match_numpy(clip_norm):
  """optim.make's updates against Adam in numpy on gradients clipped by their global norm (over
  all groups at once): a first gradient of norm 30, then one of norm 0.1. Adam's first step is
  the same with or without clipping; the second shows it (its moments hold the first). A
  clip_norm of 0 or None is no clipping (configs/base.py: "0 = off"), not a clip to zero."""
  rng = np.random.default_rng(3)
  params = _params()
  grads = []
  for norm in (30.0, 0.1):
    g = {k: rng.standard_normal(3) for k in params}
    grads.append({k: v * norm / _global_norm(g) for k, v in g.items()})
  tx = optim.make(_labels, lr=1e-2, total_steps=100, weight_decay=0.0, clip_norm=clip_norm)
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
    scale = min(1.0, clip_norm / _global_norm(g)) if clip_norm else 1.0
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


def test_adam_epsilon_is_the_originals_1e_8():
  """torch.optim.Adam's eps (the original's optimizer, REFERENCE.md): 1e-8 added to sqrt(v_hat).
  On a first step with gradients of 1e-6 (LoRA: no decay) the update is
  -lr0 * 1e-6 / (1e-6 + 1e-8) = -lr0 / 1.01, by hand; an eps of 1e-6 would halve it."""
  params = _params()
  tx = optim.make(_labels, lr=1e-2, total_steps=100, weight_decay=0.0, clip_norm=None)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-6), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr0 = 1e-2 / 100  # Step 0: the warm-up's start.
  np.testing.assert_allclose(updates["lora"]["w"], -lr0 / 1.01, rtol=1e-4)
  np.testing.assert_allclose(updates["router"]["w"], -0.3 * lr0 / 1.01, rtol=1e-4)


def test_many_non_finite_updates_in_a_row_are_all_skipped():
  """make's docstring: optax's limit on consecutive non-finite updates is kept large (the
  training loop stops such runs itself): the fifth NaN gradient in a row is still skipped."""
  params = _params()
  tx = optim.make(_labels, lr=1e-2, total_steps=100, weight_decay=0.5, clip_norm=1.0)
  state = tx.init(params)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  for n in range(1, 6):
    updates, state = tx.update(bad, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates)), n
    assert int(optim.skipped_updates(state)) == n


def test_global_norm_is_the_l2_norm_over_all_leaves():
  tree = {"a": jnp.array([3.0]), "b": {"c": jnp.array([[4.0, 12.0]])}}
  assert math.isclose(float(optim.global_norm(tree)), 13.0, rel_tol=1e-6)  # sqrt(9 + 16 + 144)


def test_a_warm_up_as_long_as_the_run_ends_at_the_peak_then_the_floor():
  """schedule with a warm-up given explicitly and not shorter than the run (its docstring: the
  values of optax.warmup_cosine_decay_schedule, whose decay ends at max(total, warmup + 1)):
  by hand, 10 warm-up steps of a 10-step run rise from lr/100 to lr at step 10 and the cosine,
  one step long, reaches lr/100 at step 11 - no division by zero."""
  lr = 1e-3
  sched = optim.schedule(lr, 10, warmup=10)
  for step, want in ((0, lr / 100), (5, lr / 100 + (lr - lr / 100) / 2), (10, lr), (11, lr / 100)):
    assert math.isclose(float(sched(step)), want, rel_tol=1e-5), step
  assert math.isclose(float(sched(30)), lr / 100, rel_tol=1e-5)


def test_logged_rates_of_each_group():
  """learning_rates: projector and LoRA at the schedule's rate, the router at 0.3 of it (by
  hand, 400 steps of lr 1e-3: warm-up of 20, so step 10 is halfway up from 1e-5 to 1e-3)."""
  got = optim.learning_rates(1e-3, 400, 10)
  want = 1e-5 + (1e-3 - 1e-5) * 10 / 20
  for group, scale in (("projector", 1.0), ("lora", 1.0), ("router", 0.3)):
    assert math.isclose(float(got[f"lr/{group}"]), scale * want, rel_tol=1e-5), group


def test_the_papers_small_decay_still_moves_the_router():
  """REFERENCE.md's coupled L2 of 1e-5: with zero gradients Adam's first step normalises
  g = 1e-5 * p (p = 1) to -lr0 * 1e-5 / (1e-5 + 1e-8) = -lr0 / 1.001, by hand; LoRA stays,
  and the projector without a gradient (a step of text-only prompts) too."""
  params = _params()
  tx = optim.make(_labels, lr=7e-4, total_steps=100, weight_decay=1e-5, clip_norm=1.0)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr0 = 7e-4 / 100
  np.testing.assert_allclose(updates["projector"]["w"], 0.0)
  np.testing.assert_allclose(updates["router"]["w"], -0.3 * lr0 / 1.001, rtol=1e-4)
  np.testing.assert_allclose(updates["lora"]["w"], 0.0)


def test_steps_without_a_projector_gradient_leave_it_as_torchs_adam_leaves_a_gradless_one():
  """The original turns the projector's gradients off for text-only batches; torch's Adam
  skips a parameter without a gradient: no decay, no moment update, its step count kept
  (bias correction per parameter), while the learning-rate schedule follows the run. Here
  the projector gets no gradient on steps 0 and 1, then g on step 2: its update is Adam's
  first (t = 1) at step 2's learning rate, with L2 (numpy, by hand); the count of its
  moments is 1 after it. Before, the L2 alone moved it on steps 0 and 1 and its moments
  carried that on."""
  params = _params()
  wd, lr, total = 0.5, 1e-2, 100
  tx = optim.make(_labels, lr=lr, total_steps=total, weight_decay=wd, clip_norm=None)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    updates, state = tx.update(dict(zero, router=params["router"]), state, params)
    assert not np.any(np.asarray(updates["projector"]["w"]))
  g = np.asarray([0.3, -0.2, 0.05], np.float32)
  updates, state = tx.update(dict(zero, projector={"w": jnp.asarray(g)}), state, params)
  c = g + wd * np.asarray(params["projector"]["w"])  # Coupled L2.
  m, v = 0.1 * c, 0.001 * c**2
  want = -_expected_lr(lr, total, 2) * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
  np.testing.assert_allclose(updates["projector"]["w"], want, rtol=1e-4)
  projector_adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
                    if hasattr(s, "mu") and jax.tree.leaves(s.mu["projector"])]  # fmt: skip
  assert [int(s.count) for s in projector_adam] == [1]


def test_schedule_floor_ratio_sets_the_start_and_the_end():
  """A floor of lr / 10 instead of the default lr / 100 (by hand, 400 steps, warm-up 20)."""
  sched = optim.schedule(1e-3, 400, floor_ratio=0.1)
  for step, want in ((0, 1e-4), (10, 1e-4 + (1e-3 - 1e-4) / 2), (20, 1e-3), (400, 1e-4)):
    assert math.isclose(float(sched(step)), want, rel_tol=1e-5), step
