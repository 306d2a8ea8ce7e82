"""Orbax checkpoints of a stage: array state plus a JSON record of where the run stood.

Layout: `<workdir>/checkpoints/<stage>/<step>/{state,meta}`. `state` is a pytree of
arrays restored against an abstract, sharded target so it lands directly in its
layout; `meta` holds the host-side position (metrics written, pending loss sums)
and the settings that must match for a resume to be valid.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import signal
import stat
import time
import weakref
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ilora_jax import console
from ilora_jax.errors import UserError
from ilora_jax.files import checkpoint_folder

# Tests only: "STAGE:STEP" SIGKILLs this process right after the save of that step of that
# stage's checkpoints (the folder's name: "ilora", "ilora_best", "sasrec") has started.
_KILL_AT = (
  tuple(os.environ["ILORA_JAX_KILL_DURING_SAVE"].split(":"))
  if os.environ.get("ILORA_JAX_KILL_DURING_SAVE")
  else None
)

# How long a save's failure that may come from its folder being removed waits for the removal
# to show: `rm -rf` empties a folder before removing it, and the writers fail meanwhile.
_SETTLE_S = 2.0


def _denied(path: str) -> str | None:
  """The first folder or file at or under `path` that this process may not read (None
  where all can be read, or `path` does not exist). A link to nothing is damage, not a
  denial: `os.access` fails on it too."""

  def denied(p: str) -> bool:
    return os.path.exists(p) and not os.access(p, os.R_OK | (os.X_OK if os.path.isdir(p) else 0))

  if denied(path):
    return path
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      if denied(os.path.join(root, name)):
        return os.path.join(root, name)
  return None


class StageCheckpoints:
  """Saves and restores one stage's training state."""

  def __init__(
    self,
    workdir: str,
    stage: str,
    max_to_keep: int = 2,
    async_save: bool = True,
    read_only: bool = False,
  ):
    """`read_only`: only restores, so no folder is created (an evaluation or a recommendation
    of a workdir without the stage's checkpoints leaves no empty `checkpoints/` behind)."""
    self.directory = os.path.abspath(checkpoint_folder(workdir, stage))
    self.stage = stage
    # Opened to write, the temporary folders of saves a kill left unfinished are removed
    # first: a step saved again beside one was never deleted by `max_to_keep`.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=not read_only,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
    )
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
      # Orbax would list no checkpoint in it (a resume from scratch) and fail at the first save.
      raise UserError(
        f"checkpoint folder {self.directory} is a file, not a folder: move it away, or use "
        "another --workdir"
      )
    self._pending: int | None = None
    self._unsettled = False  # A save started and not yet waited for.
    self._closed = False
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as exc:
      denied = _denied(self.directory)
      if denied:
        raise UserError(f"cannot read checkpoint folder {self.directory}: permission denied on "
                        f"{denied}") from None  # fmt: skip
      verb = "open" if read_only or os.path.isdir(self.directory) else "create"
      raise UserError(f"cannot {verb} checkpoint folder {self.directory}: {exc}") from None
    self._held = None if read_only else _hold(self.directory)

  def _removed_error(self, step: int | None) -> UserError:
    return _SaveFailed(
      f"cannot write checkpoint {step}: its folder {self.directory} was removed or moved while "
      "the run used it; re-run to start the stage again (after removing what is left there)"
    )

  def _removed(self) -> bool:
    """Whether the folder this object opened to write, and holds, was removed or moved since:
    its path names no folder, or another one than it opened (its writers may make one anew at
    the same path; the held descriptor keeps the old one's inode number from being reused).
    An error reading the path other than its absence is no removal. Unheld (read only, or a
    folder this process could not open: not yet seen on a network file system, say), it is
    never called removed."""
    if self._held is None:
      return False
    try:
      now = os.stat(self.directory)
    except (FileNotFoundError, NotADirectoryError):
      return True
    except OSError:
      return False
    return not stat.S_ISDIR(now.st_mode) or (now.st_dev, now.st_ino) != self._held.inode

  def _removed_by_now(self, reason: str | None) -> bool:
    """Whether the folder was removed, asked after a save failed for `reason` (None: no
    file-system error). A file gone (ENOENT), or an error Orbax raised for no such reason,
    may come from a removal still emptying the folder, which goes last: that is watched
    for up to `_SETTLE_S` seconds before the failure is taken at its word."""
    waits = self._held is not None and reason in (None, os.strerror(errno.ENOENT))
    deadline = time.monotonic() + (_SETTLE_S if waits else 0.0)
    while not self._removed():
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.05)
    return True

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving `step` (asynchronously when enabled).

    Orbax writes into a temporary folder and renames it when complete, so a crash or a kill
    mid-save leaves the previous checkpoints readable. A write failure (full disk, read-only
    folder), here or reported later by the background writer, is a UserError that names the
    last complete checkpoint, which is kept.
    """
    if self._removed():  # Between saves: Orbax would make it anew and save on.
      raise self._removed_error(step)
    self._pending = step
    meta = {**meta, CHECKSUMS: checksums(state)}  # What a restore verifies the arrays by.
    with self._io(step):
      self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
      )
    self._unsettled = True
    if _KILL_AT == (self.stage, str(step)):  # Fault injection for the kill-mid-save test.
      os.kill(os.getpid(), signal.SIGKILL)

  @contextlib.contextmanager
  def _io(self, step: int | None):
    try:
      yield
    except UserError:
      raise
    except Exception as exc:  # Orbax re-raises background write errors in many wrappers.
      self._unsettled = False  # Failed: said here.
      at = self._pending if step is None else step
      reason = _write_failure(exc)
      if self._removed_by_now(reason):  # Removed mid-save (`rm -rf`): Orbax's errors vary.
        _drop_asyncio_reports("read")  # Its abandoned tasks' reports of files gone.
        raise self._removed_error(at) from None
      if reason is None:
        raise
      _drop_asyncio_reports("write")
      try:
        self._manager.reload()
        kept = self._manager.latest_step()
      except Exception:  # noqa: BLE001 - only for the message.
        kept = None
      last = (
        f"the last complete checkpoint {kept} is kept"
        if kept is not None
        else "no earlier checkpoint exists"
      )
      fix = (  # A file of the save gone: its folder emptied (an `rm -rf` that raced the writers).
        "see that nothing else removes files there"
        if reason == os.strerror(errno.ENOENT)
        else "free space or fix permissions"
      )
      raise _SaveFailed(
        f"cannot write checkpoint {at} to {self.directory}: {reason}; {last}; {fix} and re-run "
        "to resume"
      ) from None

  def restore_meta(self, step: int) -> dict:
    """Only the JSON record of `step` (cheap; read before the arrays to compare settings)."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as exc:  # noqa: BLE001 - classified by `_looks_damaged`.
      raise self._unreadable(step, exc) from None
    return dict(restored["meta"])

  def _unreadable(self, step: int, exc: BaseException | None = None, reason: str = "") -> UserError:
    """The error of a checkpoint that cannot be read (`exc`), or that was read and found
    damaged (`reason`), with the advice of which folder to remove."""
    first = reason or _reason(exc)
    path = os.path.join(self.directory, str(step))
    denied = _denied(path)
    if denied:  # Readable once its permissions are fixed: no advice to remove it.
      return UserError(
        f"cannot read checkpoint {step} in {self.directory}: permission denied on {denied}"
      )
    # Out of memory, say: no advice to delete a good checkpoint.
    if exc is not None and not _looks_damaged(exc):
      return UserError(f"cannot restore checkpoint {step} in {self.directory} "
                       f"({type(exc).__name__}: {first})")  # fmt: skip
    if self.stage.endswith("_best"):  # Kept weights of a selection, not a training state.
      advice = (
        f"remove {self.directory} to drop the kept selection (evaluations then use the latest "
        "checkpoint; a resumed run selects anew)"
      )
    else:
      earlier = [s for s in self._manager.all_steps() if s < step]
      advice = f"remove {path} to " + (
        f"resume from checkpoint {max(earlier)}"
        if earlier
        else f"start the {self.stage} stage anew"
      )
    return UserError(
      f"checkpoint {step} in {self.directory} is unreadable ({first}); {advice}, or use "
      "another --workdir"
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
    # Orbax reads the arrays in tasks of its own: of damaged files, the failures other than
    # the one raised are logged by asyncio as their tasks are collected, which may come
    # before this read's one error line (a loaded machine showed one in a full test run).
    _drop_asyncio_reports("read")
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
      )
    except (ValueError, KeyError, TypeError) as exc:
      if _looks_damaged(exc):
        raise self._unreadable(step, exc) from None
      index = os.path.join(self.directory, str(step), "state", "_METADATA")
      if not os.path.exists(index):  # Orbax then reports another tree structure.
        raise self._unreadable(step, reason=f"{index} is missing") from None
      # Orbax's advice on how to pad or truncate arrays is no advice for a user of a run.
      text = re.split(r"\s*Truncating/padding is disabled", " ".join(str(exc).split()))[0]
      raise UserError(
        f"checkpoint {step} in {self.directory} does not match this model "
        f"({type(exc).__name__}: {text[:300]}): it was written with other model settings"
      ) from None
    except Exception as exc:  # noqa: BLE001 - TensorStore reports damaged files as Exception.
      raise self._unreadable(step, exc) from None
    state, meta = restored["state"], dict(restored["meta"])
    changed = _changed_arrays(state, meta)
    if changed:
      more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
      raise self._unreadable(step, reason=f"array {changed[0]}{more} does not hold what "
                             "was saved: its checksum differs")  # fmt: skip
    return state, meta

  @contextlib.contextmanager
  def guard(self):
    """On an error inside the block, lets a pending save finish (or fail) before re-raising,
    so the error that stopped the run is reported and the newest complete checkpoint stays."""
    try:
      yield
    except Exception as stopped:
      try:
        self._manager.wait_until_finished()
      except Exception as exc:  # noqa: BLE001 - the error raised on is the one that stopped it.
        if not isinstance(stopped, _SaveFailed):  # Else its wait's failure is no news.
          reason = _write_failure(exc)
          why = "its folder was removed or moved" if self._removed_by_now(reason) else reason
          console.line(f"warning: the save of checkpoint {self._pending} under way failed "
                       f"too: {why or type(exc).__name__}")  # fmt: skip
      raise

  def wait(self) -> None:
    with self._io(None):
      self._manager.wait_until_finished()
    self._settled()

  def _settled(self) -> None:
    """After a wait that raised nothing: a save under way while its folder was removed may
    have finished in a folder its writers made anew at the path (seen in a loaded test run):
    that is no checkpoint of this run, so it fails as one that raised would."""
    unsettled, self._unsettled = self._unsettled, False
    if unsettled and self._removed():
      raise self._removed_error(self._pending)

  def after_step(self, step: int, save, boundary: bool, stop, bar=None) -> None:
    """The end of a training step: `save(step)` at a boundary (epoch end, interval, stop step)
    or when SIGINT/SIGTERM arrived; after a signal, waits for the write, closes and leaves
    through `stop.exit` (the CLI exits with 128 + the signal number). In a multi-process run
    a signal any process received stops them all after this step (`Graceful.agree`)."""
    stopping = stop.agree(step)
    if boundary or stopping:
      save(step)
    if stopping:
      self.leave(step, stop, bar)

  def leave(self, step: int, stop, bar=None, saved: bool = True) -> None:
    """Leaves the run on the signal `stop` (`interrupts.Graceful`) holds after `step`: closes
    the bar and this object (waiting for a save under way), then raises `Interrupted`
    (`saved`: whether the checkpoint of `step` was written now or stands from before)."""
    if bar is not None:
      bar.close()
    self.close()
    stop.exit(step, saved)

  def close(self) -> None:
    """Waits for a pending save and releases the manager; a second call does nothing."""
    if self._closed:
      return
    with self._io(None):
      self._manager.wait_until_finished()
      self._manager.close()
    self._closed = True
    try:
      self._settled()
    finally:
      self._held = None  # Its descriptor closes when collected.


