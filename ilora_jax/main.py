"""Command line: `python -m ilora_jax.main --config=configs/<name>.py --workdir=DIR`.

Every `--config.<field>=<value>` overrides the config file. Expected failures end
with one `error: ...` line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import ConfigDict

from ilora_jax import errors, files
from ilora_jax.errors import UserError, cli_main, parse_flags

_CONFIG = errors.define_config_file(
  "config", None, "Path to a config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.jsonl.")


def parse(argv: list[str]) -> tuple[ConfigDict, str]:
  """Parses flags; turns every flag or config problem into a UserError."""
  parse_flags(flags.FLAGS, argv)
  config = errors.loaded_config(_CONFIG.value, argv)
  if not _WORKDIR.value:
    raise UserError("--workdir is required")
  return config, _WORKDIR.value


@cli_main
def main(argv: list[str] | None = None) -> None:
  config, workdir = parse(list(sys.argv if argv is None else argv))
  with errors.resumable_interrupts(
    "re-run the same command to evaluate"
    if config.stage == "evaluate"
    else "the checkpoints saved so far are kept: re-run the same command to resume"
  ):
    _main(config, workdir)


def _main(config: ConfigDict, workdir: str) -> None:
  from ilora_jax import configuration, distributed

  distributed.initialize(config)  # Before anything touches a device.
  configuration.validate(config)
  distributed.check_same_config(config, workdir)
  from ilora_jax import compile_cache, console

  console.quiet_libraries()
  compile_cache.enable(config.compile_cache_dir)
  if config.stage == "evaluate" and config.eval.stage == "auto":
    config.eval.stage = _trained_stage(workdir)
  # The runs that compare with config.report.compare (SASRec's evaluation keeps its run's).
  if config.stage != "evaluate" or config.eval.stage == "ilora":
    from ilora_jax import report

    compare = report.parse_compare(config.report.compare)
    report.warn_unfound_compared(compare)
    try:
      report.check_not_itself(compare, workdir)
      report.check_compared(compare)  # Not at the end of the run, in its report.
    except UserError as exc:
      raise UserError(f"config.report.compare: {exc}") from None
  # The LLM a pipeline names is checked before SASRec trains, and before a workdir is made.
  if config.stage == "pipeline":
    from ilora_jax import llm, train_ilora

    train_ilora.check_llm(config)
    llm.check_weight_files(config.llm.name)  # The ilora stage's loading reads them anyway.
  if config.stage == "evaluate":  # Reads a trained run: a missing workdir is a typo.
    if not os.path.isdir(workdir):
      raise UserError(
        f"--workdir={workdir} is no folder: stage=evaluate reads the workdir of a trained run"
      )
    from ilora_jax import report

    report.read_records(workdir)  # Damaged: refused now, not by the report after the work.
  else:
    files.check_workdir(workdir)
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as exc:
      raise UserError(f"cannot create workdir {workdir}: {exc}") from None
  distributed.check_shared_workdir(workdir)
  import jax

  with files.workdir_lock(workdir, jax.process_index()):
    _run_stages(config, workdir)


def _trained_stage(workdir: str) -> str:
  """`eval.stage=auto`'s stage: ilora where `workdir` holds a checkpoint of the iLoRA stage
  (its latest or selected weights), else sasrec (a missing workdir too: refused later)."""
  if not os.path.isdir(workdir):
    return "sasrec"
  from ilora_jax import console, train_ilora

  begun = train_ilora.has_weights(workdir)
  console.info(
    "evaluate: "
    + ("the ilora stage (config.eval.stage=auto: the workdir holds iLoRA checkpoints)" if begun
       else "the sasrec stage (config.eval.stage=auto: no iLoRA checkpoint in the workdir)")
  )  # fmt: skip
  return "ilora" if begun else "sasrec"


def _run_stages(config: ConfigDict, workdir: str) -> None:
  from ilora_jax import console

  if config.stage != "evaluate":
    from ilora_jax import configuration

    configuration.check_results_kept(config, workdir)
  if config.stage in ("sasrec", "pipeline"):
    from ilora_jax import train_sasrec

    finished = train_sasrec.run(config, workdir)
    console.raise_unshown(workdir)  # Its results, written: stdout's failure ends the run.
    if finished is None:
      return  # Stopped early (train.stop_after_steps): iLoRA needs the finished SASRec.
  if config.stage in ("ilora", "pipeline"):
    from ilora_jax import train_ilora

    train_ilora.run(config, workdir)
  elif config.stage == "evaluate":
    assert config.eval.stage != "auto", "resolved by _main"
    if config.eval.stage == "sasrec":
      from ilora_jax import train_sasrec

      train_sasrec.evaluate(config, workdir)
    else:
      from ilora_jax import train_ilora

      train_ilora.evaluate(config, workdir)
  console.raise_unshown(workdir)


if __name__ == "__main__":
  main()
