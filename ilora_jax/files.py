"""Whole-file writes: a reader (or a re-run after a kill) sees the old file or the new one,
never half of one; and the lock that keeps a second run out of a workdir in use."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import IO


def checkpoint_folder(workdir: str, stage: str) -> str:
  """Where `workdir` keeps `stage`'s checkpoints: `checkpoints/<stage>` (sasrec, ilora, and
  ilora_best, the weights `ilora.select_by` picked)."""
  return os.path.join(workdir, "checkpoints", stage)


def check_workdir(workdir: str) -> None:
  """`workdir` is a folder or can be made one: not a file, nor below one (a UserError saying
  so, not `os.makedirs`'s "File exists")."""
  folder = os.path.abspath(workdir)
  while not os.path.exists(folder) and os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    from ilora_jax.errors import UserError

    shown = workdir if folder == os.path.abspath(workdir) else folder
    raise UserError(f"cannot create workdir {workdir}: {shown} is a file, not a folder")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to `path` to write to; when the block ends without an
  error the file is renamed over `path` (one `os.replace`, atomic on POSIX), otherwise it is
  removed and `path` is left as it was.

  An OSError naming the temporary file (a folder at `path`, a missing folder), or no file (a
  write to a full disk), names `path`, the file meant, instead. The temporary name is unique
  to the process and thread, so concurrent writers of the same file do not write into each
  other's temporary file; the last rename wins. The file gets the permissions a plain `open`
  would give it (not `mkstemp`'s owner-only ones).
  """
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as exc:  # Opening, writing or renaming the temporary file: named by `path`.
    if exc.filename not in (tmp, None):  # A write's error (a full disk) names no file.
      raise
    raise type(exc)(exc.errno, exc.strerror, path) from None
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)  # Only there when the block or the rename failed.


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
  """`open(path, mode)` whose contents replace `path` only once the block has finished."""
  if not mode.startswith("w"):
    raise ValueError(f"atomic_write writes whole files: mode {mode!r} is not a 'w' mode")
  with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
    yield f


@contextlib.contextmanager
def workdir_lock(workdir: str, process: int = 0) -> Iterator[None]:
  """Holds `workdir`'s lock (`.lock-<process>`, the process's index in a multi-process run)
  for the block, so that a second run in the same workdir (the command started twice, an
  experiment grid re-run while an orphaned run goes on) is refused with a UserError naming
  the process that holds it, instead of both writing its checkpoints and metrics. The
  operating system releases the lock when the holder ends, also by a kill. Where no lock can
  be taken (a read-only folder, a file system without locks), the block runs without one."""
  path = os.path.join(workdir, f".lock-{process}")
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as exc:  # The run's own writes say what else is wrong with the folder.
    _unguarded(workdir, path, exc)
    fd = None
  try:
    if fd is not None:
      _take(fd, workdir, path)
    yield
  finally:
    if fd is not None:
      os.close(fd)  # Releases the lock.


def _unguarded(workdir: str, path: str, exc: OSError) -> None:
  """The warning of a run that goes on without its workdir lock."""
  print(
    f"warning: cannot take the workdir lock {path} ({exc.strerror or exc}): a second run in "
    f"{workdir} would not be refused",
    file=sys.stderr,
    flush=True,
  )


def _take(fd: int, workdir: str, path: str) -> None:
  """Locks the open lock file `fd` and writes who holds it; held by another: a UserError."""
  import fcntl
  import socket

  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    from ilora_jax.errors import UserError

    raise UserError(
      f"{workdir} is in use by {holder} (it holds {path}): wait for that run to end or stop it, "
      "or use another --workdir"
    ) from None
  except OSError as exc:  # No locks on this file system: the run goes on without one.
    _unguarded(workdir, path, exc)
    return
  with contextlib.suppress(OSError):
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
