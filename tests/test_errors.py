"""errors: a user's mistake is one `error: ...` line and exit 2 (README), a bug one line and
exit 3, a signal's stop 128 + its number; flag and config-file failures worded as one line.
In-process checks of the helpers (test_cli.py runs the commands themselves)."""

import errno
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
from unittest import mock

import pytest
from absl import flags
from conftest import ROOT
from ml_collections import ConfigDict, config_flags

from ilora_jax import errors
from ilora_jax.errors import UserError
from ilora_jax.interrupts import Interrupted


@pytest.fixture
def quiet_restored(monkeypatch):
  """What `report_and_exit` silences for the rest of a process, put back after the test."""
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  monkeypatch.setattr(threading, "excepthook", threading.excepthook)
  asyncio_logger = logging.getLogger("asyncio")
  level = asyncio_logger.level
  with warnings.catch_warnings():
    yield
  asyncio_logger.setLevel(level)


def _exit_of(exc, capsys) -> tuple[object, str, str]:
  """The exit code `report_and_exit(exc)` ends with, and what it wrote to stdout and stderr."""
  # An interruption ends the process at once (`os._exit`): here, as `sys.exit` would.
  with mock.patch.object(errors, "_exit_now", sys.exit), pytest.raises(SystemExit) as ended:
    errors.report_and_exit(exc)
  out, err = capsys.readouterr()
  return ended.value.code, out, err


def test_a_user_error_is_one_line_and_exit_2(capsys, quiet_restored):
  code, out, err = _exit_of(UserError("data file\n   broken:  row 3"), capsys)
  assert (code, out, err) == (2, "", "error: data file broken: row 3\n")
  assert errors.EXIT_USER_ERROR == 2


def _screen(written: str) -> list[str]:
  """The lines a terminal shows for `written`: a carriage return goes back to the line's start,
  where the text after it overwrites what stood there."""
  lines = []
  for raw in written.split("\n"):
    shown = ""
    for part in raw.split("\r"):
      shown = part + shown[len(part) :]
    lines.append(shown.rstrip())
  return [line for line in lines if line]


def test_an_error_inside_a_progress_bar_loop_stands_on_its_own_line(capsys, quiet_restored):
  """A command that fails inside a loop with a progress bar (an iLoRA run's non-finite steps, a
  Ctrl-C in an evaluation): its line was appended to the bar's text on the screen, and the bar,
  closed at exit, drawn again below it. The bars are cleared first."""
  from tqdm import tqdm

  bar = tqdm(total=10, desc="ilora train", file=sys.stderr, mininterval=0)
  bar.update(3)
  code, _, err = _exit_of(UserError("5 optimizer steps in a row had a non-finite loss"), capsys)
  del bar  # As the interpreter collects it at exit: drawn again unless closed.
  err += capsys.readouterr().err
  assert code == 2
  assert _screen(err) == ["error: 5 optimizer steps in a row had a non-finite loss"], err


def test_a_message_during_a_progress_bar_is_a_line_of_its_own(capsys):
  """`console.line` (every `console.info`): the message above the bar, which is drawn again
  below it, where a print was appended to the bar's text (`... 3/10 [...]SASRec step 65 ...`)."""
  from tqdm import tqdm

  from ilora_jax import console

  bar = tqdm(total=10, desc="sasrec train", file=sys.stderr, mininterval=0)
  bar.update(3)
  console.line("SASRec step 3 val hr@1=0.7000")
  bar.close()
  shown = _screen(capsys.readouterr().err)
  assert shown[0] == "SASRec step 3 val hr@1=0.7000", shown
  assert len(shown) == 2 and shown[1].startswith("sasrec train:  30%|"), shown


def test_a_progress_bar_in_a_log_writes_a_line_per_state_now_and_then(monkeypatch, capsys):
  """Where stderr is no terminal (a log file), a bar's states each stood after a carriage
  return, about ten a second and at every postfix: one ever longer line. Now each state is a
  line, at most one per interval, the first after one (a short loop writes none), the last at
  the end; the nested evaluation bar's cursor moves are dropped."""
  from ilora_jax import console

  monkeypatch.setattr(console, "LOG_INTERVAL_S", 0.25)
  quick = console.bar(total=3, desc="eval val", leave=False, enabled=True)
  quick.update(3)
  quick.close()
  assert capsys.readouterr().err == ""
  started = time.monotonic()
  bar = console.bar(total=20, desc="sasrec train", enabled=True)
  for i in range(20):
    time.sleep(0.05)
    bar.update(1)
    bar.set_postfix(loss=f"{1 / (i + 1):.4f}", refresh=False)
    if i == 10:
      for _ in console.bar(range(10), desc="eval val", leave=False, enabled=True):
        time.sleep(0.03)
      console.line("SASRec step 11 val hr@1=0.7000")
  bar.close()
  elapsed = time.monotonic() - started  # 1.3 s or more (a loaded machine sleeps longer).
  err = capsys.readouterr().err
  assert "\r" not in err and "\x1b" not in err, repr(err)
  lines = err.splitlines()
  assert "SASRec step 11 val hr@1=0.7000" in lines
  states = [line for line in lines if line.startswith("sasrec train: ")]
  # Its first state after 0.25 s, then at most one per 0.25 s, and the last.
  assert 2 <= len(states) <= elapsed / 0.25 + 1, (elapsed, lines)
  assert states[-1].startswith("sasrec train: 100%|") and "loss=0.0500" in states[-1], lines
  others = [x for x in lines if x not in states and x != "SASRec step 11 val hr@1=0.7000"]
  assert all(x.startswith("eval val: ") for x in others), lines  # The nested bar's, if any.


