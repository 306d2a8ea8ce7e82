"""User-facing errors: one clear line, never a traceback.

Code that detects bad input (a missing file, malformed data, an impossible
config) raises `UserError`; the command-line entry points turn it into one
`error: ...` line on stderr and a non-zero exit code (see `cli_main`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


def counted(n: int, noun: str) -> str:
  """'1 step', '2 steps' (for messages): `n` and `noun`, plural (an s) unless `n` is 1."""
  return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def plain_int(text: str) -> int:
  """The integer `text` writes as ASCII digits with an optional minus (whitespace around it
  allowed); a ValueError for anything else: Python's `int` also reads '1_0' as 10 and other
  scripts' digits ('٣' as 3)."""
  if not re.fullmatch(r"\s*-?[0-9]+\s*", text):
    raise ValueError(f"not a plain integer: {text!r}")
  return int(text)


class UserError(Exception):
  """An expected failure caused by input: its message is shown to the user as is."""


def require(condition: bool, message: str) -> None:
  """Raises `UserError(message)` unless `condition` holds."""
  if not condition:
    raise UserError(message)


def tilde_hint(path: str) -> str:
  """A missing path's hint where it starts with '~', which no shell expands after
  `--flag=` (and a config file's value is never expanded): '' otherwise."""
  return " ('~' is not expanded here: give the full path)" if path.startswith("~") else ""


def require_file(path: str, what: str) -> str:
  """Returns `path` if it names a readable file, else raises a `UserError` naming `what`."""
  if not os.path.exists(path):
    raise UserError(f"{what} not found: {path}{tilde_hint(path)}")
  if not os.path.isfile(path):
    raise UserError(f"{what} is not a file: {path}")
  if not os.access(path, os.R_OK):
    raise UserError(f"{what} is not readable: {path}")
  return path


_PARSE_MARKER = "Error whilst parsing config file"  # ml_collections' wrapper of a file's error.


def flag_error(exc: Exception) -> UserError:
  """A flag-parsing error as one line; a config file's own exception keeps only its last line
  (ml_collections embeds the whole traceback in the message)."""
  text = str(exc)
  if "Traceback (most recent call last)" in text:
    head = text.split(f": {_PARSE_MARKER}", 1)[0] if _PARSE_MARKER in text else text.split(":")[0]
    last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
    text = f"{head}: {last}"
  return UserError(text)


