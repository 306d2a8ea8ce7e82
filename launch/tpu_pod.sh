#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, copies this checkout to every worker and runs the main job on
# all workers at once (JAX finds the other hosts itself: --config.distributed.auto=True).
#
# Usage: launch/tpu_pod.sh [--dry_run] NAME ZONE ACCELERATOR --config=... --workdir=... [--config.x=y ...]
#   e.g. launch/tpu_pod.sh ilora us-east5-a v5p-32 --config=configs/lastfm.py --workdir=/mnt/bucket/run
# --dry_run, anywhere among the arguments, prints the commands instead of running them (the copy
# after a "cd CHECKOUT &&" when the caller is in another folder; another spelling of it,
# --dry_run=true or --dry-run, is an error). Steps: create (skipped when
# ILORA_JAX_TPU_EXISTS=1; 0 or unset creates, any other value is an error), copy, run. The
# workdir should be on storage every worker sees for checkpoints that survive the slice (e.g. a
# mounted bucket).
#
# The slice gets the TPU software version Google names for the ACCELERATOR's generation
# (tpu-ubuntu2204-base for v4 and older, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for
# v5litepod, v2-alpha-tpuv6e for v6e), or the one ILORA_JAX_TPU_VERSION names.
#
# Everything is checked before the slice is created, each a one-line error with exit status 2:
# NAME, ZONE and ACCELERATOR (and a software version for it); the job's arguments (every one a
# --flag=value, with --config= and --workdir= among them, and no --flagfile=); and the config
# file, which the workers read from their copy of the tracked files: it must be a file git
# tracks in this checkout (a relative path is the caller's when it is there, else the
# checkout's), and the workers are given its path in the checkout.
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
usage="usage: launch/tpu_pod.sh [--dry_run] NAME ZONE ACCELERATOR --config=... --workdir=..."
# One line on stderr and exit status 2.
fail() {
  echo "error: $1; $usage" >&2
  exit 2
}
source launch/dry_run.sh
launcher_help launch/tpu_pod.sh "" "$@"  # Its opening comment holds the usage.
take_dry_run "$usage" "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}  # (Bash before 4.4 calls an empty array unbound.)
case "${ILORA_JAX_TPU_EXISTS:-0}" in
  0 | 1) ;;
  *) fail "ILORA_JAX_TPU_EXISTS=$(printf '%q' "$ILORA_JAX_TPU_EXISTS") is not 1 (the slice exists: no create) or 0" ;;