class _SaveFailed(UserError):
  """A save that could not be written (the error raised for it: one line, as any UserError)."""


class _Held:
  """An open descriptor of a folder, closed when this object is collected, and the folder's
  identity (device, inode) when it was opened: while it is held, no other folder gets that
  inode number, so a folder at the same path with another one is not the folder opened."""

  def __init__(self, fd: int):
    weakref.finalize(self, os.close, fd)
    opened = os.fstat(fd)
    self.inode = (opened.st_dev, opened.st_ino)


def _hold(directory: str) -> _Held | None:
  try:
    return _Held(os.open(directory, os.O_RDONLY))
  except OSError:  # Not there (yet), or a system that opens no folder.
    return None


class _DropReports(logging.Filter):
  """Drops log records of the failures `kind` names: "write" (a file-system write failure)
  or "read" (TensorStore's report of a damaged file, `_DAMAGE`, or a file gone; not every
  OSError, as `_looks_damaged` takes: a full disk's stays)."""

  def __init__(self, kind: str):
    super().__init__()
    self.kind = kind

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None:  # asyncio's "exception was never retrieved" may carry it in the message
      text = record.getMessage()
      failed = _write_failure_text(text) if self.kind == "write" else _DAMAGE.search(text)
      return not failed
    if self.kind == "write":
      return _write_failure(exc) is None
    return not any(isinstance(e, FileNotFoundError) or _DAMAGE.search(str(e)) for e in _chain(exc))


