"""The iLoRA optimizer: three parameter groups, warm-up then cosine, clipping, NaN safety.

Groups (../shared/REFERENCE.md): the projector at `lr`, the router at `0.3 * lr`, the
LoRA adapters at `lr`; Adam with coupled L2 (`weight_decay`) on projector and router
only. An update whose projector gradients are all zero (no hybrid prompt in the step: the
projector computed nothing) leaves the projector and its Adam moments as they were, as the
original's does (it turns the projector's gradients off for text-only batches, and torch's
Adam skips a parameter without one); the coupled L2 alone moved it by about the learning
rate per step, Adam normalising `weight_decay * p`. The learning rate warms up linearly
from `lr / 100` over `total_steps / 20`
steps, then follows a cosine to `lr / 100`. Global-norm clipping (which the original
lacked) is applied across all groups before the split. Updates whose gradients are not
finite are skipped and counted (`optax.apply_if_finite`), never applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

GROUPS = ("projector", "router", "lora")
ROUTER_LR_SCALE = 0.3
WARMUP_FRACTION = 0.05  # Of the run's updates (REFERENCE.md: total / 20).
FLOOR_RATIO = 0.01  # Warm-up starts and the cosine ends at lr / 100.


def warmup_steps(total_steps: int, warmup_fraction: float = WARMUP_FRACTION) -> int:
  """Warm-up length of a run of `total_steps` updates (host integers, as the original)."""
  return int(max(int(total_steps), 1) * warmup_fraction)


def schedule(
  lr, total_steps, warmup: Any = None, floor_ratio: float = FLOOR_RATIO
) -> optax.Schedule:
  """Linear warm-up from lr * floor_ratio to lr over `warmup` steps (default
  `warmup_steps(total_steps)`), then a cosine down to lr * floor_ratio at `total_steps`.

  The values of `optax.warmup_cosine_decay_schedule` (a test compares them), written with
  array operations so that `lr`, `total_steps` and `warmup` may be traced: the train step
  takes them as inputs (`train_ilora.run_inputs`) instead of constants, so runs that differ
  only in them (seeds, learning rates, lengths of a sweep) share one compiled step.
  """
  if warmup is None:
    total_steps = max(int(total_steps), 1)
    warmup = warmup_steps(total_steps)

  def value(count):
    count = jnp.asarray(count, jnp.float32)
    peak = jnp.asarray(lr, jnp.float32)
    low = peak * floor_ratio
    warm = jnp.asarray(warmup, jnp.float32)
    total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), warm + 1)
    rising = low + (peak - low) * count / jnp.maximum(warm, 1)
    progress = jnp.clip(count - warm, 0, total - warm) / (total - warm)
    falling = low + (peak - low) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warm, rising, falling)

  return value


def make(
  labels: Callable[[Any], Any] | Any,
  lr: float,
  total_steps: int,
  weight_decay: float,
  clip_norm: float | None,
  max_bad_steps: int = 1_000_000,
  warmup: Any = None,
) -> optax.GradientTransformation:
  """Builds the optimizer.

  Args:
    labels: a tree (or a function of the params giving a tree) of group names in GROUPS.
    lr: peak learning rate of projector and LoRA (a number or a traced scalar).
    total_steps: optimizer updates in the whole run (sets warm-up and cosine length; a
      number, or a traced scalar with `warmup` given).
    weight_decay: coupled L2 on projector and router.
    clip_norm: global gradient-norm bound; None or <= 0 disables clipping.
    max_bad_steps: consecutive non-finite updates tolerated by optax (kept large: the
      training loop itself stops a run that keeps producing them).
    warmup: warm-up steps (default `warmup_steps(total_steps)`).
  """

  def group(scale: float, decay: float) -> optax.GradientTransformation:
    parts = [optax.add_decayed_weights(decay)] if decay else []
    parts.append(optax.adam(schedule(lr * scale, total_steps, warmup)))
    return optax.chain(*parts)

  inner = optax.multi_transform(
    {
      "projector": unless_no_gradient(group(1.0, weight_decay)),
      "router": group(ROUTER_LR_SCALE, weight_decay),
      "lora": group(1.0, 0.0),
    },
    labels,
  )
  if clip_norm is not None and clip_norm > 0:
    inner = optax.chain(optax.clip_by_global_norm(clip_norm), inner)
  return optax.apply_if_finite(inner, max_bad_steps)


def unless_no_gradient(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, except on an update whose gradients are all exactly zero: then zero updates,
  and `inner`'s state as it was (Adam's moments and step count), but for its learning-rate
  schedule's step count, which follows the run's steps. The state's structure is `inner`'s
  (checkpoints of either restore into the other)."""

  def update(updates, state, params=None):
    moved = jnp.any(jnp.stack([jnp.any(u != 0) for u in jax.tree.leaves(updates)] or [False]))
    new_updates, new_state = inner.update(updates, state, params)

    def keep(new, old):
      if isinstance(new, optax.ScaleByScheduleState):
        return new
      return jax.tree.map(lambda n, o: jnp.where(moved, n, o), new, old)

    scheduled = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    new_state = jax.tree.map(keep, new_state, state, is_leaf=scheduled)
    return jax.tree.map(lambda u: jnp.where(moved, u, jnp.zeros_like(u)), new_updates), new_state

  return optax.GradientTransformation(inner.init, update)


def skipped_updates(opt_state) -> jax.Array:
  """Total number of updates skipped for non-finite gradients so far."""
  return opt_state.total_notfinite


def for_run(labels, weight_decay: float, clip_norm: float | None) -> Callable[[Any], Any]:
  """run -> `make(...)` with the run's learning rate, length and warm-up taken from the
  mapping `run` (keys of `run_values`; numbers, or arrays traced inside the train step)."""

  def build(run) -> optax.GradientTransformation:
    return make(labels, run["lr"], run["total_steps"], weight_decay, clip_norm,
                warmup=run["warmup_steps"])  # fmt: skip

  return build


def run_values(lr: float, total_steps: int) -> dict[str, Any]:
  """The schedule's inputs of a run as numpy scalars (`for_run`, `train_ilora.run_inputs`)."""
  total = max(int(total_steps), 1)
  return {
    "lr": np.float32(lr),
    "total_steps": np.int32(total),
    "warmup_steps": np.int32(warmup_steps(total)),
  }


@jax.jit
def _schedule_at(lr, total_steps, warmup, step):
  """`schedule` as one program for every run (its inputs are arguments, not constants)."""
  return schedule(lr, total_steps, warmup)(step)


def learning_rates(lr: float, total_steps: int, step) -> dict[str, Any]:
  """Current learning rate of each group (for logging)."""
  run = run_values(lr, total_steps)
  base = _schedule_at(run["lr"], run["total_steps"], run["warmup_steps"], step)
  return {"lr/projector": base, "lr/router": ROUTER_LR_SCALE * base, "lr/lora": base}


def global_norm(tree) -> jax.Array:
  """L2 norm of all leaves together."""
  norm = getattr(getattr(optax, "tree", None), "norm", None)
  return norm(tree) if norm is not None else optax.global_norm(tree)
