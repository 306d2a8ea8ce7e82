"""JAX's persistent compilation cache, from `config.compile_cache_dir`.

Compiled XLA programs are kept on disk, keyed by the program, the JAX version and the
device, so a resumed run, an evaluation of a finished one or a second experiment with the
same shapes loads its train and evaluation steps instead of compiling them again (the
SmolLM2-135M train step takes tens of seconds to compile on a CPU). Every key covers all that
the program depends on, so a stale entry is never used; an entry that cannot be loaded is
compiled again by JAX. '' turns the cache off. Must run before the first compile.

The folder is capped at `MAX_BYTES`, least recently used programs evicted first (JAX's
own JAX_COMPILATION_CACHE_MAX_SIZE, when set, wins; -1 there means no cap).
"""

from __future__ import annotations

import os

MAX_BYTES = 4 << 30


def enable(path: str) -> str | None:
  """Points JAX's cache at `path` (`~` expanded, created); returns it, or None when off.

  A folder that cannot be created, or that this user may not write to (JAX then warns of
  every program it reads or writes: it takes a lock file there), gives a one-line warning on
  stderr and no cache: the run goes on.
  '' (or spaces only: no folder name) turns the cache off, also where
  JAX_COMPILATION_CACHE_DIR set it.
  """
  import jax

  from ilora_jax import console

  if not path.strip():
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as exc:
    console.info(
      f"warning: compile cache off: cannot create {path} ({exc.strerror}); set "
      "config.compile_cache_dir to a folder you can write ('' turns it off)"
    )
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if not os.access(path, os.W_OK | os.X_OK):  # JAX cannot even read entries: a lock file.
    console.info(
      f"warning: compile cache off: cannot write to {path} (permission denied); set "
      "config.compile_cache_dir to a folder you can write ('' turns it off)"
    )
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  if jax.config.jax_compilation_cache_max_size != -1:
    _add_access_times(path)
  return path


def _add_access_times(path: str) -> None:
  """Gives every entry of the cache without an access-time file one (its modification time):
  entries written without a cap (JAX's default, by a process that never called `enable`,
  such as a script using the Python API) have none, and a capped cache reads the file of
  every entry when it makes room, failing with a warning on each write and caching nothing
  more."""
  names = set(os.listdir(path))
  for name in names:
    key = name.removesuffix("-cache")
    if key != name and f"{key}-atime" not in names:
      try:
        stamp = os.stat(os.path.join(path, name)).st_mtime_ns
        with open(os.path.join(path, f"{key}-atime"), "wb") as f:
          f.write(stamp.to_bytes(8, "little"))
      except OSError:
        pass  # A read-only or vanished entry: JAX reports it, if it matters, as before.