def parse_flags(values, argv: list[str], what: str = "config") -> None:
  """Parses `argv` into absl `values`; a bad flag, an override naming an unknown key of
  the `what` config, or a word that is no flag (these commands take none; a value split at
  a space by the shell, say) becomes a UserError."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    print_help(values)
    sys.exit(0)
  try:  # Before absl parses (one that cannot be read: named below, by absl).
    given = expanded_argv(values, argv)
  except Exception:  # noqa: BLE001
    given = argv
  override = next((a for a in given[1:] if a.startswith("--config.")), None)
  no_default = "config" in values and values["config"].default is None
  if override and no_default and not _config_given(given):  # absl: "Unknown command line flag".
    raise UserError(
      f"{override.split('=', 1)[0]}=... overrides a config file, and none is given: "
      "--config is required, e.g. --config=configs/tiny.py"
    )
  # Before absl parses: a --config given twice after an override is absl's "flag defined
  # twice" of that override otherwise.
  _check_repeats_and_bare_flags(values, given)
  with flag_errors(what, argv):
    rest = values(argv)  # Had the flagfiles been unreadable, it would have said so here.
  if "workdir" in values and (values.workdir or "").startswith("~"):
    # `--workdir=~/run`: the shell expands no '~' after '=', and a folder named '~' in the
    # current one would take the run while its last line pointed at the home folder's.
    values.workdir = os.path.expanduser(values.workdir)
  if len(rest) > 1:
    raise UserError(
      f"unexpected argument(s) {' '.join(repr(a) for a in rest[1:])}: every argument is a "
      "--flag=value (quote a value that holds spaces)"
    )


def expanded_argv(values, argv: list[str]) -> list[str]:
  """`argv` with each --flagfile replaced by the flags in its file, as absl reads them."""
  return values.read_flags_from_files(argv, force_gnu=False)


def _check_repeats_and_bare_flags(values, argv: list[str]) -> None:
  """What absl reads without a word, refused: a flag given twice (absl keeps the last value;
  a config's dotted overrides may repeat, the later winning, as launchers add them), and a
  flag that takes a value given bare before another flag (`--workdir --config.stage=sasrec`:
  absl's `--flag value` form takes that flag for the value). `argv` is `expanded_argv`'s: a
  flagfile's lines count as given where the file is named."""
  seen: dict[str, str] = {}
  for arg in argv[1:]:
    name = arg.split("=", 1)[0].lstrip("-") if arg.startswith("-") else ""
    if name.startswith("no") and name[2:] in values and values[name[2:]].boolean:
      name = name[2:]
    if name in values and "." not in name and name != "flagfile":
      if name in seen:
        raise UserError(f"--{name} is given twice ({seen[name]} and {arg}): give it once")
      seen[name] = arg
  for arg, after in zip(argv[1:], argv[2:]):
    name = arg.lstrip("-")
    if (arg.startswith("-") and "=" not in arg and name in values and not values[name].boolean
        and (after.startswith("--") or after.lstrip("-").split("=")[0] in values)):  # fmt: skip
      raise UserError(
        f"{arg} has no value: write {arg}=VALUE (the flag after it, {after}, was taken for its "
        "value)"
      )


def run_script(main: Callable[[list[str]], object], default_config: str | None = None) -> None:
  """Runs an absl script's `main(argv)` (the bench/ scripts) as the package's commands run:
  flags parsed by `parse_flags` (`--help` exits 0; a bad flag value or an override of an
  unknown config key is one `error:` line, exit 2), a `--config` file that cannot be loaded
  is one line too, and every failure of `main` is one line (`cli_main`). A script with a
  config file flag defines it with no default (ml_collections would otherwise apply the
  overrides while the flag is defined, outside any handler) and names it `default_config`
  here: it stands in where the command line gives no `--config`."""

  @cli_main
  def run() -> None:
    from absl import flags

    argv = list(sys.argv)
    if default_config and not _config_given(argv):
      argv.insert(1, f"--config={default_config}")
    parse_flags(flags.FLAGS, argv)
    if "config" in flags.FLAGS:
      loaded_config(flags.FLAGS["config"].value, argv)
    main(argv)

  run()


def _config_given(argv: Sequence[str]) -> bool:
  return any(a == "--config" or a.startswith("--config=") for a in argv[1:])


def loaded_config(config, argv: Sequence[str]):
  """`config` if a config file was loaded into it (a ConfigDict), else a UserError naming
  the file, as `python -m ilora_jax.main` words it."""
  from ml_collections import ConfigDict

  if not isinstance(config, ConfigDict):
    if not _config_given(argv):
      raise UserError("--config is required, e.g. --config=configs/tiny.py")
    raise _unloadable("config", argv, config)
  return config


def _unloadable(what: str, argv: Sequence[str], loaded: object = None) -> UserError:
  """The `what` file given could not be loaded (a missing file: ml_collections reports it
  only when the config is first used, by `loaded_config` or by an override)."""
  given = _flag_value(what, argv)
  return unloadable(what, "?" if given is None else given, loaded)


def unloadable(what: str, path: str, loaded: object = None) -> UserError:
  """The `what` (config or grid) file at `path` is missing or defines no config; `loaded`,
  what ml_collections loaded from it, names what its get_config() returned instead of a
  ConfigDict (a plain dict, say: the file was called "not found or not a config file")."""
  if loaded is not None and type(loaded).__name__ != "_ErrorConfig":  # Not a file's failure.
    return UserError(
      f"cannot load {what} file {path}: its get_config() returns a {type(loaded).__name__}, "
      "not an ml_collections ConfigDict"
    )
  return UserError(
    f"cannot load {what} file {path}: not found or not a {what} file{tilde_hint(path)}"
  )


HELP_FLAGS = ("--help", "-h", "-help", "--helpshort", "--helpfull", "-?")  # As absl's app.


def print_help(values) -> None:
  """The running module's docstring and its flags (absl's own help, which needs app.run)."""
  main = sys.modules.get("__main__")
  # Not getattr(None, "__doc__"): Python 3.13 gives None a docstring.
  doc = "" if main is None else (getattr(main, "__doc__", None) or "").strip()
  if doc:
    print(doc + "\n")
  text = (values.main_module_help() if main is not None else values.get_help()).strip()
  # The shared --config, --grid and --workdir are defined in other modules (errors, main):
  # named too.
  shared = [f"  --{name}: {values[name].help}" for name in ("config", "grid", "workdir")
            if name in values and f"--{name}:" not in text]  # fmt: skip
  print("\n".join(line for line in (text, *shared) if line) or "(no flags)")
  if "config" in values:
    print(
      "\n  --config.<field>=<value> overrides any field of the config file "
      "(every field is documented in configs/base.py)."
    )


def define_config_file(
  name: str, default: str | None = None, help_: str = "path to config file.", **kwargs
):
  """`config_flags.DEFINE_config_file`, whose definition (at import) already reads the
  command line's --flagfile files: one that cannot be read or is not UTF-8 text is one
  `error:` line, exit 2, instead of a traceback."""
  from ml_collections import config_flags

  try:
    return config_flags.DEFINE_config_file(name, default, help_, **kwargs)
  except Exception as exc:  # noqa: BLE001 - only a flagfile's failure is reported here.
    failed = _flagfile_error(exc, sys.argv)
    if failed is None:
      raise
    report_and_exit(failed)


def _flagfile_error(exc: BaseException, argv: Sequence[str]) -> UserError | None:
  """A --flagfile that absl could not open or decode, as one line; None for other errors."""
  from absl import flags

  if isinstance(exc, flags.CantOpenFlagFileError):
    return UserError(f"cannot read --flagfile: {str(exc).removeprefix('ERROR:: ')}")
  if not isinstance(exc, UnicodeDecodeError):
    return None
  for arg in argv:
    path = arg.split("=", 1)[1] if arg.startswith(("--flagfile=", "-flagfile=")) else ""
    try:
      with open(path, encoding="utf-8") as f:
        f.read()
    except UnicodeDecodeError as bad:
      return UserError(f"--flagfile={path} is not UTF-8 text ({bad.reason} at byte {bad.start})")
    except OSError:
      continue
  return UserError(f"a --flagfile is not UTF-8 text ({exc.reason} at byte {exc.start})")


@contextlib.contextmanager
def flag_errors(what: str = "config", argv: Sequence[str] = ()):
  """Turns absl flag errors, unreadable flag files and overrides of unknown `what` keys into
  UserErrors."""
  from absl import flags

  try:
    yield
  except (flags.Error, UnicodeDecodeError) as exc:
    failed = _flagfile_error(exc, argv) or _config_file_error(exc, what, argv)
    raise (failed or flag_error(exc)) from None
  except (AttributeError, KeyError) as exc:  # An override names an unknown config key.
    failed = _failed_in_file(exc, what, argv)  # Or the file's own code failed.
    if failed is not None:
      raise failed from None
    if isinstance(exc, AttributeError) and getattr(exc, "name", None) == "get_config":
      path = _file_given(what, argv) or f"the {what} file"
      raise UserError(
        f"{path} defines no get_config(): a {what} file is a Python file whose get_config() "
        "returns an ml_collections ConfigDict"
      ) from None
    inner: object = exc  # ml_collections wraps a KeyError (its message) in an AttributeError.
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]
    text = "; ".join(line.strip() for line in str(inner).splitlines() if line.strip())
    leaf = text.split(";")[0].strip("'\" ")
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith(f"--{what}.")
                 and leaf in a.split("=", 1)[0].split(".")[1:]), "")  # fmt: skip
    where = f" (in {flag})" if flag else ""
    raise UserError(f"unknown {what} key: {text}{where}") from None
  except SystemExit as exc:  # sys.exit in the file's code: it ended the command silently.
    failed = _failed_in_file(exc, what, argv)
    if failed is None:
      raise
    raise failed from None
  except Exception as exc:
    if str(exc).startswith("Configuration is not available because of an earlier failure"):
      raise _unloadable(what, argv) from None  # An override of a file that did not load.
    failed = _failed_in_file(exc, what, argv) or _not_source_text(exc, what, argv)
    if failed is None:
      raise
    raise failed from None


