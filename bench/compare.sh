#!/usr/bin/env bash
# JAX train step vs the PyTorch references, same shape, same machine, in alternation.
#
#   bash bench/compare.sh [MODEL] [BATCH] [SEQ] [STEPS] [ROUNDS]
#
# Defaults: the SmolLM2-135M shape (random weights), batch 4, seq 256, 5 timed steps, 3
# rounds; on a CPU both run in float32 (bf16 is emulated there), on a GPU in bf16. Each round
# runs the JAX step and the fused PyTorch step one after the other (separate processes), so a
# shared machine's drift hits both alike; the PyTorch step as the original writes it runs
# once, after the first round. Prints each run's JSON line, then every round's ratio and their
# median: JAX step time / fused PyTorch step time (the CPU target is <= 0.7); the last line
# is one JSON object with the step times, the ratios and their median. MODEL is a preset of
# ilora_jax.llm; BATCH, SEQ, STEPS and ROUNDS are positive integers. A run that fails stops
# the script with its own `error:` line (exit 2 for bad input). Runs in the checkout from any
# folder; uses $PYTHON, else the checkout's .venv/bin/python when present, else python.
set -eu
usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  -*) echo "error: unknown option $1 (usage: bash bench/compare.sh [MODEL] [BATCH] [SEQ] [STEPS] [ROUNDS])" >&2
      exit 2 ;;
esac
if [ $# -gt 5 ]; then
  echo "error: at most 5 arguments, got $# (usage: bash bench/compare.sh [MODEL] [BATCH] [SEQ] [STEPS] [ROUNDS])" >&2
  exit 2
fi
MODEL=${1:-smollm2-135m-random}
B=${2:-4}
T=${3:-256}
N=${4:-5}
ROUNDS=${5:-3}
for pair in "BATCH=$B" "SEQ=$T" "STEPS=$N" "ROUNDS=$ROUNDS"; do
  value=${pair#*=}
  case "$value" in
    ''|*[!0-9]*) bad=1 ;;
    *) bad=$(( ${#value} > 9 || 10#$value < 1 )) ;;
  esac
  if [ "$bad" = 1 ]; then
    echo "error: ${pair%%=*}=$value: must be a positive integer" >&2
    exit 2
  fi
done
B=$((10#$B)) T=$((10#$T)) N=$((10#$N)) ROUNDS=$((10#$ROUNDS))
PY=${PYTHON:-python}
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; esac  # A relative $PYTHON is the caller's.
cd "$(dirname "$0")/.."  # The checkout: its configs/ and package, from any folder.
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python; fi
# torch_reference.py builds a preset's shape only: checked before the first run.
if ! err=$("$PY" -c '
import sys
from ilora_jax.llm import PRESETS
if sys.argv[1] not in PRESETS:
  sys.exit(f"error: MODEL={sys.argv[1]} is not a preset, which bench/torch_reference.py needs: "
           f"one of {sorted(PRESETS)}")' "$MODEL" 2>&1); then
  line=$(printf '%s\n' "$err" | grep '^error: ' | tail -n 1 || true)
  echo "${line:-error: cannot check MODEL=$MODEL against the presets ($PY failed)}" >&2
  exit 2
fi
DT=float32
if "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then DT=bfloat16; fi
ERR=$(mktemp)
OUT=$(mktemp)
trap 'rm -f "$ERR" "$OUT"' EXIT

one() {  # one() NAME COMMAND...: the command's last line, which must be a JSON object.
  local name=$1 rc=0 line err
  shift
  "$@" >"$OUT" 2>"$ERR" || rc=$?
  line=$(tail -n 1 "$OUT")
  if [ "$rc" = 0 ]; then
    case "$line" in "{"*) echo "$line"; return 0 ;; esac
  fi
  err=$(grep '^error: ' "$ERR" | tail -n 1 || true)  # The run's own one-line error.
  if [ -n "$err" ]; then
    echo "$err" >&2
  else
    echo "error: the $name run printed no result (exit $rc); run its command alone to see why" >&2
  fi
  if [ "$rc" = 2 ]; then exit 2; fi
  exit 1
}
LINES=()
for ((r = 1; r <= ROUNDS; r++)); do
  jax_line=$(one JAX "$PY" -m ilora_jax.bench --config=configs/movielens.py \
    --config.llm.name="$MODEL" --config.llm.dtype=$DT --config.llm.param_dtype=$DT \
    --config.bench.batch_size="$B" --config.bench.seq_len="$T" --config.bench.steps="$N" \
    --config.bench.eval=False)
  fused=$(one "fused PyTorch" "$PY" bench/torch_reference.py --model="$MODEL" --variant=fused \
    --batch_size="$B" --seq_len="$T" --steps="$N")
  echo "$jax_line"
  echo "$fused"
  LINES+=("$jax_line" "$fused")
  if [ "$r" = 1 ]; then
    orig=$(one "original PyTorch" "$PY" bench/torch_reference.py --model="$MODEL" \
      --variant=original --batch_size="$B" --seq_len="$T" --steps="$N")
    echo "$orig"
  fi
done
"$PY" - "$MODEL" "$B" "$T" "$N" "$orig" "${LINES[@]}" <<'PYEOF'
import json, statistics, sys
model, batch, seq, steps = sys.argv[1], *map(int, sys.argv[2:5])
orig = json.loads(sys.argv[5])
runs = [json.loads(x) for x in sys.argv[6:]]
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
print(json.dumps({
  "model": model, "batch_size": batch, "seq_len": seq, "steps": steps, "rounds": len(pairs),
  "jax_step_s": [j["step_s"] for j, _ in pairs],
  "torch_fused_step_s": [f["step_s"] for _, f in pairs],
  "torch_original_step_s": orig["step_s"],
  "ratios": ratios,
  "median_ratio": statistics.median(ratios),
  "jax_over_original": jax_s / orig["step_s"],
}))
PYEOF
