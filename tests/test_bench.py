"""The benchmark entry point: its table and last-line JSON contract on the tiny config."""

import json

import numpy as np
from conftest import assert_one_line_error, run_cli

TINY = "--config=configs/tiny.py"
SMALL = [
  "--config.bench.batch_size=2", "--config.bench.seq_len=64", "--config.bench.steps=2",
  "--config.bench.warmup=1", "--config.bench.eval_batch_size=2",
  "--config.bench.eval_prompt_len=64", "--config.bench.eval_new_tokens=4",
]  # fmt: skip


def test_bench_train_generate_and_score_keys():
  proc = run_cli(TINY, *SMALL, module="ilora_jax.bench")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ("step_s", "tokens_per_s", "compile_s", "mfu", "eval_gen_prompts_per_s",
              "eval_score_prompts_per_s", "eval_score_speedup"):  # fmt: skip
    assert np.isfinite(result[key]) and result[key] > 0, key
  assert result["tokens_per_s"] == np.float64(2 * 64 / result["step_s"])
  assert result["eval_score_speedup"] == np.float64(
    result["eval_gen_batch_s"] / result["eval_score_batch_s"]
  )
  assert np.isfinite(result["loss"])


def test_bench_rejects_bad_shapes():
  proc = run_cli(TINY, "--config.bench.seq_len=8", "--config.bench.target_tokens=8",
                 module="ilora_jax.bench")  # fmt: skip
  assert_one_line_error(proc, "target_tokens")


def _ab_step(*args):
  import subprocess
  import sys

  from conftest import ROOT

  return subprocess.run([sys.executable, "bench/ab_step.py", TINY, *SMALL[:2], *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_ab_step_times_variants_in_alternation():
  import statistics

  proc = _ab_step("--variants=llm.remat=none;llm.remat=projections,lora.dropout=0.0", "--rounds=3")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  first, second = result["variants"]
  assert first["variant"] == "llm.remat=none" and len(first["step_s"]) == 3
  assert first["ratio_to_first"] == 1.0
  ratios = [a / b for a, b in zip(second["step_s"], first["step_s"])]
  assert second["ratio_to_first"] == statistics.median(ratios)
  assert second["median_s"] == statistics.median(second["step_s"]) > 0
  assert_one_line_error(_ab_step("--variants=llm.no_such_key=1"), "unknown config key")
  assert_one_line_error(_ab_step("--variants=llm.remat"), "is not key=value")