def test_progress_bars_are_drawn_by_process_0_alone(monkeypatch):
  """The SASRec stage's bars and both stages' evaluation bars were drawn by every process."""
  from ilora_jax import console

  monkeypatch.setattr(console.jax, "process_index", lambda: 1)
  assert console.bar(total=3, enabled=True).disable
  monkeypatch.setattr(console.jax, "process_index", lambda: 0)
  assert not console.bar(total=3, enabled=True).disable
  assert console.bar(total=3, enabled=False).disable


def test_sigterm_ends_every_command_with_one_line(tmp_path):
  """`recommend` and `report` (any entry point outside training's own block) died of SIGTERM
  without a word, where Ctrl-C gives one line: now the same line and 128 + 15."""
  script = tmp_path / "entry.py"
  script.write_text(
    "import time\n"
    "from ilora_jax.errors import cli_main\n"
    "@cli_main\n"
    "def main():\n"
    "  print('ready', flush=True)\n"
    "  time.sleep(60)\n"
    "main()\n"
  )
  child = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
  try:
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
  finally:
    child.kill()
  assert (child.returncode, err) == (128 + signal.SIGTERM, "error: interrupted by SIGTERM\n")


def test_a_command_started_with_stderr_closed_runs_without_its_lines(tmp_path):
  """`2>&-`: Python's sys.stderr is None, so progress lines were printed on stdout among the
  results, and a progress bar ended the run (exit 3, an AttributeError). They now go to
  /dev/null."""
  script = tmp_path / "entry.py"
  script.write_text(
    "from ilora_jax import console\n"
    "from ilora_jax.errors import cli_main\n"
    "@cli_main\n"
    "def main():\n"
    "  console.info('SASRec: 2080 training rows')\n"
    "  print('sasrec val step 130: hr@1=0.7000')\n"
    "main()\n"
  )
  proc = subprocess.run(["bash", "-c", f"{sys.executable} {script} 2>&-"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)  # fmt: skip
  assert (proc.returncode, proc.stdout) == (0, "sasrec val step 130: hr@1=0.7000\n")


def _raised_starting_a_backend(tmp_path, exc: BaseException) -> BaseException:
  """`exc`, raised from a function `backends` of a file named as jax's `xla_bridge.py`."""
  source = tmp_path / "xla_bridge.py"
  source.write_text("def backends(exc):\n  raise exc\n")
  space: dict = {}
  exec(compile(source.read_text(), str(source), "exec"), space)
  try:
    space["backends"](exc)
  except BaseException as raised:  # noqa: BLE001
    return raised
  raise AssertionError("not raised")


def test_a_backend_that_does_not_start_is_one_line_an_interrupt_there_stays_one(
  capsys, quiet_restored, monkeypatch, tmp_path
):
  """Where no JAX_PLATFORMS is given the advice is the device's, not a platform's; a Ctrl-C
  or SIGTERM while the backend starts (a pre-empted job) was reported as a backend that did
  not start, exit 2 (found by the diff review)."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  code, _, err = _exit_of(_raised_starting_a_backend(tmp_path, RuntimeError("busy\nmore")), capsys)
  assert (code, err) == (2, "error: jax could not start its backend (RuntimeError: busy); check "
                            "that the accelerator is free and its driver works (another process "
                            "holding it, a driver that does not match jax's build)\n")  # fmt: skip
  code, _, err = _exit_of(_raised_starting_a_backend(tmp_path, KeyboardInterrupt()), capsys)
  assert (code, err) == (130, "error: interrupted\n")


def test_a_kind_of_user_error_is_one_too(capsys, quiet_restored):
  class NoVocab(UserError):
    pass

  assert _exit_of(NoVocab("no vocab"), capsys) == (2, "", "error: no vocab\n")


def test_after_a_user_error_background_reports_are_silenced(capsys, quiet_restored):
  _exit_of(UserError("x"), capsys)
  assert logging.getLogger("asyncio").level > logging.CRITICAL
  assert sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("late"))) is None
  assert threading.excepthook(types.SimpleNamespace(exc_value=ValueError("late"))) is None
  with warnings.catch_warnings(record=True) as caught:
    warnings.warn("coroutine was never awaited", RuntimeWarning, stacklevel=1)
  assert caught == []
  assert capsys.readouterr() == ("", "")  # The hooks print nothing either.


def test_a_signal_stop_exits_128_plus_its_number(capsys):
  code, out, err = _exit_of(Interrupted(signal.SIGTERM, 7), capsys)
  assert code == 128 + 15 and out == ""
  assert err == (
    "stopped by SIGTERM at step 7; checkpoint saved, re-run the same command to resume\n"
  )
  assert _exit_of(Interrupted(signal.SIGINT, 3), capsys)[0] == 128 + 2
  code, _, err = _exit_of(Interrupted(signal.SIGTERM, 4, saved=False), capsys)  # Nothing new.
  assert code == 143 and err == (
    "stopped by SIGTERM at step 4; checkpoint 4 kept as it was, re-run the same command to resume\n"
  )


def test_ctrl_c_is_one_line_and_exit_130(capsys):
  assert _exit_of(KeyboardInterrupt(), capsys) == (130, "", "error: interrupted\n")


def test_sigterm_outside_a_training_loop_is_one_line_with_the_commands_advice(capsys):
  """SIGTERM while a run loaded, evaluated or went from one stage to the next ended it
  silently (exit 143, nothing said), and Ctrl-C there said only "interrupted"."""
  advice = "re-run the same command to resume"
  before = signal.getsignal(signal.SIGTERM)
  # Python's own Ctrl-C handler, as a command has it (a test worker may ignore SIGINT), and
  # SIGHUP at its default (a test worker may have been started under nohup).
  sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
  sighup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
  try:
    for signum, said in ((signal.SIGTERM, "interrupted by SIGTERM"),
                         (signal.SIGHUP, "interrupted by SIGHUP"),
                         (signal.SIGINT, "interrupted")):  # fmt: skip
      with pytest.raises(KeyboardInterrupt) as raised:
        with errors.resumable_interrupts(advice):
          os.kill(os.getpid(), signum)
          time.sleep(5)  # The handler raises in this thread before it ends.
      assert _exit_of(raised.value, capsys) == (128 + signum, "", f"error: {said}; {advice}\n")
      assert signal.getsignal(signal.SIGTERM) is before  # Restored after the block.
      assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
  finally:
    signal.signal(signal.SIGINT, sigint)
    signal.signal(signal.SIGHUP, sighup)


@pytest.fixture
def moved(monkeypatch):
  """Where errors' `os.dup2` pointed descriptors (only errors' view of `os`: pytest's own
  capture moves descriptors with os.dup2)."""
  targets = []

  def dup2(source, target):
    targets.append(target)
    os.close(source)

  real = {n: getattr(os, n) for n in ("open", "devnull", "O_WRONLY", "environ")}
  monkeypatch.setattr(errors, "os", types.SimpleNamespace(**real, dup2=dup2))
  return targets


def test_a_reader_gone_away_ends_quietly_as_sigpipe(capsys, monkeypatch, moved):
  """`... | head`: stdout is pointed at /dev/null (nothing more can fail writing to it) and the
  exit code is the shell's for SIGPIPE, 128 + 13."""
  monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(fileno=lambda: 1))
  code, _, err = _exit_of(BrokenPipeError(), capsys)
  assert (code, err, moved) == (141, "", [1])


