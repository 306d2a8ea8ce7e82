"""Device mesh, logical-axis rules and batch placement.

Model code names logical axes only (`batch`, `embed`, `mlp`, ...); the config's
`logical_axis_rules` map them to the mesh axes `data`, `fsdp` and `tensor`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ilora_jax.errors import UserError, counted

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry to fill the devices; checks the product equals `num_devices`."""
  sizes = [int(data), int(fsdp), int(tensor)]
  if sum(s == -1 for s in sizes) > 1:
    raise UserError("config.mesh: at most one of data, fsdp, tensor may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"config.mesh: sizes must be positive or -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise UserError(f"config.mesh {sizes} does not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise UserError(
      f"config.mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
      f"{counted(int(np.prod(sizes)), 'device')}, but "
      f"{num_devices} {'is' if num_devices == 1 else 'are'} available"
    )
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules(config) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """The config's logical-axis rules as the tuple of pairs flax expects."""
  return tuple(
    (name, None if axes is None else tuple(axes) if isinstance(axes, list) else axes)
    for name, axes in config.logical_axis_rules
  )


def batch_size_per_shard(mesh, global_batch: int, field: str = "") -> int:
  """The rows of a `global_batch` each data shard of `mesh` (a Mesh, or its axis sizes by
  name) holds; a UserError naming `field` (the config's setting of it) and the mesh where the
  shards do not divide it."""
  sizes = getattr(mesh, "shape", mesh)  # A Mesh's or AbstractMesh's, or the sizes given.
  shards = sizes["data"] * sizes["fsdp"]
  if global_batch % shards:
    named = f"{field}={global_batch}" if field else f"batch size {global_batch}"
    raise UserError(
      f"{named} is not divisible by the {shards} data shards "
      f"(mesh data={sizes['data']} x fsdp={sizes['fsdp']}): give a multiple of "
      f"{shards}, or config.mesh.data and config.mesh.fsdp that divide it"
    )
  return global_batch // shards


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


_COMPILE_TARGET: list[str] = []  # Set by `compiling_for`, innermost last.


def backend() -> str:
  """The platform programs are traced for: JAX's default backend, unless a tool compiling for
  another platform (bench/gpu_plan.py: a GPU, on a machine without one) says otherwise with
  `compiling_for`. Trace-time choices between platforms' code paths read this."""
  return _COMPILE_TARGET[-1] if _COMPILE_TARGET else jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
  """Programs traced inside take `platform`'s code paths (`backend()`)."""
  _COMPILE_TARGET.append(platform)
  try:
    yield
  finally:
    _COMPILE_TARGET.pop()


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_shardings(mesh: Mesh, logical_specs, rule_pairs):
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rule_pairs)


def global_batch(mesh: Mesh, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Builds global arrays sharded over (data, fsdp) from this process's slice of the batch.

  `host_batch` holds only this process's rows (global batch / process count).
  """
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in host_batch.items()
  }


def host_slice(global_rows: int) -> slice:
  """Rows of a global batch this process feeds."""
  n, i = jax.process_count(), jax.process_index()
  if global_rows % n:
    raise UserError(f"batch size {global_rows} is not divisible by {n} processes")
  per = global_rows // n
  return slice(i * per, (i + 1) * per)


def replicated_rows(mesh: Mesh, x: np.ndarray) -> jax.Array:
  """A host array every process holds whole (e.g. an evaluation batch) as a global array with
  its rows split over (data, fsdp); each process places only the rows of its own devices."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])


def to_host(x) -> np.ndarray:
  """A result as one numpy array on every process, gathered from the other processes' devices
  when they hold part of it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
