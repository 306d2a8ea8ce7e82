"""The linter configured in pyproject.toml passes on the whole tree."""

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def test_ruff_check_is_clean():
  if (
    shutil.which("ruff") is None
    and subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode
    != 0
  ):
    pytest.skip("ruff is not installed (pip install -e '.[test]')")
  proc = subprocess.run(
    [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