def test_an_unexpected_error_is_one_line_and_exit_3(capsys, monkeypatch):
  monkeypatch.delenv("ILORA_JAX_DEBUG", raising=False)
  code, out, err = _exit_of(ValueError("bad\n  shape"), capsys)
  assert (code, out) == (3, "")
  assert err == (
    "error: unexpected ValueError: bad shape (set ILORA_JAX_DEBUG=1 to see the traceback)\n"
  )
  assert errors.EXIT_INTERNAL_ERROR == 3
  for off in ("", "0", "false", "No"):  # Set but empty, or a word for off (0 meant on).
    monkeypatch.setenv("ILORA_JAX_DEBUG", off)
    assert _exit_of(ValueError("x"), capsys)[0] == 3


class JaxRuntimeError(RuntimeError):
  """Stands for jax.errors.JaxRuntimeError (matched by name: XLA's class moves between
  versions)."""


def test_a_lost_peer_of_a_multi_process_run_is_named_not_called_a_bug(capsys, monkeypatch):
  """Another process gone (killed, or ended by its own error) breaks this one's collective:
  one line saying so, exit 2, not `unexpected JaxRuntimeError` (exit 3); in a single-process
  run, or for another runtime error, the same error is a bug as before."""
  from ilora_jax import distributed

  monkeypatch.delenv("ILORA_JAX_DEBUG", raising=False)
  monkeypatch.setattr(errors, "_exit", lambda code: sys.exit(code))  # No grace timer here.
  lost = JaxRuntimeError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by "
                         "peer [127.0.0.1]:7062\nmore")  # fmt: skip
  monkeypatch.setattr(distributed, "JOINED", True)
  code, out, err = _exit_of(lost, capsys)
  assert (code, out) == (2, "")
  assert err == (
    "error: another process of this multi-process run stopped (UNKNOWN: Gloo AllGather failed: "
    "[pair.cc:547] Connection closed by peer [127.0.0.1]:7062): see its output for why, then "
    "start every process again to resume from the last checkpoint\n"
  )
  assert _exit_of(JaxRuntimeError("INTERNAL: an XLA failure"), capsys)[0] == 3
  assert _exit_of(ValueError("Connection reset by peer"), capsys)[0] == 3  # Not JAX's.
  # Orbax's save sync re-raises the collective's failure as a ValueError (the audit's kill of
  # one process: "unexpected ValueError", exit 3), with JAX's error as its cause or not.
  orbax = ValueError("UNKNOWN: Gloo AllGather failed: [pair.cc:589] Connection reset by peer")
  assert _exit_of(orbax, capsys)[:2] == (2, "")
  try:
    raise ValueError("sync failed") from lost
  except ValueError as wrapped:
    code, _, err = _exit_of(wrapped, capsys)
  assert code == 2 and err.startswith("error: another process of this multi-process run stopped")
  monkeypatch.setattr(distributed, "JOINED", False)
  assert _exit_of(lost, capsys)[0] == 3


def test_out_of_memory_is_named_with_the_way_out_not_called_a_bug(capsys, monkeypatch):
  """A batch or shape too large for the machine (the host's MemoryError, XLA's
  RESOURCE_EXHAUSTED) was "unexpected", exit 3, as a bug; the settings fix it."""
  monkeypatch.delenv("ILORA_JAX_DEBUG", raising=False)
  monkeypatch.setattr(errors, "_exit", lambda code: sys.exit(code))
  xla = JaxRuntimeError(
    "RESOURCE_EXHAUSTED: Out of memory allocating 3280008844800096096 bytes.\nx"
  )
  for exc, first in ((xla, "RESOURCE_EXHAUSTED: Out of memory allocating 3280008844800096096 "
                      "bytes."), (MemoryError(), "MemoryError")):  # fmt: skip
    code, out, err = _exit_of(exc, capsys)
    assert (code, out) == (2, "")
    assert err == (
      f"error: out of memory ({first}): lower the batch size or the sequence lengths; "
      "`python -m ilora_jax.plan --config=...` estimates a run's device memory\n"
    )
  assert _exit_of(ValueError("RESOURCE_EXHAUSTED"), capsys)[0] == 3  # Not XLA's.


_HANGING_EXIT = r"""
import atexit, sys, time
sys.path.insert(0, __ROOT__)
from ilora_jax import distributed, errors
distributed.JOINED = __JOINED__
errors.EXIT_GRACE_S = 0.5
atexit.register(time.sleep, 60)  # As JAX's shutdown waits for a process that will not come.

@errors.cli_main
def main(argv=None):
  raise errors.UserError("data folder not found: data")

main()
"""