def _not_source_text(exc: BaseException, what: str, argv: Sequence[str]) -> UserError | None:
  """Python's refusal of a `what` file with NUL bytes (saved as UTF-16, "Unicode" in some
  editors), which names no file: one line naming it; None for other errors."""
  if not (isinstance(exc, (SyntaxError, ValueError)) and "null bytes" in str(exc)):
    return None
  path = _file_given(what, argv) or f"the {what} file"
  return UserError(
    f"{what} file {path} is not Python source: it holds NUL bytes (saved as UTF-16, say): "
    "save it as UTF-8 text"
  )


def _config_file_error(exc: BaseException, what: str, argv: Sequence[str]) -> UserError | None:
  """A TypeError or ValueError raised by the `what` file's get_config (ml_collections wraps
  these in a flag error holding their traceback as text) as one line: for
  `--what=file.py:arg`, the whole flag value and the file's own message (the file refused its
  argument, naming those it takes, say); without an argument, the file and its line, as for
  any other failure of its code. None for other flag errors."""
  text = str(exc)
  if not text.startswith(f"flag --{what}=") or f": {_PARSE_MARKER}" not in text:
    return None
  cause = exc
  for _ in range(10):
    if cause.__context__ is None:
      break
    cause = cause.__context__
  if cause is exc or _PARSE_MARKER in str(cause):
    return None
  value = text.split(f": {_PARSE_MARKER}", 1)[0].removeprefix("flag ")
  if ":" not in value.split("=", 1)[1]:
    return _failed_in_file(cause, what, argv)
  kind = "" if type(cause) is ValueError else f"{type(cause).__name__}: "
  return UserError(f"{value}: {kind}{_one_line(cause)}")


