#!/usr/bin/env bash
# JAX train step vs the PyTorch references, same shape, same machine, one after the other.
#
#   bash bench/compare.sh [MODEL] [BATCH] [SEQ] [STEPS]
#
# Defaults: the SmolLM2-135M shape (random weights), batch 4, seq 256, 5 timed steps; on a CPU
# both run in float32 (bf16 is emulated there), on a GPU in bf16. Prints each JSON line and
# the ratio JAX step time / fused PyTorch step time (the CPU target is <= 0.7). Uses $PYTHON,
# else ./.venv/bin/python when present, else python.
set -eu
MODEL=${1:-smollm2-135m-random}
B=${2:-4}
T=${3:-256}
N=${4:-5}
PY=${PYTHON:-python}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
DT=float32
if $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then DT=bfloat16; fi
jax_line=$($PY -m ilora_jax.bench --config=configs/movielens.py --config.llm.name="$MODEL" \
  --config.llm.dtype=$DT --config.llm.param_dtype=$DT --config.bench.batch_size="$B" \
  --config.bench.seq_len="$T" --config.bench.steps="$N" --config.bench.eval=False 2>/dev/null | tail -n 1)
fused=$($PY bench/torch_reference.py --model="$MODEL" --variant=fused --batch_size="$B" \
  --seq_len="$T" --steps="$N" 2>/dev/null | tail -n 1)
orig=$($PY bench/torch_reference.py --model="$MODEL" --variant=original --batch_size="$B" \
  --seq_len="$T" --steps="$N" 2>/dev/null | tail -n 1)
for pair in "JAX:$jax_line" "fused PyTorch:$fused" "original PyTorch:$orig"; do
  case "${pair#*:}" in
    "{"*) ;;
    *) echo "error: the ${pair%%:*} run printed no result; run its command alone to see why" >&2
       exit 1 ;;
  esac
done
echo "$jax_line"
echo "$fused"
echo "$orig"
$PY - "$jax_line" "$fused" "$orig" <<'PYEOF'
import json, sys
j, f, o = (json.loads(x) for x in sys.argv[1:])
print(f"step s: jax {j['step_s']:.3f}  torch-fused {f['step_s']:.3f}  torch-original {o['step_s']:.3f}")
print(f"jax / torch-fused step time: {j['step_s'] / f['step_s']:.2f}  "
      f"(jax / torch-original: {j['step_s'] / o['step_s']:.2f})")
PYEOF