esac
[[ $# -ge 3 ]] || fail "NAME, ZONE and ACCELERATOR come first, then the job's flags"
NAME=$1 ZONE=$2 ACCEL=$3
shift 3

# The three names are checked before anything runs (a missing one would shift a flag into its
# place).
refuse() {
  fail "$1 $(printf '%q' "$2") is not $3"
}
# GCP's rule for resource names: at most 63 characters, [a-z]([-a-z0-9]*[a-z0-9])?
[[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  refuse NAME "$NAME" "a TPU name like ilora (a-z, 0-9 and -, first a letter, last no -, at most 63)"
[[ "$ZONE" =~ ^[a-z][-a-z0-9]*$ ]] || refuse ZONE "$ZONE" "a zone like us-east5-a"
[[ "$ACCEL" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  refuse ACCELERATOR "$ACCEL" "a TPU type like v5p-32, v4-8, v5litepod-16 or v6e-8"

# The job's arguments: flags only (a word that is none would reach every worker's command line),
# with --config= and --workdir=; the config file given to the workers as its path in the checkout.
JOB=()
CONFIG="" WORKDIR=""
for a in "$@"; do
  case "$a" in
    --config=*) CONFIG=${a#--config=} ;;
    --workdir=*) WORKDIR=${a#--workdir=} ;;
    --config | --workdir | --flagfile | --config.*dir | --config.data.raw_ratings | --config.llm.name | --config.sasrec.init_from)
      fail "the job's argument $a has no value: write $a=VALUE (the job would take the argument after it for its value)" ;;
    --config.distributed.coordinator* | --config.distributed.num_processes* | \
      --config.distributed.process_id* | --config.distributed.auto* | --noconfig.distributed.auto)
      fail "the job's argument $(printf '%q' "$a") is the launcher's to set: the workers find each other (--config.distributed.auto=True, added here)" ;;
    --flagfile=*)
      fail "the job's argument $(printf '%q' "$a") names a file the workers would not have (they get this checkout's tracked files, and --config only is mapped to its path there): give its flags on the command line" ;;
    --?*) ;;
    *) fail "the job's argument $(printf '%q' "$a") is no --flag=value (quote a value that holds spaces)" ;;
  esac
done
[[ -n "$CONFIG" ]] || fail "no --config=FILE for the job (e.g. --config=configs/lastfm.py)"
[[ -n "$WORKDIR" ]] || fail "no --workdir=DIR for the job"
if [[ "$WORKDIR" != /* ]]; then  # run_host.sh makes it absolute on each worker, on its own disk.
  where="under ~/ilora_jax (its copy of this checkout)"
  [[ "$WORKDIR" != "~/"* ]] || where="in its own home folder"
  echo "warning: --workdir=$WORKDIR is not an absolute path: each worker writes it $where on its own disk: on a slice of several hosts the job refuses it at start-up, since all workers write each checkpoint into one folder they share (give a mounted bucket or NFS path such as /mnt/bucket/run)" >&2
fi
GIVEN=${CONFIG%%:*}  # ml_collections reads FILE:ARGS as the file and its argument.
SUFFIX=${CONFIG:${#GIVEN}}
FILE=$GIVEN
if [[ "$FILE" != /* && -f "$CALLER/$FILE" ]]; then FILE="$CALLER/$FILE"; fi
ROOT=$(pwd -P)
if [[ ! -f "$FILE" ]]; then
  where="neither in $(printf '%q' "$CALLER") nor in this checkout"
  [[ "$(cd "$CALLER" && pwd -P)" != "$ROOT" ]] || where="not in this checkout"
  [[ "$FILE" != /* ]] || where="not there"  # An absolute path is looked for nowhere else.
  fail "--config names no file: $(printf '%q' "$GIVEN") is $where"
fi
FULL="$(cd "$(dirname "$FILE")" && pwd -P)/$(basename "$FILE")"
IN_REPO=${FULL#"$ROOT"/}
if [[ "$IN_REPO" == "$FULL" ]]; then
  fail "--config=$(printf '%q' "$CONFIG") is outside this checkout $(printf '%q' "$ROOT"): the workers get only its tracked files"
fi
if ! git ls-files --error-unmatch -- "$IN_REPO" >/dev/null 2>&1; then
  fail "--config=$(printf '%q' "$CONFIG") is not tracked by git, and the workers get only the tracked files (git add $(printf '%q' "$IN_REPO"))"
fi
for a in "$@"; do
  if [[ "$a" == --config=* ]]; then a="--config=$IN_REPO$SUFFIX"; fi
  JOB+=("$a")
done

# The TPU software version Google names for JAX on each TPU generation (v2-alpha-tpuv5 is v5p's
# only), unless ILORA_JAX_TPU_VERSION names one.
case "$ACCEL" in
  v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
  v5p-*) VERSION=v2-alpha-tpuv5 ;;
  v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
  v6e-*) VERSION=v2-alpha-tpuv6e ;;
  *) VERSION="" ;;
esac
VERSION="${ILORA_JAX_TPU_VERSION:-$VERSION}"
[[ -n "$VERSION" ]] || fail "no TPU software version known for $ACCEL: set ILORA_JAX_TPU_VERSION"
TGZ=/tmp/ilora_jax.tgz
# The workers' shell line; the job's arguments quoted for it (a value may hold spaces or quotes).
REMOTE="mkdir -p ~/ilora_jax && tar -xzf $TGZ -C ~/ilora_jax && cd ~/ilora_jax && ILORA_JAX_EXTRA=tpu bash launch/run_host.sh $(printf '%q ' "${JOB[@]}")--config.distributed.auto=True"
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
if [[ "$DRY_RUN" == 1 ]]; then  # In the checkout: from another folder, it goes there first.
  CD=""
  [[ "$(cd "$CALLER" && pwd -P)" == "$ROOT" ]] || CD="cd $(printf '%q' "$PWD") && "
  echo "${CD}git ls-files -z | tar --null -czf $TGZ -T -"
else
  git ls-files -z | tar --null -czf "$TGZ" -T -
fi
run "${COPY[@]}"
run "${START[@]}"
