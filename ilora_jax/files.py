"""Whole-file writes: a reader (or a re-run after a kill) sees the old file or the new one,
never half of one."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to `path` to write to; when the block ends without an
  error the file is renamed over `path` (one `os.replace`, atomic on POSIX), otherwise it is
  removed and `path` is left as it was.

  An OSError naming the temporary file (a folder at `path`, a missing folder) names `path`,
  the file meant, instead. The temporary name is unique to the process and thread, so
  concurrent writers of the same file do not write into each other's temporary file; the last
  rename wins. The file gets the permissions a plain `open` would give it (not `mkstemp`'s
  owner-only ones).
  """
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as exc:  # Opening, writing or renaming the temporary file: named by `path`.
    if exc.filename != tmp:
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
