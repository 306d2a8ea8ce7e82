#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, copies this checkout to every worker and runs the main job on
# all workers at once (JAX finds the other hosts itself: --config.distributed.auto=True).
#
# Usage: launch/tpu_pod.sh [--dry_run] NAME ZONE ACCELERATOR --config=... --workdir=... [--config.x=y ...]
#   e.g. launch/tpu_pod.sh ilora us-east5-a v5p-32 --config=configs/lastfm.py --workdir=/tmp/run
# --dry_run, anywhere among the arguments, prints the commands instead of running them.
# Steps: create (skipped when ILORA_JAX_TPU_EXISTS=1), copy, run. The workdir should be on
# storage every worker sees for checkpoints that survive the slice (e.g. a mounted bucket).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: launch/tpu_pod.sh [--dry_run] NAME ZONE ACCELERATOR --config=... --workdir=..."
DRY_RUN=0
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry_run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
done
set -- ${ARGS[@]+"${ARGS[@]}"}  # (Bash before 4.4 calls an empty array unbound.)
if [[ $# -lt 4 ]]; then
  echo "$usage" >&2
  exit 2
fi
NAME=$1 ZONE=$2 ACCEL=$3
shift 3

# The three names are checked before anything runs (a missing one would shift a flag into its
# place): one line on stderr and exit status 2 when one is not of its form.
refuse() {
  echo "error: $1 $(printf '%q' "$2") is not $3; $usage" >&2
  exit 2
}
[[ "$NAME" =~ ^[a-z][-a-z0-9]*$ ]] ||
  refuse NAME "$NAME" "a TPU name like ilora (a-z, 0-9 and -, first a letter)"
[[ "$ZONE" =~ ^[a-z][-a-z0-9]*$ ]] || refuse ZONE "$ZONE" "a zone like us-east5-a"
[[ "$ACCEL" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  refuse ACCELERATOR "$ACCEL" "a TPU type like v5p-32, v4-8, v5litepod-16 or v6e-8"

VERSION="${ILORA_JAX_TPU_VERSION:-v2-alpha-tpuv5}"
TGZ=/tmp/ilora_jax.tgz
# The workers' shell line; the job's arguments quoted for it (a value may hold spaces or quotes).
REMOTE="mkdir -p ~/ilora_jax && tar -xzf $TGZ -C ~/ilora_jax && cd ~/ilora_jax && ILORA_JAX_EXTRA=tpu bash launch/run_host.sh $(printf '%q ' "$@")--config.distributed.auto=True"
CREATE=(gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCEL"
        --version="$VERSION")
COPY=(gcloud compute tpus tpu-vm scp --zone="$ZONE" --worker=all "$TGZ" "$NAME:$TGZ")
START=(gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$REMOTE")

# Runs one command given as words, or in a dry run prints it quoted for a shell.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}
if [[ "${ILORA_JAX_TPU_EXISTS:-0}" != 1 ]]; then run "${CREATE[@]}"; fi
# The tracked files only.
if [[ "$DRY_RUN" == 1 ]]; then
  echo "git ls-files -z | tar --null -czf $TGZ -T -"
else
  git ls-files -z | tar --null -czf "$TGZ" -T -
fi
run "${COPY[@]}"
run "${START[@]}"
