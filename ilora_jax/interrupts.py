"""SIGINT / SIGTERM / SIGHUP during training: finish the step, save a checkpoint, then exit.

    with interrupts.Graceful() as stop:
      while ...:
        ...one step...
        if stop.requested:
          save(step)
          stop.exit(step)   # raises Interrupted

A second SIGINT while the checkpoint is being written is ignored for a few seconds, then
taken as "stop now" (KeyboardInterrupt). Outside the main thread nothing is installed. SIGHUP
(the terminal or ssh session that started the run closed) is handled only where it is not
ignored: `nohup` keeps a run going, as it asks. A write to stdout or stderr whose reader went
away (`closed_output_stops_training`) stops it the same way.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time


class Interrupted(Exception):
  """Training stopped on a signal after saving; the CLI exits with 128 + signal number."""

  def __init__(self, signum: int, step: int, saved: bool = True):
    super().__init__(
      f"stopped at step {step}: the reader of the run's output went away (a broken pipe)"
      if signum == signal.SIGPIPE
      else f"stopped by {signal.Signals(signum).name} at step {step}"
    )
    self.signum = signum
    self.step = step
    self.saved = saved  # False: stopped before its step's work, whose checkpoint stands.


class Graceful:
  def __init__(self, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
    self.signals = signals
    self.signum: int | None = None
    self._first_at = 0.0
    self._previous = {}
    self._agreed: tuple[int, bool] | None = None  # (step, its answer)

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handler(self, signum, frame):
    if self.signum is None:
      self.signum, self._first_at = signum, time.monotonic()
      return
    if signum == signal.SIGINT and time.monotonic() - self._first_at > 5.0:
      raise KeyboardInterrupt

  def agree(self, step: int) -> bool:
    """Whether to stop after `step`. Alone, whether a signal has arrived. In a multi-process
    run, whether any process had received one when they all asked, the same answer in every
    process; each adopts the signal (the largest signal number), so that all stop after the
    same step and save together. A signal to one host alone (a preempted VM gets SIGTERM)
    would otherwise send that process into the checkpoint's collective write while the others
    run the next step's collectives: a deadlock, and the work since the last checkpoint lost.
    A signal arriving after the processes asked counts at the next step. One collective of a
    number per process, once per `step` (a call again for the step last asked about gives
    the same answer; any key will do: an epoch's val asks with (step, batch) before each of
    its batches, then the step's end with `step`); call it at the same point of every step
    in every process."""
    import jax

    if jax.process_count() == 1:
      return self.requested
    if self._agreed is not None and self._agreed[0] == step:
      return self._agreed[1]
    import numpy as np
    from jax.experimental import multihost_utils

    heard = int(np.max(multihost_utils.process_allgather(np.int32(self.signum or 0))))
    if heard and self.signum is None:
      self.signum, self._first_at = heard, time.monotonic()
    self._agreed = (step, bool(heard))
    return bool(heard)

  def exit(self, step: int, saved: bool = True) -> None:
    raise Interrupted(self.signum, step, saved)

  def __enter__(self) -> Graceful:
    _running.append(self)
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        if not ignored(sig):
          self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    _running.remove(self)
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


def ignored(sig: int) -> bool:
  """Whether SIGHUP is ignored in this process (started under `nohup`): left so. Other
  signals are handled whatever their disposition (a background job's ignored SIGINT too)."""
  return sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN


_running: list[Graceful] = []  # The training loop under way (innermost last), if any.


def _stop_for_closed_output() -> bool:
  """Asks the training loop under way to stop after its step as on a signal (SIGPIPE, the
  signal a shell names for a reader gone away); False where none runs."""
  if not _running:
    return False
  stop = _running[-1]
  if stop.signum is None:
    stop.signum, stop._first_at = signal.SIGPIPE, time.monotonic()
  return True


class _StopWhenReaderGone:
  """A text stream (sys.stdout, sys.stderr) whose write or flush that fails with a broken
  pipe, while a training loop runs, stops that loop (see `closed_output_stops_training`)
  instead of raising; from then on what it is given goes to /dev/null. Elsewhere the error is
  raised as before."""

  def __init__(self, stream):
    self._stream = stream
    self._gone = False

  def _guarded(self, call, *args):
    if self._gone:
      return None
    try:
      return call(*args)
    except BrokenPipeError:
      if not _stop_for_closed_output():
        raise
      self._gone = True
      # Also for the writers that hold the stream itself (a logging handler, the interpreter
      # flushing it at exit) or its descriptor (XLA's logs): they write into /dev/null.
      from ilora_jax import errors

      errors.to_devnull(self._stream)
      return None

  def write(self, text: str) -> int:
    self._guarded(self._stream.write, text)
    return len(text)

  def writelines(self, lines) -> None:
    self._guarded(self._stream.writelines, lines)

  def flush(self) -> None:
    self._guarded(self._stream.flush)

  def __getattr__(self, name: str):
    return getattr(self._stream, name)


@contextlib.contextmanager
def closed_output_stops_training():
  """For a command's block that trains: a training loop stops after its step, saves and ends
  the command with exit 141 (128 + SIGPIPE, as a shell reports a reader gone away) when
  stdout or stderr loses its reader (the ssh session that started the run closed without a
  terminal, the `tee` that kept its log killed). Python ignores SIGPIPE, so such a write
  raised BrokenPipeError wherever it happened (a progress bar, a log line), which ended the
  run at once and lost its steps since the last checkpoint. Streams taken from sys.stdout or
  sys.stderr inside the block (progress bars take theirs when made) are the guarded ones."""
  saved = sys.stdout, sys.stderr
  # None where the command started with it closed (`>&-`): print() then writes nothing.
  sys.stdout, sys.stderr = (None if s is None else _StopWhenReaderGone(s) for s in saved)
  try:
    yield
  finally:
    sys.stdout, sys.stderr = saved