def _drop_asyncio_reports(kind: str) -> None:
  """From here on, asyncio's reports of a failed write or read (`kind`) in Orbax's other,
  abandoned tasks ("Task exception was never retrieved", with a traceback, when they are
  collected, often at exit) are dropped: the failure raised is the one `error:` line. Other
  asyncio errors stay."""
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropReports) and f.kind == kind for f in logger.filters):
    logger.addFilter(_DropReports(kind))


def _write_failure_text(text: str) -> str | None:
  code = re.search(r"os_error_code='?(\d+)", text)
  return os.strerror(int(code.group(1))) if code else None


def _chain(exc: BaseException | None, limit: int = 16) -> list[BaseException]:
  """`exc`, its cause (or context), that one's, ...: at most `limit`, each once."""
  chain: list[BaseException] = []
  while exc is not None and len(chain) < limit and all(exc is not e for e in chain):
    chain.append(exc)
    exc = exc.__cause__ or exc.__context__
  return chain


def _write_failure(exc: BaseException) -> str | None:
  """Why a write failed, when `exc` (or its cause chain) is a file-system error, else None.

  Python writers raise OSError; TensorStore (Orbax's array writer) raises ValueError with
  the errno in its text, e.g. "RESOURCE_EXHAUSTED: ... [os_error_code='28']".
  """
  for e in _chain(exc):
    if isinstance(e, OSError):
      return e.strerror or str(e) or type(e).__name__  # A bare TimeoutError says nothing.
    reason = _write_failure_text(str(e))
    if reason:
      return reason
  return None


