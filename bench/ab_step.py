r"""Paired timing of train-step variants in one process.

  python bench/ab_step.py --config=configs/movielens.py \
      --config.llm.name=smollm2-135m-random --config.llm.dtype=float32 \
      --config.llm.param_dtype=float32 --config.bench.batch_size=4 --config.bench.seq_len=256 \
      --variants="llm.remat=none;llm.remat=projections" --rounds=8

Each variant is a space-separated list of `key=value` config overrides, parsed as the command
line's `--config.key=value` (shell quoting applies), on top of --config with its own
overrides; an empty variant is that config itself. Every variant's train step is built and
compiled first (`ilora_jax.bench.train_stepper`, the benchmark's own step), then the
steps run in alternation, one step of each per round, so that the drift of a shared machine
(10-15% from one run to the next on 2 CPU cores) hits all variants alike. Prints each
variant's median and minimum step time and the median over rounds of its ratio to the first
variant; the last line is one JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
from absl import flags

from ilora_jax import bench, configuration, console, errors
from ilora_jax.errors import UserError

_CONFIG = errors.define_config_file("config", None, "config file (configs/movielens.py)")
_VARIANTS = flags.DEFINE_string("variants", None, "';'-separated variants of 'key=value ...'")
_ROUNDS = flags.DEFINE_integer("rounds", 8, "timed rounds (one step of every variant each)")


def _stepper(config):
  """A function running one compiled train step of `config` to completion (warmed up)."""
  _, step = bench.train_stepper(config)
  step()  # warm-up
  return step


def main(argv) -> None:
  del argv
  if _ROUNDS.value < 1:  # Before any variant is built.
    raise UserError(f"--rounds={_ROUNDS.value}: must be >= 1")
  variants = bench.parse_variants(_VARIANTS.value)
  names = [name for name, _ in variants]
  configs = [configuration.override(_CONFIG.value, items) for _, items in variants]
  for config in configs:  # Every variant's shape checked before the first one is built.
    bench.train_mesh(config)
  steps = []
  for k, (name, config) in enumerate(zip(names, configs), 1):
    console.info(f"ab_step: building and compiling variant {k} of {len(configs)}: {name}")
    steps.append(_stepper(config))
  times = [[] for _ in names]
  for round_ in range(_ROUNDS.value):
    console.info(f"ab_step: round {round_ + 1} of {_ROUNDS.value}")
    for step, record in zip(steps, times):
      t0 = time.perf_counter()
      step()
      record.append(time.perf_counter() - t0)
  result = {"device": jax.devices()[0].device_kind, "rounds": _ROUNDS.value, "variants": []}
  print(f"{'variant':<44}{'median s':>10}{'min s':>8}{'ratio':>8}", file=sys.stderr)
  for name, record in zip(names, times):
    ratio = statistics.median(a / b for a, b in zip(record, times[0]))
    row = {"variant": name, "median_s": statistics.median(record),
           "min_s": min(record), "ratio_to_first": ratio, "step_s": record}  # fmt: skip
    result["variants"].append(row)
    print(f"{row['variant']:<44}{row['median_s']:>10.3f}{row['min_s']:>8.3f}{ratio:>8.3f}",
          file=sys.stderr)  # fmt: skip
  print(json.dumps(result))


if __name__ == "__main__":
  errors.run_script(main, default_config="configs/movielens.py")
