"""Host batches built ahead of the device step, in a background thread.

    with Prefetch(make_batch, range(start, stop), depth=2) as batches:
      for batch in batches:
        ...dispatch the step; block on its metrics...

`make_batch(i)` runs in order for every index, at most `depth` ahead of the consumer, so the
host work of the next step (tokenising, padding, candidate sampling) overlaps the device work
of this one. The batches are the same as without the thread: `make_batch` must be a pure
function of its index (the training batches are: drawn from the seed, epoch and step). An
exception raised in the thread is raised again in the consumer at the index that failed.
Leaving the `with` block (a stop, an error) stops the thread; batches not yet taken are
dropped. `depth=0` builds each batch in the consumer's thread (no thread at all).

`built_s` and `waited_s` are the seconds spent building batches (`built` of them, counting
any dropped at the end) and the seconds the consumer waited for the `count` it took: with
the thread, what is left of the host work on the step's critical path. A `StopIteration`
raised by `make_batch` is raised as a `RuntimeError` (it would end the loop silently).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class _Failed:
  def __init__(self, error: BaseException):
    self.error = error


_DONE = object()


class Prefetch:
  def __init__(
    self,
    make: Callable[[Any], Any],
    indices: Iterable[Any],
    depth: int,
    name: str = "prefetch",
  ):
    if depth < 0:
      raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    self._make = make
    self._indices = iter(indices)
    self.depth = int(depth)
    self.name = name
    self.built_s = 0.0
    self.built = 0
    self.waited_s = 0.0
    self.count = 0
    self._queue: queue.Queue = queue.Queue(maxsize=max(self.depth, 1))
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> Prefetch:
    if self.depth > 0:
      self._thread = threading.Thread(target=self._produce, name=self.name, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Stops the thread (it finishes the batch it is building) and drops what it built."""
    self._stop.set()
    if self._thread is not None:
      while self._thread.is_alive():
        self._drain()
        self._thread.join(timeout=0.05)
      self._thread = None
    self._drain()

  def _drain(self) -> None:
    try:
      while True:
        self._queue.get_nowait()
    except queue.Empty:
      pass

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _build(self, index):
    start = time.perf_counter()
    try:
      batch = self._make(index)
    except StopIteration as error:  # would otherwise end the consumer's loop silently
      raise RuntimeError(f"{self.name}: building batch {index!r} raised StopIteration") from error
    self.built_s += time.perf_counter() - start
    self.built += 1
    return batch

  def _produce(self) -> None:
    try:
      for index in self._indices:
        if self._stop.is_set() or not self._put(self._build(index)):
          return
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
      self._put(_Failed(error))
      return
    self._put(_DONE)

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self):
    start = time.perf_counter()
    try:
      if self._thread is None:
        if self._stop.is_set():
          raise StopIteration
        index = next(self._indices)  # StopIteration ends the loop
        item = self._build(index)
        self.count += 1
        return item
      while True:
        try:
          item = self._queue.get(timeout=0.1)
          break
        except queue.Empty:
          if not self._thread.is_alive() and self._queue.empty():
            raise StopIteration from None
      if item is _DONE:
        raise StopIteration
      if isinstance(item, _Failed):
        raise item.error
      self.count += 1
      return item
    finally:
      self.waited_s += time.perf_counter() - start

  def summary(self, apart_s: float = 0.0) -> str:
    """One line: ms to build a batch (over all built, dropped ones too; `apart_s` seconds of
    one-off work inside the builds left out) and ms the consumer waited for one (over the
    batches it took)."""
    how = f"{self.depth} ahead in a thread" if self.depth else "in the loop"
    built_s = max(self.built_s - apart_s, 0.0)
    return (
      f"host batches ({how}): {1000 * built_s / max(self.built, 1):.1f} ms built, "
      f"{1000 * self.waited_s / max(self.count, 1):.1f} ms waited for, per step"
    )
