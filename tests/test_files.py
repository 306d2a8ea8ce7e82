"""`ilora_jax.files`: whole-file writes that a crash or a failed write never leaves half done."""

import os
import stat

import pytest

from ilora_jax import files


def test_the_old_contents_stay_until_the_block_ends(tmp_path):
  path = str(tmp_path / "a.json")
  with open(path, "w") as f:
    f.write("old")
  with files.atomic_write(path) as f:
    f.write("new")
    f.flush()
    assert open(path).read() == "old"  # A reader during the write sees the whole old file.
  assert open(path).read() == "new"
  assert os.listdir(tmp_path) == ["a.json"]  # No temporary file left.


def test_an_error_in_the_block_keeps_the_old_file_and_removes_the_temporary(tmp_path):
  path = str(tmp_path / "a.json")
  with open(path, "w") as f:
    f.write("old")
  with pytest.raises(RuntimeError, match="half way"):
    with files.atomic_write(path) as f:
      f.write("ne")
      raise RuntimeError("half way")
  assert open(path).read() == "old"
  assert os.listdir(tmp_path) == ["a.json"]
  # No file before: none after either.
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_path(str(tmp_path / "b.df")) as tmp:
      open(tmp, "w").close()
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == ["a.json"]


def test_a_failed_rename_removes_the_temporary_and_names_the_file_meant(tmp_path):
  (tmp_path / "taken").mkdir()  # A folder where the file should go: the rename fails.
  with pytest.raises(IsADirectoryError) as info:
    with files.atomic_write(str(tmp_path / "taken")) as f:
      f.write("x")
  assert (info.value.filename, info.value.filename2) == (str(tmp_path / "taken"), None)
  assert sorted(os.listdir(tmp_path)) == ["taken"]
  # Opening it fails (no such folder): the same; another file's error is left as it is.
  with pytest.raises(FileNotFoundError) as info:
    with files.atomic_write(str(tmp_path / "gone" / "a.json")) as f:
      pass
  assert info.value.filename == str(tmp_path / "gone" / "a.json")
  with pytest.raises(FileNotFoundError) as info:
    with files.atomic_write(str(tmp_path / "a.json")) as f:
      open(tmp_path / "other")
  assert info.value.filename == str(tmp_path / "other")


def test_permissions_are_those_of_a_plain_open(tmp_path):
  plain = tmp_path / "plain"
  with open(plain, "w") as f:
    f.write("x")
  with files.atomic_write(str(tmp_path / "atomic")) as f:
    f.write("x")
  mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
  assert mode(tmp_path / "atomic") == mode(plain)


def test_keyword_arguments_reach_open_and_only_whole_file_modes_are_allowed(tmp_path):
  path = str(tmp_path / "u.item")
  with files.atomic_write(path, encoding="latin-1", errors="replace") as f:
    f.write("Amélie|€\n")  # The euro sign has no latin-1 byte: replaced, as open would.
  assert open(path, "rb").read() == "Amélie|?\n".encode("latin-1")
  with files.atomic_write(str(tmp_path / "b.bin"), "wb") as f:
    f.write(b"\x00\x01")
  assert open(tmp_path / "b.bin", "rb").read() == b"\x00\x01"
  with pytest.raises(ValueError, match="whole files"):
    with files.atomic_write(path, "a"):
      pass
  assert open(path, "rb").read() == "Amélie|?\n".encode("latin-1")


def test_two_threads_writing_one_file_at_once_each_write_a_whole_file(tmp_path):
  """Both threads have written their whole temporary file before either renames it (a
  barrier): with a temporary name shared between them the second rename found nothing, and
  the file could hold a mix. Now the last rename wins, whole."""
  import threading

  path = str(tmp_path / "target.bin")
  contents = [bytes([1, 2, 3, 4]) * (1 << 18), bytes([9, 8, 7, 6]) * (1 << 18)]  # 1 MiB each.
  barrier = threading.Barrier(2)
  errors = []

  def write(data):
    try:
      with files.atomic_write(path, "wb") as f:
        f.write(data)
        f.flush()
        barrier.wait(timeout=30)
    except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
      errors.append(exc)

  threads = [threading.Thread(target=write, args=(data,)) for data in contents]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=60)
  assert errors == []
  assert open(path, "rb").read() in contents
  assert os.listdir(tmp_path) == ["target.bin"]


