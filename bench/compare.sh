#!/usr/bin/env bash
# JAX train step vs the PyTorch references, same shape, same machine, in alternation.
#
#   bash bench/compare.sh [MODEL] [BATCH] [SEQ] [STEPS] [ROUNDS]
#
# Defaults: the SmolLM2-135M shape (random weights), batch 4, seq 256, 5 timed steps, 3
# rounds; on a CPU both run in float32 (bf16 is emulated there), on a GPU in bf16. Each round
# runs the JAX step and the fused PyTorch step one after the other (separate processes), so a
# shared machine's drift hits both alike; the PyTorch step as the original writes it runs
# once, after the first round. Prints each JSON line, then every round's ratio and their
# median: JAX step time / fused PyTorch step time (the CPU target is <= 0.7). Uses $PYTHON,
# else ./.venv/bin/python when present, else python.
set -eu
MODEL=${1:-smollm2-135m-random}
B=${2:-4}
T=${3:-256}
N=${4:-5}
ROUNDS=${5:-3}
PY=${PYTHON:-python}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
DT=float32
if $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then DT=bfloat16; fi

one() {  # one() NAME COMMAND...: the command's last line, which must be a JSON object.
  local name=$1 line
  shift
  line=$("$@" 2>/dev/null | tail -n 1)
  case "$line" in
    "{"*) echo "$line" ;;
    *) echo "error: the $name run printed no result; run its command alone to see why" >&2
       exit 1 ;;
  esac
}
LINES=()
for ((r = 1; r <= ROUNDS; r++)); do
  jax_line=$(one JAX $PY -m ilora_jax.bench --config=configs/movielens.py \
    --config.llm.name="$MODEL" --config.llm.dtype=$DT --config.llm.param_dtype=$DT \
    --config.bench.batch_size="$B" --config.bench.seq_len="$T" --config.bench.steps="$N" \
    --config.bench.eval=False)
  fused=$(one "fused PyTorch" $PY bench/torch_reference.py --model="$MODEL" --variant=fused \
    --batch_size="$B" --seq_len="$T" --steps="$N")
  echo "$jax_line"
  echo "$fused"
  LINES+=("$jax_line" "$fused")
  if [ "$r" = 1 ]; then
    orig=$(one "original PyTorch" $PY bench/torch_reference.py --model="$MODEL" \
      --variant=original --batch_size="$B" --seq_len="$T" --steps="$N")
    echo "$orig"
  fi
done
$PY - "$orig" "${LINES[@]}" <<'PYEOF'
import json, statistics, sys
orig = json.loads(sys.argv[1])
runs = [json.loads(x) for x in sys.argv[2:]]
pairs = list(zip(runs[0::2], runs[1::2]))
for i, (j, f) in enumerate(pairs, 1):
  print(f"round {i}: step s jax {j['step_s']:.3f}  torch-fused {f['step_s']:.3f}  "
        f"ratio {j['step_s'] / f['step_s']:.3f}")
ratios = [j["step_s"] / f["step_s"] for j, f in pairs]
jax_s = statistics.median(j["step_s"] for j, _ in pairs)
print(f"torch-original step s {orig['step_s']:.3f}; jax (median) / torch-original: "
      f"{jax_s / orig['step_s']:.2f}")
print(f"jax / torch-fused step time, median of {len(ratios)} rounds: "
      f"{statistics.median(ratios):.2f}  (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
PYEOF
