"""The benchmark entry point: its table and last-line JSON contract on the tiny config."""

import functools
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, run_cli

TINY = "--config=configs/tiny.py"
SMALL = [
  "--config.bench.batch_size=2", "--config.bench.seq_len=64", "--config.bench.steps=2",
  "--config.bench.warmup=1", "--config.bench.eval_batch_size=2",
  "--config.bench.eval_prompt_len=64", "--config.bench.eval_new_tokens=4",
]  # fmt: skip


def test_bench_train_generate_and_score_keys():
  from ilora_jax import bench, llm

  proc = run_cli(TINY, *SMALL, module="ilora_jax.bench")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ("step_s", "tokens_per_s", "compile_s", "mfu", "eval_gen_prompts_per_s",
              "eval_score_prompts_per_s", "eval_score_speedup"):  # fmt: skip
    assert np.isfinite(result[key]) and result[key] > 0, key
  assert result["tokens_per_s"] == np.float64(2 * 64 / result["step_s"])
  # The evaluation's keys, which a run without it gives as nulls.
  assert set(bench.eval_keys(decode_both=False)) <= set(result)
  assert result["eval_score_speedup"] == np.float64(
    result["eval_gen_batch_s"] / result["eval_score_batch_s"]
  )
  assert np.isfinite(result["loss"])
  # MFU: the step's FLOPs (`bench.train_flops_per_token`, checked against Llama-2-7B's size
  # below) over the step time and the default peak of the one device.
  flops = bench.train_flops_per_token(llm.PRESETS["tiny"], 64) * 2 * 64
  assert result["mfu"] == pytest.approx(flops / result["step_s"] / 989e12, rel=1e-12)
  # The compile time in its two parts (each timed on its own, around its own call).
  parts = result["compile_trace_s"] + result["compile_xla_s"]
  assert result["compile_trace_s"] > 0 and result["compile_xla_s"] > 0
  assert parts == pytest.approx(result["compile_s"], abs=1e-3)
  assert 0 < result["eval_score_compile_xla_s"] < result["eval_score_compile_s"]
  assert 0 < result["eval_gen_compile_xla_s"] < result["eval_gen_compile_s"]
  # The step's scratch memory holds at least the float32 logits of the 2 rows' 16 target
  # positions over the tiny model's 49,152-token vocabulary.
  assert result["temp_bytes"] >= 2 * 16 * 49152 * 4
  # XLA's scratch memory of the scoring program: at least the 20 packed candidates' hidden
  # states of both rows (2 x 240 positions x 64 float32 in the tiny model).
  assert result["eval_score_packed"] is True
  assert result["eval_score_temp_bytes"] >= 2 * 240 * 64 * 4
  # Both modes from one prefill: at least one cache (2 layers' keys and values, 2 rows, 2 KV
  # heads of 16, 64 prompt slots and 240 for the packed candidates, float32).
  assert result["eval_both_prompts_per_s"] == np.float64(2 / result["eval_both_batch_s"])
  assert result["eval_both_temp_bytes"] >= 2 * 2 * 2 * 2 * (64 + 240) * 16 * 4
  assert result["eval_both_compile_s"] > 0
  # The prefill alone and the per-step share of the rest (scanned layers, the default).
  assert result["eval_gen_unroll"] is False
  assert np.isfinite(result["eval_gen_prefill_s"]) and result["eval_gen_prefill_s"] > 0
  decode = result["eval_gen_batch_s"] - result["eval_gen_prefill_s"]  # Null, never negative.
  assert result["eval_gen_decode_step_s"] == (np.float64(decode / (4 - 1)) if decode > 0 else None)
  # The shapes the figures were timed at.
  shape = {"batch_size": 2, "seq_len": 64, "eval_batch_size": 2, "eval_prompt_len": 64,
           "eval_new_tokens": 4, "eval_candidates": 20, "eval_candidate_len": 12}  # fmt: skip
  assert {k: result[k] for k in shape} == shape
  # The roofline estimates sit beside the timings on a GPU with a model; on a CPU they are
  # null (ilora_jax.roofline).
  for key in ("roofline_step_s", "eval_gen_roofline_s", "eval_score_roofline_s",
              "eval_both_roofline_s"):  # fmt: skip
    assert key in result and result[key] is None, key


def test_bench_generation_alone():
  """`bench.train=False` and `bench.eval_candidates=0`: generation keys only (gpu.sh times
  generation at a large batch this way, where 20 candidates' caches would not fit). On two
  devices with a train batch of 3, which does not divide over them: no train step runs, so
  it is not refused (it was)."""
  from conftest import xla_flags

  proc = run_cli(TINY, *SMALL, "--config.bench.train=False", "--config.bench.eval_candidates=0",
                 "--config.bench.eval_new_tokens=1", "--config.bench.batch_size=3",
                 module="ilora_jax.bench", env={"XLA_FLAGS": xla_flags(2)})  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["eval_gen_prompts_per_s"] > 0 and result["devices"] == 2
  # Scoring's figures null (they were absent), each with its reason, as the train step's.
  scoring = [k for k in result if k.startswith(("eval_score", "eval_both"))]
  assert len(scoring) == 15 and all(result[k] is None for k in scoring), scoring
  # No train step ran: its figures and shape are null (were absent), each with its reason.
  train = ("step_s", "tokens_per_s", "compile_s", "peak_bytes", "temp_bytes", "mfu", "loss",
           "batch_size", "seq_len")  # fmt: skip
  assert all(k in result and result[k] is None for k in train), result
  assert result["eval_candidates"] == 0 and result["eval_prompt_len"] == 64
  table = dict(line.split(None, 1) for line in proc.stdout.strip().splitlines()[:-1])
  for key in train:
    assert table[key] == "null: no train step ran (bench.train=False)", key
  # One new token: the prefill alone, no decode step (was called decode below the noise).
  assert result["eval_gen_decode_step_s"] is None
  assert table["eval_gen_decode_step_s"].startswith("null: one new token"), table
  assert result["eval_candidate_len"] is None
  for key in ("eval_candidate_len", *scoring):
    assert table[key] == "null: no candidates scored (bench.eval_candidates=0)", key
  # Progress on stderr, phase by phase.
  for phase in ("bench: building tiny", "bench: compiling generation", "bench: timing generation"):
    assert phase in proc.stderr, proc.stderr


def test_bench_trains_with_splash_attention_and_checks_it_against_einsum():
  """The iLoRA train step of the benchmark with `llm.attention=splash` (interpreted on a CPU)
  and the loss of one padded batch under both kernels."""
  proc = run_cli(TINY, *SMALL, "--config.llm.attention=splash", "--config.bench.eval=False",
                 "--config.bench.check_attention=True", module="ilora_jax.bench")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["attention"] == "splash" and np.isfinite(result["loss"])
  # No evaluation ran: its figures are null (were absent: `r["eval_gen_batch_s"]` a KeyError),
  # each with its reason.
  from ilora_jax import bench

  evaluation = bench.eval_keys(decode_both=False)
  assert [k for k in evaluation if result.get(k, 0) is not None] == []
  table = dict(line.split(None, 1) for line in proc.stdout.strip().splitlines()[:-1])
  assert {table[k] for k in evaluation} == {"null: no evaluation ran (bench.eval=False)"}
  assert result["attention_loss_xla"] > 0
  assert result["attention_rel_diff"] < 1e-6, result  # 9e-8 when written


def test_bench_rejects_bad_shapes():
  proc = run_cli(TINY, "--config.bench.seq_len=50", "--config.bench.target_tokens=50",
                 module="ilora_jax.bench")  # fmt: skip
  assert_one_line_error(proc, "target_tokens")
  # Too short for the prompt's 30 item placeholders: refused before any work (was an
  # IndexError, for the evaluation's prompts after the train step was timed).
  proc = run_cli(TINY, "--config.bench.seq_len=8", module="ilora_jax.bench")
  assert_one_line_error(proc, "seq_len=8 must be an integer >= 47 (a prompt: 46 tokens, its 10 "
                        "history and 20 candidate placeholders and 8 tokens either side, then a "
                        "token)")  # fmt: skip
  proc = run_cli(TINY, "--config.bench.seq_len=50", "--config.bench.target_tokens=8",
                 module="ilora_jax.bench")  # fmt: skip
  assert_one_line_error(proc, "seq_len=50 leaves 42 prompt tokens", "a prompt needs 46")
  proc = run_cli(TINY, "--config.bench.eval_prompt_len=8", "--config.bench.eval=False",
                 module="ilora_jax.bench")  # fmt: skip
  assert_one_line_error(proc, "eval_prompt_len=8 must be an integer >= 47")
  assert not proc.stdout
  proc = run_cli(TINY, "--config.bench.eval_data=True", module="ilora_jax.bench")
  assert_one_line_error(proc, "eval_data needs a trained SASRec: give --workdir=DIR")