def test_the_temporary_file_is_next_to_the_target(tmp_path, monkeypatch):
  """Beside the target, on its file system: `os.replace` is then one atomic rename (across
  file systems it fails)."""
  folder = tmp_path / "out"
  folder.mkdir()
  path = str(folder / "a.json")
  renames = []
  real_replace = os.replace

  def replace(src, dst):
    renames.append((src, dst))
    assert sorted(os.listdir(folder)) == sorted([os.path.basename(src)])  # Written there.
    real_replace(src, dst)

  monkeypatch.setattr(files.os, "replace", replace)
  with files.atomic_write(path) as f:
    f.write("new")
  [(src, dst)] = renames
  assert dst == path and os.path.dirname(src) == str(folder) and src != path
  assert open(path).read() == "new" and os.listdir(folder) == ["a.json"]


def test_a_workdir_in_use_is_refused_naming_its_holder_until_it_ends(tmp_path, capsys):
  """Two runs in one workdir (the same command started twice) both trained, and wrote each
  other's checkpoints and interleaved metrics. The lock is the operating system's: another
  process is refused while the block runs, a later one takes it, and other process indices
  of a multi-process run have their own."""
  import socket
  import subprocess
  import sys

  from ilora_jax.errors import UserError

  take = (
    "import sys; from ilora_jax import files\n"
    "from ilora_jax.errors import UserError\n"
    "try:\n"
    "  with files.workdir_lock(sys.argv[1], int(sys.argv[2])): print('held')\n"
    "except UserError as e: print(e)"
  )

  def other(process=0):
    proc = subprocess.run([sys.executable, "-c", take, str(tmp_path), str(process)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return proc.stdout.strip()

  lock = tmp_path / ".lock-0"
  with files.workdir_lock(str(tmp_path)):
    assert lock.read_text() == f"process {os.getpid()} on {socket.gethostname()}"
    assert other() == (
      f"{tmp_path} is in use by process {os.getpid()} on {socket.gethostname()} (it holds "
      f"{lock}): wait for that run to end or stop it, or use another --workdir"
    )
    assert other(process=1) == "held"
    with pytest.raises(UserError, match="is in use by"):  # Another open file, in-process too.
      with files.workdir_lock(str(tmp_path)):
        pass
  assert other() == "held"
  ran = []
  with files.workdir_lock(str(tmp_path / "missing")):  # No lock file can be made: runs on.
    ran.append(True)
  assert ran
  # A lock that cannot be taken (a folder in its place) let a second run in without a word:
  # it says so now, and runs on.
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / ".lock-0").mkdir()
  capsys.readouterr()
  with files.workdir_lock(str(tmp_path / "w")):
    ran.append(True)
  assert ran == [True, True]
  assert capsys.readouterr().err.startswith(
    f"warning: cannot take the workdir lock {tmp_path / 'w' / '.lock-0'} (Is a directory): a "
    f"second run in {tmp_path / 'w'} would not be refused"
  )


def test_a_write_that_fails_without_a_file_name_names_the_file_meant(tmp_path):
  """A write to a full disk raises an OSError naming no file: a run re-evaluated on a full
  disk ended in `cannot write: No space left on device`, no path given."""
  import errno

  path = str(tmp_path / "metrics.jsonl")
  with pytest.raises(OSError) as raised:
    with files.atomic_write(path):
      raise OSError(errno.ENOSPC, "No space left on device")
  assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, path)
  assert os.listdir(tmp_path) == []
