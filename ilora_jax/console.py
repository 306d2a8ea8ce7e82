"""Human-readable progress messages on stderr (process 0 only).

Library logs (Orbax, absl) are kept at WARNING so these lines stay readable.
"""

from __future__ import annotations

import sys

import jax


def info(message: str) -> None:
  if jax.process_index() == 0:
    line(message)


def line(message: str) -> None:
  """`message` on stderr as a line of its own above the progress bars being drawn (tqdm's
  write clears them, writes, draws them again); a plain print was appended to the text of the
  bar on the screen (`... 65/130 [00:01<00:01, loss=2.82]SASRec step 65 val ...`)."""
  from tqdm import tqdm

  tqdm.write(message, file=sys.stderr)
  sys.stderr.flush()


def _closed_loop(exc) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_hook(hook, value_of):
  def quiet(*args):
    if not _closed_loop(value_of(*args)):
      hook(*args)

  quiet._ilora_quiet = True
  return quiet


# Orbax's log lines of a save that failed in a background thread, each logged with the
# traceback of an exception Orbax then raises again in the main thread (from the wait for the
# save): its writer thread, its commit thread, and the wait for its finalize thread.
_RERAISED = ("_SignalingThread", "in background save thread", "Finalize thread")


class _DropBackgroundTracebacks:
  """Drops Orbax's log copies of failures that reach the user as one `error:` line: a
  background save's tracebacks (`_RERAISED`), and the warning about a step folder without its
  metadata file (the restore of that step then fails and says which folder to remove)."""

  def filter(self, record) -> bool:
    message = record.getMessage()
    if record.exc_info and any(mark in message for mark in _RERAISED):
      return False
    return not message.startswith("Metadata file does not exist")


def quiet_libraries() -> None:
  import logging as pylogging

  from absl import logging

  logging.set_verbosity(logging.WARNING)
  for name in ("absl", "orbax", "jax"):
    pylogging.getLogger(name).setLevel(pylogging.WARNING)
  # Orbax logs a background writer's failure with its traceback, then re-raises it in the
  # main thread, where it becomes one `error:` line; the logged copy is dropped.
  # When a write fails, TensorStore completes its pending futures into Orbax's already closed
  # event loop; the resulting "Event loop is closed" reports are noise after the real error.
  if not getattr(sys.unraisablehook, "_ilora_quiet", False):
    sys.unraisablehook = _quiet_hook(sys.unraisablehook, lambda u: u.exc_value)
    sys.excepthook = _quiet_hook(sys.excepthook, lambda *a: a[1])
  for name in ("absl", "orbax"):
    logger = pylogging.getLogger(name)
    if not any(isinstance(f, _DropBackgroundTracebacks) for f in logger.filters):
      logger.addFilter(_DropBackgroundTracebacks())