def test_an_error_exit_of_a_multi_process_run_does_not_wait_for_good():
  """JAX's shutdown at exit waits for every process; after an error the others did not meet
  (they wait in a collective for this one) both waited until killed. A process that joined a
  cluster now ends EXIT_GRACE_S after its error line, with its code; one that did not keeps
  the ordinary exit (here the stand-in's 60 s wait, cut short by the test's timeout)."""
  code = _HANGING_EXIT.replace("__ROOT__", repr(ROOT))
  started = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", code.replace("__JOINED__", "True")],
                        capture_output=True, text=True, timeout=30)  # fmt: skip
  assert (proc.returncode, proc.stderr) == (2, "error: data folder not found: data\n")
  assert time.monotonic() - started < 20
  with pytest.raises(subprocess.TimeoutExpired):
    subprocess.run([sys.executable, "-c", code.replace("__JOINED__", "False")], capture_output=True,
                   timeout=5)  # fmt: skip


def test_ilora_jax_debug_raises_the_error_itself(capsys, monkeypatch):
  monkeypatch.setenv("ILORA_JAX_DEBUG", "1")
  error = ValueError("the bug")
  with pytest.raises(ValueError) as raised:
    errors.report_and_exit(error)
  assert raised.value is error
  assert capsys.readouterr() == ("", "")


def test_require():
  assert errors.require(True, "unused") is None
  with pytest.raises(UserError, match="^need a workdir$"):
    errors.require(False, "need a workdir")


def test_require_file(tmp_path, monkeypatch):
  path = tmp_path / "f.txt"
  with pytest.raises(UserError) as raised:
    errors.require_file(str(path), "vocab")
  assert str(raised.value) == f"vocab not found: {path}"
  with pytest.raises(UserError) as raised:
    errors.require_file(str(tmp_path), "vocab")
  assert str(raised.value) == f"vocab is not a file: {tmp_path}"
  path.write_text("x")
  assert errors.require_file(str(path), "vocab") == str(path)
  monkeypatch.setattr(os, "access", lambda p, mode: mode != os.R_OK)  # As for another user.
  with pytest.raises(UserError) as raised:
    errors.require_file(str(path), "vocab")
  assert str(raised.value) == f"vocab is not readable: {path}"


def test_flag_error_keeps_the_last_line_of_an_embedded_traceback():
  text = (
    "Error loading config file c.py: Traceback (most recent call last):\n"
    '  File "c.py", line 3, in get_config\n'
    "    1 / 0\n"
    "ZeroDivisionError: division by zero\n\n"
  )
  assert str(errors.flag_error(ValueError(text))) == (
    "Error loading config file c.py: ZeroDivisionError: division by zero"
  )
  wrapped = (
    "flag --config=c.py:a:b: Error whilst parsing config file:\n\nTraceback (most recent call "
    'last):\n  File "c.py", line 3, in get_config\nKeyError: 7\n'
  )
  assert str(errors.flag_error(ValueError(wrapped))) == "flag --config=c.py:a:b: KeyError: 7"
  plain = errors.flag_error(ValueError("flag --n: invalid literal"))
  assert isinstance(plain, UserError) and str(plain) == "flag --n: invalid literal"


def _values():
  values = flags.FlagValues()
  flags.DEFINE_integer("n", 1, "a number", flag_values=values)
  return values


def test_parse_flags():
  values = _values()
  errors.parse_flags(values, ["prog", "--n=4"])
  assert values.n == 4
  with pytest.raises(UserError) as raised:
    errors.parse_flags(_values(), ["prog", "--n=4", "word", "other"])
  assert str(raised.value) == (
    "unexpected argument(s) 'word' 'other': every argument is a --flag=value (quote a value "
    "that holds spaces)"
  )
  with pytest.raises(UserError, match=r"^unexpected argument\(s\) 'word': every argument"):
    errors.parse_flags(_values(), ["prog", "word"])
  with pytest.raises(UserError, match="--n"):  # absl's words for a bad value, as one line.
    errors.parse_flags(_values(), ["prog", "--n=four"])


