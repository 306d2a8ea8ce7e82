#!/usr/bin/env bash
# Every benchmark on one GPU, in one go (aimed at under 8 minutes on an H100: the last three
# runs, Triton GEMMs off, dynamic-slice fusion on and remat 'none', are skipped when the
# others took more than 5.8, 6.3 and 6.7 minutes), JSON results in $RESULTS.
#
#   bash bench/gpu.sh [RESULTS_DIR]
#
# 1. smoke: SmolLM2-135M shape, loss with einsum vs cuDNN attention (must agree), one short
#    timed step; the same step with the linear router instead of the original's ResNet (the
#    ResNet's share of the compile time: compile_s, compile_trace_s, compile_xla_s);
# 2. the 7B shape (random bf16 weights), batch 8, seq 512, r = 8, 4 experts, all seven
#    projections: the JAX train step (cuDNN attention, the default remat 'projections'), then
#    with Triton GEMMs off (XLA autotunes cuBLAS algorithms only: the compile time's share of
#    autotuning), with XLA's dynamic-slice fusion on (matmuls reading each layer's weights in
#    place in the stack), then without remat ('none'; remat 'dots' measured 2026-11-27: same
#    speed as 'none', 34.1 GiB), each only when the runs before left the time;
# 3. the PyTorch references on the same card: fused adapters at batch 8, the original's
#    per-expert adapters at batch 4 (batch 8 ran out of memory for the original);
# 4. greedy generation, batch 16, 400-token prompts, 32 new tokens, JAX and PyTorch; JAX at
#    batch 160 too, with the scanned decode loop and the unrolled one (`llm.unroll_decode`;
#    eval_gen_* and eval_gen_alt_*). The generation target needs the large batch: a
#    400-token prompt's prefill alone is 5.2 TFLOP, and each decode step reads the 13.5 GB
#    of weights, so the roofline of the compiled programs (bench/gpu_plan.py, bench/README.md)
#    gives at batch 16 / 64 / 128 / 160 about 20 / 46 / 59 / 62 prompts/s scanned and
#    35 / 61 / 69.6 / 71.6 unrolled (peak 54 GiB at 128, 64 GiB at 160; 192 gains little more,
#    71.9, in 74 GiB, too close to an 80 GB card's limit).
# Each command has its own time limit, so one failure still leaves the other results.
set -u
RESULTS=${1:-${OUT:-bench_results}}
# A results folder that cannot be made or written would keep nothing of ~8 GPU minutes.
if ! mkdir -p "$RESULTS" 2>/dev/null || ! [ -d "$RESULTS" ] || ! [ -w "$RESULTS" ]; then
  echo "error: gpu.sh: cannot create or write the results folder $RESULTS" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
PY=${PYTHON:-python3}
CFG=--config=configs/movielens.py
SEVEN=(--config.llm.name=llama2-7b --config.bench.batch_size=8 --config.bench.seq_len=512
       --config.bench.steps=10 --config.bench.eval_batch_size=16
       --config.bench.eval_prompt_len=400 --config.bench.eval_new_tokens=32)

run() {  # run NAME LIMIT_S CMD...: keeps the last JSON line of CMD's output as NAME.json
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log" | grep -v '^{' | tail -n 30
  grep '^{' "$RESULTS/$name.log" | tail -n 1 > "$RESULTS/$name.json"
  echo "=== $name: $((SECONDS - start)) s; $(cat "$RESULTS/$name.json")"
}

# The package's imports besides jax, flax, optax, orbax and chex (a GPU image often lacks
# ml_collections: install it, or its wheel, first).
if ! $PY -c "import ml_collections, absl, tqdm" 2>/dev/null; then
  echo "error: gpu.sh: $PY cannot import ml_collections, absl and tqdm; install them first" >&2
  exit 2
