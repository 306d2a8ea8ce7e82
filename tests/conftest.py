"""Shared fixtures: paths to ../shared (skipped with a reason when absent) and a CLI runner."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ILORA_JAX_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


def shared_path(*parts: str) -> str:
  """Path under ../shared; skips the test with a clear reason when it is absent."""
  path = os.path.join(SHARED, *parts)
  if not os.path.exists(path):
    pytest.skip(f"{path} not present (the shared data folder is only on project machines)")
  return path


def run_cli(*args: str, module: str = "ilora_jax.main", timeout: int = 600, env=None):
  """Runs `python -m module args...` from the repository root; returns CompletedProcess."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  full_env.pop("ILORA_JAX_DEBUG", None)
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=full_env,
  )


def assert_one_line_error(proc, *fragments: str) -> str:
  """The process failed with exactly one `error: ...` line naming `fragments`, no traceback."""
  assert proc.returncode != 0, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]
