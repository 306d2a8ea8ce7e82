"""SIGTERM during iLoRA training saves a checkpoint; the re-run ends as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_cli, with_sasrec_of

ARGS = [
  "--config=configs/tiny.py",
  "--config.stage=ilora",
  "--config.train.steps=16",
  "--config.ilora.eval_generate=False",
  "--config.ilora.eval_score=False",
]


# The tiny config's SASRec stage for 10 epochs of 65 steps, a checkpoint only at its end.
_SASREC_LONG = [
  "--config=configs/tiny.py",
  "--config.stage=sasrec",
  "--config.sasrec.train.epochs=10",
  "--config.checkpoint.every_steps=1000",
]


def _ilora_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["stage"] == "ilora"]


def test_sigterm_saves_and_resume_matches(pipeline, tmp_path):
  pipeline_dir, _ = pipeline  # Its trained SASRec, frozen under both runs.
  interrupted = tmp_path / "interrupted"
  reference = tmp_path / "reference"
  with_sasrec_of(pipeline_dir, interrupted)
  with_sasrec_of(pipeline_dir, reference)
  env = dict(os.environ)
  env.pop("ILORA_JAX_DEBUG", None)
  child = subprocess.Popen(
    [sys.executable, "-m", "ilora_jax.main", *ARGS, f"--workdir={interrupted}"],
    cwd=ROOT,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )
  deadline = time.time() + 300
  while time.time() < deadline and child.poll() is None:
    path = interrupted / "metrics.jsonl"
    if path.exists() and len(_ilora_records(interrupted)) >= 3:
      break
    time.sleep(0.2)
  assert child.poll() is None, child.stderr.read()
  child.send_signal(signal.SIGTERM)
  _, stderr = child.communicate(timeout=300)
  assert child.returncode == 128 + signal.SIGTERM, stderr
  assert "stopped by SIGTERM at step" in stderr and "Traceback" not in stderr
  assert " ms per step (" in stderr  # The run's speed, also when a signal ends it.
  stopped = int(stderr.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert 3 <= stopped < 16
  again = run_cli(*ARGS, f"--workdir={interrupted}")
  assert again.returncode == 0, again.stderr
  assert f"resumed from step {stopped}" in again.stderr
  full = run_cli(*ARGS, f"--workdir={reference}")
  assert full.returncode == 0, full.stderr
  assert _ilora_records(interrupted) == _ilora_records(reference)


def test_after_a_failed_write_asyncio_reports_of_the_same_failure_are_dropped(caplog):
  """The full-disk run ends with one `error:` line; Orbax's abandoned write tasks must not add
  asyncio's "exception was never retrieved" tracebacks (they did, depending on timing)."""
  import logging

  from ilora_jax import checkpointing

  logger = logging.getLogger("asyncio")
  full = ValueError("RESOURCE_EXHAUSTED: Error writing: No space left [os_error_code='28']")
  other = RuntimeError("a bug elsewhere")
  saved = list(logger.filters)
  try:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
      logger.error("Task exception was never retrieved", exc_info=(ValueError, full, None))
      assert len(caplog.records) == 1  # Not dropped before any write failed.
      checkpointing._drop_asyncio_reports("write")
      checkpointing._drop_asyncio_reports("write")  # Installed once.
      logger.error("Task exception was never retrieved", exc_info=(ValueError, full, None))
      logger.error(f"future: <_GatheringFuture finished exception={full!r}>")
      logger.error("Task exception was never retrieved", exc_info=(RuntimeError, other, None))
    assert [r.exc_info[1] if r.exc_info else None for r in caplog.records] == [full, other]
  finally:
    logger.filters[:] = saved


