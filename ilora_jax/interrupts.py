"""SIGINT / SIGTERM during training: finish the step, save a checkpoint, then exit.

    with interrupts.Graceful() as stop:
      while ...:
        ...one step...
        if stop.requested:
          save(step)
          stop.exit(step)   # raises Interrupted

A second SIGINT while the checkpoint is being written is ignored for a few seconds, then
taken as "stop now" (KeyboardInterrupt). Outside the main thread nothing is installed.
"""

from __future__ import annotations

import signal
import threading
import time


class Interrupted(Exception):
  """Training stopped on a signal after saving; the CLI exits with 128 + signal number."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
    self.signum = signum
    self.step = step


class Graceful:
  def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
    self.signals = signals
    self.signum: int | None = None
    self._first_at = 0.0
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handler(self, signum, frame):
    if self.signum is None:
      self.signum, self._first_at = signum, time.monotonic()
      return
    if signum == signal.SIGINT and time.monotonic() - self._first_at > 5.0:
      raise KeyboardInterrupt

  def exit(self, step: int) -> None:
    raise Interrupted(self.signum, step)

  def __enter__(self) -> Graceful:
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