def test_gpu_script_stops_at_once_without_a_gpu(tmp_path):
  """`bench/gpu.sh` on a jax without a GPU backend: one error line and exit 2 before any
  benchmark (the 7B runs would otherwise spend their time limits on the CPU)."""
  import jax

  if jax.default_backend() == "gpu":
    pytest.skip("this machine has a GPU: the script would run every benchmark")
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(tmp_path / "results")],
    env={**os.environ, "PYTHON": sys.executable},
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2
  assert_one_line_error(proc, "gpu.sh", "not gpu")
  assert not list((tmp_path / "results").iterdir())  # No benchmark ran.


def test_gpu_script_stops_at_once_without_a_results_folder(tmp_path):
  """A results folder that cannot be created: one error line before anything runs (mkdir
  failed and the script went on, keeping nothing of its GPU minutes)."""
  taken = tmp_path / "afile"
  taken.write_text("")
  for bad in (taken, taken / "sub"):
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(bad)], cwd=ROOT,
                          env={**os.environ, "PYTHON": "false"}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert_one_line_error(proc, f"cannot create or write the results folder {bad}")
    assert not proc.stdout


def test_ab_step_times_variants_in_alternation():
  import statistics

  variants = "--variants=llm.remat=none;llm.remat=projections lora.dropout=0.0"
  proc = run_cli(TINY, *SMALL[:2], variants, "--rounds=3", script="bench/ab_step.py")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  first, second = result["variants"]
  assert first["variant"] == "llm.remat=none" and len(first["step_s"]) == 3
  assert second["variant"] == "llm.remat=projections lora.dropout=0.0"
  assert first["ratio_to_first"] == 1.0
  ratios = [a / b for a, b in zip(second["step_s"], first["step_s"])]
  assert second["ratio_to_first"] == statistics.median(ratios)
  assert second["median_s"] == statistics.median(second["step_s"]) > 0


