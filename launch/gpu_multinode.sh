#!/usr/bin/env bash
# Several GPU nodes: run this on every node with the same coordinator (node 0's address), the
# number of nodes and this node's rank. Each node is one JAX process driving its local GPUs.
#
# Usage: launch/gpu_multinode.sh [--dry_run] COORDINATOR:PORT NUM_NODES NODE_RANK --config=... --workdir=...
#   e.g. on node 1 of 2: launch/gpu_multinode.sh 10.0.0.1:1234 2 1 --config=configs/steam.py --workdir=/shared/run
# Under Slurm (srun starts one task per node), JAX reads the layout from the environment:
#   srun --nodes=2 --ntasks-per-node=1 launch/run_host.sh --config=... --config.distributed.auto=True
# The workdir must be on storage all nodes share (checkpoints are written collectively).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=()
if [[ "${1:-}" == "--dry_run" ]]; then DRY=(--dry_run); shift; fi
if [[ $# -lt 4 ]]; then
  echo "usage: launch/gpu_multinode.sh [--dry_run] COORDINATOR:PORT NUM_NODES NODE_RANK --config=..." >&2
  exit 2
fi
COORD=$1 NUM=$2 RANK=$3
shift 3
export ILORA_JAX_EXTRA=cuda
exec bash launch/run_host.sh "${DRY[@]}" "$@" --config.distributed.coordinator="$COORD" \
  --config.distributed.num_processes="$NUM" --config.distributed.process_id="$RANK"