def test_a_workdir_given_from_the_home_folder_is_expanded(monkeypatch, tmp_path):
  """`--workdir=~/run`: no shell expands a '~' after '=', so the run went to a folder named
  '~' in the current one while its last line (`report: ~/run/report`) pointed at the home
  folder (found by the bad-input audit). Every command parses its flags here."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  for given, expected in (("~/run", tmp_path / "home" / "run"), ("~", tmp_path / "home"),
                          ("a/~b", "a/~b"), ("/x/y", "/x/y")):  # fmt: skip
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "a folder", flag_values=values)
    errors.parse_flags(values, ["prog", f"--workdir={given}"])
    assert values.workdir == str(expected)


def test_a_flag_given_twice_is_refused_but_dotted_overrides_may_repeat(monkeypatch, tmp_path):
  """absl keeps a repeated flag's last value: `--history=A --history=B` recommended for B
  alone, without a word."""
  values = _values()
  flags.DEFINE_boolean("b", False, "a switch", flag_values=values)
  for argv, first, second in (
    (["prog", "--n=1", "--n=2"], "--n=1", "--n=2"),
    (["prog", "--n", "1", "-n=2"], "--n", "-n=2"),
    (["prog", "--b", "--nob"], "--b", "--nob"),
  ):
    with pytest.raises(UserError) as raised:
      errors.parse_flags(values, argv)
    assert str(raised.value) == f"--{argv[1].lstrip('-').split('=')[0]} is given twice ({first} " \
      f"and {second}): give it once"  # fmt: skip
  # A flagfile's lines count too (the last value won: the file's, or the command line's).
  (tmp_path / "flags.txt").write_text("--n=2\n")
  for argv, first, second in (
    (["prog", f"--flagfile={tmp_path / 'flags.txt'}", "--n=3"], "--n=2", "--n=3"),
    (["prog", "--n=3", f"--flagfile={tmp_path / 'flags.txt'}"], "--n=3", "--n=2"),
  ):
    with pytest.raises(UserError) as raised:
      errors.parse_flags(_values(), argv)
    assert str(raised.value) == f"--n is given twice ({first} and {second}): give it once"
  values = _values()
  argv = ["prog", f"--config={ROOT}/configs/tiny.py", "--config.train.seed=2", "--n=3",
          "--config.train.seed=4"]  # fmt: skip
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections defines the overrides it finds there.
  config_flags.DEFINE_config_file("config", flag_values=values)
  errors.parse_flags(values, argv)
  assert (values.config.train.seed, values.n) == (4, 3)  # The later override wins.
  # --config twice with an override between: absl said its override flag was "defined
  # twice" (from absl.flags._flag), before the repeat was seen.
  values = _values()
  tiny = f"--config={ROOT}/configs/tiny.py"
  argv = ["prog", tiny, "--config.train.lr=0.1", tiny]
  monkeypatch.setattr(sys, "argv", argv)
  config_flags.DEFINE_config_file("config", flag_values=values)
  with pytest.raises(UserError) as raised:
    errors.parse_flags(values, argv)
  assert str(raised.value) == f"--config is given twice ({tiny} and {tiny}): give it once"


def test_overrides_without_a_config_file_say_that_config_is_required(monkeypatch, tmp_path):
  """absl said "Unknown command line flag 'config.llm.name'": without --config no override
  is defined. A --config in a flagfile counts as given."""
  argv = ["prog", "--config.llm.name=tiny", "--n=3"]
  monkeypatch.setattr(sys, "argv", argv)
  values = _values()
  config_flags.DEFINE_config_file("config", flag_values=values)
  with pytest.raises(UserError) as raised:
    errors.parse_flags(values, argv)
  assert str(raised.value) == (
    "--config.llm.name=... overrides a config file, and none is given: --config is required, "
    "e.g. --config=configs/tiny.py"
  )
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text(f"--config={ROOT}/configs/tiny.py\n")
  argv = ["prog", f"--flagfile={flagfile}", "--config.llm.name=other"]
  monkeypatch.setattr(sys, "argv", argv)
  values = _values()
  config_flags.DEFINE_config_file("config", flag_values=values)
  errors.parse_flags(values, argv)
  assert values.config.llm.name == "other"
  # A script whose --config has a default (bench/gpu_plan.py's) takes overrides without one.
  argv = ["prog", "--config.llm.name=third"]
  monkeypatch.setattr(sys, "argv", argv)
  values = _values()
  config_flags.DEFINE_config_file("config", f"{ROOT}/configs/tiny.py", flag_values=values)
  errors.parse_flags(values, argv)
  assert values.config.llm.name == "third"


def test_a_flag_whose_value_would_be_the_next_flag_is_refused():
  """absl reads `--flag value`: a bare `--s` before another flag took that flag for its
  value (a run went to a workdir named `--config.stage=sasrec`, with the config's stage)."""
  values = _values()
  flags.DEFINE_string("s", "", "a string", flag_values=values)
  flags.DEFINE_boolean("b", False, "a switch", flag_values=values)
  errors.parse_flags(values, ["prog", "--s", "word", "--n", "-3", "--b"])
  assert (values.s, values.n, values.b) == ("word", -3, True)  # The space form still works.
  for after in ("--n=2", "-n=2", "--other"):
    with pytest.raises(UserError) as raised:
      errors.parse_flags(values, ["prog", "--b", "--s", after])
    assert str(raised.value) == (
      f"--s has no value: write --s=VALUE (the flag after it, {after}, was taken for its value)"
    )


@pytest.mark.parametrize("flag", ["--help", "-h", "-help", "--helpshort", "--helpfull", "-?"])
def test_every_help_flag_prints_help_and_exits_0(flag, capsys):
  with pytest.raises(SystemExit) as ended:
    errors.parse_flags(_values(), ["prog", "--n=2", flag])
  assert ended.value.code == 0
  assert capsys.readouterr().out.strip()


class _Help:
  """The part of absl's FlagValues that `print_help` uses."""

  def __init__(self, text, names=()):
    self.text, self.names = text, names

  def main_module_help(self):
    return self.text

  def get_help(self):
    return "all: " + self.text

  def __contains__(self, name):
    return name in self.names

  def __getitem__(self, name):
    return types.SimpleNamespace(help=f"the {name}")


def test_print_help(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__doc__="\n  Trains.\n"))
  errors.print_help(_Help("\n  --seed: the seed\n", names=("config",)))
  assert capsys.readouterr().out == (
    "Trains.\n\n--seed: the seed\n  --config: the config\n\n  --config.<field>=<value> "
    "overrides any field of the config file (every field is documented in configs/base.py).\n"
  )
  # --config and --workdir, defined outside the main module (bench's had "(no flags)"), are
  # named unless its help already has them.
  errors.print_help(_Help("  --workdir: w", names=("config", "workdir")))
  assert capsys.readouterr().out.startswith("Trains.\n\n--workdir: w\n  --config: the config\n\n")
  errors.print_help(_Help("", names=("config", "workdir")))
  assert capsys.readouterr().out.startswith(
    "Trains.\n\n  --config: the config\n  --workdir: the workdir\n\n"
  )
  monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__doc__=None))
  errors.print_help(_Help("  "))
  assert capsys.readouterr().out == "(no flags)\n"
  monkeypatch.delitem(sys.modules, "__main__")
  errors.print_help(_Help("--x"))
  assert capsys.readouterr().out == "all: --x\n"


