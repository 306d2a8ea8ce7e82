"""`config.compile_cache_dir`: a second process loads what the first compiled; '' is off."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from ilora_jax import compile_cache

# Runs a small jitted function after `compile_cache.enable(argv[1])`; prints the number of
# persistent-cache hits JAX reported, what `enable` returned and the result; returns those
# fields and the lines of stderr.
SCRIPT = """
import sys
import jax, jax.numpy as jnp
from ilora_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(
  lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
path = compile_cache.enable(sys.argv[1])
result = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((16, 8)))
print(len(hits), path, result, jax.config.jax_compilation_cache_max_size, sep="|")
"""


def _run(path, env_dir=None):
  unset = ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")  # the session's
  env = {k: v for k, v in os.environ.items() if k not in unset}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  if env_dir is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(env_dir)
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(path)], cwd=ROOT, capture_output=True, text=True, env=env
  )
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().split("|"), proc.stderr.splitlines()


def test_second_process_loads_from_the_cache(tmp_path):
  cache = tmp_path / "a" / "cache"  # created by `enable`
  first, _ = _run(cache)
  assert first[0] == "0" and first[1] == str(cache)
  assert first[3] == str(4 << 30)  # compile_cache.MAX_BYTES, with eviction
  entries = sorted(os.listdir(cache))
  assert entries, "nothing was written to the cache"
  second, _ = _run(cache)
  assert int(second[0]) >= 1, second  # the jitted function came from disk
  assert sorted(os.listdir(cache)) == entries  # nothing new compiled
  assert second[2] == first[2]  # the same result


def test_empty_path_turns_the_cache_off_even_when_the_environment_sets_one(tmp_path):
  env_dir = tmp_path / "from_env"
  env_dir.mkdir()
  out, _ = _run("", env_dir=env_dir)
  assert out[:2] == ["0", "None"]
  assert os.listdir(env_dir) == []


def test_a_folder_that_cannot_be_made_warns_in_one_line_and_runs_on(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  out, stderr = _run(blocker / "cache")
  assert out[1] == "None"
  assert not any("Traceback" in line for line in stderr), stderr
  warned = [line for line in stderr if "compile cache" in line]
  assert warned == [
    f"warning: compile cache off: cannot create {blocker / 'cache'} (Not a directory); set "
    "config.compile_cache_dir to a folder you can write ('' turns it off)"
  ]


def test_a_folder_this_user_may_not_write_turns_the_cache_off_in_one_line(
  tmp_path, monkeypatch, capsys
):
  """A run's cache folder another user made (a shared path saved in its config.json): JAX
  warned of every program it compiled, 41 warnings over 84 lines for one `recommend`, as it
  cannot take its lock file there even to read. Root may write anywhere, so the denial is
  `os.access`'s answer here."""
  import jax

  cache = tmp_path / "cache"
  cache.mkdir()
  access = os.access
  monkeypatch.setattr(
    os, "access", lambda path, mode: str(path) != str(cache) and access(path, mode)
  )
  updates = {}
  monkeypatch.setattr(jax.config, "update", lambda name, value: updates.update({name: value}))
  assert compile_cache.enable(str(cache)) is None
  assert updates == {"jax_enable_compilation_cache": False}
  assert capsys.readouterr().err == (
    f"warning: compile cache off: cannot write to {cache} (permission denied); set "
    "config.compile_cache_dir to a folder you can write ('' turns it off)\n"
  )


def test_entries_written_without_a_cap_do_not_break_a_capped_cache(tmp_path):
  """A process that used the cache without `enable` (a script calling the Python API with
  JAX_COMPILATION_CACHE_DIR set: JAX's default has no cap) writes entries without access-time
  files; a capped cache read them all at its next write and warned of a FileNotFoundError on
  every compile, caching nothing more. `enable` gives each such entry one."""
  cache = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_MAX_SIZE"}
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  code = "import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3))"
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, env=env)
  assert proc.returncode == 0, proc.stderr
  written = [n for n in os.listdir(cache) if n.endswith("-cache")]
  assert written and not [n for n in os.listdir(cache) if n.endswith("-atime")]
  out, err = _run(cache)  # Another program, compiled and written under the cap.
  assert out[3] == str(4 << 30) and not [line for line in err if "atime" in line], err
  entries = os.listdir(cache)
  caches = {n.removesuffix("-cache") for n in entries if n.endswith("-cache")}
  assert len(caches) > len(written)  # The new program was written.
  assert caches == {n.removesuffix("-atime") for n in entries if n.endswith("-atime")}


# In-process tests of `enable` (no compile): JAX's options it sets are put back afterwards.
OPTIONS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
           "jax_compilation_cache_max_size")  # fmt: skip


