#!/usr/bin/env bash
# N minicpm-jax processes on this machine, joined through jax.distributed on 127.0.0.1: the multi-host
# code path (one coordinator, per-process data shards, collective checkpoints) without a cluster.
# Each process sees K fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K).
#
#   launch/local_multiprocess.sh 2 -- --config configs/demo.py --workdir /tmp/run
#
# `local_multiprocess.sh --help` prints the usage.
set -euo pipefail

SCRIPT_NAME=local_multiprocess.sh
DRY_RUN=${DRY_RUN:-0}

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME N [options] [--] [TRAIN_ARGS...]

Starts N processes of 'minicpm-jax train TRAIN_ARGS' with --coordinator-address 127.0.0.1:PORT
--num-processes N --process-id I (and the same values in MINICPM_COORDINATOR_ADDRESS,
MINICPM_NUM_PROCESSES, MINICPM_PROCESS_ID). Waits for all; if one fails, the others are stopped
(SIGTERM, then SIGKILL after --grace seconds) and its exit status is returned.

Options:
  --devices-per-process K  fake CPU devices per process (default: 4)
  --port P                 coordinator port (default: a free port)
  --exe "CMD"              program and subcommand (default: "minicpm-jax train", or
                           "python3 -m minicpm_jax.cli train" when minicpm-jax is not on PATH)
  --log-dir DIR            write process I's output to DIR/process-I.log (default: the terminal,
                           each line prefixed with [pI])
  --grace S                seconds between SIGTERM and SIGKILL when stopping the others (default: 10)
  --dry-run                print the N commands instead of running them (or DRY_RUN=1)
EOF
}

HELP_HINT=--help
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"


free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

nprocs="" devices=4 port="" exe="" log_dir="" grace=10
train_args=()
while [[ $# -gt 0 ]]; do
  arg=$1
  if [[ $arg == --*=* ]]; then
    shift
    set -- "${arg%%=*}" "${arg#*=}" "$@"
    arg=$1
  fi
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --devices-per-process | --port | --exe | --log-dir | --grace)
      [[ $# -ge 2 && -n $2 ]] || die "$arg needs a value"
      case $arg in
        --devices-per-process) devices=$2 ;;
        --port) port=$2 ;;
        --exe) exe=$2 ;;
        --log-dir) log_dir=$2 ;;
        --grace) grace=$2 ;;
      esac
      shift 2
      ;;
    --) shift; train_args=("$@"); break ;;
    *)
      if [[ -z $nprocs ]]; then
        nprocs=$1
        shift
      else
        train_args=("$@")  # the first argument the launcher does not know starts TRAIN_ARGS
        break
      fi
      ;;
  esac
done

[[ -n $nprocs ]] || { usage >&2; die "give the number of processes N"; }
[[ $nprocs =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got $nprocs"
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got $devices"
[[ $grace =~ ^[0-9]+$ ]] || die "--grace must be a non-negative integer, got $grace"
[[ -z $port || $port =~ ^[0-9]+$ ]] || die "--port must be a number, got $port"
[[ -n $port ]] || port=$(free_port)
if [[ -z $exe ]]; then
  if command -v minicpm-jax >/dev/null; then exe="minicpm-jax train"; else exe="python3 -m minicpm_jax.cli train"; fi
fi
read -r -a exe_words <<<"$exe"
[[ ${#exe_words[@]} -gt 0 ]] || die "--exe is empty"

coordinator="127.0.0.1:$port"
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"

process_argv() {  # PROC_ARGV := the command of process $1
  PROC_ARGV=(env XLA_FLAGS="$xla_flags" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    MINICPM_COORDINATOR_ADDRESS="$coordinator" MINICPM_NUM_PROCESSES="$nprocs" MINICPM_PROCESS_ID="$1"
    "${exe_words[@]}" --coordinator-address "$coordinator" --num-processes "$nprocs" --process-id "$1"
    ${train_args[@]+"${train_args[@]}"})
}

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < nprocs; i++)); do
    process_argv "$i"
    printf '+ %s &\n' "$(quote_all "${PROC_ARGV[@]}")"
  done
  echo "# then: wait for all; if one fails, stop the others and exit with its status"
  exit 0
fi

[[ -z $log_dir ]] || mkdir -p "$log_dir"
for ((i = 0; i < nprocs; i++)); do
  process_argv "$i"
  if [[ -n $log_dir ]]; then
    "${PROC_ARGV[@]}" >"$log_dir/process-$i.log" 2>&1 &
  else
    "${PROC_ARGV[@]}" > >(awk -v p="[p$i] " '{ print p $0; fflush() }') 2>&1 &
  fi
  PIDS+=($!)
done

# shellcheck disable=SC2329  # run by the trap below and by stop_the_others
stop_all() {  # SIGTERM every live process, SIGKILL what is left after the grace period
  local pid waited=0
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  while ((waited < grace * 10)); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 1 ]] || return 0
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all' TERM INT

# shellcheck disable=SC2329  # wait_group calls it by name
stop_the_others() {  # process $1 exited $2
  echo "$SCRIPT_NAME: process $1 exited $2; stopping the others" >&2
  stop_all
}
status=0
wait_group stop_the_others 0.2 || status=$?
wait  # the output filters
exit "$status"
