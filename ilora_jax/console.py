"""What a command shows (process 0 only): progress messages and bars on stderr (`info`,
`bar`), final results on stdout (`result`).

Library logs (Orbax, absl) are kept at WARNING so these lines stay readable.
"""

from __future__ import annotations

import os
import sys

import jax

from ilora_jax import errors


def info(message: str) -> None:
  if jax.process_index() == 0:
    line(message)


# Where stderr is no terminal, the seconds at least between two states a progress bar writes.
LOG_INTERVAL_S = 30.0


def bar(iterable=None, *, enabled: bool, **kwargs):
  """A tqdm progress bar on stderr, drawn by process 0 only and where `enabled`
  (config.progress). Where stderr is no terminal (a log file: `nohup`, a batch job, a grid's
  run), it writes its state as a line of its own at most every `LOG_INTERVAL_S` seconds: on a
  terminal's terms, states each after a carriage return, a file got one ever longer line of
  them, about ten a second. Its postfix is set with `refresh=False` (a refresh writes)."""
  from tqdm import tqdm

  kwargs["disable"] = not enabled or jax.process_index() != 0
  if not sys.stderr.isatty():  # Its first state too after that long: short loops write none.
    log = {"mininterval": LOG_INTERVAL_S, "delay": LOG_INTERVAL_S}
    kwargs = {**log, **kwargs, "file": _StatusLines(sys.stderr)}
  return tqdm(iterable, **kwargs)


class _StatusLines:
  """A progress bar's file in a log: each state it draws written as a line; the carriage
  returns, cursor moves (a bar drawn below another) and clearing it writes are dropped."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> int:
    for state in text.replace("\x1b[A", "").replace("\r", "\n").split("\n"):
      if state.strip():
        self._stream.write(state.rstrip() + "\n")
    return len(text)

  def flush(self) -> None:
    self._stream.flush()


def line(message: str) -> None:
  """`message` on stderr as a line of its own above the progress bars being drawn (tqdm's
  write clears them, writes, draws them again); a plain print was appended to the text of the
  bar on the screen (`... 65/130 [00:01<00:01, loss=2.82]SASRec step 65 val ...`)."""
  from tqdm import tqdm

  tqdm.write(message, file=sys.stderr)
  sys.stderr.flush()


_UNSHOWN: list[BaseException] = []  # Why a result line was not shown (`result`).


def result(text: str) -> None:
  """A line of final results on stdout (process 0), printed before their records are written
  (a workdir that cannot be written loses no result). A stdout that cannot take it (a full
  disk behind `> file`, stdout closed, its reader gone away) loses none either: the failure
  is kept for `raise_unshown`, called once the records are written, and stdout's later output
  is dropped. It ended the command at once, before the records, with `cannot write: No space
  left on device` as if the workdir's disk were full."""
  if jax.process_index() != 0 or _UNSHOWN:
    return
  try:
    if sys.stdout is None:  # Started with it closed (`>&-`): print() would write nothing.
      raise ValueError("closed")
    print(text, flush=True)
  except (OSError, ValueError) as exc:
    _UNSHOWN.append(exc)
    errors.discard_stdout()


def raise_unshown(workdir: str) -> None:
  """Ends the command for a result line stdout did not take (`result`): a reader gone away
  (`| head -1`) as a broken pipe (quietly, exit 141), anything else with one error line."""
  if not _UNSHOWN:
    return
  exc = _UNSHOWN.pop()
  if isinstance(exc, BrokenPipeError):
    raise exc
  raise errors.UserError(
    f"cannot write the results to stdout ({errors.stdout_failure(exc)}); they are in "
    f"{os.path.join(workdir, 'metrics.jsonl')}"
  )


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