def _flag_value(what: str, argv: Sequence[str]) -> str | None:
  """The value of `--what=` on the command line (None where it is not given); the last one
  given counts, as for absl."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{what}=")]
  return values[-1] if values else None


def _file_given(what: str, argv: Sequence[str]) -> str:
  """The `what` file the command line names (`--what=FILE[:ARG]`, its argument cut off; ''
  where none is given)."""
  return (_flag_value(what, argv) or "").split(":", 1)[0]


def _failed_in_file(exc: BaseException, what: str, argv: Sequence[str]) -> UserError | None:
  """The `what` file's own code failed as it loaded (a syntax error, an exception raised in
  get_config, a sys.exit there): a UserError naming the file, the line and the error; None
  for a failure elsewhere."""
  path = _file_given(what, argv)
  if not path or not os.path.isfile(path):
    return None
  real = os.path.realpath(path)
  if isinstance(exc, SyntaxError) and exc.filename and os.path.realpath(exc.filename) == real:
    line = exc.lineno
  else:
    lines = [lineno for frame, lineno in traceback.walk_tb(exc.__traceback__)
             if os.path.realpath(frame.f_code.co_filename) == real]  # fmt: skip
    if not lines:
      return None
    line = lines[-1]
  head = f"{what} file {path} line {line}"
  if isinstance(exc, SystemExit):
    return UserError(
      f"{head}: it called sys.exit ({exc.code!r}) while loading: a {what} file returns its config"
    )
  message = exc.msg if isinstance(exc, SyntaxError) else _one_line(exc)
  locked = _locked_config_message(message)
  if locked:
    return UserError(f"{head}: {locked}")
  return UserError(
    f"{head}: {type(exc).__name__}: {message}" if message else f"{head}: {type(exc).__name__}"
  )


def _locked_config_message(message: str) -> str | None:
  """ml_collections' refusal to add or delete a field of a locked ConfigDict (configs/base.py
  locks its config) in words a config file's author can act on; None for other errors."""
  added = re.search(r'Key "([^"]+)" does not exist and cannot be added', message)
  if added:
    guess = re.search(r'Did you mean "([^"]+)" instead of', message)
    hint = f" (did you mean {guess.group(1)}?)" if guess else ""
    return (
      f"there is no field {added.group(1)!r} to set{hint}: a config file sets fields that "
      "configs/base.py defines and adds none"
    )
  if "locked, you have to unlock it before trying to delete" in message:
    return "a config file cannot delete a field that configs/base.py defines: every one is read"
  read = re.search(r'Did you mean \\?"([^"\\]+)\\?" instead of \\?"([^"\\]+)\\?"', message)
  if read:  # A field read that the config has not: ml_collections' guess, its message's end.
    return f"there is no field {read.group(2)!r} (did you mean {read.group(1)}?)"
  return None


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _quiet_at_exit() -> None:
  """After the one error line, nothing more: background tasks that failed along with it
  (Orbax's asyncio reads of a damaged checkpoint) would log their tracebacks at exit, through
  asyncio's logger or, for a coroutine collected mid-read, through `sys.unraisablehook` or
  a "coroutine ... was never awaited" RuntimeWarning."""
  import logging
  import warnings

  warnings.simplefilter("ignore")
  logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None


