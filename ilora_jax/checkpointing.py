"""Orbax checkpoints of a stage: array state plus a JSON record of where the run stood.

Layout: `<workdir>/checkpoints/<stage>/<step>/{state,meta}`. `state` is a pytree of
arrays restored against an abstract, sharded target so it lands directly in its
layout; `meta` holds the host-side position (metrics written, pending loss sums)
and the settings that must match for a resume to be valid.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ilora_jax.errors import UserError


class StageCheckpoints:
  """Saves and restores one stage's training state."""

  def __init__(self, workdir: str, stage: str, max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints", stage))
    self.stage = stage
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as exc:
      raise UserError(f"cannot create checkpoint folder {self.directory}: {exc}") from None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
      )
    except OSError as exc:
      raise UserError(f"cannot write checkpoint {step} to {self.directory}: {exc}") from None

  def restore_meta(self, step: int) -> dict:
    """Only the JSON record of `step` (cheap; read before the arrays to compare settings)."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError, OSError) as exc:
      raise UserError(f"checkpoint {step} in {self.directory} is unreadable ({exc})") from None
    return dict(restored["meta"])

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
      )
    except (ValueError, KeyError, TypeError) as exc:
      raise UserError(
        f"checkpoint {step} in {self.directory} does not match this model "
        f"({type(exc).__name__}: {str(exc)[:300]})"
      ) from None
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def check_same_settings(saved: dict, current: dict, directory: str) -> None:
  """Raises a UserError naming every setting that differs between a checkpoint and the config."""
  diffs = [
    f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
    for k in sorted(set(saved) | set(current))
    if saved.get(k) != current.get(k)
  ]
  if diffs:
    raise UserError(
      f"the checkpoint in {directory} was made with other settings ("
      + "; ".join(diffs)
      + "); use another --workdir or restore the settings"
    )


def jsonable(value: Any) -> Any:
  """Round-trips through JSON so saved and current settings compare equal."""
  return json.loads(json.dumps(value))