def test_padding_counts_the_slots_of_both_step_orders(pipeline, tmp_path):
  sasrec = f"--config.sasrec.init_from={pipeline[0]}"  # The tiny pipeline's SASRec.
  lengths = ",".join(f"{t}={t / 100}" for t in range(32, 1025, 32))  # Time proportional to T.
  proc = run_cli(
    TINY, sasrec, f"--workdir={tmp_path}", "--steps=4", "--config.ilora.bucket_window=4",
    f"--step_s={lengths}", "--eval_split=val", "--config.ilora.eval_rows=18",
    script="bench/padding.py",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  ev = result["eval"]
  assert ev["split"] == "val" and ev["batch_size"] == 4
  real = []
  for order in ("in_order", "sorted"):  # 18 rows in 5 batches of 4, either order.
    counts = {int(t): n for t, n in ev[order]["padded_lengths"].items()}
    assert sum(counts.values()) == 5
    assert ev[order]["slots"] == 4 * sum(t * n for t, n in counts.items())
    real.append(ev[order]["filled"] * ev[order]["slots"])  # The same prompts either way.
  assert real[0] == pytest.approx(real[1])
  cands = ev["candidates"]  # The candidates' tokens, padded to each batch's longest or packed.
  for form, per_row in (("chunked", 20), ("packed", 1)):  # 20 candidates per row
    counts = {int(t): n for t, n in cands[form]["lengths"].items()}
    assert sum(counts.values()) == 5
    assert cands[form]["slots"] == 4 * per_row * sum(t * n for t, n in counts.items())
    assert 0 < cands[form]["filled"] <= 1
  assert cands["slot_ratio"] == cands["packed"]["slots"] / cands["chunked"]["slots"]
  assert ev["slot_ratio"] == ev["sorted"]["slots"] / ev["in_order"]["slots"]
  rows = result["rows_per_step"]
  assert rows == 8 and result["steps"] == 4 and result["window"] == 4
  for order in ("plain", "bucketed"):
    counts = {int(t): n for t, n in result[order]["padded_lengths"].items()}
    assert sum(counts.values()) == 4
    assert result[order]["slots"] == rows * sum(t * n for t, n in counts.items())
    assert result[order]["summed_s"] == pytest.approx(sum(t / 100 * n for t, n in counts.items()))
    assert 0.5 < result[order]["filled"] <= 1
  assert result["time_ratio"] == pytest.approx(result["slot_ratio"])
  bad = run_cli(
    TINY, sasrec, f"--workdir={tmp_path}", "--steps=2", "--step_s=64=1", script="bench/padding.py"
  )
  assert_one_line_error(bad, "--step_s lacks the padded lengths")


def test_padding_checks_the_eval_splits_file_before_the_train_tallies(tmp_path):
  """A data folder without Test_data.df and --eval_split=test: refused before the model is
  built (was after both train tallies printed, then after the model and SASRec loaded)."""
  from conftest import SHARED

  data, sasrec = f"{SHARED}/data/movielens", f"{SHARED}/checkpoints/sasrec/movielens.pt"
  if not os.path.isfile(f"{data}/train_data.df") or not os.path.isfile(sasrec):
    pytest.skip("no shared MovieLens data and SASRec")
  if os.path.exists(f"{data}/Test_data.df"):
    pytest.skip("the shared MovieLens data has a test split")
  proc = run_cli("--config=configs/movielens.py", "--config.llm.name=tiny",
                 f"--config.data.dir={data}", f"--config.sasrec.init_from={sasrec}",
                 "--eval_split=test", "--steps=1", f"--workdir={tmp_path}",
                 script="bench/padding.py")  # fmt: skip
  assert_one_line_error(proc, "split 'test' is not available: test file not found")
  # No SASRec read: the error, after the data's note of the train rows left out (min_len).
  lines = proc.stderr.strip().splitlines()
  assert [line.split(":")[0] for line in lines] == ["data", "error"], proc.stderr
  assert not proc.stdout


def test_ab_eval_times_evaluation_variants_in_alternation_with_their_metrics(pipeline, tmp_path):
  sasrec = f"--config.sasrec.init_from={pipeline[0]}"  # The tiny pipeline's SASRec.
  proc = run_cli(
    TINY, sasrec, f"--workdir={tmp_path}", "--rounds=2", "--config.ilora.eval_rows=12",
    "--variants=ilora.eval_sort=False;llm.unroll_decode=True;"
    "ilora.eval_shared_prefill=False ilora.eval_score=False",
    script="bench/ab_eval.py",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["rows"] == 12 and result["split"] == "val" and result["rounds"] == 2
  assert [v["rows"] for v in result["variants"]] == [12, 12, 12]
  assert len({v["candidates"] for v in result["variants"]}) == 1
  first, unrolled, generating = result["variants"]
  assert [v["variant"] for v in result["variants"]] == [
    "ilora.eval_sort=False", "llm.unroll_decode=True",
    "ilora.eval_shared_prefill=False ilora.eval_score=False",
  ]  # fmt: skip
  for v in result["variants"]:
    assert len(v["seconds"]) == 2 and min(v["seconds"]) > 0 and v["batch_size"] == 4
    assert v["ratios"] == [a / b for a, b in zip(v["seconds"], first["seconds"])]
  assert first["ratios"] == [1.0, 1.0] and first["metrics_rel_diff"] == 0.0
  # Neither the row order nor the decode loop (the second variant: sorted rows, as configured,
  # and unrolled decode layers) changes a metric; without scoring, the ranking metrics are
  # gone and the loss comes from a pass of its own over the first answer tokens.
  assert unrolled["metrics"].keys() == first["metrics"].keys() and "hr@1" in first["metrics"]
  assert unrolled["metrics_rel_diff"] < 1e-5
  for key, value in first["metrics"].items():
    assert unrolled["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  assert "hr@1" not in generating["metrics"] and "valid_ratio" in generating["metrics"]
  assert generating["metrics"]["valid_ratio"] == pytest.approx(first["metrics"]["valid_ratio"])
  bad = run_cli(
    TINY, sasrec, f"--workdir={tmp_path}", "--rounds=0", "--variants=;", script="bench/ab_eval.py"
  )
  assert_one_line_error(bad, "--rounds=0")
  bad = run_cli(
    TINY, sasrec, f"--workdir={tmp_path}", "--variants=llm.remat=none;", script="bench/ab_eval.py"
  )
  assert_one_line_error(bad, "variant item 'llm.remat=none'", "a variant may change only")


def test_eval_memory_reports_each_programs_scratch_and_the_cache():
  """The tiny preset compiled (no weights, nothing run) at one shape: the cache's size by the
  formula (keys and values of 2 layers, 2 rows, 2 KV heads of 16 dims, 24 prompt slots and
  32 candidate slots, float32) and a scratch figure per program."""
  proc = run_cli("--model=tiny", "--batch=2", "--prompt_len=24", "--new_tokens=4",
                 "--candidates=4", "--candidate_len=8", "--packed_len=32",
                 script="bench/eval_memory.py")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["cache_bytes"] == 2 * 2 * 2 * 2 * (24 + 32) * 16 * 4
  names = ("generate", "score", "both_keep_cache_True", "both_keep_cache_False")
  for name in names:
    assert result[f"{name}_temp_bytes"] > 0, name
  both = result["both_keep_cache_True_temp_bytes"] / result["both_keep_cache_False_temp_bytes"]
  assert result["both_ratio"] == pytest.approx(both)
  assert "KV cache" in proc.stdout and proc.stderr.count("error") == 0
  proc = run_cli("--model=llama9", script="bench/eval_memory.py")
  assert_one_line_error(proc, "--model=llama9 is not a preset")


def test_sasrec_step_bench_times_the_stages_own_step(tmp_path):
  """`bench/sasrec_step.py` drives the SASRec stage's jitted step (its outputs included):
  its last line is the JSON of the timing, with the rows per second its step time gives."""
  cache = tmp_path / "cache"  # JAX's persistent cache named: compile_s must not load from it.
  proc = run_cli("--n_items=200", "--batch_size=8", "--steps=3", script="bench/sasrec_step.py",
                 env={"JAX_COMPILATION_CACHE_DIR": str(cache)})  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step_s"] > 0 and result["compile_s"] > 0
  assert result["rows_per_s"] == pytest.approx(8 / result["step_s"])
  # The compile alone, in its two parts (the steps timed apart), and nothing cached.
  assert result["compile_trace_s"] > 0 and result["compile_xla_s"] > 0
  assert result["compile_s"] == pytest.approx(result["compile_trace_s"] + result["compile_xla_s"])
  assert not cache.exists() or not os.listdir(cache)
  proc = run_cli("--steps=0", script="bench/sasrec_step.py")
  assert_one_line_error(proc, "--steps=0: must be >= 1")
  assert not proc.stdout


def test_ab_step_variants_parse_as_command_line_overrides():
  from ilora_jax import bench, configuration
  from ilora_jax.errors import UserError

  variants = bench.parse_variants("; llm.remat=none lora.targets=\"['q', 'v']\" ;train.steps=3")
  assert variants == [
    ("(config)", []),
    ("llm.remat=none lora.targets=['q', 'v']", ["llm.remat=none", "lora.targets=['q', 'v']"]),
    ("train.steps=3", ["train.steps=3"]),
  ]
  base = configuration.load("configs/tiny.py", ["lora.dropout=0.0"])
  assert base.train.steps is None  # A None field (a placeholder), which can be set.
  configs = [configuration.override(base, items) for _, items in variants]
  assert configs[0] == base and configs[0] is not base
  assert configs[1].llm.remat == "none" and list(configs[1].lora.targets) == ["q", "v"]
  assert configs[1].lora.dropout == 0.0 and base.llm.remat == "projections"
  assert configs[2].train.steps == 3
  for text, fragment in (
    (None, "--variants is required"),
    ("llm.remat", "is not key=value"),
    ("llm.remat='none", "No closing quotation"),
    ("llm.remat=none", "is one variant: give two or more"),
    ("", "--variants is required"),
  ):
    with pytest.raises(UserError, match=fragment):
      bench.parse_variants(text)
  for items, fragment in (
    (["llm.no_such_key=1"], "unknown config key"),
    (["lora.rank=x"], "lora.rank"),
    (["llm.remat=fast"], "llm.remat='fast' is not one of"),
    (["llm.attention_chunks=0"], "llm.attention_chunks must be at least 1"),
    (["ilora.prefetch=-1"], "ilora.prefetch must be >= 0"),
    (["ilora.bucket_window=0"], "ilora.bucket_window must be >= 1"),
    (["ilora.pad_multiple=0"], "ilora.pad_multiple must be >= 1"),
  ):
    with pytest.raises(UserError, match=fragment):
      configuration.override(base, items)


@functools.cache
def _profile_step():
  """bench/profile_step.py as a module, loaded once (its absl flags can be defined once)."""
  import importlib.util

  from conftest import ROOT

  spec = importlib.util.spec_from_file_location("profile_step", f"{ROOT}/bench/profile_step.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_profile_step_attributes_the_traced_ops_to_their_jax_source(tmp_path):
  """bench/profile_step.py: every op it reports is an instruction of the compiled step, put in
  the kind its JAX source names; the kinds add up to the summed op time."""
  import os

  proc = run_cli(TINY, *SMALL[:2], "--steps=1", f"--out={tmp_path}", "--top=40",
                 script="bench/profile_step.py")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert os.listdir(tmp_path) and result["trace"] == str(tmp_path)
  assert sum(result["kinds_s"].values()) == pytest.approx(result["ops_s"])
  assert result["kinds_s"]["matmul"] > 0 and result["step_s"] > 0
  profile_step = _profile_step()
  with open(tmp_path / "step.hlo.txt") as f:  # the compiled step the trace ran
    module = profile_step.instructions(f.read())
  for op in result["top"]:
    assert op["source"] == module[op["op"]][1][0]
    assert op["kind"] == profile_step._kind(module, op["op"])
    assert op["source"] == "" or op["source"].startswith("jit(step)/"), op
  assert "matmul" in {op["kind"] for op in result["top"]}
  hlo = """
%fused_computation.3 (param_0.29: f32[256,64], param_1.29: f32[64,8]) -> f32[256,8] {
  %dot.1 = f32[256,8]{1,0} dot(%param_0.29, %param_1.29), metadata={op_name="jit(step)/v/dot_general"}
}

%fused_computation.4 (param_0.1: u32[64]) -> pred[64] {
  %x.2 = u32[64]{0} xor(%param_0.1, %param_0.1), metadata={op_name="jit(step)/a/threefry2x32"}
  ROOT %ge.3 = pred[64]{0} compare(%x.2, %x.2), direction=GE, metadata={op_name="jit(step)/a/ge"}
}

ENTRY %main.9 (a: f32[256,64]) -> f32[4,8] {
  %ynn_fusion.3 = f32[256,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.3, metadata={op_name="jit(step)/layers/attn/v/adapter/dot_general" stack_frame_id=7}
  %ge_fusion = pred[64]{0} fusion(%c), kind=kLoop, calls=%fused_computation.4, metadata={op_name="jit(step)/a/ge"}
  %ynn_fusion.5 = f32[256,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.3
  %w.1 = (f32[2]{0}, s32[]) while(%t), condition=%c, body=%b, metadata={op_name="jit(step)/while"}
  ROOT %dynamic-update-slice.2 = f32[4,8]{1,0} dynamic-update-slice(%x, %y, %i, %j)
}
"""  # noqa: E501
  known = profile_step.instructions(hlo)
  assert known["ynn_fusion.3"][:2] == (
    "fusion",
    ("jit(step)/layers/attn/v/adapter/dot_general", "jit(step)/v/dot_general"),
  )
  assert known["ge_fusion"][:2] == (
    "fusion",
    ("jit(step)/a/ge", "jit(step)/a/threefry2x32", "jit(step)/a/ge"),
  )
  assert known["ynn_fusion.5"][:2] == ("fusion", ("jit(step)/v/dot_general",))  # no metadata
  assert known["w.1"][:2] == ("while", ("jit(step)/while",))
  assert known["dynamic-update-slice.2"] == ("dynamic-update-slice", ("",), frozenset())
  assert known["ynn_fusion.3"][2] == {"dot"}  # The opcodes it fuses.
  events = [{"ph": "X", "name": "ynn_fusion.3", "dur": 5.0}, {"ph": "X", "name": "w.1", "dur": 9.0},
            {"ph": "X", "name": "ynn_fusion.3", "dur": 1.0}, {"ph": "i", "name": "w.1"},
            {"ph": "X", "name": "dynamic-update-slice.2", "dur": 2.0}]  # fmt: skip
  times = profile_step.op_times(events, known)
  assert times == {"ynn_fusion.3": 6.0, "dynamic-update-slice.2": 2.0}
  names = ("ynn_fusion.3", "ge_fusion", "ynn_fusion.5", "w.1", "dynamic-update-slice.2")
  kinds = [profile_step._kind(known, n) for n in names]
  assert kinds == ["matmul", "dropout bits", "matmul", "other element-wise", "scan stacking"]


def test_profile_step_splits_generation_into_prefill_and_decode_steps(tmp_path):
  """--mode=generate: the decode loop's ops, by kind, per decode step (new tokens - 1)."""

  from conftest import assert_one_line_error

  gen = SMALL[4:]  # eval batch 2, 64-token prompts, 4 new tokens
  proc = run_cli(TINY, *gen, "--mode=generate", "--steps=1", f"--out={tmp_path}",
                 script="bench/profile_step.py")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["mode"] == "generate"
  assert 0 < result["decode_loop_s"] < result["ops_s"]  # The prefill is the rest.
  assert result["decode_step_ops_s"] == pytest.approx(result["decode_loop_s"] / 3)
  assert sum(result["decode_step_kinds_s"].values()) == pytest.approx(result["decode_step_ops_s"])
  assert result["decode_step_kinds_s"]["matmul"] > 0
  for op in result["top"]:  # Only the generation ran in the trace.
    assert op["source"] == "" or op["source"].startswith("jit(generate_tokens)/"), op
  profile_step = _profile_step()
  loop = profile_step.is_decode_loop
  assert loop("jit(generate_tokens)/while/body/Llama/while/body/closed_call/layers/mlp/mul")
  assert loop("jit(generate_tokens)/while/body/Llama/layers_3/attn/q/dot_general")
  assert not loop("jit(generate_tokens)/Llama/while/body/closed_call/layers/mlp/mul")  # prefill
  assert not loop("jit(generate_tokens)/while/cond/reduce_and")
  proc = run_cli(TINY, "--mode=generate", "--config.bench.eval_new_tokens=1",
                 script="bench/profile_step.py")  # fmt: skip
  assert_one_line_error(proc, "eval_new_tokens must be at least 2")


@pytest.mark.parametrize(
  "override, fragment",
  [
    ("eval_batch_size=0", "config.bench.eval_batch_size=0 must be an integer >= 1"),
    ("eval_new_tokens=0", "config.bench.eval_new_tokens=0 must be an integer >= 1"),
    ("grad_accum=0", "config.bench.grad_accum=0 must be an integer >= 1"),
    ("warmup=-1", "config.bench.warmup=-1 must be an integer >= 0"),
    ("peak_flops=0", "config.bench.peak_flops=0.0 must be a number of FLOP/s, at least 1"),
    # A positive peak this small made an MFU of Infinity: the last line was no JSON.
    ("peak_flops=1e-320", "config.bench.peak_flops=1e-320 must be a number of FLOP/s"),
    ("train=False --config.bench.eval=False", "are both False (and eval_data and "),
    # That mode batches by ilora.eval_batch_size: the flag would be ignored in silence.
    (
      "eval_data=True --config.bench.eval_batch_size=4",
      "config.bench.eval_batch_size is not read with config.bench.eval_data=True",
    ),
    # Each mode's fields, given to the other, were ignored in silence; so was a --workdir.
    (
      "eval_data=True --config.bench.eval_new_tokens=2",
      "config.bench.eval_new_tokens is not read with config.bench.eval_data=True: that mode",
    ),
    ("eval_rows=4", "config.bench.eval_rows is not read with config.bench.eval_data=False"),
    ("eval_split=bogus", "config.bench.eval_split='bogus' must be one of train, val, test"),
    ("steps=2 --workdir=/tmp/w", "--workdir=/tmp/w is read only with config.bench.eval_data=True"),
  ],
)
def test_bench_rejects_impossible_fields_before_any_work(override, fragment):
  """Each numeric `bench.*` field is checked up front (seconds: no model is built), and a
  benchmark that would time nothing is refused."""
  proc = run_cli(TINY, *f"--config.bench.{override}".split(" "), module="ilora_jax.bench")
  assert proc.returncode == 2
  assert_one_line_error(proc, fragment)


def test_a_flagfiles_override_that_eval_data_does_not_read_is_refused_too(tmp_path):
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text("--config.bench.eval_batch_size=2\n")
  proc = run_cli(TINY, "--config.bench.eval_data=True", f"--flagfile={flagfile}",
                 module="ilora_jax.bench")  # fmt: skip
  assert_one_line_error(
    proc, "config.bench.eval_batch_size is not read with config.bench.eval_data"
  )


def test_bench_check_config_accepts_the_defaults_and_names_the_field():
  from ilora_jax import bench, configuration

  overrides = [o.removeprefix("--config.") for o in SMALL]
  config = configuration.load(f"{ROOT}/configs/tiny.py", overrides)
  bench.check_config(config)
  config.bench.peak_flops = float("nan")
  with pytest.raises(bench.UserError, match="config.bench.peak_flops=nan"):
    bench.check_config(config)
  config.bench.peak_flops, config.bench.eval_split = 1e12, "x"
  with pytest.raises(bench.UserError, match="config.bench.eval_split='x' must be one of"):
    bench.check_config(config)


def test_loop_census_counts_a_scans_weight_slices_and_in_place_updates():
  """A scan over stacked [6, 256, 256] weights, compiled here: its body cuts one layer's
  weights out of the stack (256 * 256 float32 bytes, a copy) each of its 6 iterations and
  writes a [4, 256] row of a [6, 4, 256] carry in place."""
  import jax
  import jax.numpy as jnp

  from ilora_jax import bench

  layers, d, b = 6, 256, 4

  def f(w, x, cache):
    def body(carry, wl):
      h, cache, i = carry
      h = jnp.tanh(h @ wl)
      return (h, jax.lax.dynamic_update_index_in_dim(cache, h, i, 0), i + 1), None

    return jax.lax.scan(body, (x, cache, 0), w)[0]

  spec = jax.ShapeDtypeStruct
  args = (spec((layers, d, d), jnp.float32), spec((b, d), jnp.float32),
          spec((layers, b, d), jnp.float32))  # fmt: skip
  (loop,) = bench.loop_census(jax.jit(f).lower(*args).compile().as_text())
  assert loop["trip_count"] == layers
  assert loop["slice_copies_count"] == 1 and loop["slice_copies_bytes"] == d * d * 4
  assert loop["matmuls_count"] == 1 and loop["matmuls_bytes"] == b * d * 4
  assert loop["concat_copies_bytes"] == 0
  assert loop["in_place_count"] == 1 and loop["in_place_bytes"] == layers * b * d * 4


# Lines of an H100 compile of the 7B decode step's layer loop (bench/gpu_plan.py, XLA's dot
# merger on), shortened: the q/k/v weights joined with their adapters' A (one concatenation),
# the gate weights sliced out of the stack, a cuBLAS call, the key cache written in place.
_H100_DECODE_LOOP = """
%body.1 (arg: (s32[], bf16[16,1,4096])) -> (s32[], bf16[16,1,4096]) {
  %loop_concatenate_fusion = bf16[4096,12312]{1,0} fusion(%a, %b, %c), kind=kLoop, calls=%fc.3
  %loop_dynamic_slice_fusion.1 = bf16[1,4096,11008]{2,1,0} fusion(%w, %i), kind=kCustom, calls=%ds
  %custom-call.35 = (bf16[16,12312]{1,0}, s8[4194304]{0}) custom-call(%x, %loop_concatenate_fusion), custom_call_target="__cublas$lt$matmul"
  %loop_dynamic_update_slice_fusion = bf16[32,16,32,432,128]{4,3,2,1,0} fusion(%k, %n, %i), kind=kLoop, calls=%dus
  %loop_multiply_fusion.1 = bf16[16,8]{1,0} fusion(%y, %g), kind=kLoop, calls=%fm.1
  ROOT %tuple.52 = (s32[], bf16[16,1,4096]{2,1,0}) tuple(%i2, %h)
}

ENTRY %main.55 (p: bf16[16,1,4096]) -> bf16[16,1,4096] {
  %while.27 = (s32[], bf16[16,1,4096]{2,1,0}) while(%init), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"32"}}
  ROOT %gte = bf16[16,1,4096]{2,1,0} get-tuple-element(%while.27), index=1
}
"""  # noqa: E501


def test_loop_census_reads_a_gpu_compile():
  from ilora_jax import bench

  (loop,) = bench.loop_census(_H100_DECODE_LOOP)
  assert loop["body"] == "body.1" and loop["trip_count"] == 32
  assert loop["concat_copies_count"] == 1 and loop["concat_copies_bytes"] == 4096 * 12312 * 2
  assert loop["slice_copies_count"] == 1 and loop["slice_copies_bytes"] == 4096 * 11008 * 2
  # The cuBLAS call's output, without its workspace.
  assert loop["matmuls_count"] == 1 and loop["matmuls_bytes"] == 16 * 12312 * 2
  assert loop["in_place_count"] == 1 and loop["in_place_bytes"] == 32 * 16 * 32 * 432 * 128 * 2
  assert loop["other_count"] == 1 and loop["other_bytes"] == 16 * 8 * 2


def _has_cuda_plugin() -> bool:
  import importlib.util

  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # No jax_plugins package at all.
    return False


@pytest.mark.skipif(_has_cuda_plugin(), reason="JAX's CUDA plugin is installed here")
def test_gpu_plan_without_the_cuda_plugin_is_one_line_naming_it():
  proc = run_cli(TINY, "--programs=train", script="bench/gpu_plan.py")
  assert_one_line_error(proc, "no CUDA compiler", "jax[cuda12]")
  proc = run_cli(TINY, "--programs=train,decode", script="bench/gpu_plan.py")
  assert_one_line_error(proc, "--programs: unknown decode")


@pytest.mark.skipif(
  not _has_cuda_plugin(),
  reason="needs JAX's CUDA plugin (pip install jax[cuda12]) to compile for a GPU; no GPU needed",
)
def test_gpu_plan_compiles_for_an_h100_without_one():
  """The tiny config compiled for a compile-only H100: each memory plan adds up, the train
  step donates its state, and the unrolled decode steps copy no weights (the dot merger off:
  with it, each step joined every projection's weights with its adapter's A)."""
  proc = run_cli(TINY, *SMALL, "--programs=train,generate_unrolled", script="bench/gpu_plan.py")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["target"].startswith("H100")
  for name, p in result["programs"].items():
    total = p["argument_bytes"] + p["temp_bytes"] + p["output_bytes"] - p["alias_bytes"]
    assert p["peak_bytes"] == total, name
  assert result["programs"]["train"]["alias_bytes"] > 0
  # The roofline estimate of each program (ilora_jax.roofline): cuBLAS matmuls found, and the
  # decode loop of unknown length counted as eval_new_tokens - 1 steps.
  for name, p in result["programs"].items():
    assert p["roofline"]["seconds"] > 0 and p["roofline"]["matmul_flops"] > 0, name
  assert result["programs"]["generate_unrolled"]["roofline"]["unknown_trip_counts"] == 1
  decode = [x for x in result["programs"]["generate_unrolled"]["loops"] if x["trip_count"] is None]
  assert decode and decode[0]["matmuls_count"] > 0
  # Less than one of its weight matrices (q: 64 x 64 float32) per step; with the merger on,
  # 312,320 bytes of concatenations.
  assert decode[0]["slice_copies_bytes"] + decode[0]["concat_copies_bytes"] < 64 * 64 * 4


def test_compiling_for_a_gpu_takes_its_code_paths_inside_the_block_only():
  """`sharding.compiling_for` (bench/gpu_plan.py): cuDNN attention for `auto` in bf16 and the
  plain adapter matmul (no CPU custom VJP) while tracing for a GPU; the CPU's paths after."""
  import jax
  import jax.numpy as jnp

  from ilora_jax import lora, sharding, train_ilora
  from ilora_jax.errors import UserError

  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny

  config = tiny.get_config()
  config.llm.attention, config.llm.dtype = "auto", "bfloat16"
  x, w = jnp.ones((4, 8)), jnp.ones((8, 2))

  def grad_jaxpr() -> str:  # The CPU's custom gradient holds an optimization barrier.
    return str(jax.make_jaxpr(jax.grad(lambda w: lora.thin_matmul(x, w).sum()))(w))

  with sharding.compiling_for("gpu"):
    assert sharding.backend() == "gpu"
    assert train_ilora.attention_impl(config) == "cudnn"
    assert "optimization_barrier" not in grad_jaxpr()
  assert sharding.backend() == jax.default_backend() == "cpu"
  assert train_ilora.attention_impl(config) == "xla"
  assert "optimization_barrier" in grad_jaxpr()
  # Asked for by name, cuDNN attention is a GPU's only: on this CPU one line, not JAX's
  # "cuDNN is not detected" at the first step (exit 3); compiled for a GPU it stands.
  config.llm.attention = "cudnn"
  with pytest.raises(UserError, match="attention=cudnn is an NVIDIA GPU kernel and this run's "
                     "devices are CPUs: use auto"):  # fmt: skip
    train_ilora.attention_impl(config)
  with sharding.compiling_for("gpu"):
    assert train_ilora.attention_impl(config) == "cudnn"


def test_decode_step_is_null_where_the_generation_is_not_slower_than_its_prefill():
  """Two separately timed means can come out either way round: no negative (or clamped)
  figure, a null, which the table explains."""
  from ilora_jax import bench

  assert bench.decode_step_s(0.7, 0.1, 4) == pytest.approx(0.2)
  assert bench.decode_step_s(0.1, 0.2, 4) is None and bench.decode_step_s(0.2, 0.2, 4) is None
  assert bench.decode_step_s(0.3, 0.1, 1) is None  # One new token: no decode step.
  timed = {"step_s": 0.1, "eval_batch_size": 2, "eval_new_tokens": 4, "eval_candidates": 3}
  note = functools.partial(bench._null_note, result=timed)
  assert note("eval_gen_alt_decode_step_s").startswith("null: the generation was not slower")
  assert note("batch_size").startswith("null: no train step")
  assert note("peak_bytes").startswith("null: the backend reports no peak")
  assert note("eval_score_roofline_s").startswith("null: no roofline model")
  assert note("roofline_step_s").startswith("null: no roofline model")  # Was a bare "null".
  assert note("eval_data_score_compile_s").startswith("null: the compile pass was not slower")
  # Each null its own reason (the eval_* shape keys had none, one new token was "noise").
  one = {"step_s": 0.1, "eval_batch_size": 2, "eval_new_tokens": 1, "eval_candidates": 0}
  assert bench._null_note("eval_gen_decode_step_s", one).startswith("null: one new token")
  assert bench._null_note("eval_candidate_len", one).startswith("null: no candidates scored")
  off = dict.fromkeys(bench.EVAL_SHAPE_KEYS) | {"step_s": 0.1}
  for key in bench.EVAL_SHAPE_KEYS + bench.eval_keys(decode_both=True):
    assert bench._null_note(key, off) == "null: no evaluation ran (bench.eval=False)", key
  untrained = dict.fromkeys(bench.TRAIN_KEYS) | {"eval_batch_size": 2}
  for key in bench.TRAIN_KEYS:
    assert bench._null_note(key, untrained).startswith("null: no train step ran"), key


def test_ab_eval_variants_may_change_only_what_each_evaluator_reads():
  """The rows, the shared parts' settings and training's settings would make variants
  evaluate other rows, or be ignored (two identical variants compared): refused."""
  from ilora_jax import bench
  from ilora_jax.errors import UserError

  allowed = ("ilora.eval_batch_size=2 ilora.eval_generate=False ilora.eval_score=True "
             "ilora.eval_shared_prefill=False ilora.eval_sort=False ilora.score_packed=False "
             "ilora.score_chunk=2 ilora.max_new_tokens=3 llm.unroll_decode=True;")  # fmt: skip
  bench.check_eval_variants(bench.parse_variants(allowed))
  for item in ("ilora.eval_rows=4", "ilora.max_target_tokens=2", "ilora.train.steps=3",
               "ilora.bucket_window=1", "ilora.prefetch=0", "ilora.eval_base=False",
               "ilora.pad_multiple=8", "llm.remat=none", "data.num_candidates=5",
               # Refused here, as override would refuse it (was let through to be refused there).
               "config.ilora.eval_sort=True"):  # fmt: skip
    with pytest.raises(UserError, match=f"variant item '{item}': a variant may change only"):
      bench.check_eval_variants(bench.parse_variants(f"ilora.eval_sort=False;{item}"))


@pytest.mark.parametrize(
  "script, args, fragment",
  [
    ("ab_eval.py", ["--variants=ilora.eval_rows=4;"], "variant item 'ilora.eval_rows=4'"),
    ("ab_step.py", ["--rounds=0", "--variants=;"], "--rounds=0: must be >= 1"),
    ("ab_step.py", ["--variants=llm.remat=none", "--rounds=1"], "is one variant: give two"),
    ("ab_eval.py", ["--variants=ilora.eval_sort=False"], "is one variant: give two"),
    # Each script's own example (ab_eval's was ab_step's llm.remat, which ab_eval refuses).
    ("ab_eval.py", ["--variants="], "is required, e.g. --variants='ilora.eval_sort=False;'"),
    ("ab_step.py", ["--variants="], "--variants is required, e.g. --variants='llm.remat=none;'"),
    ("profile_step.py", ["--top=-1"], "--top=-1: must be >= 1"),
    # The config checked as ilora_jax.bench checks it (was an "unexpected KeyError", exit 3).
    ("profile_step.py", ["--config.llm.dtype=bogus"], "config.llm.dtype='bogus' is not one of"),
    ("padding.py", ["--config.llm.remat=bogus"], "config.llm.remat='bogus' is not one of"),
    ("padding.py", ["--step_s=256=nan,288=0"], "--step_s: 256=nan: a padded length"),
    ("padding.py", ["--eval_split=bogus"], "--eval_split='bogus' must be one of"),
    ("padding.py", ["--steps=-1"], "--steps=-1: 0 (the whole epoch) or a number of steps >= 1"),
    ("eval_memory.py", ["--model=tiny", "--batch=0"], "--batch=0: must be >= 1"),
    ("gpu_plan.py", ["--top=0"], "--top=0: must be >= 1"),
    ("gpu_plan.py", ["--programs="], "--programs is empty: name one or more of train"),
    # The HLO folder before the first program compiles (was made after it).
    ("gpu_plan.py", ["--hlo_dir=/proc/nope"], "--hlo_dir=/proc/nope: cannot write there"),
    ("eval_memory.py", ["--model=tiny", "--dtype=int32"], "--dtype=int32 is not one of"),
    # Packed slots fewer than the candidates fill (the longest's 4, one of each other), or
    # more than every slot full rounded up to 32: no evaluation has that shape.
    ("eval_memory.py", ["--model=tiny", "--candidates=3", "--candidate_len=4", "--packed_len=1"],
     "--packed_len=1: 3 candidates of up to 4 tokens pack into 6 to 32 slots"),
    ("eval_memory.py", ["--model=tiny", "--candidates=3", "--candidate_len=4", "--packed_len=5"],
     "--packed_len=5: 3 candidates"),
    ("eval_memory.py", ["--model=tiny", "--candidates=3", "--candidate_len=4", "--packed_len=33"],
     "--packed_len=33: 3 candidates"),
    # absl's own failures (a config file, a key, a flag value), as `ilora_jax.bench` words them
    ("ab_step.py", ["--config=configs/nonexist.py"],
     "cannot load config file configs/nonexist.py: not found or not a config file"),
    ("ab_eval.py", ["--config.nokey=1"], "unknown config key: 'nokey' (in --config.nokey)"),
    ("ab_step.py", ["--config.bench.batch_size=abc"], "--config.bench.batch_size=abc"),
    ("profile_step.py", ["--mode=bogus"], "--mode=bogus"),
  ],
)  # fmt: skip
def test_bench_scripts_refuse_bad_input_in_one_line_before_any_work(script, args, fragment):
  """Each refused before anything is built, compiled or printed (was a traceback, absl's
  two-line flag error with exit 1, or a failure after the work)."""
  given = script == "eval_memory.py" or any(a.startswith("--config=") for a in args)
  config = [] if given else [TINY]
  proc = run_cli(*config, *args, script=f"bench/{script}", timeout=120)
  assert_one_line_error(proc, fragment)
  assert not proc.stdout


def test_bench_scripts_help_exits_zero():
  proc = run_cli("--help", script="bench/eval_memory.py")
  assert proc.returncode == 0 and "XLA's scratch memory" in proc.stdout and "--batch" in proc.stdout


@pytest.mark.parametrize("script", ["ab_step.py", "profile_step.py"])
def test_train_step_scripts_check_the_batch_divides_over_the_devices(script, tmp_path):
  """Two CPU devices, batch 3: the benchmark's one line before the model is built (was
  JAX's IndivisibleError traceback)."""
  from conftest import xla_flags

  variants = ["--variants=;"] if script == "ab_step.py" else [f"--out={tmp_path}"]
  proc = run_cli(TINY, "--config.bench.batch_size=3", *variants, script=f"bench/{script}",
                 env={"XLA_FLAGS": xla_flags(2)})  # fmt: skip
  assert_one_line_error(proc, "bench.batch_size=3 is not divisible by the 2 data shards")


def test_profile_step_checks_its_output_folder_first(tmp_path):
  """--out is created, or refused, before anything is compiled or profiled."""
  taken = tmp_path / "afile"
  taken.write_text("")
  proc = run_cli(TINY, f"--out={taken}", script="bench/profile_step.py")
  assert_one_line_error(proc, f"--out={taken} is not a folder")
  profile_step = _profile_step()
  made = tmp_path / "new" / "trace"
  assert profile_step.output_folder(str(made)) == str(made) and made.is_dir()
  with pytest.raises(profile_step.UserError, match="cannot write there"):
    profile_step.output_folder(str(taken / "sub"))


def test_profile_step_calls_a_fusion_a_matmul_only_when_it_fuses_one():
  """A fusion without a dot whose instructions carry a dot's op_name (the bitcast of its
  output, say) is no matmul; a fusion holding a dot is, nested fusions and custom calls to a
  matmul library too."""
  hlo = """
%fused_bitcast (p: f32[256,8]) -> f32[8,256] {
  %bitcast.1 = f32[8,256]{1,0} bitcast(%p), metadata={op_name="jit(step)/v/dot_general"}
  ROOT %add.1 = f32[8,256]{1,0} add(%bitcast.1, %bitcast.1), metadata={op_name="jit(step)/v/add"}
}

%inner_dot (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  ROOT %dot.2 = f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  ROOT %fusion.9 = f32[4,4]{1,0} fusion(%a, %b), kind=kOutput, calls=%inner_dot
}

ENTRY %main (a: f32[256,8]) -> f32[8,256] {
  %loop_add_fusion = f32[8,256]{1,0} fusion(%a), kind=kLoop, calls=%fused_bitcast, metadata={op_name="jit(step)/v/dot_general"}
  %nested_fusion = f32[4,4]{1,0} fusion(%x, %y), kind=kCustom, calls=%outer
  %custom-call.3 = (f32[4,4]{1,0}, s8[64]{0}) custom-call(%x, %y), custom_call_target="__cublas$gemm"
  ROOT %copy.1 = f32[8,256]{1,0} copy(%loop_add_fusion)
}
"""  # noqa: E501
  profile_step = _profile_step()
  known = profile_step.instructions(hlo)
  assert "dot" not in known["loop_add_fusion"][2] and "dot" in known["nested_fusion"][2]
  kinds = {name: profile_step._kind(known, name) for name in known}
  assert kinds["loop_add_fusion"] == "other element-wise"
  assert kinds["nested_fusion"] == "matmul" and kinds["custom-call.3"] == "matmul"
  assert kinds["dot.2"] == "matmul" and kinds["bitcast.1"] == "other element-wise"


@pytest.mark.parametrize(
  "args, fragment",
  [
    (["--experts=3", "--variant=original"], "--rank=8 is not a multiple of --experts=3"),
    (["--peak_flops=1e-320"], "--peak_flops=1e-320: must be a number of FLOP/s, at least 1"),
    # argparse took an abbreviation for the flag it starts (absl's commands refuse it).
    (["--batch=2"], "unrecognized arguments: --batch=2"),
  ],
)
def test_torch_reference_refuses_bad_flags_in_one_line(args, fragment):
  pytest.importorskip("torch")
  proc = run_cli(*args, script="bench/torch_reference.py", timeout=120)
  assert_one_line_error(proc, fragment)
  assert not proc.stdout


def _compare(tmp_path, *args, fake: str | None = None, cwd=ROOT):
  """bash bench/compare.sh with $PYTHON a fake interpreter (`fake`: a bash body) when given,
  else this test's interpreter (not the checkout's .venv, which a clone run with another
  environment's Python lacks)."""
  env = {**os.environ, "PYTHON": sys.executable}
  if fake is not None:
    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\n" + fake)
    python.chmod(0o755)
    env["PYTHON"] = str(python)
  return subprocess.run(["bash", os.path.join(ROOT, "bench", "compare.sh"), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_compare_script_checks_its_arguments_and_ends_with_one_json_object(tmp_path):
  """Usage for --help; one line for a bad argument (ROUNDS=0 was an unbound variable) or a
  failed run (its own error line, which 2>/dev/null hid); the last line one JSON object of
  the ratios, here of canned runs: JAX 0.2 s and 0.3 s against fused 0.1 s, original 0.4 s."""
  proc = _compare(tmp_path, "--help")
  assert proc.returncode == 0 and "bash bench/compare.sh [MODEL]" in proc.stdout
  for args, fragment in ((["tiny", "2", "64", "1", "0"], "ROUNDS=0: must be a positive integer"),
                         (["tiny", "0"], "BATCH=0: must be a positive integer"),
                         (["tiny", "2", "x"], "SEQ=x: must be a positive integer"),
                         # A model torch_reference.py cannot build: refused before any run
                         # (the JAX run completed first).
                         (["smollm2-135m", "2", "64", "1", "1"],
                          "MODEL=smollm2-135m is not a preset")):  # fmt: skip
    assert_one_line_error(_compare(tmp_path, *args), fragment)
  real = sys.executable
  canned = f"""
case "$*" in
  *"import jax"*) exit 1 ;;
  *ilora_jax.bench*) [ -f {tmp_path}/2nd ] && echo '{{"step_s": 0.3}}' || echo '{{"step_s": 0.2}}'
                     touch {tmp_path}/2nd; pwd > {tmp_path}/cwd ;;
  *variant=fused*) echo table; echo '{{"step_s": 0.1}}' ;;
  *variant=original*) echo '{{"step_s": 0.4}}' ;;
  *) exec {real} "$@" ;;
esac
"""
  proc = _compare(tmp_path, "tiny", "2", "64", "1", "2", fake=canned, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  # Started from another folder, it runs in the checkout (its configs/ are found there).
  assert os.path.realpath((tmp_path / "cwd").read_text().strip()) == os.path.realpath(ROOT)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["ratios"] == pytest.approx([2.0, 3.0]) and result["median_ratio"] == 2.5
  assert result["jax_step_s"] == [0.2, 0.3] and result["torch_original_step_s"] == 0.4
  failing = 'case "$*" in *"import jax"*) exit 1 ;; *) echo "error: boom" >&2; exit 2 ;; esac\n'
  assert_one_line_error(_compare(tmp_path, "tiny", fake=failing), "error: boom")


def test_bench_warns_of_shapes_past_the_models_positions(capsys):
  """Rotary positions are computed for any position (no table to run past): a shape beyond
  `max_position_embeddings` is timed, with one warning line per shape."""
  from ilora_jax import bench, configuration

  config = configuration.load(f"{ROOT}/configs/tiny.py", ["bench.seq_len=2100"])
  bench.warn_positions(config, 2048)
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("warning: config.bench.seq_len=2100"), lines
  assert "max_position_embeddings=2048" in lines[0]
  config = configuration.load(f"{ROOT}/configs/tiny.py", ["bench.eval_prompt_len=2040"])
  bench.warn_positions(config, 2048)  # 2040 + 32 new tokens
  assert "eval_prompt_len=2040 reaches position 2072" in capsys.readouterr().err
  config = configuration.load(f"{ROOT}/configs/tiny.py", ["bench.seq_len=2048"])
  bench.warn_positions(config, 2048)
  assert not capsys.readouterr().err
  # Scored candidates reach past the prompt by their length where it exceeds the new tokens.
  shape = ["bench.eval_prompt_len=2030", "bench.eval_new_tokens=4", "bench.eval_candidate_len=30"]
  config = configuration.load(f"{ROOT}/configs/tiny.py", shape)
  bench.warn_positions(config, 2048)
  assert "eval_prompt_len=2030 reaches position 2060" in capsys.readouterr().err
  config.bench.eval_candidates = 0
  bench.warn_positions(config, 2048)
  assert not capsys.readouterr().err
  # Real prompts (eval_data) take no eval_prompt_len; the attention check runs a train-shaped
  # batch of seq_len.
  config = configuration.load(f"{ROOT}/configs/tiny.py", ["bench.eval_prompt_len=2040"])
  config.bench.eval_data = True
  bench.warn_positions(config, 2048)
  assert not capsys.readouterr().err
  config = configuration.load(f"{ROOT}/configs/tiny.py", ["bench.seq_len=2100"])
  config.bench.train, config.bench.check_attention = False, True
  bench.warn_positions(config, 2048)
  assert "warning: config.bench.seq_len=2100" in capsys.readouterr().err


def test_torch_reference_warns_of_a_sequence_past_the_models_positions(capsys):
  """Hugging Face's rotary positions are computed for any position: --seq_len past the
  preset's max_position_embeddings is timed, with one warning line (it ran in silence)."""
  import argparse
  import importlib.util

  pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location(
    "torch_reference", f"{ROOT}/bench/torch_reference.py"
  )
  torch_reference = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(torch_reference)
  args = dict(model="tiny", batch_size=1, steps=1, warmup=0, target_tokens=16, rank=8, experts=4,
              eval_batch_size=1, eval_new_tokens=32, eval_prompt_len=400, eval=False,
              peak_flops=1e12)  # fmt: skip
  torch_reference.check_args(argparse.Namespace(**args, seq_len=3000))
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("warning: --seq_len=3000 reaches position 3000")
  assert "max_position_embeddings=2048" in lines[0]
  torch_reference.check_args(argparse.Namespace(**args, seq_len=2048))
  assert not capsys.readouterr().err


def test_mfu_counts_4_n_flops_per_token_and_12_l_d_t_for_attention():
  """bench/README's formula: 4 N FLOPs per token for the N matmul weights of the layers, plus
  12 L d T for attention. N is checked against Llama-2-7B's published size (6,738,415,616
  parameters: N, the embedding and head rows, 2 x 32000 x 4096, and 65 norm scales of 4096)
  and against the kernels of each preset's own parameter tree; the PyTorch reference
  (bench/torch_reference.py) counts the same FLOPs from the Hugging Face config."""
  import importlib.util

  import jax

  from ilora_jax import bench, llama, llm

  seven = llm.PRESETS["llama2-7b"]
  n = bench.layer_matmul_params(seven)
  assert n + 2 * 32000 * 4096 + 65 * 4096 == 6_738_415_616
  assert bench.train_flops_per_token(seven, 512) == 4 * n + 12 * 32 * 4096 * 512
  for name, cfg in llm.PRESETS.items():
    leaves = jax.tree_util.tree_leaves_with_path(llama.abstract_params(cfg))
    kernels = sum(int(np.prod(x.shape)) for p, x in leaves if "kernel" in jax.tree_util.keystr(p))
    assert bench.layer_matmul_params(cfg) == kernels, name
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location("torch_ref", f"{ROOT}/bench/torch_reference.py")
  torch_reference = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(torch_reference)
  for cfg in (seven, llm.PRESETS["smollm2-135m-random"]):
    hf = transformers.LlamaConfig(
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
    )  # fmt: skip
    assert torch_reference.flops_per_token(hf, 300) == bench.train_flops_per_token(cfg, 300)


def test_random_batch_is_shaped_as_the_stages_batches():
  """The benchmark's batch: prompts of ordinary tokens (below the 128 rows past the base
  vocabulary), 30 distinct item placeholders inside the prompt (8 tokens clear of either
  end), the last `target_tokens` positions the loss's, 10-item histories; fixed by the seed."""
  import types

  from ilora_jax import bench
  from ilora_jax.errors import UserError

  parts = types.SimpleNamespace(model=types.SimpleNamespace(config=types.SimpleNamespace(
    vocab_size=300)), n_items=50)  # fmt: skip
  accum, rows, length, targets = 2, 3, 60, 5
  batch = bench.random_batch(parts, accum, rows, length, targets, seed=1)
  for key in ("input_ids", "attention", "loss_mask", "item_ids"):
    assert batch[key].shape == (accum, rows, length), key
  assert batch["seq"].shape == (accum, rows, 10) and (batch["len_seq"] == 10).all()
  assert batch["input_ids"].min() >= 0 and batch["input_ids"].max() < 300 - 128
  assert (batch["attention"] == 1).all()
  np.testing.assert_array_equal(batch["loss_mask"][..., : length - targets], 0)
  np.testing.assert_array_equal(batch["loss_mask"][..., length - targets :], 1)
  placed = batch["item_ids"] != 50  # 50 = n_items, the padding id: no item there.
  assert (placed.sum(-1) == 30).all()
  where = np.nonzero(placed[0, 0])[0]
  assert where.min() >= 8 and where.max() < length - targets - 8
  np.testing.assert_array_equal(
    np.nonzero(placed)[-1].reshape(accum, rows, 30), np.broadcast_to(where, (accum, rows, 30))
  )
  assert batch["item_ids"][placed].max() < 50 and batch["seq"].max() < 50
  again, other = (bench.random_batch(parts, accum, rows, length, targets, seed=s) for s in (1, 2))
  for key in batch:
    np.testing.assert_array_equal(again[key], batch[key])
  assert not np.array_equal(other["input_ids"], batch["input_ids"])
  with pytest.raises(UserError, match="a prompt of 45 tokens: it needs 46"):
    bench.random_batch(parts, 1, 1, 50, 5)
  shortest = bench.random_batch(parts, 1, 1, 51, 5)["item_ids"][0, 0]  # 8 + 30 + 8 tokens.
  np.testing.assert_array_equal(np.nonzero(shortest != 50)[0], np.arange(8, 38))


@pytest.mark.parametrize(
  "key, least",
  [("batch_size", 1), ("seq_len", 47), ("grad_accum", 1), ("steps", 1), ("warmup", 0),
   ("target_tokens", 1), ("eval_batch_size", 1), ("eval_prompt_len", 47),
   ("eval_new_tokens", 1), ("eval_candidates", 0), ("eval_candidate_len", 1),
   ("eval_rows", 0)],
)  # fmt: skip
def test_bench_check_config_takes_each_fields_least_value_and_refuses_below_it(key, least):
  """The least value of each count (a prompt is 46 tokens and one more, for a target or the
  prompt's last token; 0 warm-up steps, candidates or rows, which means every row) passes;
  one less, or a bool (a ConfigDict takes one for an int field), is refused naming the field."""
  from ilora_jax import bench, configuration

  config = configuration.load(f"{ROOT}/configs/tiny.py", [])
  if key == "seq_len":
    config.bench.target_tokens = 1
  config.bench[key] = least
  bench.check_config(config)
  for bad in (least - 1, True):
    config.bench[key] = bad
    with pytest.raises(
      bench.UserError,
      match=rf"config\.bench\.{key}={bad!r} must be an integer >= {least}( \(a prompt: .*\))?$",
    ):
      bench.check_config(config)


def test_bench_check_config_refuses_targets_that_leave_no_prompt():
  from ilora_jax import bench, configuration

  config = configuration.load(f"{ROOT}/configs/tiny.py", ["bench.seq_len=60"])
  config.bench.target_tokens = 60
  with pytest.raises(bench.UserError, match="target_tokens=60 must be smaller than .*seq_len=60"):
    bench.check_config(config)
  config.bench.target_tokens = 15  # A prompt of 45 tokens: one short of the layout's 46.
  with pytest.raises(bench.UserError, match="seq_len=60 leaves 45 prompt tokens before the "):
    bench.check_config(config)
  config.bench.target_tokens = 14
  bench.check_config(config)


def test_eval_data_seconds_and_compile_seconds_cover_the_same_parts(monkeypatch):
  """`compile_s` left out the prepare step's compile (gates, merge, projector) that `_s`
  counts: each is now the mode's passes plus the prepare step, by hand from scripted timings."""
  from ilora_jax import bench, configuration, train_ilora

  script = {  # Per mode: the compile pass's timings, then the timed pass's.
    "generate": [{"generate": 5.0, "prepare": 2.0, "loss": 1.5}, {"generate": 1.0, "prepare": 0.5}],
    "score": [{"score": 3.0, "prepare": 2.0}, {"score": 2.5, "prepare": 0.5}],
  }

  class Scripted:
    def __init__(self, parts, cfg, split, gate_kind, mesh):
      self.mode = "generate" if cfg.ilora.eval_generate else "score"
      self.idx, self.generated_tokens, self.calls = np.arange(4), 12, 0
      self.batch_size = 4  # ilora.eval_batch_size 8, cut to the 4 rows.

    def __call__(self, *args):
      self.timings = script[self.mode][self.calls]
      self.calls += 1
      return {"valid_ratio": 0.75, "hr@1": 0.25}

  split = types.SimpleNamespace(name="val")
  su = types.SimpleNamespace(
    dataset=types.SimpleNamespace(name="d", split=lambda name: split), parts=None,
    state={"trainable": None, "stats": None}, frozen=None, gate_kind="router", mesh=None,
  )  # fmt: skip
  setups = []
  monkeypatch.setattr(
    train_ilora, "setup", lambda cfg, workdir, trains: setups.append(trains) or su
  )
  monkeypatch.setattr(train_ilora, "Evaluator", Scripted)
  config = configuration.load(os.path.join(ROOT, "configs", "tiny.py"))
  result = bench.bench_eval_data(config, "unused")
  # Nothing trains: no training batch checks; the batch evaluated is the evaluator's.
  assert setups == [False] and result["eval_batch_size"] == 4
  assert result["eval_data_generate_s"] == 1.5 and result["eval_data_score_s"] == 3.0
  assert result["eval_data_generate_compile_s"] == 5.5  # 7.0 - 1.5: the loss pass in neither.
  assert result["eval_data_score_compile_s"] == 2.0  # 5.0 - 3.0.
  assert result["eval_data_generate_prompts_per_s"] == 4 / 1.5
  assert result["eval_data_generated_tokens_per_row"] == 3 and result["eval_data_hr@1"] == 0.25
