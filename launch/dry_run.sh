# Sourced by the launch scripts, not run: `take_dry_run SUFFIX ARG...` sets DRY_RUN (1 when
# --dry_run is among the arguments, anywhere, else 0) and ARGS (the others, in order). Another
# spelling of it (--dry_run=true, --dry-run, --nodry_run, -dry_run) would reach the job as one
# of its flags (after the set-up, or after a slice is created), so it is one line on stderr,
# "error: ...", with "; SUFFIX" after it when SUFFIX is not empty, and exit status 2.
take_dry_run() {
  local suffix=$1 a
  shift
  DRY_RUN=0
  ARGS=()
  for a in "$@"; do
    if [[ "$a" == "--dry_run" ]]; then
      DRY_RUN=1
    elif [[ "$a" =~ ^--?(no)?dry[-_]?run ]]; then
      echo "error: $(printf '%q' "$a") is no launcher flag: give --dry_run alone (no value), or leave it out${suffix:+; $suffix}" >&2
      exit 2
    else
      ARGS+=("$a")
    fi
  done
}

# `launcher_help SCRIPT USAGE ARG...`: with --help or -h among the arguments, prints SCRIPT's
# opening comment and USAGE (unless empty), and exits 0, before any check or step (where a
# layout's "error" would come).
launcher_help() {
  local script=$1 usage=$2 a
  shift 2
  for a in "$@"; do
    if [[ "$a" == "--help" || "$a" == "-h" ]]; then
      sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$script"
      [[ -z "$usage" ]] || printf '\n%s\n' "$usage"
      exit 0
    fi
  done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # Run, not sourced: it would do nothing.
  echo "error: launch/dry_run.sh is a helper the launch scripts source; run one of them (launch/run_host.sh, gpu_node.sh, gpu_multinode.sh, tpu_pod.sh) with --dry_run" >&2
  exit 2
fi
