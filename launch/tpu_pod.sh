#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, copies this checkout to every worker and runs the main job on
# all workers at once (JAX finds the other hosts itself: --config.distributed.auto=True).
#
# Usage: launch/tpu_pod.sh [--dry_run] NAME ZONE ACCELERATOR --config=... --workdir=... [--config.x=y ...]
#   e.g. launch/tpu_pod.sh ilora us-east5-a v5p-32 --config=configs/lastfm.py --workdir=/tmp/run
# Steps: create (skipped when ILORA_JAX_TPU_EXISTS=1), copy, run. The workdir should be on
# storage every worker sees for checkpoints that survive the slice (e.g. a mounted bucket).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 4 ]]; then
  echo "usage: launch/tpu_pod.sh [--dry_run] NAME ZONE ACCELERATOR --config=... --workdir=..." >&2
  exit 2
fi
NAME=$1 ZONE=$2 ACCEL=$3
shift 3
VERSION="${ILORA_JAX_TPU_VERSION:-v2-alpha-tpuv5}"
# The job's arguments quoted for the workers' shell (a value may hold spaces or quotes).
ARGS="$(printf '%q ' "$@")--config.distributed.auto=True"
REMOTE="mkdir -p ~/ilora_jax && tar -xzf /tmp/ilora_jax.tgz -C ~/ilora_jax && cd ~/ilora_jax && ILORA_JAX_EXTRA=tpu bash launch/run_host.sh $ARGS"
CMDS=()
[[ "${ILORA_JAX_TPU_EXISTS:-0}" == 1 ]] || CMDS+=("gcloud compute tpus tpu-vm create $NAME --zone=$ZONE --accelerator-type=$ACCEL --version=$VERSION")
CMDS+=("git ls-files -z | tar --null -czf /tmp/ilora_jax.tgz -T -")  # Tracked files only.
CMDS+=("gcloud compute tpus tpu-vm scp --zone=$ZONE --worker=all /tmp/ilora_jax.tgz $NAME:/tmp/ilora_jax.tgz")
CMDS+=("gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=all --command=$(printf '%q' "$REMOTE")")
for c in "${CMDS[@]}"; do
  if [[ "$DRY_RUN" == 1 ]]; then echo "$c"; else eval "$c"; fi
done
