"""prefetch.Prefetch: the same batches in the same order as building them in the loop, built
concurrently with the consumer, errors raised where they happened, a clean stop."""

import gc
import itertools
import queue
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest

from ilora_jax.prefetch import Prefetch


def make(i):
  return {"i": i, "x": np.random.default_rng(i).normal(size=3)}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_in_order(depth):
  with Prefetch(make, range(7), depth) as batches:
    got = list(batches)
  want = [make(i) for i in range(7)]
  assert [g["i"] for g in got] == list(range(7))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["x"], w["x"])
  assert batches.count == 7


def test_builds_the_next_batch_while_the_consumer_works():
  consumer_has_0 = threading.Event()
  second_overlapped = threading.Event()

  def make(i):
    if i == 1 and consumer_has_0.wait(timeout=30):
      # Batch 1 is being built while the consumer holds batch 0 (and has not asked for 1).
      second_overlapped.set()
    return i

  with Prefetch(make, range(3), depth=1) as batches:
    assert next(batches) == 0
    consumer_has_0.set()
    assert second_overlapped.wait(timeout=30)
    assert list(batches) == [1, 2]


def test_in_the_loop_does_not_overlap():
  # The same probe without a thread: batch 1 is built only when asked for, after batch 0.
  consumer_has_0 = threading.Event()
  overlapped = []

  def make(i):
    if i == 1:
      overlapped.append(not consumer_has_0.is_set())
    return i

  with Prefetch(make, range(3), depth=0) as batches:
    assert next(batches) == 0
    consumer_has_0.set()
    assert list(batches) == [1, 2]
  assert overlapped == [False]


def test_stop_iteration_in_make_is_an_error():
  def make(i):
    if i == 2:
      raise StopIteration
    return i

  for depth in (0, 2):
    with pytest.raises(RuntimeError, match="batch 2 raised StopIteration"):
      with Prefetch(make, range(5), depth) as batches:
        list(batches)


def test_summary_divides_build_time_by_batches_built(monkeypatch):
  # A fake clock: every build takes 20 ms of it, nothing else advances it.
  import ilora_jax.prefetch as prefetch_lib

  clock = {"now": 0.0}
  monkeypatch.setattr(prefetch_lib.time, "perf_counter", lambda: clock["now"])

  def make(i):
    clock["now"] += 0.020
    return i

  with Prefetch(make, range(6), depth=0) as batches:
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
  assert batches.built == batches.count == 3
  assert batches.summary().endswith("20.0 ms built, 20.0 ms waited for, per step")
  with Prefetch(make, range(6), depth=3) as batches:  # batches built ahead, then dropped
    assert next(batches) == 0
    while batches.built < 4:
      threading.Event().wait(0.01)
  assert batches.count == 1 and batches.built >= 4
  assert "20.0 ms built" in batches.summary()


def test_without_thread_builds_only_on_demand():
  calls = []

  def record(i):
    calls.append(i)
    return i

  with Prefetch(record, range(5), depth=0) as batches:
    assert next(batches) == 0
    assert calls == [0]


def test_bounded_lead():
  # depth 2: two batches queued plus one built and waiting to be queued, never a fifth.
  fourth_built, fifth_started = threading.Event(), threading.Event()

  def record(i):
    if i == 3:
      fourth_built.set()
    if i == 4:
      fifth_started.set()
    return i

  with Prefetch(record, itertools.count(), depth=2) as batches:
    assert next(batches) == 0
    assert fourth_built.wait(timeout=30)  # the thread ran as far ahead as it may
    assert not fifth_started.wait(timeout=0.3)
    assert next(batches) == 1
    assert fifth_started.wait(timeout=30)  # taking one lets it build one more


def _consume_failing(error, at, depth=2, n=6):
  """Takes the batches of a Prefetch whose batch `at` raises `error` (expected to end the
  loop); returns the batches taken before it and the Prefetch."""

  def failing(i):
    if i == at:
      raise error
    return i

  got = []
  with pytest.raises(type(error), match=str(error.args[0])):
    with Prefetch(failing, range(n), depth) as batches:
      for b in batches:
        got.append(b)
  return got, batches


def test_error_raised_in_the_consumer_at_its_index():
  got, _ = _consume_failing(KeyError("row 3"), at=3)
  assert got == [0, 1, 2]


def test_leaving_early_stops_the_thread():
  with Prefetch(make, itertools.count(), depth=2) as batches:
    next(batches)
    thread = batches._thread
    assert thread.is_alive()
  assert not thread.is_alive()
  assert list(batches) == []


def test_negative_depth():
  with pytest.raises(ValueError, match="depth"):
    Prefetch(make, range(3), -1)


def test_no_batch_is_started_after_the_block_is_left():
  """The thread has queued batch 1 and is taking the next index when the consumer leaves the
  block: it stops there, without building batch 2."""
  asked_for_2 = threading.Event()
  calls = []

  def record(i):
    calls.append(i)
    return i

  def indices():
    yield 0
    yield 1
    asked_for_2.set()  # Batch 1 is queued (depth 1: put once batch 0 was taken).
    assert batches._stop.wait(timeout=30)  # Until the consumer has left the block.
    yield 2

  with Prefetch(record, indices(), depth=1) as batches:
    assert next(batches) == 0
    assert asked_for_2.wait(timeout=30)
  assert calls == [0, 1]
  assert batches.built == 2 and batches.count == 1


@pytest.mark.parametrize("depth", [0, 2])
def test_a_failed_batch_is_not_counted(depth):
  _, batches = _consume_failing(KeyError("row 3"), at=3, depth=depth)
  assert batches.count == 3