@pytest.fixture
def jax_options():
  import jax

  saved = {name: getattr(jax.config, name) for name in OPTIONS}
  yield jax.config
  for name, value in saved.items():
    jax.config.update(name, value)


def test_an_uncapped_cache_from_the_environment_stays_uncapped(tmp_path, monkeypatch, jax_options):
  """JAX_COMPILATION_CACHE_MAX_SIZE=-1 (JAX read it at import) wins over `MAX_BYTES`: no cap,
  so no eviction and no access-time files."""
  monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
  jax_options.update("jax_compilation_cache_max_size", -1)
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "j-cache").write_bytes(b"an entry")
  assert compile_cache.enable(str(cache)) == str(cache)
  assert jax_options.jax_compilation_cache_max_size == -1
  assert jax_options.jax_compilation_cache_dir == str(cache)
  assert os.listdir(cache) == ["j-cache"]


def test_entries_without_an_access_time_get_their_modification_time(
  tmp_path, monkeypatch, jax_options
):
  """Under the cap an entry without an access-time file gets one: its modification time in
  nanoseconds, 8 bytes little-endian (as JAX's LRU cache writes and reads them); an entry
  that has one keeps it as it was, and other files get none."""
  monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "k-cache").write_bytes(b"entry k")
  planted = bytes([1, 2, 3, 4, 5, 6, 7, 8])
  (cache / "k-atime").write_bytes(planted)
  (cache / "j-cache").write_bytes(b"entry j")
  mtime_ns = 0x0102_0304_0506_0708  # 1972-04-20, in nanoseconds since 1970.
  os.utime(cache / "j-cache", ns=(2 * mtime_ns, mtime_ns))  # Last read later: not used.
  (cache / "notes").write_bytes(b"not an entry")
  assert compile_cache.enable(str(cache)) == str(cache)
  assert jax_options.jax_compilation_cache_max_size == compile_cache.MAX_BYTES == 4 << 30
  assert sorted(os.listdir(cache)) == ["j-atime", "j-cache", "k-atime", "k-cache", "notes"]
  assert (cache / "k-atime").read_bytes() == planted
  assert (cache / "j-atime").read_bytes() == bytes([8, 7, 6, 5, 4, 3, 2, 1])  # Low byte first.
  assert int.from_bytes((cache / "j-atime").read_bytes(), "little") == mtime_ns
  assert os.stat(cache / "j-cache").st_mtime_ns == mtime_ns


def test_a_tilde_is_the_home_folder(tmp_path, monkeypatch, jax_options):
  home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
  home.mkdir()
  elsewhere.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(elsewhere)  # Where a literal "~" folder would go.
  assert compile_cache.enable("~/c") == str(home / "c")
  assert (home / "c").is_dir() and os.listdir(elsewhere) == []
  assert jax_options.jax_compilation_cache_dir == str(home / "c")


def test_an_entry_that_cannot_be_read_is_left_as_it_is(tmp_path, monkeypatch, jax_options):
  """An entry that vanished (here a link to nothing) gets no access-time file and does not
  stop `enable`; the other entries get theirs."""
  monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "gone-cache").symlink_to(tmp_path / "nothing")
  (cache / "j-cache").write_bytes(b"entry j")
  assert compile_cache.enable(str(cache)) == str(cache)
  assert sorted(os.listdir(cache)) == ["gone-cache", "j-atime", "j-cache"]


def test_a_later_enable_turns_the_cache_on_again(tmp_path, jax_options):
  assert compile_cache.enable("") is None
  assert jax_options.jax_enable_compilation_cache is False
  assert compile_cache.enable(str(tmp_path / "c")) == str(tmp_path / "c")
  assert jax_options.jax_enable_compilation_cache is True


def test_a_path_of_spaces_turns_the_cache_off(tmp_path, monkeypatch, jax_options):
  """Spaces only name no folder (`--config.compile_cache_dir=' '`): off, as '' is; a folder
  named by spaces was made in the working folder."""
  monkeypatch.chdir(tmp_path)
  assert compile_cache.enable(str(tmp_path / "c")) == str(tmp_path / "c")
  assert compile_cache.enable("  ") is None
  assert jax_options.jax_enable_compilation_cache is False
  assert sorted(os.listdir(tmp_path)) == ["c"]


def test_a_relative_path_is_the_folder_it_names_when_enabled(tmp_path, monkeypatch, jax_options):
  """JAX opens the cache at the first compile: a change of the working folder after `enable`
  must not move it."""
  first, later = tmp_path / "first", tmp_path / "later"
  first.mkdir()
  later.mkdir()
  monkeypatch.chdir(first)
  assert compile_cache.enable("c") == str(first / "c")
  monkeypatch.chdir(later)
  assert jax_options.jax_compilation_cache_dir == str(first / "c")
  assert (first / "c").is_dir()