def test_from_a_checkpoints_restore_on_asyncio_reports_of_damaged_reads_are_dropped(caplog):
  """A damaged checkpoint is one `error:` line; Orbax's other reads of its files fail in tasks
  of their own, which asyncio reported ("exception was never retrieved", with a traceback),
  once before the error line on a loaded machine (a full test run). From a restore on, those
  reports are dropped (a read failure is also a write-failure filter's miss); others stay, a
  full disk's among them."""
  import logging

  from ilora_jax import checkpointing

  logger = logging.getLogger("asyncio")
  damaged = ValueError('OUT_OF_RANGE: Error reading "trainable.lora/.zarray" in OCDBT database')
  gone = FileNotFoundError(2, "No such file or directory")
  other = RuntimeError("a bug elsewhere")
  full = OSError(28, "No space left on device")
  saved = list(logger.filters)
  try:
    logger.filters[:] = []
    with caplog.at_level(logging.ERROR, logger="asyncio"):
      checkpointing._drop_asyncio_reports("write")
      logger.error("Task exception was never retrieved", exc_info=(ValueError, damaged, None))
      assert len(caplog.records) == 1  # Not a write failure: kept.
      logger.filters[:] = []
      checkpointing._drop_asyncio_reports("read")
      checkpointing._drop_asyncio_reports("read")  # Installed once.
      assert sum(getattr(f, "kind", "") == "read" for f in logger.filters) == 1
      logger.error("Task exception was never retrieved", exc_info=(ValueError, damaged, None))
      logger.error("Task exception was never retrieved", exc_info=(OSError, gone, None))
      logger.error(f"future: <Task finished exception={damaged!r}>")
      logger.error("Task exception was never retrieved", exc_info=(RuntimeError, other, None))
      logger.error("Task exception was never retrieved", exc_info=(OSError, full, None))
    kept = [r.exc_info[1] if r.exc_info else None for r in caplog.records]
    assert kept == [damaged, other, full]
  finally:
    logger.filters[:] = saved


def test_an_interrupt_raised_inside_a_gc_callback_still_stops_the_run(tmp_path):
  """Ctrl-C whose KeyboardInterrupt lands in a garbage-collector callback (JAX registers one):
  Python prints it as "Exception ignored" and goes on, so a run interrupted in its final
  evaluation finished with exit 0 (found by an audit, 1 time in 3). An entry point delivers
  the signal again: one `error: interrupted` line, exit 130, and the work after it never runs.
  (The script sets Python's SIGINT handler itself: a test worker's children may inherit
  SIGINT ignored.)"""
  script = tmp_path / "entry.py"
  script.write_text(
    "import gc, signal, time\n"
    "from ilora_jax.errors import cli_main\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)  # As in a terminal.\n"
    "@cli_main\n"
    "def main():\n"
    "  fired = []\n"
    "  def callback(phase, info):\n"
    "    if phase == 'start' and not fired:\n"
    "      fired.append(1)\n"
    "      raise KeyboardInterrupt  # As the SIGINT handler does when it runs here.\n"
    "  gc.callbacks.append(callback)\n"
    "  gc.collect()\n"
    "  for _ in range(250):\n"
    "    time.sleep(0.02)\n"
    "  print('finished')\n"
    "main()\n"
  )
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)  # fmt: skip
  assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "error: interrupted\n")


def _two_processes(workdir, *extra_of_process) -> list[subprocess.Popen]:
  """Both processes of a 2-process CPU run (4 devices each) of the tiny config's SASRec stage,
  process i with the flags `extra_of_process[i]` on top (a --workdir among them in place of
  `workdir`: a flag given twice is refused)."""
  from conftest import TINY, start_processes

  common = [TINY, "--config.stage=sasrec", "--config.distributed.timeout_s=120"]
  return start_processes(*[
    [*common, *extra] + ([] if any(a.startswith("--workdir=") for a in extra)
                         else [f"--workdir={workdir}"])
    for extra in extra_of_process
  ])  # fmt: skip


