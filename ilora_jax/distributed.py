r"""Multi-process start-up: `jax.distributed.initialize` from `config.distributed`.

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

import contextlib
import errno
import os
import sys
import threading
from collections.abc import Callable

from ilora_jax.errors import EXIT_USER_ERROR, UserError

JOINED = False  # Whether this process joined a multi-process run (`errors` reads it).


def wanted(config) -> bool:
  dc = config.distributed
  return bool(dc.auto or dc.coordinator)


def initialize(config) -> None:
  """Joins the cluster named by `config.distributed` (no-op for a single process)."""
  if not wanted(config):
    return
  from ilora_jax.configuration import validate_distributed

  dc = config.distributed
  validate_distributed(dc)
  import jax

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
  if dc.coordinator and dc.process_id != 0:
    _wait_for_coordinator(dc.coordinator, float(dc.timeout_s))
  elif dc.coordinator:
    _check_port_free(dc.coordinator)
  # JAX's preemption notifier (which this package does not use: `interrupts` stops a run on
  # a signal) would catch SIGTERM everywhere outside the training loop, so that `kill` or a
  # scheduler's timeout could not end a process that waits on another.
  jax.config.update("jax_enable_preemption_service", False)
  where = dc.coordinator or "the environment (TPU, Slurm or Open MPI)"
  # JAX ends the process with a native stack dump when the cluster is not complete within its
  # timeout (process 0 waiting for the others, say); a watchdog ends it first with one line.
  watchdog = threading.Timer(float(dc.timeout_s), _not_joined, (where, dc))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
      initialization_timeout=int(dc.timeout_s) + _JAX_TIMEOUT_MARGIN_S, **kwargs
    )
  except (RuntimeError, ValueError) as exc:
    elsewhere = "distributed.coordinator, num_processes and process_id instead of distributed.auto"
    hint = "" if dc.coordinator else f"; elsewhere give {elsewhere}"
    raise UserError(
      f"cannot join the cluster via {where}: {str(exc).splitlines()[0]}{hint}"
    ) from None
  finally:
    watchdog.cancel()
  global JOINED
  JOINED = True


_JAX_TIMEOUT_MARGIN_S = 30  # JAX's own timeout is this much later than the watchdog's.


def check_same_config(config, workdir: str) -> None:
  """A UserError in every process of a multi-process run whose processes were started with
  different configs (but for `distributed.process_id`) or `--workdir`s: they would deadlock
  at the first collective that differs (another checkpoint interval, checkpoints written to
  two folders), fail in one (another learning rate), or train on a mix of data sets (another
  data seed). A digest of each part of each process's config (`_PARTS`, the rest, and the
  workdir as given) is gathered and compared with process 0's; the error names the parts."""
  import hashlib
  import json

  from ilora_jax.configuration import json_form

  own = json_form(config)
  own["distributed"].pop("process_id", None)
  parts = {name: own.pop(name, None) for name in _PARTS}
  parts["other settings"], parts["--workdir"] = own, workdir

  def digest() -> bytes:
    return b"".join(
      hashlib.sha256(json.dumps(part, sort_keys=True).encode()).digest()[:8]
      for part in parts.values()
    )

  rows = _gathered(digest)
  changed = (rows != rows[:1]).reshape(len(rows), -1, 2).any(axis=2)  # [process, part]
  others = [i for i, row in enumerate(changed) if row.any()]
  if others:
    differ = [name for name, c in zip(parts, changed.any(axis=0), strict=True) if c]
    raise UserError(
      f"process(es) {', '.join(map(str, others))} were started with another config or "
      f"--workdir than process 0's (other {', '.join(differ)}): start every process with the "
      "same command (only --config.distributed.process_id differs)"
    )


# The config's top-level fields, each digested apart so that a mismatch names where it is.
_PARTS = ("stage", "data", "sasrec", "llm", "lora", "router", "ilora", "train", "mesh",
          "logical_axis_rules", "distributed", "checkpoint", "eval", "report", "bench", "plan",
          "progress", "compile_cache_dir")  # fmt: skip