def discard_stdout() -> None:
  """Points stdout's file descriptor at /dev/null once writing to it failed, so that what its
  buffer still holds is dropped at interpreter exit instead of failing there again (which
  Python reports with exit code 120, whatever exit the command chose)."""
  to_devnull(sys.stdout)


def stdout_failure(exc: BaseException) -> str:
  """How a write to stdout failed, in a few words (`No space left on device`, `closed`)."""
  return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def print_results(text: str, *, kept: str = "") -> None:
  """Prints a command's results on stdout now (flushed). A stdout that cannot take them (a
  full disk behind `> file`, stdout closed with `>&-`) ends the command with one line that
  names stdout and, in `kept`, where the results are kept, if anywhere; a print's failure was
  `cannot write: No space left on device; free some space`, as if a file the command writes
  were on a full disk, and with stdout closed the results were dropped without a word. A
  reader gone away (`| head -1`) ends it quietly, as a broken pipe."""
  try:
    if sys.stdout is None:  # Started with it closed: print() would write nothing.
      raise ValueError("closed")
    print(text, flush=True)
  except BrokenPipeError:
    raise
  except (OSError, ValueError) as exc:
    discard_stdout()
    raise UserError(f"cannot write the results to stdout ({stdout_failure(exc)}){kept}") from None


def to_devnull(stream) -> None:
  """Points the file descriptor of `stream` (None: a stream the process started without, as
  with `>&-`) at /dev/null: what anyone writes to it from then on is dropped."""
  if stream is None:
    return
  with contextlib.suppress(OSError, ValueError):
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _settle_stdout() -> None:
  """Before an exit for another reason: what stdout still holds is written out now, or
  dropped where that fails, so the exit code stays the one chosen."""
  if sys.stdout is None:
    return
  try:
    sys.stdout.flush()
  except (OSError, ValueError):  # ValueError: stdout closed.
    discard_stdout()


EXIT_GRACE_S = 10.0  # A multi-process run's error exit: JAX's shutdown gets this long.


def _joined() -> bool:
  """Whether this process joined a multi-process run (`distributed.initialize`)."""
  return bool(getattr(sys.modules.get("ilora_jax.distributed"), "JOINED", False))


def _exit(code: int) -> None:
  """`sys.exit(code)`. In a multi-process run JAX's shutdown at exit waits for every process;
  after an error the others did not meet (they wait in a collective for this one) it waited
  for good, so the process then ends at once after `EXIT_GRACE_S`, which the others'
  collectives see as a lost peer (`_peer_lost`)."""
  if _joined():
    timer = threading.Timer(EXIT_GRACE_S, _exit_now, (code,))
    timer.daemon = True
    timer.start()
  sys.exit(code)


def _exit_now(code: int) -> None:
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(code)


# What a collective raises when another process of the run went away (JAX's Gloo and
# coordination-service errors).
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "Socket closed", "task has failed", "heartbeat")  # fmt: skip


def _peer_lost(exc: BaseException) -> bool:
  """Whether `exc` is JAX's error for another process of a multi-process run gone away, or
  carries one: Orbax's checkpoint sync re-raises the collective's failure as a ValueError
  (its cause, or a Gloo collective named in its text)."""
  if not _joined():
    return False
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text = str(exc).lower()
    jax_error = type(exc).__name__ in ("JaxRuntimeError", "XlaRuntimeError") or "gloo" in text
    if jax_error and any(marker.lower() in text for marker in _PEER_LOST):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def _out_of_memory(exc: BaseException) -> bool:
  """Whether `exc` is the host's or XLA's out-of-memory error: a batch or shape too large for
  the machine, which the run's settings can fix, not a bug."""
  runtime = type(exc).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
  return isinstance(exc, MemoryError) or (runtime and "RESOURCE_EXHAUSTED" in str(exc))


_BACKEND_START = ("backends", "_init_backend", "_get_backend_uncached")  # jax's xla_bridge.


def _backend_not_started(exc: BaseException) -> bool:
  """Whether `exc` was raised while jax started its backends (`jax._src.xla_bridge`): a
  JAX_PLATFORMS naming a platform this jax install has not (`cuda` with the CPU wheel gave
  an AssertionError without a message), or a device it could not open."""
  return any(
    frame.f_code.co_name in _BACKEND_START
    and os.path.basename(frame.f_code.co_filename) == "xla_bridge.py"
    for frame, _ in traceback.walk_tb(exc.__traceback__)
  )


