"""Multi-process start-up: `jax.distributed.initialize` from `config.distributed`.

Every host runs the same command; JAX's coordinator service connects them. On Cloud TPU,
Slurm and Open MPI JAX finds the coordinator, process count and id itself
(`--config.distributed.auto=True`); elsewhere (a GPU cluster, or several processes on one
machine) they are given explicitly:

  --config.distributed.coordinator=host0:1234 --config.distributed.num_processes=2 \
      --config.distributed.process_id=$RANK

After start-up only process 0 logs, draws progress bars and writes metrics and reports; every
process feeds its own rows of each global batch and Orbax writes checkpoints collectively.
Must run before anything touches a JAX device.
"""

from __future__ import annotations

from ilora_jax.errors import UserError


def wanted(config) -> bool:
  dc = config.distributed
  return bool(dc.auto or dc.coordinator)


def initialize(config) -> None:
  """Joins the cluster named by `config.distributed` (no-op for a single process)."""
  if not wanted(config):
    return
  import jax

  dc = config.distributed
  kwargs = {}
  if dc.coordinator:
    if dc.num_processes < 1 or not 0 <= dc.process_id < dc.num_processes:
      raise UserError(
        "config.distributed: with a coordinator, num_processes must be >= 1 and process_id in "
        f"[0, num_processes); got num_processes={dc.num_processes}, process_id={dc.process_id}"
      )
    kwargs = dict(coordinator_address=dc.coordinator, num_processes=int(dc.num_processes),
                  process_id=int(dc.process_id))  # fmt: skip
  if dc.cpu_collectives:  # CPU devices talk over Gloo (tests, CPU-only clusters).
    jax.config.update("jax_cpu_collectives_implementation", dc.cpu_collectives)
  try:
    jax.distributed.initialize(initialization_timeout=int(dc.timeout_s), **kwargs)
  except (RuntimeError, ValueError) as exc:
    where = dc.coordinator or "the environment (TPU, Slurm or Open MPI)"
    raise UserError(f"cannot join the cluster via {where}: {str(exc).splitlines()[0]}") from None