def test_processes_started_with_different_configs_are_refused(tmp_path):
  """Another checkpoint interval in one process deadlocked both at its first save; another
  data seed trained on a mix of two data sets in silence. Every process now names the ones
  whose config differs from process 0's, before anything runs."""
  refusal = ("error: process(es) 1 were started with another config or --workdir than process "
             "0's (other {}): start every process with the same command (only "
             "--config.distributed.process_id differs)")  # fmt: skip
  procs = _two_processes(tmp_path / "w", [], ["--config.checkpoint.every_steps=7"])
  _each_refused(procs, refusal.format("checkpoint"))
  assert not (tmp_path / "w" / "checkpoints").exists()
  # Another workdir: each process waited at its first checkpoint for the other's, for good.
  procs = _two_processes(tmp_path / "w", [], [f"--workdir={tmp_path / 'w2'}"])
  _each_refused(procs, refusal.format("--workdir"))
  assert not (tmp_path / "w" / "checkpoints").exists()


def _each_refused(procs, line: str) -> None:
  """Every process exited 2 with `line` its only error line (killed after 300 s: a hung pair,
  the defect, must not outlive the test)."""
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, stderr) in zip(procs, outs):
    assert p.returncode == 2, stderr
    assert [x for x in stderr.splitlines() if x.startswith("error: ")] == [line], stderr


def test_processes_that_read_other_data_are_refused(tmp_path):
  """Two hosts with the same command but other files under its data path (here each
  process's own folder: one row's next item differs) fed their rows of each batch from
  their own copies, a silent mix. Every process now names those whose data differ."""
  import pandas as pd
  from conftest import ROOT, start_processes

  for host, last in (("a", 4), ("b", 5)):
    folder = tmp_path / host / "data"
    folder.mkdir(parents=True)
    rows = [{"seq": [1, 2, 3] + [9] * 7, "len_seq": 3, "next": 4}] * 39
    frame = pd.DataFrame([*rows, {"seq": [1, 2, 3] + [9] * 7, "len_seq": 3, "next": last}])
    frame.to_pickle(folder / "train_data.df")
    frame.to_pickle(folder / "Val_data.df")
    (folder / "id2name.txt").write_text("".join(f"{i}::Item {i}\n" for i in range(9)))
  args = [f"--config={ROOT}/configs/lastfm.py", f"--workdir={tmp_path / 'w'}",
          "--config.stage=sasrec", "--config.data.dir=data", "--config.data.n_items=9",
          "--config.data.num_candidates=4", "--config.train.batch_size=8", "--config.train.steps=3",
          "--config.distributed.timeout_s=120"]  # fmt: skip
  procs = start_processes(args, args, cwds=[tmp_path / "a", tmp_path / "b"])
  _each_refused(procs, "error: process(es) 1 read other data than process 0's from data: give "
                "every host the same files")  # fmt: skip
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_processes_that_do_not_share_the_workdir_are_refused(tmp_path):
  """The same relative --workdir started in each host's own folder (or a node-local scratch
  path): each process wrote its part of the first checkpoint into its own folder, and both
  waited 10 minutes at Orbax's barrier before an error with an empty reason (the launch
  audit). Every process now says so at start-up, before anything is trained."""
  from conftest import ROOT, start_processes

  args = [f"--config={ROOT}/configs/tiny.py", "--workdir=w", "--config.stage=sasrec",
          "--config.distributed.timeout_s=120"]  # fmt: skip
  for host in ("a", "b"):
    (tmp_path / host).mkdir()
  procs = start_processes(args, args, cwds=[tmp_path / "a", tmp_path / "b"])
  _each_refused(procs, "error: --workdir=w is not one folder that every process shares: "
                "process(es) 1 do not see the file process 0 wrote there; give every process a "
                "--workdir on a file system all hosts mount at the same path (every process "
                "writes its part of each checkpoint there; a relative path is taken from each "
                "process's own folder)")  # fmt: skip
  for host in ("a", "b"):
    assert sorted(os.listdir(tmp_path / host / "w")) == [], host  # Nothing left, no lock.


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
  """SIGTERM to one process of a 2-process run (a preempted host) sent it alone into the
  checkpoint's collective write while the other ran on: both hung, nothing saved. Now every
  process stops after the same step, they save it together and exit as a signal does."""
  workdir = tmp_path / "w"
  long = ["--config.train.epochs=40", "--config.checkpoint.every_steps=1000"]
  procs = _two_processes(workdir, long, long)
  try:
    deadline = time.time() + 300
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      time.sleep(0.2)
    assert all(p.poll() is None for p in procs), procs[0].stderr.read()
    procs[1].send_signal(signal.SIGTERM)
    stopped = []
    for p in procs:
      _, stderr = p.communicate(timeout=300)
      assert p.returncode == 128 + signal.SIGTERM, stderr
      assert "Traceback" not in stderr, stderr
      stopped.append(int(stderr.split("stopped by SIGTERM at step ")[1].split(";")[0]))
  finally:  # A hung pair (the defect) must not outlive the test.
    for p in procs:
      p.kill()
  assert stopped[0] == stopped[1]
  assert (workdir / "checkpoints" / "sasrec" / str(stopped[0])).is_dir()