def report_and_exit(exc: BaseException) -> None:
  """Prints one `error:` line for `exc` on stderr and exits non-zero."""
  if not isinstance(exc, BrokenPipeError):
    _settle_stdout()
    _clear_bars()
  if _peer_lost(exc):
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    exc = UserError(
      f"another process of this multi-process run stopped ({first}): see its output for why, "
      "then start every process again to resume from the last checkpoint"
    )
  elif _out_of_memory(exc):
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    exc = UserError(
      f"out of memory ({first}): lower the batch size or the sequence lengths; "
      "`python -m ilora_jax.plan --config=...` estimates a run's device memory"
    )
  elif isinstance(exc, ValueError) and (
    bad_flag := re.match(r'Invalid value "(.*)" for JAX flag (jax_\w+)', str(exc))
  ):
    variable = bad_flag.group(2).upper()  # jax reads its flags from these at import.
    given = (
      f" (the environment has {variable}={os.environ[variable]})" if variable in os.environ else ""
    )
    exc = UserError(f"{_one_line(exc)}{given}: fix or unset it")
  elif isinstance(exc, Exception) and not isinstance(exc, UserError) and _backend_not_started(exc):
    # Not an interrupt while the backend starts (a pre-empted job): that is reported below.
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "no message"
    platforms = os.environ.get("JAX_PLATFORMS", "")
    advice = (
      f"JAX_PLATFORMS={platforms}: name a platform this jax install has (`python -c 'import "
      "jax; print(jax.devices())'` with JAX_PLATFORMS unset lists what it finds) or install "
      "jax's build for the accelerator (pip install -e '.[cuda]' or '.[tpu]')"
      if platforms
      else "check that the accelerator is free and its driver works (another process holding "
      "it, a driver that does not match jax's build)"
    )
    exc = UserError(f"jax could not start its backend ({type(exc).__name__}: {first}); {advice}")
  if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
    # A write no code path expected to fail (stdout unbuffered, say): the disk, not a bug.
    where = f" ({exc.filename})" if exc.filename else ""
    exc = UserError(f"cannot write: {exc.strerror}{where}; free some space and re-run")
  elif isinstance(exc, OSError) and exc.errno == errno.EROFS:  # A mount, not a bug either.
    where = f" ({exc.filename})" if exc.filename else ""
    exc = UserError(f"cannot write: {exc.strerror}{where}; mount it writable and re-run")
  if isinstance(exc, UserError):
    print(f"error: {_one_line(exc)}", file=sys.stderr, flush=True)
    _quiet_at_exit()
    _exit(EXIT_USER_ERROR)
  from ilora_jax.interrupts import Interrupted

  if isinstance(exc, Interrupted):
    done = "checkpoint saved" if exc.saved else f"checkpoint {exc.step} kept as it was"
    print(f"{exc}; {done}, re-run the same command to resume", file=sys.stderr, flush=True)
    _exit(128 + exc.signum)
  if isinstance(exc, BrokenPipeError):  # The reader went away (`... | head`): nothing to say.
    discard_stdout()
    _exit(128 + 13)  # As a shell reports SIGPIPE.
  if isinstance(exc, KeyboardInterrupt):
    signum = getattr(exc, "signum", signal.SIGINT)
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    advice = f"; {exc.advice}" if getattr(exc, "advice", "") else ""
    print(f"error: interrupted{by}{advice}", file=sys.stderr, flush=True)
    # At once: threads of the interrupted work (prefetch, a compile) may still run, and the
    # interpreter's teardown around them crashed now and then (a segmentation fault after
    # this line, when a second Ctrl-C stopped a compile).
    _exit_now(128 + signum)
  if os.environ.get("ILORA_JAX_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
    raise exc
  print(
    f"error: unexpected {type(exc).__name__}: {_one_line(exc)} "
    "(set ILORA_JAX_DEBUG=1 to see the traceback)",
    file=sys.stderr,
    flush=True,
  )
  _exit(EXIT_INTERNAL_ERROR)


def _clear_bars() -> None:
  """Progress bars still drawn (the command stopped inside a loop) are closed and cleared, so
  that its last line stands on a line of its own, not appended to a bar's text, and no bar is
  drawn again below it when the interpreter collects them at exit."""
  tqdm = sys.modules.get("tqdm")
  for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
    with contextlib.suppress(Exception):
      bar.leave = False
      bar.close()


def _flush_stdout() -> None:
  """Flushes stdout now, so that a failed write ends the process as one of ours, not as a
  traceback at interpreter exit (exit 120): a reader gone away (`... | head`) quietly, any
  other failure (a full disk behind `> file`) with one error line."""
  if sys.stdout is None:  # Started with stdout closed (`>&-`): print() wrote nothing.
    return
  try:
    sys.stdout.flush()
  except BrokenPipeError as exc:
    report_and_exit(exc)
  except OSError as exc:  # `report_and_exit` drops what stdout still holds.
    report_and_exit(UserError(f"cannot write to stdout: {exc.strerror or exc}"))


def _interrupts_are_not_lost(hook: Callable) -> Callable:
  """A `sys.unraisablehook` that delivers SIGINT again when its KeyboardInterrupt was raised
  where Python cannot propagate it: inside a garbage-collector callback (JAX registers one)
  the interrupt is printed as "Exception ignored in ..." and the run goes on (a Ctrl-C during
  an evaluation then ended with exit 0). Sent from a thread a moment later, the signal is
  handled again in the main thread's ordinary code, where it stops the run."""
  import time

  def handle(unraisable) -> None:
    # Only where the signal has a Python handler (one that raised it): at its default action
    # the signal would kill the process, and ignored it would be lost anyway. SIGTERM's
    # (`Terminated`) is sent again as itself.
    signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)
    if not isinstance(unraisable.exc_value, KeyboardInterrupt) or not callable(
      signal.getsignal(signum)
    ):
      hook(unraisable)
      return

    def again() -> None:
      time.sleep(0.05)  # Out of the callback: the main thread has moved on.
      signal.raise_signal(signum)

    threading.Thread(target=again, daemon=True, name="sigint-again").start()

  if getattr(hook, "redelivers_interrupts", False):  # Installed by an earlier entry point.
    return hook
  handle.redelivers_interrupts = True
  return handle