# How damaged files show: TensorStore's status codes and read errors, Orbax's missing metadata
# and unparsable JSON records.
_DAMAGE = re.compile(
  r"DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|Error reading|Error opening|does not exist|"
  r"[Uu]nterminated|Expecting (value|property name)|Extra data|JSONDecodeError|"
  r"was not found in the checkpoint|error while reading"
)


def _reason(exc: BaseException) -> str:
  """One short line saying why a read failed: TensorStore's own report where the error chain
  holds one ('array NAME: what is wrong'), never its printed object specs."""
  for e in _chain(exc):
    found = re.search(r'Error reading "([^"]+)"[^:]*(?::[^:]*")?[^:]*: (.*)', str(e))
    if found:
      name, why = found.group(1), _without_specs(found.group(2))
      return f"array {name}: {' '.join(why.split())[:160]}"
  text = " ".join(str(exc).split()) or type(exc).__name__
  return _without_specs(re.split(r"\s*See full TensorStore details", text)[0])[:200]


def _without_specs(text: str) -> str:
  """`text` up to TensorStore's printed object specs ("... [tensorstore_spec='{...}']")."""
  return re.split(r"\s*\[tensorstore_spec", text)[0]


def _looks_damaged(exc: BaseException) -> bool:
  return isinstance(exc, (OSError, json.JSONDecodeError)) or bool(_DAMAGE.search(str(exc)))


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