@pytest.mark.parametrize(
  "argv, given",
  [
    (["p", "--config=c.py"], True),
    (["p", "--config", "c.py"], True),
    (["p", "--config.seed=1"], False),
    (["p", "--configs=c.py"], False),
    (["--config=c.py"], False),  # The program's own name.
    (["p"], False),
  ],
)
def test_config_given(argv, given):
  assert errors._config_given(argv) is given


def test_loaded_config():
  config = ConfigDict({"seed": 1})
  assert errors.loaded_config(config, ["p"]) is config
  with pytest.raises(UserError, match=r"^--config is required, e\.g\. --config=configs/tiny\.py$"):
    errors.loaded_config(None, ["p", "--workdir=w"])
  with pytest.raises(UserError) as raised:  # The last --config given counts, as for absl.
    errors.loaded_config(None, ["p", "--config=a.py", "--config=b.py"])
  assert str(raised.value) == "cannot load config file b.py: not found or not a config file"


def test_a_missing_path_given_with_a_tilde_says_it_is_not_expanded(tmp_path, monkeypatch):
  """`--config=~/c.py` or `--config.sasrec.init_from=~/x.pt`: no shell expands a '~' after
  '=', so the file is looked for under a folder named '~': the one line says so (found while
  checking paths by hand). A path without '~' gets no hint; one that exists is not refused."""
  from ilora_jax import configuration

  hint = " ('~' is not expanded here: give the full path)"
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError) as raised:
    errors.loaded_config(None, ["p", "--config=~/c.py"])
  assert (
    str(raised.value) == f"cannot load config file ~/c.py: not found or not a config file{hint}"
  )
  with pytest.raises(UserError) as raised:
    configuration.load("~/nowhere/c.py")
  assert str(raised.value).endswith(f"not a config file{hint}")
  with pytest.raises(UserError) as raised:
    errors.require_file("~/x.pt", "checkpoint")
  assert str(raised.value) == f"checkpoint not found: ~/x.pt{hint}"
  with pytest.raises(UserError) as raised:
    errors.require_file(str(tmp_path / "x.pt"), "checkpoint")
  assert str(raised.value) == f"checkpoint not found: {tmp_path / 'x.pt'}"
  (tmp_path / "~").mkdir()
  (tmp_path / "~" / "x.pt").write_bytes(b"")  # A folder named '~' here: read as given.
  assert errors.require_file("~/x.pt", "checkpoint") == "~/x.pt"
  want = f"cannot load grid file ~/g.py: not found or not a grid file{hint}"
  assert str(errors.unloadable("grid", "~/g.py")) == want


def test_an_unopenable_flagfile_is_named():
  exc = flags.CantOpenFlagFileError("ERROR:: Unable to open flagfile: gone.txt")
  failed = errors._flagfile_error(exc, ["p"])
  assert str(failed) == "cannot read --flagfile: Unable to open flagfile: gone.txt"
  assert errors._flagfile_error(ValueError("x"), ["p"]) is None


def test_a_flagfile_that_is_not_utf8_is_named_with_the_byte(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"--n=1\n\xff\n")  # Byte 6 (from 0) starts no UTF-8 character.
  good = tmp_path / "good.txt"
  good.write_text("--n=2\n")
  exc = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
  for dash in ("--", "-"):
    argv = ["p", f"{dash}flagfile={tmp_path / 'gone.txt'}", f"--flagfile={good}",
            f"{dash}flagfile={bad}"]  # fmt: skip
    assert str(errors._flagfile_error(exc, argv)) == (
      f"--flagfile={bad} is not UTF-8 text (invalid start byte at byte 6)"
    )
  unnamed = errors._flagfile_error(exc, ["p", f"--flagfile={good}"])  # Not found again.
  assert str(unnamed) == "a --flagfile is not UTF-8 text (invalid start byte at byte 0)"


def _raised_in(what, argv, exc):
  """What `flag_errors(what, argv)` turns `exc`, raised inside it, into."""
  with pytest.raises(BaseException) as raised:
    with errors.flag_errors(what, argv):
      raise exc
  return raised.value


def test_an_unknown_override_key_names_its_flag():
  argv = ["p", "--config=gone.py", "--config.nope_too=1", "--config.train.nope=3"]
  wrapped = AttributeError(KeyError("'nope'\n  Did you mean: 'note'?\n"))  # As ml_collections.
  got = _raised_in("config", argv, wrapped)
  assert isinstance(got, UserError)
  assert str(got) == "unknown config key: 'nope'; Did you mean: 'note'? (in --config.train.nope)"
  got = _raised_in("model", ["p", "--model.x=1"], KeyError("'y'"))  # No flag names it.
  assert str(got) == "unknown model key: 'y'"
  named = AttributeError(KeyError("'get_config_dir'"))  # A key, not the file's function.
  got = _raised_in("config", ["p", "--config=c.py", "--config.get_config_dir=d"], named)
  assert str(got) == "unknown config key: 'get_config_dir' (in --config.get_config_dir)"


def test_a_file_without_get_config_is_named():
  missing = AttributeError("module 'c' has no attribute 'get_config'", name="get_config")
  got = _raised_in("config", ["p", "--config=c.py:arg"], missing)
  assert str(got) == (
    "c.py defines no get_config(): a config file is a Python file whose get_config() returns "
    "an ml_collections ConfigDict"
  )
  got = _raised_in("model", ["p"], missing)
  assert str(got).startswith("the model file defines no get_config(): a model file is")


def test_flag_errors_passes_other_errors_on():
  error = RuntimeError("a bug")
  assert _raised_in("config", ["p", "--config=gone.py"], error) is error
  with errors.flag_errors("config", ["p"]):
    pass  # Nothing raised: nothing to do.


def test_an_override_of_a_file_that_did_not_load():
  earlier = RuntimeError("Configuration is not available because of an earlier failure: x")
  got = _raised_in("config", ["p", "--config=c.py"], earlier)
  assert str(got) == "cannot load config file c.py: not found or not a config file"