class Terminated(KeyboardInterrupt):
  """SIGTERM outside a training loop (which saves first, `interrupts.Graceful`): reported as
  an interruption by it, exit 128 + 15."""

  signum = signal.SIGTERM


class HungUp(Terminated):
  """SIGHUP there (the session that started the run closed): exit 128 + 1."""

  signum = signal.SIGHUP


def _terminated(signum, frame):
  raise HungUp if signum == signal.SIGHUP else Terminated


@contextlib.contextmanager
def resumable_interrupts(advice: str):
  """For the block of a command whose work is saved as it goes (training): SIGTERM (or
  SIGHUP, unless ignored) outside the training loops (loading, evaluating, between stages; in
  the main thread) stops it with one line as Ctrl-C does, not silently, and all say `advice`
  (how to go on). A reader of stdout or stderr gone away during a training loop stops it as a
  signal does (`interrupts.closed_output_stops_training`)."""
  from ilora_jax import interrupts

  try:
    with _terminate_as_interrupt(), interrupts.closed_output_stops_training():
      yield
  except KeyboardInterrupt as exc:
    exc.advice = advice
    raise


@contextlib.contextmanager
def _terminate_as_interrupt(default_only: bool = False):
  """In the block (in the main thread), SIGTERM and SIGHUP end a command as Ctrl-C does, with
  one line and 128 + the signal's number; SIGHUP ignored (`nohup`) stays so. `default_only`
  (every command, `cli_main`: `recommend` and `report` ended without a word) leaves a signal
  that is not at its default action, ignored or the caller's; training's own block
  (`resumable_interrupts`) takes them whatever their disposition, and saves first."""
  from ilora_jax import interrupts

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGHUP):
      if default_only and signal.getsignal(sig) != signal.SIG_DFL:
        continue
      if not interrupts.ignored(sig):
        previous[sig] = signal.signal(sig, _terminated)
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def cli_main(fn: Callable[..., object]) -> Callable[..., object]:
  """Decorates an entry point so that every failure ends as one `error:` line."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    sys.unraisablehook = _interrupts_are_not_lost(sys.unraisablehook)
    if sys.stderr is None:  # Started with stderr closed (`2>&-`): its lines go nowhere.
      sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process.
    try:
      with _terminate_as_interrupt(default_only=True):
        result = fn(*args, **kwargs)
    except SystemExit:
      _flush_stdout()
      raise
    except BaseException as exc:  # noqa: BLE001 - the whole point is to catch everything.
      report_and_exit(exc)
    _flush_stdout()
    return result

  return wrapper