CHECKSUMS = "array_hashes"  # The meta's record of the state's arrays (`checksums`).
_OLD_CHECKSUMS = "checksums"  # Older code's record: weighted bit sums, still verified.


def _bits_and_index(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The array's elements' bit patterns as uint32, and each element's flat position."""
  import jax.numpy as jnp
  from jax import lax

  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
    bits = lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  if x.ndim == 0:
    return bits, jnp.zeros((), jnp.uint32)
  return bits, lax.broadcasted_iota(jnp.uint32, (x.size,), 0).reshape(x.shape)


def _host_bits_and_index(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`_bits_and_index` in numpy, flattened."""
  x = np.ascontiguousarray(x).reshape(-1)
  bits = x.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize]).astype(np.uint32)
  return bits, np.arange(x.size, dtype=np.uint32)


_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _mixed_sums(x: Any, xp: Any = None) -> Any:
  """Two sums, modulo 2**32, of every element's bit pattern and position mixed by
  MurmurHash3's 32-bit finaliser under two seeds: any change of elements changes each sum
  with probability 1 - 2**-32, exact and independent of how the array is sharded or summed.
  (Older checkpoints' weighted sum of bit patterns missed changes that move only high bits
  over aligned blocks: a matrix doubled adds 2**23 to each float32 pattern, and 2**23 times
  the block's summed weights can vanish modulo 2**32.) `xp`: numpy to sum on the host (uint32
  arithmetic wraps there as XLA's does), else jax.numpy where the array is."""
  if xp is None:
    import jax.numpy as xp

    bits, index = _bits_and_index(x)
  else:
    bits, index = _host_bits_and_index(x)
  u32 = xp.uint32
  sums = []
  for seed in _SEEDS:
    h = bits + index * u32(seed)
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
      h = (h ^ (h >> u32(shift))) * u32(factor)
    sums.append(xp.sum(h ^ (h >> u32(16)), dtype=u32))
  return xp.stack(sums)


def _bits_sum(x: Any, xp: Any = None) -> Any:
  """Older checkpoints' checksum: the sum, modulo 2**32, of the array's elements' bit
  patterns each times an odd weight of its position (2i + 1). `xp` as in `_mixed_sums`."""
  if xp is None:
    import jax.numpy as xp

    bits, index = _bits_and_index(x)
  else:
    bits, index = _host_bits_and_index(x)
  return xp.sum(bits * (index * xp.uint32(2) + xp.uint32(1)), dtype=xp.uint32)


@functools.partial(jax.jit, static_argnums=0)
def _device_sums(kind: str, leaves: list) -> list:
  return [_KINDS[kind](x) for x in leaves]


_KINDS = {CHECKSUMS: _mixed_sums, _OLD_CHECKSUMS: _bits_sum}


def fingerprint(tree: Any) -> str:
  """A digest (16 hex digits) of a tree's arrays, bit for bit, with their paths, dtypes and
  shapes: summed where the arrays are (a model's weights on their devices, sharded or not;
  nothing copied to the host), so the same weights give the same digest on any mesh or
  backend."""
  leaves = _checksum_leaves(tree)
  sums = jax.device_get(_device_sums(CHECKSUMS, [x for _, x in leaves]))
  described = [[p, str(x.dtype), list(x.shape), [int(v) for v in s]]
               for (p, x), s in zip(leaves, sums)]  # fmt: skip
  return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def _checksum_leaves(state: Any) -> list[tuple[str, Any]]:
  """(path, array) of the state's leaves of at most 32 bits (all a run's states hold)."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return [(jax.tree_util.keystr(path), x) for path, x in flat
          if hasattr(x, "dtype") and x.dtype.itemsize <= 4]  # fmt: skip


def checksums(state: Any, kind: str = CHECKSUMS) -> dict[str, str]:
  """{array path: 'dtype:hex digits'} of a state's arrays (`_mixed_sums`; `_OLD_CHECKSUMS`:
  older code's `_bits_sum`): saved in the meta, so that a restore finds an array whose bytes
  changed on disk (a damaged file that still decodes, which Orbax would restore as it is).
  Summed on the host where this process holds every array whole (no program to compile),
  else where the arrays are (a multi-process run's shards)."""
  leaves = _checksum_leaves(state)
  if all(getattr(x, "is_fully_addressable", True) for _, x in leaves):
    sums = [_KINDS[kind](np.asarray(x), np) for _, x in leaves]
  else:
    sums = jax.device_get(_device_sums(kind, [x for _, x in leaves]))
  return {path: f"{x.dtype}:" + "".join(f"{int(v):08x}" for v in np.atleast_1d(s))
          for (path, x), s in zip(leaves, sums)}  # fmt: skip


def _changed_arrays(state: Any, meta: dict) -> list[str]:
  """Paths of the restored arrays whose checksum differs from the one the meta saved (by
  this code or older code; an array of another dtype or one not recorded is not compared;
  a meta without checksums, of still older code, compares none)."""
  kind = next((k for k in _KINDS if k in meta), None)
  if kind is None:
    return []
  saved, mine = meta[kind], checksums(state, kind)
  return [p for p, v in mine.items() if p in saved and saved[p].split(":")[0] == v.split(":")[0]
          and saved[p] != v]  # fmt: skip


UNKNOWN = object()  # `check_same_settings`: what older checkpoints were made with.


def check_same_settings(
  saved: dict,
  current: dict,
  directory: str,
  added: dict[str, Any] | None = None,
  same: dict[str, Any] | None = None,
) -> None:
  """Raises a UserError naming every setting that differs between a checkpoint and the config.

  `added`: settings recorded only by newer code, each with the value every older checkpoint
  (which lacks it) was made with, or `UNKNOWN`: such a setting is then compared only when
  the checkpoint has it (refusing every older checkpoint would strand its run).
  `same`: per-setting equality `(saved, current) -> bool` where `==` is too strict (a
  fingerprint of float sums that two backends round apart, say).
  """
  saved = dict(saved)
  for key, old in (added or {}).items():
    if key not in saved:
      saved[key] = current.get(key) if old is UNKNOWN else jsonable(old)
  diffs = [
    f"{name}: checkpoint {old!r} vs config {new!r}"
    for k in sorted(set(saved) | set(current))
    for name, old, new in _differences(k, saved.get(k), current.get(k), same)
  ]
  if diffs:
    raise UserError(
      f"the checkpoint in {directory} was made with other settings ("
      + "; ".join(diffs)
      + "); use another --workdir or restore the settings"
    )


def setting_diffs(saved: dict, current: dict, keys, same: dict[str, Any] | None = None):
  """'key saved vs config current' for each of `keys` (in that order) both dicts hold with
  different values: a checkpoint's settings against the running config's (`same`: as in
  `check_same_settings`)."""
  return [f"{k} {saved[k]!r} vs config {current[k]!r}" for k in keys
          if k in saved and k in current and not _equal(k, saved[k], current[k], same)]  # fmt: skip


def _differences(key: str, saved: Any, current: Any, same: dict[str, Any] | None) -> list:
  """(name, saved, current) of each difference under `key`, a group of settings (a dict on
  both sides, compared by `==`) by the name of each of its settings that differs
  ("lora.dropout", not the whole group)."""
  if isinstance(saved, dict) and isinstance(current, dict) and not (same and key in same):
    return [d for k in sorted(set(saved) | set(current))
            for d in _differences(f"{key}.{k}", saved.get(k), current.get(k), None)]  # fmt: skip
  return [] if _equal(key, saved, current, same) else [(key, saved, current)]


def _equal(key: str, saved: Any, current: Any, same: dict[str, Any] | None) -> bool:
  if saved == current:
    return True
  return bool(same and key in same and same[key](saved, current))


def jsonable(value: Any) -> Any:
  """Round-trips through JSON so saved and current settings compare equal."""
  return json.loads(json.dumps(value))
