#!/usr/bin/env bash
# Several GPU nodes: one JAX process per node drives its local GPUs; the processes meet at a
# coordinator (node 0) through jax.distributed.initialize. Run it on every node, with the
# layout given in one of three ways:
#   1. arguments:    launch/gpu_multinode.sh HOST0:1234 NUM_NODES NODE_RANK --config=... --workdir=...
#   2. environment:  COORDINATOR_ADDRESS (or MASTER_ADDR + MASTER_PORT), NUM_PROCESSES (or
#                    WORLD_SIZE) and PROCESS_ID (or RANK), as torchrun-style launchers set them
#   3. Slurm:        srun --nodes=N --ntasks-per-node=G --gpus-per-node=G
#                      launch/gpu_multinode.sh --config=...   with G the GPUs of a node
#                    (SLURM_PROCID is set: JAX reads the layout itself, distributed.auto=True,
#                    and gives each process the one GPU numbered SLURM_LOCALID, so under Slurm
#                    it is one process per GPU, not per node)
# --dry_run, anywhere among the arguments, prints the commands instead. The workdir must be on
# storage all nodes share (checkpoints are written collectively). Relative paths are the
# caller's (run_host.sh starts in the caller's folder, as this script does not move). A missing,
# partial or inconsistent layout (a process id not below the count, a count that is no number,
# a coordinator without its port, MASTER_ADDR without MASTER_PORT, a torchrun-style variable
# that disagrees with ours, e.g. WORLD_SIZE beside NUM_PROCESSES, or a layout variable with the
# arguments, LOCAL_WORLD_SIZE above 1, a
# layout variable under Slurm), a --config.distributed.* flag among the job's (the layout's to
# set), or no job, is one line on stderr and exit status 2 before run_host.sh's set-up. One
# node (NUM_NODES 1) runs as a single process, without a coordinator.
set -euo pipefail
usage="usage: launch/gpu_multinode.sh [--dry_run] [COORDINATOR:PORT NUM_NODES NODE_RANK] --config=... --workdir=..."
# One line on stderr and exit status 2.
fail() {
  echo "error: $1; $usage" >&2
  exit 2
}
source "$(dirname "$0")/dry_run.sh"
launcher_help "$0" "$usage" "$@"
take_dry_run "$usage" "$@"
DRY=()
[[ "$DRY_RUN" == 0 ]] || DRY=(--dry_run)
set -- ${ARGS[@]+"${ARGS[@]}"}  # (Bash before 4.4 calls an empty array unbound.)
# The layout is checked here, before run_host.sh's set-up (the job would refuse it only after).
check_layout() {  # COORD NUM ID, each given as NAME=VALUE
  local coord=${1#*=} num=${2#*=} id=${3#*=}
  [[ "$coord" == ?*:* && "${coord##*:}" =~ ^[1-9][0-9]{0,4}$ ]] && ((${coord##*:} <= 65535)) ||
    fail "${1%%=*}=$(printf '%q' "$coord") is not HOST:PORT (a port 1 to 65535)"
  [[ "$num" =~ ^[1-9][0-9]{0,5}$ ]] ||
    fail "${2%%=*}=$(printf '%q' "$num") is not a number of processes (1 or more)"
  [[ "$id" =~ ^(0|[1-9][0-9]{0,5})$ ]] && ((id < num)) ||
    fail "${3%%=*}=$(printf '%q' "$id") is not a process id from 0 to ${2%%=*} - 1 = $((num - 1))"
}
if [[ $# -ge 1 && "$1" != --* ]]; then
  if [[ $# -lt 3 || "$2" == --* || "$3" == --* ]]; then
    fail "COORDINATOR:PORT, NUM_NODES and NODE_RANK are given together, before the flags"
  fi
  check_layout "COORDINATOR:PORT=$1" "NUM_NODES=$2" "NODE_RANK=$3"
  # A layout in the environment too (a torchrun-style launcher's) must say the same: the
  # arguments won in silence.
  agree() {  # VARIABLE VALUE ARGUMENT
    [[ -z "${!1:-}" || "${!1}" == "$2" ]] ||
      fail "$1=$(printf '%q' "${!1}") disagrees with the argument $3=$(printf '%q' "$2"): unset it, or give the layout one way"
  }
  agree COORDINATOR_ADDRESS "$1" COORDINATOR:PORT
  [[ -z "${MASTER_ADDR:-}${MASTER_PORT:-}" || "${MASTER_ADDR:-}:${MASTER_PORT:-}" == "$1" ]] ||
    fail "MASTER_ADDR:MASTER_PORT=$(printf '%q' "${MASTER_ADDR:-}:${MASTER_PORT:-}") disagrees with the argument COORDINATOR:PORT=$(printf '%q' "$1"): unset them, or give the layout one way"
  agree NUM_PROCESSES "$2" NUM_NODES
  agree WORLD_SIZE "$2" NUM_NODES
  agree PROCESS_ID "$3" NODE_RANK
  agree RANK "$3" NODE_RANK
  NODES=$2
  CLUSTER=(--config.distributed.coordinator="$1" --config.distributed.num_processes="$2"
           --config.distributed.process_id="$3")
  shift 3
elif [[ -n "${SLURM_PROCID:-}" ]]; then
  # JAX reads Slurm's layout itself: a layout of ours beside it would be ignored in silence.
  for v in COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID MASTER_ADDR MASTER_PORT WORLD_SIZE RANK; do
    [[ -z "${!v:-}" ]] ||
      fail "$v=$(printf '%q' "${!v}") is set under Slurm (SLURM_PROCID=$SLURM_PROCID), where JAX reads the layout from Slurm and would ignore it: unset it, or start outside srun"
  done
  CLUSTER=(--config.distributed.auto=True)
else
  # torchrun's default layout starts a process per GPU; here one process drives a node's GPUs.
  [[ -z "${LOCAL_WORLD_SIZE:-}" || "$LOCAL_WORLD_SIZE" == 1 ]] ||
    fail "LOCAL_WORLD_SIZE=$(printf '%q' "$LOCAL_WORLD_SIZE"): this launcher runs one process per node, which drives all of the node's GPUs; start one per node (torchrun --nproc_per_node=1)"
  # A torchrun-style variable beside ours must agree with it (one of them would be ignored).
  same() {  # OURS THEIRS: the names of two variables that say the same thing.
    [[ -z "${!1:-}" || -z "${!2:-}" || "${!1}" == "${!2}" ]] ||
      fail "$1=$(printf '%q' "${!1}") and $2=$(printf '%q' "${!2}") disagree: set one of them"
  }
  if [[ -n "${MASTER_ADDR:-}" || -n "${MASTER_PORT:-}" ]]; then
    [[ -n "${MASTER_ADDR:-}" && -n "${MASTER_PORT:-}" ]] ||
      fail "MASTER_ADDR and MASTER_PORT are set together (one of them is missing)"
    MASTER="$MASTER_ADDR:$MASTER_PORT"
    [[ -z "${COORDINATOR_ADDRESS:-}" || "$COORDINATOR_ADDRESS" == "$MASTER" ]] ||
      fail "COORDINATOR_ADDRESS=$(printf '%q' "$COORDINATOR_ADDRESS") and MASTER_ADDR:MASTER_PORT=$(printf '%q' "$MASTER") disagree: set one of them"
  fi
  same NUM_PROCESSES WORLD_SIZE
  same PROCESS_ID RANK
  COORD="${COORDINATOR_ADDRESS:-${MASTER:-}}" CN=COORDINATOR_ADDRESS
  [[ -n "${COORDINATOR_ADDRESS:-}" || -z "$COORD" ]] || CN=MASTER_ADDR:MASTER_PORT
  NUM="${NUM_PROCESSES:-${WORLD_SIZE:-}}" NN=NUM_PROCESSES
  [[ -n "${NUM_PROCESSES:-}" || -z "$NUM" ]] || NN=WORLD_SIZE
  ID="${PROCESS_ID:-${RANK:-}}" IN=PROCESS_ID
  [[ -n "${PROCESS_ID:-}" || -z "$ID" ]] || IN=RANK
  if [[ -z "$COORD" && -z "$NUM" && -z "$ID" ]]; then
    fail "no cluster layout: give COORDINATOR:PORT NUM_NODES NODE_RANK, set COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID (or MASTER_ADDR/WORLD_SIZE/RANK), or run under srun"
  fi
  missing=""
  [[ -n "$COORD" ]] || missing+=", COORDINATOR_ADDRESS (or MASTER_ADDR)"
  [[ -n "$NUM" ]] || missing+=", NUM_PROCESSES (or WORLD_SIZE)"
  [[ -n "$ID" ]] || missing+=", PROCESS_ID (or RANK)"
  [[ -z "$missing" ]] || fail "a partial cluster layout in the environment: no ${missing#, }"
  check_layout "$CN=$COORD" "$NN=$NUM" "$IN=$ID"
  NODES=$NUM
  CLUSTER=(--config.distributed.coordinator="$COORD" --config.distributed.num_processes="$NUM"
           --config.distributed.process_id="$ID")
fi
[[ $# -ge 1 ]] || fail "no job arguments (--config=... --workdir=...) after the layout"
for a in "$@"; do  # The job would take the later value: the layout's, without a word.
  case "$a" in
    --config.distributed.coordinator | --config.distributed.coordinator=* | \
      --config.distributed.num_processes | --config.distributed.num_processes=* | \
      --config.distributed.process_id | --config.distributed.process_id=* | \
      --config.distributed.auto | --config.distributed.auto=* | --noconfig.distributed.auto)
      fail "the job's argument $(printf '%q' "$a") is the launcher's to set: give the layout as above, not as --config.distributed.*" ;;
  esac
done
if [[ "${NODES:-}" == 1 ]]; then
  CLUSTER=()  # One node: a process of its own, no coordinator to meet.
fi
export ILORA_JAX_EXTRA=cuda
export ILORA_JAX_USAGE="${usage#usage: }"
exec bash "$(dirname "$0")/run_host.sh" ${DRY[@]+"${DRY[@]}"} "$@" ${CLUSTER[@]+"${CLUSTER[@]}"}