def check_shared_workdir(workdir: str) -> None:
  """A UserError in every process of a multi-process run whose processes do not share
  `workdir` (a relative path started in other folders, a node-local scratch disk): Orbax
  writes each checkpoint into one folder from every process, so the first save waited out
  its barrier (10 minutes) and then failed with no reason given (the launch audit). Process 0
  writes a file of a random name there and every process looks for it (for a few seconds: a
  network file system may show it late). Where process 0 cannot write it, nothing is said:
  the run's own writes say what is wrong with the folder."""
  import jax

  if jax.process_count() == 1:
    return
  import numpy as np
  from jax.experimental import multihost_utils

  mine = None
  token = np.zeros(2, np.uint32)
  if jax.process_index() == 0:
    drawn = np.frombuffer(os.urandom(8), np.uint32) | np.uint32(1)  # Never all zero.
    mine = os.path.join(workdir, f".shared-{drawn.tobytes().hex()}")
    try:
      with open(mine, "x"):
        token = drawn
    except OSError:
      mine = None
  token = np.asarray(multihost_utils.broadcast_one_to_all(token))  # After the write.
  seen = not token.any() or _appears(os.path.join(workdir, f".shared-{token.tobytes().hex()}"))
  seen_by = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
  if mine is not None:
    with contextlib.suppress(OSError):
      os.remove(mine)
  blind = [i for i, ok in enumerate(seen_by) if not ok]
  if blind:
    raise UserError(
      f"--workdir={workdir} is not one folder that every process shares: process(es) "
      f"{', '.join(map(str, blind))} do not see the file process 0 wrote there; give every "
      "process a --workdir on a file system all hosts mount at the same path (every process "
      "writes its part of each checkpoint there; a relative path is taken from each "
      "process's own folder)"
    )


def _appears(path: str, within_s: float = 5.0) -> bool:
  import time

  deadline = time.monotonic() + within_s
  while not os.path.exists(path):
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.1)
  return True


def check_same_data(digest: Callable[[], bytes], directory: str) -> None:
  """A UserError in every process of a multi-process run whose processes read different data
  (`digest()` of what each loaded): each feeds its rows of every global batch from its own
  copy, so copies that differ (a host's stale or other files under the same path) would train
  and evaluate on a mix in silence."""
  others = _differing(digest)
  if others:
    raise UserError(
      f"process(es) {', '.join(map(str, others))} read other data than process 0's from "
      f"{directory}: give every host the same files"
    )


def _differing(digest: Callable[[], bytes]) -> list[int]:
  """The processes whose `digest()` (its first 8 bytes) differs from process 0's, gathered
  from every process; none in a single-process run, which computes no digest."""
  rows = _gathered(lambda: digest()[:8])
  return [i for i, row in enumerate(rows) if (row != rows[0]).any()]


def _gathered(digest: Callable[[], bytes]):
  """Every process's `digest()` (a multiple of 4 bytes, the same length in each), one row a
  process as uint32 words; one empty row in a single-process run, which computes none."""
  import jax
  import numpy as np

  if jax.process_count() == 1:
    return np.zeros((1, 0), np.uint32)
  from jax.experimental import multihost_utils

  words = np.frombuffer(digest(), np.uint32)
  return np.asarray(multihost_utils.process_allgather(words)).reshape(-1, words.size)


def _not_joined(where: str, dc) -> None:
  """The watchdog's end of a cluster that did not form in time: one line, exit 2."""
  start = "start every host's process"
  if dc.coordinator:
    start = (f"start all {dc.num_processes} processes with the same settings (process_id 0 "
             f"to {dc.num_processes - 1})")  # fmt: skip
  print(
    f"error: the cluster via {where} did not form within config.distributed.timeout_s="
    f"{float(dc.timeout_s):g} s: {start} or raise the timeout",
    file=sys.stderr,
    flush=True,
  )
  os._exit(EXIT_USER_ERROR)


def _check_port_free(address: str) -> None:
  """A UserError unless this host (process 0's) can serve the coordinator on `address`'s
  port: one that another program holds ended process 0 with a segmentation fault (gRPC's
  failed bind) and the others with a timeout naming no cause."""
  import socket

  _, _, port = address.rpartition(":")
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):  # As JAX binds: [::].
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # No IPv6 on this host.
    with sock:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # Past closed connections.
      try:
        sock.bind((host, int(port)))
      except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
          continue  # This family is unusable here (IPv6 off, say): the next one, or JAX's.
        raise UserError(
          f"process 0 cannot serve the coordinator {address} on this host: port {port}: "
          f"{exc.strerror or exc} (another program holds it, or a process started before "
          "this one as process_id=0?); give every process another port in "
          "config.distributed.coordinator, and each its own process_id"
        ) from None
    return


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until process 0's coordinator accepts connections, or raises a UserError.

  JAX itself ends the whole process with a native stack dump when its coordinator cannot be
  reached in time; checking the port first turns the common case (process 0 not started,
  a wrong address) into one line. Process 0 cannot be checked this way: it is the server.
  """
  import socket
  import time

  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError as exc:
      if time.monotonic() >= deadline:
        raise UserError(
          f"cannot reach the coordinator {address} within config.distributed.timeout_s="
          f"{timeout_s:g} s ({exc.strerror or exc}); start process 0 or check the address"
        ) from None
      time.sleep(0.5)
