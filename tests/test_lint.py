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
