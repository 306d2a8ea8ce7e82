"""The iLoRA optimizer: three parameter groups, warm-up then cosine, clipping, NaN safety.

Groups (../shared/REFERENCE.md): the projector at `lr`, the router at `0.3 * lr`, the
LoRA adapters at `lr`; Adam with coupled L2 (`weight_decay`) on projector and router
only. The learning rate warms up linearly from `lr / 100` over `total_steps / 20`
steps, then follows a cosine to `lr / 100`. Global-norm clipping (which the original
lacked) is applied across all groups before the split. Updates whose gradients are not
finite are skipped and counted (`optax.apply_if_finite`), never applied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

GROUPS = ("projector", "router", "lora")
ROUTER_LR_SCALE = 0.3


def schedule(
  lr: float, total_steps: int, warmup_fraction: float = 0.05, floor_ratio: float = 0.01
) -> optax.Schedule:
  """Linear warm-up from lr * floor_ratio to lr, then cosine down to lr * floor_ratio."""
  total_steps = max(int(total_steps), 1)
  warmup = int(total_steps * warmup_fraction)
  return optax.warmup_cosine_decay_schedule(
    init_value=lr * floor_ratio,
    peak_value=lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=lr * floor_ratio,
  )


def make(
  labels: Callable[[Any], Any] | Any,
  lr: float,
  total_steps: int,
  weight_decay: float,
  clip_norm: float | None,
  max_bad_steps: int = 1_000_000,
) -> optax.GradientTransformation:
  """Builds the optimizer.

  Args:
    labels: a tree (or a function of the params giving a tree) of group names in GROUPS.
    lr: peak learning rate of projector and LoRA.
    total_steps: optimizer updates in the whole run (sets warm-up and cosine length).
    weight_decay: coupled L2 on projector and router.
    clip_norm: global gradient-norm bound; None or <= 0 disables clipping.
    max_bad_steps: consecutive non-finite updates tolerated by optax (kept large: the
      training loop itself stops a run that keeps producing them).
  """

  def group(scale: float, decay: float) -> optax.GradientTransformation:
    parts = [optax.add_decayed_weights(decay)] if decay else []
    parts.append(optax.adam(schedule(lr * scale, total_steps)))
    return optax.chain(*parts)

  inner = optax.multi_transform(
    {
      "projector": group(1.0, weight_decay),
      "router": group(ROUTER_LR_SCALE, weight_decay),
      "lora": group(1.0, 0.0),
    },
    labels,
  )
  if clip_norm is not None and clip_norm > 0:
    inner = optax.chain(optax.clip_by_global_norm(clip_norm), inner)
  return optax.apply_if_finite(inner, max_bad_steps)


def skipped_updates(opt_state) -> jax.Array:
  """Total number of updates skipped for non-finite gradients so far."""
  return opt_state.total_notfinite


@functools.lru_cache(maxsize=8)
def _jitted_schedule(lr: float, total_steps: int):
  """`schedule` as one program (called eagerly, its few ops would each compile on their own)."""
  return jax.jit(schedule(lr, total_steps))


def learning_rates(lr: float, total_steps: int, step) -> dict[str, Any]:
  """Current learning rate of each group (for logging)."""
  base = _jitted_schedule(float(lr), int(total_steps))(step)
  return {"lr/projector": base, "lr/router": ROUTER_LR_SCALE * base, "lr/lora": base}


def global_norm(tree) -> jax.Array:
  """L2 norm of all leaves together."""
  norm = getattr(getattr(optax, "tree", None), "norm", None)
  return norm(tree) if norm is not None else optax.global_norm(tree)