def test_a_stop_iteration_names_the_prefetcher_and_the_index():
  def make(i):
    raise StopIteration

  with pytest.raises(RuntimeError) as raised:
    with Prefetch(make, ["b"], 1, name="train batches") as batches:
      next(batches)
  assert str(raised.value) == "train batches: building batch 'b' raised StopIteration"
  assert isinstance(raised.value.__cause__, StopIteration)  # The original, kept as the cause.


class Abort(BaseException):
  """Not an Exception (as KeyboardInterrupt and SystemExit are not)."""


def test_a_base_exception_in_the_thread_is_raised_in_the_consumer():
  got, _ = _consume_failing(Abort("at 2"), at=2, n=5)
  assert got == [0, 1]


def test_a_failure_put_as_the_consumer_stopped_waiting_is_still_raised():
  """The thread puts its failure and ends just after the consumer's wait for an item timed
  out: the item in the queue is still taken, the iteration does not end quietly."""

  class LateQueue(queue.Queue):
    timed_out = False

    def get(self, block=True, timeout=None):
      if not self.timed_out:
        self.timed_out = True
        batches._thread.join(timeout=30)  # It puts the failure and ends meanwhile.
        assert not batches._thread.is_alive()
        raise queue.Empty
      return super().get(block, timeout)

  def failing(i):
    raise KeyError("row 0")

  batches = Prefetch(failing, range(3), depth=1)
  batches._queue = LateQueue(maxsize=1)
  with pytest.raises(KeyError, match="row 0"):
    with batches:
      next(batches)
  assert batches._queue.timed_out


def test_leaving_the_block_waits_for_the_batch_being_built():
  """The thread is building batch 1 when the consumer leaves: the block ends once it has
  finished it (no thread left running), and the batch is dropped."""
  building_1, finish_1 = threading.Event(), threading.Event()

  def slow(i):
    if i == 1:
      building_1.set()
      assert finish_1.wait(timeout=30)
    return i

  with Prefetch(slow, range(5), depth=1) as batches:
    assert next(batches) == 0
    thread = batches._thread
    assert building_1.wait(timeout=30)
    threading.Timer(0.2, finish_1.set).start()  # Longer than one wait of `close` for it.
  assert not thread.is_alive()
  assert batches.built == 2 and batches.count == 1
  assert list(batches) == []


def test_batches_not_taken_are_released_when_the_block_is_left():
  """Batch 1 queued and batch 2 built, waiting for room, when the consumer leaves: neither is
  kept (a batch can hold much memory), though the Prefetch object is."""

  class Batch:
    def __init__(self, i):
      self.i = i

  made = {}

  def build(i):
    made[i] = weakref.ref(batch := Batch(i))
    return batch

  with Prefetch(build, range(10), depth=1) as batches:
    first = next(batches)
    while batches.built < 3:
      threading.Event().wait(0.005)
    threading.Event().wait(0.05)  # Batch 2 is waiting to be queued.
  gc.collect()
  assert first.i == 0 and made[0]() is first
  assert sorted(made) == [0, 1, 2]
  assert made[1]() is None and made[2]() is None


def test_depth_0_builds_nothing_after_the_block_is_left():
  calls = []

  def record(i):
    calls.append(i)
    return i

  with Prefetch(record, range(5), depth=0) as batches:
    assert next(batches) == 0
  assert list(batches) == []
  assert calls == [0]


def test_the_thread_bears_the_name_given():
  with Prefetch(make, range(3), depth=1, name="eval batches") as batches:
    assert batches._thread in [t for t in threading.enumerate() if t.name == "eval batches"]
    list(batches)


def test_a_process_that_never_leaves_the_block_still_exits():
  """The thread (waiting for room in the queue forever) does not keep the process alive."""
  code = (
    "import itertools\n"
    "from ilora_jax.prefetch import Prefetch\n"
    "batches = Prefetch(lambda i: i, itertools.count(), depth=1).__enter__()\n"
    "print(next(batches))\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert (proc.returncode, proc.stdout) == (0, "0\n"), proc.stderr


@pytest.mark.parametrize(
  "depth, built_s, built, waited_s, count, how, built_ms, waited_ms",
  [
    # 300 ms over 4 built is 75 ms each; 50 ms waited over the 2 taken is 25 ms each.
    (2, 0.3, 4, 0.05, 2, "2 ahead in a thread", "75.0", "25.0"),
    (1, 0.0123, 1, 0.0, 1, "1 ahead in a thread", "12.3", "0.0"),
    (0, 0.2, 4, 0.21, 3, "in the loop", "50.0", "70.0"),
    (3, 0.0, 0, 0.0, 0, "3 ahead in a thread", "0.0", "0.0"),  # None yet: no division by 0.
  ],
)
def test_summary_line(depth, built_s, built, waited_s, count, how, built_ms, waited_ms):
  batches = Prefetch(make, range(3), depth)
  batches.built_s, batches.built, batches.waited_s, batches.count = built_s, built, waited_s, count
  want = f"host batches ({how}): {built_ms} ms built, {waited_ms} ms waited for, per step"
  assert batches.summary() == want


@pytest.mark.parametrize("apart_s, built_ms", [(0.1, "50.0"), (0.3, "0.0"), (0.5, "0.0")])
def test_summary_leaves_one_off_work_out_of_the_build_time(apart_s, built_ms):
  """`apart_s` of one-off work inside the builds (an epoch's row order) is not spread over
  the batches: 300 ms over 4 built, 100 ms of it apart, is 50 ms each; never below 0."""
  batches = Prefetch(make, range(3), 2)
  batches.built_s, batches.built, batches.waited_s, batches.count = 0.3, 4, 0.05, 2
  want = f"host batches (2 ahead in a thread): {built_ms} ms built, 25.0 ms waited for, per step"
  assert batches.summary(apart_s=apart_s) == want
