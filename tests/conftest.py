"""Shared fixtures: paths to ../shared (skipped with a reason when absent), a CLI runner, and
the tiny config's pipeline run shared by the test files that need a trained workdir."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest
from filelock import FileLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ILORA_JAX_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a child process with `devices` CPU devices, keeping the session's flags."""
  own = os.environ.get("XLA_FLAGS", "")
  return f"{own} --xla_force_host_platform_device_count={devices}".strip()


# Test files by their summed time in a full run (`--durations=0`, 2026-12-03: 408, 247, 241,
# 232, 221, 114 s, then 99 s and less), heaviest first. pytest-xdist's `--dist loadfile` hands
# each worker whole files in collection order, which by default it sorts by the number of
# tests in a file: the six-test mesh file then starts last and one worker finishes about 60 s
# after the other. Heaviest first (its reordering off) leaves them about even.
HEAVIEST_FIRST = [
  "test_ilora_stage.py",
  "test_cli.py",
  "test_experiments.py",
  "test_bench.py",
  "test_ilora_mesh.py",
  "test_ilora_faults.py",
  "test_llama.py",
  "test_scoring.py",
  "test_llm_weights.py",
  "test_interrupts.py",
  "test_splash.py",
]


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files stay whole.


def pytest_configure(config):
  """One persistent compilation cache for the session (`ilora_jax.compile_cache`): xdist
  workers, in-process tests and CLI subprocesses inherit the folder from the environment,
  so the tiny model's programs are compiled once, not in every end-to-end run. Likewise one
  folder of rebuilt GGUF tokenizers (`tokenizer.CACHE_ENV`): the tiny model's tokenizer is
  read from the SmolLM2 GGUF once, not in every process (about 0.4 s saved in each)."""
  if hasattr(config, "workerinput"):
    return  # A worker: the controller's folders came with the environment.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False  # `HEAVIEST_FIRST` gives the files' order.
  config._ilora_temp = []
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    config._ilora_temp.append(tempfile.mkdtemp(prefix="ilora_jax_tests_xla_"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._ilora_temp[-1]
  if "ILORA_JAX_TOKENIZER_CACHE" not in os.environ:
    config._ilora_temp.append(tempfile.mkdtemp(prefix="ilora_jax_tests_tokenizers_"))
    os.environ["ILORA_JAX_TOKENIZER_CACHE"] = config._ilora_temp[-1]
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  # The tests' programs are tiny and run a few steps each, so XLA's CPU backend optimisation
  # (LLVM's) costs more than it saves: at level 0 compiling is about a quarter faster. The
  # level changes no semantics; the product's runs and the benchmarks keep XLA's default.
  if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
  # No size cap (so no eviction) in any test process: a capped writer expects every entry's
  # access-time file, which the in-process tests, uncapped, do not write.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")


def pytest_unconfigure(config):
  for folder in getattr(config, "_ilora_temp", []):
    shutil.rmtree(folder, ignore_errors=True)


def shared_path(*parts: str) -> str:
  """Path under ../shared; skips the test with a clear reason when it is absent."""
  path = os.path.join(SHARED, *parts)
  if not os.path.exists(path):
    pytest.skip(f"{path} not present (the shared data folder is only on project machines)")
  return path


def run_cli(
  *args: str,
  module: str = "ilora_jax.main",
  script: str | None = None,
  timeout=600,
  env=None,
  stdout: str = "",
):
  """Runs `python -m module args...` (or `python script args...`, a path relative to the
  repository root) from the repository root; returns CompletedProcess. `stdout`: a shell
  redirection of its stdout (`> /dev/full`, `>&-` closed), run by bash."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  full_env.pop("ILORA_JAX_DEBUG", None)
  command = [sys.executable, *([script] if script else ["-m", module]), *args]
  if stdout:
    command = ["bash", "-c", f"{shlex.join(command)} {stdout}"]
  return subprocess.run(
    command,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=full_env,
  )


def assert_one_line_error(proc, *fragments: str) -> str:
  """The process failed with exactly one `error: ...` line naming `fragments`, no traceback,
  and the exit code of bad input (2; an unexpected exception exits with 3)."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


TINY = "--config=configs/tiny.py"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
  """(workdir, finished process) of `--config.stage=pipeline` on the tiny config.

  Built once per test session: pytest-xdist workers share it through their common temporary
  folder under a file lock, so whichever worker needs it first trains it and the others wait.
  Tests read it; one that writes into a workdir works on `copy_of` it.
  """
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  workdir = shared / "tiny_pipeline"
  result = shared / "tiny_pipeline.json"
  with FileLock(str(shared / "tiny_pipeline.lock")):
    if not result.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # a failed attempt of another worker
      proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=pipeline")
      assert proc.returncode == 0, proc.stderr
      result.write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr}))
  out = json.loads(result.read_text())
  return str(workdir), subprocess.CompletedProcess([], 0, out["stdout"], out["stderr"])


