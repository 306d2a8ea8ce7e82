#!/usr/bin/env bash
# Several GPU nodes: one JAX process per node drives its local GPUs; the processes meet at a
# coordinator (node 0) through jax.distributed.initialize. Run it on every node, with the
# layout given in one of three ways:
#   1. arguments:    launch/gpu_multinode.sh HOST0:1234 NUM_NODES NODE_RANK --config=... --workdir=...
#   2. environment:  COORDINATOR_ADDRESS (or MASTER_ADDR + MASTER_PORT), NUM_PROCESSES (or
#                    WORLD_SIZE) and PROCESS_ID (or RANK), as torchrun-style launchers set them
#   3. Slurm:        srun --nodes=N --ntasks-per-node=1 launch/gpu_multinode.sh --config=...
#                    (SLURM_PROCID is set: JAX reads the layout itself, distributed.auto=True)
# --dry_run, anywhere among the arguments, prints the commands instead. The workdir must be on
# storage all nodes share (checkpoints are written collectively). Relative paths are the
# caller's (run_host.sh starts in the caller's folder, as this script does not move). A missing
# layout or job is one line on stderr and exit status 2.
set -euo pipefail
DRY=()
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry_run" ]]; then DRY=(--dry_run); else ARGS+=("$a"); fi
done
set -- ${ARGS[@]+"${ARGS[@]}"}  # (Bash before 4.4 calls an empty array unbound.)
usage="usage: launch/gpu_multinode.sh [--dry_run] [COORDINATOR:PORT NUM_NODES NODE_RANK] --config=... --workdir=..."
if [[ $# -ge 1 && "$1" != --* ]]; then
  if [[ $# -lt 3 || "$2" == --* || "$3" == --* ]]; then
    echo "error: COORDINATOR:PORT, NUM_NODES and NODE_RANK are given together, before the flags; $usage" >&2
    exit 2
  fi
  CLUSTER=(--config.distributed.coordinator="$1" --config.distributed.num_processes="$2"
           --config.distributed.process_id="$3")
  shift 3
elif [[ -n "${SLURM_PROCID:-}" ]]; then
  CLUSTER=(--config.distributed.auto=True)
else
  COORD="${COORDINATOR_ADDRESS:-}"
  if [[ -z "$COORD" && -n "${MASTER_ADDR:-}" ]]; then COORD="$MASTER_ADDR:${MASTER_PORT:-1234}"; fi
  NUM="${NUM_PROCESSES:-${WORLD_SIZE:-}}"
  ID="${PROCESS_ID:-${RANK:-}}"
  if [[ -z "$COORD" || -z "$NUM" || -z "$ID" ]]; then
    echo "error: no cluster layout: give COORDINATOR:PORT NUM_NODES NODE_RANK, set COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID (or MASTER_ADDR/WORLD_SIZE/RANK), or run under srun; $usage" >&2
    exit 2
  fi
  CLUSTER=(--config.distributed.coordinator="$COORD" --config.distributed.num_processes="$NUM"
           --config.distributed.process_id="$ID")
fi
if [[ $# -lt 1 ]]; then
  echo "error: no job arguments (--config=... --workdir=...) after the layout; $usage" >&2
  exit 2
fi
export ILORA_JAX_EXTRA=cuda
exec bash "$(dirname "$0")/run_host.sh" ${DRY[@]+"${DRY[@]}"} "$@" ${CLUSTER[@]+"${CLUSTER[@]}"}