def test_a_reader_of_the_output_gone_away_stops_training_with_a_checkpoint(tmp_path):
  """Python ignores SIGPIPE: a write to stderr after its reader went away (an ssh session
  without a terminal closed, the `tee` that kept the log killed) raised BrokenPipeError, which
  ended the run at once, exit 141, its steps since the last checkpoint lost (none saved here).
  Now the training loop stops after its step and saves it, exit 141 all the same, and the same
  command resumes from there."""
  workdir = tmp_path / "w"
  args = [*_SASREC_LONG, f"--workdir={workdir}"]
  env = dict(os.environ)
  env.pop("ILORA_JAX_DEBUG", None)
  child = subprocess.Popen([sys.executable, "-m", "ilora_jax.main", *args], cwd=ROOT,
                           stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
  try:
    deadline = time.time() + 300
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and child.poll() is None:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      time.sleep(0.2)
    assert child.poll() is None, child.stderr.read()
    child.stderr.close()  # The reader goes away.
    assert child.wait(timeout=300) == 128 + signal.SIGPIPE
  finally:
    child.kill()
  saved = [int(s) for s in os.listdir(workdir / "checkpoints" / "sasrec")]
  assert len(saved) == 1 and 15 <= saved[0] < 650, saved  # Not one of every_steps'.
  again = run_cli(*args)
  assert again.returncode == 0, again.stderr
  assert f"SASRec: resumed from step {saved[0]} of 650" in again.stderr


def test_a_broken_pipe_stops_the_training_loop_and_is_raised_elsewhere():
  """The guarded stream: inside a training loop (`Graceful`) the failed write is a stop request
  (SIGPIPE, exit 141) and the stream's descriptor now leads to /dev/null, so later writes, by
  any holder of the stream or its descriptor, succeed; outside one the error is raised."""
  from ilora_jax.interrupts import Graceful, Interrupted, _StopWhenReaderGone

  read, write = os.pipe()
  os.close(read)
  with open(write, "w", buffering=1) as raw:
    guarded = _StopWhenReaderGone(raw)
    try:
      print("outside", file=guarded, flush=True)
    except BrokenPipeError:
      pass
    else:
      raise AssertionError("no BrokenPipeError outside a training loop")
    with Graceful() as stop:
      print("step 3", file=guarded, flush=True)
      assert stop.signum == signal.SIGPIPE
      assert os.path.samestat(os.fstat(raw.fileno()), os.stat(os.devnull))
      print("later", file=raw, flush=True)  # The stream itself, not only through the guard.
      guarded.write("later")
  assert str(Interrupted(signal.SIGPIPE, 3)) == (
    "stopped at step 3: the reader of the run's output went away (a broken pipe)"
  )


def _clock(monkeypatch, times):
  """`time.monotonic` as `interrupts` alone sees it: the values of `times`, one per call."""
  import types

  from ilora_jax import interrupts

  ticks = iter(times)
  monkeypatch.setattr(interrupts, "time", types.SimpleNamespace(monotonic=lambda: next(ticks)))


def test_a_second_sigint_is_ignored_for_five_seconds_then_stops_at_once(monkeypatch):
  """The first signal only asks for a stop after the step; a second Ctrl-C within 5 s of it
  (the checkpoint being written) is ignored, one later is "stop now" (KeyboardInterrupt). A
  second SIGTERM never is; neither replaces the first signal or its time."""
  from ilora_jax.interrupts import Graceful

  def deliver(signum):  # What the handler did (a KeyboardInterrupt must not end pytest).
    try:
      stop._handler(signum, None)
    except KeyboardInterrupt:
      return "stop now"
    return "ignored"

  _clock(monkeypatch, [100.0, 101.0, 104.5, 106.0, 106.0, 107.0])
  stop = Graceful()
  assert deliver(signal.SIGTERM) == "ignored"  # t=100: the first, asks for a stop.
  assert stop.requested and stop.signum == signal.SIGTERM
  # t=101 and t=104.5: a SIGINT within 5 s of the first is ignored; at t=106 a SIGTERM is
  # never "stop now", a SIGINT 6 s after the first is (and one at t=107 too).
  later = [signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGINT]
  got = [deliver(signum) for signum in later]
  assert got == ["ignored", "ignored", "ignored", "stop now", "stop now"]
  assert stop.signum == signal.SIGTERM


def test_leaving_the_block_restores_the_handlers_that_were_there():
  import threading

  from ilora_jax.interrupts import Graceful

  assert threading.current_thread() is threading.main_thread()  # Else nothing is installed.
  mine = lambda signum, frame: None  # noqa: E731
  before = signal.signal(signal.SIGTERM, mine)  # A handler of the caller's own.
  try:
    sigint = signal.getsignal(signal.SIGINT)
    with Graceful() as stop:
      assert signal.getsignal(signal.SIGINT) == stop._handler
      assert signal.getsignal(signal.SIGTERM) == stop._handler
    assert signal.getsignal(signal.SIGINT) is sigint
    assert signal.getsignal(signal.SIGTERM) is mine
    with Graceful(signals=(signal.SIGTERM,)) as stop:  # Only the signals asked for.
      assert signal.getsignal(signal.SIGINT) is sigint
      assert signal.getsignal(signal.SIGTERM) == stop._handler
    assert signal.getsignal(signal.SIGTERM) is mine
  finally:
    signal.signal(signal.SIGTERM, before)


def test_sighup_stops_as_sigterm_does_unless_it_is_ignored():
  """A closed terminal or ssh session sends SIGHUP, which ended a run at once without saving
  (the launch audit: exit 129, the steps since the last checkpoint lost). It now stops after
  the step as SIGTERM does; under `nohup` (ignored) it stays ignored."""
  from ilora_jax.interrupts import Graceful

  before = signal.getsignal(signal.SIGHUP)
  try:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    with Graceful() as stop:
      os.kill(os.getpid(), signal.SIGHUP)
      time.sleep(0.5)  # Delivered to this (the main) thread meanwhile.
      assert stop.signum == signal.SIGHUP
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with Graceful() as stop:
      assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGHUP)
      time.sleep(0.5)
      assert stop.signum is None
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGHUP, before)