def test_absl_errors_become_one_line():
  got = _raised_in("config", ["p"], flags.IllegalFlagValueError("flag --n: bad\nvalue"))
  assert isinstance(got, UserError) and str(got) == "flag --n: bad\nvalue"
  unopened = flags.CantOpenFlagFileError("ERROR:: Unable to open flagfile: gone.txt")
  got = _raised_in("config", ["p", "--flagfile=gone.txt"], unopened)
  assert str(got) == "cannot read --flagfile: Unable to open flagfile: gone.txt"


def _run_config(path, argv):
  """Runs the file at `path` as ml_collections would load it, inside `flag_errors`."""
  with pytest.raises(BaseException) as raised:
    with errors.flag_errors("config", argv):
      runpy.run_path(str(path))["get_config"]()
  return raised.value


def test_a_config_file_whose_code_fails_is_named_with_its_line(tmp_path):
  path = tmp_path / "c.py"
  path.write_text("def get_config():\n  x = 1\n  raise ValueError('bad\\n   seed')\n")
  got = _run_config(path, ["p", f"--config={path}"])
  assert str(got) == f"config file {path} line 3: ValueError: bad seed"
  path.write_text("def get_config():\n  x = 1\n  raise ValueError()\n")
  assert str(_run_config(path, ["p", f"--config={path}:arg"])) == (
    f"config file {path} line 3: ValueError"
  )
  link = tmp_path / "link.py"  # Named through a link: the same file.
  link.symlink_to(path)
  assert str(_run_config(path, ["p", f"--config={link}"])) == (
    f"config file {link} line 3: ValueError"
  )
  other = tmp_path / "other.py"  # The error is not in the file named: passed on.
  other.write_text("")
  assert isinstance(_run_config(path, ["p", f"--config={other}"]), ValueError)


def test_a_config_file_with_a_syntax_error_is_named_with_its_line(tmp_path):
  path = tmp_path / "c.py"
  source = "def get_config():\n  return (\n\n"
  path.write_text(source)
  with pytest.raises(SyntaxError) as python:  # Python's own words for it, without its place.
    compile(source, str(path), "exec")
  got = _run_config(path, ["p", f"--config={path}"])
  assert str(got) == f"config file {path} line 2: SyntaxError: {python.value.msg}"


def test_the_deepest_line_of_the_file_is_named(tmp_path):
  path = tmp_path / "c.py"
  path.write_text("def helper():\n  raise KeyError('k')\ndef get_config():\n  return helper()\n")
  assert str(_run_config(path, ["p", f"--config={path}"])) == (
    f"config file {path} line 2: KeyError: 'k'"
  )


def test_flush_stdout_ends_quietly_when_the_reader_is_gone(monkeypatch):
  def flush():
    raise BrokenPipeError

  monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(flush=flush, fileno=lambda: -1))
  with pytest.raises(SystemExit) as ended:
    errors._flush_stdout()
  assert ended.value.code == 141


class _FullDisk:
  """A stdout whose buffered text cannot be written out (a full disk behind `> file`)."""

  def __init__(self):
    self.flushes = 0

  def flush(self):
    self.flushes += 1
    raise OSError(errno.ENOSPC, "No space left on device")

  def fileno(self):
    return 1


def test_flush_stdout_on_a_full_disk_is_one_line_and_exit_2(monkeypatch, capsys, moved,
                                                            quiet_restored):  # fmt: skip
  """Not a traceback at interpreter exit with Python's exit code 120: the text left in the
  buffer is dropped (stdout pointed at /dev/null) and the command ends as a user's error."""
  monkeypatch.setattr(sys, "stdout", _FullDisk())
  with pytest.raises(SystemExit) as ended:
    errors._flush_stdout()
  assert ended.value.code == 2 and moved == [1]
  assert capsys.readouterr().err == "error: cannot write to stdout: No space left on device\n"


def test_an_error_exit_drops_what_stdout_cannot_write(monkeypatch, capsys, moved,
                                                      quiet_restored):  # fmt: skip
  monkeypatch.setattr(sys, "stdout", _FullDisk())
  assert _exit_of(UserError("bad flag"), capsys)[::2] == (2, "error: bad flag\n")
  assert moved == [1] and sys.stdout.flushes == 1
  monkeypatch.delenv("ILORA_JAX_DEBUG", raising=False)
  assert _exit_of(ValueError("bug"), capsys)[0] == 3 and moved == [1, 1]
  assert _exit_of(KeyboardInterrupt(), capsys)[0] == 130 and moved == [1, 1, 1]
  assert _exit_of(BrokenPipeError(), capsys)[0] == 141  # Moved once, not flushed first.
  assert moved == [1, 1, 1, 1] and sys.stdout.flushes == 3


def test_a_full_disk_anywhere_unexpected_is_the_users_not_a_bug(capsys, monkeypatch,
                                                                quiet_restored):  # fmt: skip
  monkeypatch.delenv("ILORA_JAX_DEBUG", raising=False)
  full = OSError(errno.ENOSPC, "No space left on device", "/w/report/summary.md")
  assert _exit_of(full, capsys) == (
    2, "", "error: cannot write: No space left on device (/w/report/summary.md); free some "
    "space and re-run\n"
  )  # fmt: skip
  quota = OSError(errno.EDQUOT, "Disk quota exceeded")  # An unbuffered stdout: no file name.
  assert _exit_of(quota, capsys)[2] == (
    "error: cannot write: Disk quota exceeded; free some space and re-run\n"
  )
  mount = OSError(errno.EROFS, "Read-only file system", "/w/metrics.jsonl")
  assert _exit_of(mount, capsys) == (
    2, "", "error: cannot write: Read-only file system (/w/metrics.jsonl); mount it writable "
    "and re-run\n"
  )  # fmt: skip
  denied = OSError(errno.EACCES, "Permission denied", "/w/x")  # Any other: still unexpected.
  assert _exit_of(denied, capsys)[:2] == (3, "")


