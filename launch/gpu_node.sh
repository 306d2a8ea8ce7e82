#!/usr/bin/env bash
# One node with several GPUs: one process drives all of them (the mesh spans every local GPU).
#
# Usage: launch/gpu_node.sh [--dry_run] --config=... --workdir=... [--config.x=y ...]
#   e.g. launch/gpu_node.sh --config=configs/movielens.py --workdir=runs/ml \
#          --config.llm.name=/models/Llama-2-7b-hf --config.mesh.data=1 --config.mesh.fsdp=-1
# --dry_run may come anywhere among the arguments: run_host.sh takes it out and prints the
# commands instead of running them. Relative paths are the caller's (run_host.sh starts in the
# caller's folder, as this script does not move). --help or -h prints this, before any set-up.
set -euo pipefail
source "$(dirname "$0")/dry_run.sh"
launcher_help "$0" "" "$@"
export ILORA_JAX_EXTRA=cuda
export ILORA_JAX_USAGE="launch/gpu_node.sh [--dry_run] --config=... --workdir=... [--config.x=y ...]"
exec bash "$(dirname "$0")/run_host.sh" "$@"