def test_agree_asks_the_processes_once_per_step(monkeypatch):
  """Two processes (faked): the answer for a step is the one gathered the first time it was
  asked; a signal arriving after that counts at the next step, in one more gather. Another
  process's signal is adopted."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from ilora_jax.interrupts import Graceful

  gathered = []
  other = {"signum": 0}  # What the other process sends.

  def allgather(value):
    gathered.append(int(value))
    return np.array([int(value), other["signum"]], np.int32)

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  _clock(monkeypatch, [10.0, 20.0])
  stop = Graceful()
  assert stop.agree(5) is False
  stop._handler(signal.SIGTERM, None)  # Arrives after the processes asked about step 5.
  assert stop.agree(5) is False  # The same answer as the other process got, no new gather.
  assert gathered == [0]
  assert stop.agree(6) is True
  assert stop.agree(6) is True
  assert gathered == [0, int(signal.SIGTERM)]
  alone = Graceful()  # Only the other process heard one: adopted, the same step.
  other["signum"] = int(signal.SIGINT)
  assert alone.agree(6) is True and alone.agree(6) is True
  assert alone.signum == signal.SIGINT and alone._first_at == 20.0
  assert gathered == [0, int(signal.SIGTERM), 0]


def test_exit_raises_interrupted_naming_the_signal_and_the_step(monkeypatch):
  """What the CLI prints (`stopped by SIGTERM at step 7; ...`) and its exit code (128 + the
  signal's number) come from the exception `exit` raises."""
  from ilora_jax.interrupts import Graceful, Interrupted

  _clock(monkeypatch, [50.0])
  stop = Graceful()
  stop._handler(signal.SIGINT, None)
  try:
    stop.exit(7)
  except Interrupted as exc:
    raised = exc
  else:
    raise AssertionError("exit returned")
  assert (raised.signum, raised.step) == (signal.SIGINT, 7)
  assert str(raised) == "stopped by SIGINT at step 7"
  assert str(Interrupted(signal.SIGTERM, 12)) == "stopped by SIGTERM at step 12"
  assert Interrupted(signal.SIGTERM, 12).signum == 15  # POSIX: 128 + 15 = exit 143.


def _deliver(stop, signum) -> str:
  """What `stop`'s handler did with `signum` (a KeyboardInterrupt must not end pytest)."""
  try:
    stop._handler(signum, None)
  except KeyboardInterrupt:
    return "stop now"
  return "ignored"


def test_a_second_sigint_exactly_five_seconds_later_is_still_ignored(monkeypatch):
  """A SIGINT 5 s after the first is "within 5 s" of it."""
  from ilora_jax.interrupts import Graceful

  _clock(monkeypatch, [100.0, 105.0, 105.25])
  stop = Graceful()
  got = [_deliver(stop, signal.SIGINT) for _ in range(3)]  # At t=100, 105 and 105.25.
  assert got == ["ignored", "ignored", "stop now"]


def test_only_a_second_sigint_means_stop_now(monkeypatch):
  """Other signals a caller asks for (SIGHUP here) only ask for a stop, however late."""
  from ilora_jax.interrupts import Graceful

  _clock(monkeypatch, [0.0, 60.0, 60.0])
  stop = Graceful(signals=(signal.SIGINT, signal.SIGHUP))
  got = [_deliver(stop, s) for s in (signal.SIGHUP, signal.SIGHUP, signal.SIGINT)]
  assert got == ["ignored", "ignored", "stop now"]  # The second SIGHUP a minute later.
  assert stop.signum == signal.SIGHUP


def test_outside_the_main_thread_nothing_is_installed():
  """Python lets only the main thread set signal handlers: in another one the block runs
  without them (no error), and leaving it changes nothing."""
  import threading

  from ilora_jax.interrupts import Graceful

  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  seen, errors = [], []

  def worker():
    try:
      with Graceful() as stop:
        seen.append({s: signal.getsignal(s) for s in before})
        assert not stop.requested
    except BaseException as exc:  # noqa: BLE001 - reported in the main thread.
      errors.append(exc)

  thread = threading.Thread(target=worker)
  thread.start()
  thread.join(timeout=30)
  assert errors == [] and seen == [before]
  assert {s: signal.getsignal(s) for s in before} == before


def test_agree_asks_again_for_any_other_step(monkeypatch):
  """The answer kept is for the step asked about: another step, also an earlier one (as
  after a restore), is gathered again."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from ilora_jax.interrupts import Graceful

  gathered = []

  def allgather(value):
    gathered.append(int(value))
    return np.array([int(value), 0], np.int32)

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  stop = Graceful()
  assert stop.agree(6) is False
  assert stop.agree(5) is False
  assert gathered == [0, 0]
