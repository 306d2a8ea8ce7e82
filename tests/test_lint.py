"""The linter and formatter configured in pyproject.toml pass on the whole tree."""

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(command):
  if subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode:
    pytest.skip("ruff is not installed (pip install -e '.[test]')")
  proc = subprocess.run(
    [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


def _source_files():
  import glob
  import os

  patterns = ("ilora_jax/*.py", "bench/*.py", "configs/**/*.py", "launch/*.py")
  return sorted({p for pat in patterns for p in glob.glob(os.path.join(ROOT, pat), recursive=True)})


def test_module_docstrings_keep_their_lines_as_written():
  """`--help` prints a module's docstring; a shell command in it continued with a backslash
  must print as written, not joined into one line (a plain string eats backslash-newline):
  the docstring Python sees has as many lines as its text in the file."""
  import ast

  files = _source_files()
  assert len(files) > 40
  for path in files:
    with open(path) as f:
      tree = ast.parse(f.read())
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
      continue
    node = first.value
    if isinstance(node.value, str):
      assert node.value.count("\n") == node.end_lineno - node.lineno, path