fi
# A jax without its GPU backend would run every 7B benchmark on the CPU until its time limit.
backend=$($PY -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$backend" != gpu ]; then
  echo "error: gpu.sh: jax's backend is '${backend:-none}', not gpu (a CPU-only jax?)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run jax_7b 270 $PY -m ilora_jax.bench $CFG "${SEVEN[@]}"  # Train, generate, score, both.
if [ ! -s "$RESULTS/jax_7b.json" ]; then  # cuDNN attention failed: measure the einsum path.
  run jax_7b 150 $PY -m ilora_jax.bench $CFG "${SEVEN[@]}" --config.llm.attention=xla
fi
run smoke 150 $PY -m ilora_jax.bench $CFG --config.llm.name=smollm2-135m-random \
  --config.bench.check_attention=True --config.bench.steps=5 --config.bench.eval=False
run smoke_linear_router 90 $PY -m ilora_jax.bench $CFG --config.llm.name=smollm2-135m-random \
  --config.router.kind=linear --config.bench.steps=5 --config.bench.eval=False
run torch_fused_7b 120 $PY bench/torch_reference.py --model=llama2-7b --variant=fused \
  --batch_size=8 --seq_len=512 --steps=5 --eval
run torch_original_7b 90 $PY bench/torch_reference.py --model=llama2-7b --variant=original \
  --batch_size=4 --seq_len=512 --steps=5
# Scanned against unrolled decode (decode_both): compiled for an H100 without one, a scanned
# step copies each layer's weights out of the stack, an unrolled one nothing (bench/README.md,
# 2026-12-02 fourth session); these two figures decide `llm.default_unroll` on GPUs.
run jax_7b_gen160 220 $PY -m ilora_jax.bench $CFG "${SEVEN[@]}" --config.bench.train=False \
  --config.bench.eval_batch_size=160 --config.bench.eval_candidates=0 \
  --config.bench.decode_both=True
# XLA's GPU compile of the 7B step (31.7 s on 2026-11-27, target < 20 s) includes autotuning
# every matmul over Triton kernels it compiles for the purpose; with Triton GEMMs off it only
# picks among cuBLAS's algorithms. Same step: compile_s and step_s say what that trade gives.
if [ "$SECONDS" -lt 350 ]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
    run jax_7b_cublas 110 $PY -m ilora_jax.bench $CFG "${SEVEN[@]}" --config.bench.eval=False
else
  echo "=== jax_7b_cublas: skipped, $SECONDS s spent (the 8-minute budget)"
fi
# The layer scans copy each layer's weights out of the stack before its matmuls (386 MiB a
# forward layer; 21 ms of the step and most of a scanned decode step's time by the roofline,
# bench/README.md). XLA's dynamic-slice fusion lets cuBLAS read the slice in place; with
# jax 0.10.2 it failed to compile ("BufferAllocation::Slice not assigned"). Does it on this
# jax, and what does it give?
if [ "$SECONDS" -lt 380 ]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_dynamic_slice_fusion=true" \
    run jax_7b_dsf 90 $PY -m ilora_jax.bench $CFG "${SEVEN[@]}" --config.bench.eval=False
else
  echo "=== jax_7b_dsf: skipped, $SECONDS s spent (the 8-minute budget)"
fi
if [ "$SECONDS" -lt 400 ]; then
  run jax_7b_none 80 $PY -m ilora_jax.bench $CFG "${SEVEN[@]}" --config.llm.remat=none \
    --config.bench.eval=False
else
  echo "=== jax_7b_none: skipped, $SECONDS s spent (the 8-minute budget)"
fi
$PY - "$RESULTS" <<'EOF'
import json, os, sys
d = sys.argv[1]
rows = {}
for name in ("smoke", "smoke_linear_router", "jax_7b", "jax_7b_gen160", "jax_7b_cublas",
             "jax_7b_dsf", "jax_7b_none", "torch_fused_7b", "torch_original_7b"):
  try:
    rows[name] = json.load(open(os.path.join(d, name + ".json")))
  except Exception:
    rows[name] = {}
print(f"{'run':<20}{'tokens/s':>10}{'step s':>9}{'GiB':>7}{'MFU':>7}{'compile s':>10}"
      f"{'of it XLA':>10}{'gen p/s':>9}{'unrolled':>9}{'both p/s':>9}")
for name, r in rows.items():
  r0 = lambda key: r.get(key) or 0  # Absent, or null (no train step in a generation run).
  gib = r0("peak_bytes") / 2**30
  print(f"{name:<20}{r0('tokens_per_s'):>10.0f}{r0('step_s'):>9.3f}{gib:>7.1f}"
        f"{r0('mfu'):>7.3f}{r0('compile_s'):>10.1f}{r0('compile_xla_s'):>10.1f}"
        f"{r0('eval_gen_prompts_per_s'):>9.1f}{r0('eval_gen_alt_prompts_per_s'):>9.1f}"
        f"{r0('eval_both_prompts_per_s'):>9.1f}")
# The card against the roofline model of the same compiled programs (ilora_jax.roofline).
for name, r in rows.items():
  for measured, model in [("step_s", "roofline_step_s")] + [
      (k[: -len("roofline_s")] + "batch_s", k) for k in r if k.endswith("_roofline_s")
      and k.startswith("eval_")]:
    if r.get(measured) and r.get(model):
      print(f"{name}: {measured} {r[measured]:.4f} s, roofline {r[model]:.4f} s, "
            f"measured / model {r[measured] / r[model]:.2f}")
jax7, fused = rows["jax_7b"], rows["torch_fused_7b"]
if jax7.get("tokens_per_s") and fused.get("tokens_per_s"):
  print(f"jax / torch-fused tokens/s: {jax7['tokens_per_s'] / fused['tokens_per_s']:.2f}")
json.dump(rows, open(os.path.join(d, "summary.json"), "w"), indent=1)
EOF