@pytest.mark.parametrize("unbuffered", [False, True])
def test_help_to_a_full_disk_is_one_error_line(unbuffered):
  """`python -m ilora_jax.main --help > file` on a full disk: exit 2 and one line, whether the
  help is left in stdout's buffer (a shell's default) or its print fails (PYTHONUNBUFFERED)."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
  env.update({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
  with open("/dev/full", "w") as full:
    command = [sys.executable, "-m", "ilora_jax.main", "--help"]
    proc = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env=env, timeout=120)  # fmt: skip
  assert proc.returncode == 2, proc.stderr
  want = ("cannot write: No space left on device; free some space and re-run" if unbuffered
          else "cannot write to stdout: No space left on device")  # fmt: skip
  assert proc.stderr.splitlines() == [f"error: {want}"]


def test_results_stdout_cannot_take_are_named_by_plan_report_and_bench(tmp_path):
  """Their results are printed with a flush: a full disk behind `> file` failed the print
  with `cannot write: No space left on device; free some space` (a file of theirs, by its
  words), and with stdout closed (`>&-`) the results were dropped without a word (exit 0)."""
  from conftest import TINY, assert_one_line_error, run_cli

  for redirect, why in (("> /dev/full", "No space left on device"), (">&-", "closed")):
    proc = run_cli(TINY, module="ilora_jax.plan", stdout=redirect)
    assert proc.stderr.splitlines() == [f"error: cannot write the results to stdout ({why})"]
    assert proc.returncode == 2
  record = {"run": "sasrec", "stage": "sasrec", "split": "train", "step": 1, "loss": 2.5}
  (tmp_path / "metrics.jsonl").write_text(f"{json.dumps(record)}\n")
  proc = run_cli(f"--workdir={tmp_path}", module="ilora_jax.report", stdout="> /dev/full")
  assert_one_line_error(
    proc, f"cannot write the results to stdout (No space left on device); the report is in "
    f"{tmp_path}/report"
  )  # fmt: skip
  assert os.path.isfile(tmp_path / "report" / "summary.md")
  proc = run_cli(TINY, "--config.bench.train=False", "--config.bench.eval_candidates=0",
                 "--config.bench.eval_new_tokens=1", "--config.bench.eval_batch_size=2",
                 "--config.bench.eval_prompt_len=48", "--config.bench.steps=1",
                 "--config.bench.warmup=0", module="ilora_jax.bench",
                 stdout="> /dev/full")  # fmt: skip
  assert_one_line_error(proc, "cannot write the results to stdout (No space left on device)")


def test_cli_main(capsys, monkeypatch, quiet_restored):
  monkeypatch.delenv("ILORA_JAX_DEBUG", raising=False)

  @errors.cli_main
  def entry(a, b=0):
    """Adds."""
    print("out", end="")
    if a < 0:
      raise UserError("a must be >= 0")
    if a == 0:
      sys.exit(5)
    return a + b

  assert (entry.__name__, entry.__doc__) == ("entry", "Adds.")
  assert entry(2, b=3) == 5
  assert capsys.readouterr() == ("out", "")
  assert getattr(sys.unraisablehook, "redelivers_interrupts", False)
  with pytest.raises(SystemExit) as ended:
    entry(0)
  assert ended.value.code == 5
  with pytest.raises(SystemExit) as ended:
    entry(-1)
  assert ended.value.code == 2
  assert capsys.readouterr() == ("outout", "error: a must be >= 0\n")


def test_cli_main_flushes_stdout_when_it_ends(monkeypatch):
  """Flushed inside the entry point, where a reader gone away is still one quiet exit."""
  flushed = []
  monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(flush=lambda: flushed.append(1)))
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)

  @errors.cli_main
  def entry(code):
    assert flushed == []
    if code is not None:
      sys.exit(code)

  with pytest.raises(SystemExit):
    entry(0)
  assert flushed == [1]
  flushed.clear()
  assert entry(None) is None
  assert flushed == [1]


def test_an_interrupt_lost_in_a_callback_is_delivered_again(monkeypatch):
  """A KeyboardInterrupt Python could only report as unraisable: SIGINT is raised again (from
  a thread, a moment later) where SIGINT has a Python handler; other reports, and all where
  SIGINT has none, go to the previous hook."""
  passed_on, delivered = [], threading.Event()
  hook = errors._interrupts_are_not_lost(passed_on.append)
  assert errors._interrupts_are_not_lost(hook) is hook  # Wrapped once.
  other = types.SimpleNamespace(exc_value=ValueError("x"))
  lost = types.SimpleNamespace(exc_value=KeyboardInterrupt())
  before = signal.signal(signal.SIGINT, lambda signum, frame: delivered.set())
  try:
    hook(other)
    assert passed_on == [other]
    hook(lost)
    for _ in range(3000):  # The main thread runs the handler between two of its steps.
      if delivered.is_set():
        break
      time.sleep(0.01)
    assert delivered.is_set()
    assert passed_on == [other]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # No Python handler: passed on.
    hook(lost)
    assert passed_on == [other, lost]
  finally:
    signal.signal(signal.SIGINT, before)
  # SIGTERM's interruption (`Terminated`) comes again as SIGTERM: it was sent as SIGINT, and
  # the run stopped as by Ctrl-C (exit 130, no "by SIGTERM").
  delivered.clear()
  before = signal.signal(signal.SIGTERM, lambda signum, frame: delivered.set())
  try:
    hook(types.SimpleNamespace(exc_value=errors.Terminated()))
    for _ in range(3000):
      if delivered.is_set():
        break
      time.sleep(0.01)
    assert delivered.is_set()
  finally:
    signal.signal(signal.SIGTERM, before)