def metrics_records(workdir) -> list[dict]:
  """Every record of `workdir/metrics.jsonl`."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def ilora_records(workdir) -> list[dict]:
  """Records of the ilora training run (not of later `evaluate` runs in the same workdir)."""
  return [r for r in metrics_records(workdir) if r["run"] == "ilora"]


def complete_steps(workdir, stage: str = "ilora") -> list[int]:
  """The checkpoint steps of `stage` (a folder under checkpoints/) Orbax finished writing."""
  folder = os.path.join(workdir, "checkpoints", stage)
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def start_processes(
  *args_of_process: list[str], devices: int = 4, cwds: list | None = None
) -> list[subprocess.Popen]:
  """One `python -m ilora_jax.main` per entry of `args_of_process`, joined as one
  multi-process run (a free local port as coordinator; process i gets process_id=i), each
  with `devices` CPU devices, in the repository (or in `cwds[i]`: a host of its own);
  stdout and stderr piped as text."""
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
  env.pop("ILORA_JAX_DEBUG", None)
  cluster = [f"--config.distributed.coordinator=localhost:{port}",
             f"--config.distributed.num_processes={len(args_of_process)}"]  # fmt: skip
  return [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "ilora_jax.main",
        *args,
        *cluster,
        f"--config.distributed.process_id={i}",
      ],
      cwd=cwds[i] if cwds else ROOT,
      env=dict(env, PYTHONPATH=ROOT) if cwds else env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for i, args in enumerate(args_of_process)
  ]


def run_unshared(script: str, timeout=600, **kwargs):
  """Runs the sh `script` from the repository root as root of new user and mount namespaces
  (`unshare`: its mounts, a small tmpfs or a read-only bind, vanish with it); returns
  CompletedProcess."""
  return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                        cwd=ROOT, capture_output=True, timeout=timeout, **kwargs)  # fmt: skip


def unshare_works(scratch) -> bool:
  """Whether this machine lets us mount a small tmpfs and a read-only bind in a namespace."""
  os.makedirs(scratch, exist_ok=True)
  script = (f"mount -t tmpfs -o size=64k tmpfs {scratch} && mount -o remount,size=128k {scratch}"
            f" && mount --bind {scratch} {scratch} && mount -o remount,bind,ro {scratch}"
            f" && ! touch {scratch}/x 2>/dev/null")  # fmt: skip
  try:
    probe = run_unshared(script, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return False
  return probe.returncode == 0


def with_sasrec_of(pipeline_dir, workdir) -> str:
  """A new workdir holding only the pipeline's trained SASRec (for a fresh iLoRA run)."""
  shutil.copytree(os.path.join(pipeline_dir, "checkpoints", "sasrec"),
                  os.path.join(workdir, "checkpoints", "sasrec"))  # fmt: skip
  return str(workdir)


def copy_of(pipeline_dir, workdir) -> str:
  """A full copy of the pipeline's workdir, for tests that write into it."""
  shutil.copytree(pipeline_dir, workdir)
  return str(workdir)


def tiny_sasrec_pt(path, seed: int = 0) -> str:
  """An original-style SASRec .pt (a pickled torch module tree) of the tiny config's shapes
  (60 items, hidden 16, max_len 10), its weights drawn from `seed`; skips without torch."""
  torch = pytest.importorskip("torch")
  from torch import nn

  torch.manual_seed(seed)
  d, n = 16, 60
  root = nn.Module()
  root.item_embeddings, root.positional_embeddings = nn.Embedding(n + 1, d), nn.Embedding(10, d)
  root.ln_1, root.ln_2, root.ln_3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
  root.mh_attn = nn.Module()
  for k in ("linear_q", "linear_k", "linear_v"):
    setattr(root.mh_attn, k, nn.Linear(d, d))
  root.feed_forward = nn.Module()
  root.feed_forward.w_1, root.feed_forward.w_2 = nn.Conv1d(d, d, 1), nn.Conv1d(d, d, 1)
  root.feed_forward.layer_norm = nn.LayerNorm(d)
  root.s_fc = nn.Linear(d, n)
  torch.save(root, path)
  return str(path)
