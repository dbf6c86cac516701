#!/usr/bin/env bash
# Multi-node GPU training: one minicpm-jax process per node, through SLURM or over ssh to a host list.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_hosts.sh -- --config C --workdir RUN   (SLURM)
#   launch/gpu_hosts.sh --hosts h1,h2,h3,h4 --port 12355 -- --config C --workdir RUN    (host list)
#
# Both restart the whole group (all processes together) after a crash, up to --retries times; every
# restart resumes RUN from its latest checkpoint. `gpu_hosts.sh --help` prints the usage.
#
# Defaults when submitted with sbatch (command-line sbatch options override them):
#SBATCH --job-name=minicpm-jax
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@300
#
# Functions below run through traps and restart_loop, which shellcheck cannot follow:
# shellcheck disable=SC2317
# Some functions run only through `trap` or are passed by name to restart_loop (SC2329 cannot see that).
# shellcheck disable=SC2329
set -euo pipefail

SCRIPT_NAME=gpu_hosts.sh
DRY_RUN=${DRY_RUN:-0}

usage() {
  cat <<EOF
Usage:
  sbatch [sbatch options] launch/gpu_hosts.sh [options] -- TRAIN_ARGS     (SLURM, from the repo root)
  launch/gpu_hosts.sh --hosts h1,h2,... [--port P] [options] -- TRAIN_ARGS (ssh to each host)

TRAIN_ARGS are those of 'minicpm-jax train' (--config FILE --workdir RUN [--config.a.b=v ...]); the
launcher adds --coordinator-address, --num-processes and --process-id. RUN and the data folders must be
on storage every node reads (NFS, Lustre, ...), at the same path.

Options:
  --hosts h1,h2,...   host list: process i runs on host i over ssh; host 1 is the coordinator
  --port P            coordinator port (host list default: 12355; SLURM default: 20000 + job id % 20000);
                      restart k uses port P + k, so a port left in TIME_WAIT is never reused
  --repo-dir DIR      checkout on every node, same path everywhere (default: this repo; with
                      SLURM: \$SLURM_SUBMIT_DIR); DIR/.venv/bin goes first on PATH when present
  --exe "CMD"         program and subcommand to run (default: "minicpm-jax train")
  --retries N         group restarts after a failure before giving up (default: 3)
  --retry-delay S     seconds between attempts (default: 30)
  --log-dir DIR       host list: one log per process, DIR/process-I.log (default: logs)
  --ssh-opt OPT       extra ssh option, repeatable (e.g. --ssh-opt -p2222)
  --dry-run           print the commands instead of running them (or DRY_RUN=1)
  --slurm-task        (internal) one SLURM task: compute this process's flags and run it

Exit 0 from the processes ends the launcher (the run finished, or was stopped with SIGTERM and saved).
EOF
}

HELP_HINT=--help
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

log() { printf '[%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }


hosts_csv="" port="" repo_dir="" exe="minicpm-jax train" retries=3 retry_delay=30 log_dir="logs" slurm_task=0
ssh_opts=(-o BatchMode=yes)
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
    --slurm-task) slurm_task=1; shift ;;
    --hosts | --port | --repo-dir | --exe | --retries | --retry-delay | --log-dir | --ssh-opt)
      [[ $# -ge 2 && -n $2 ]] || die "$arg needs a value"
      case $arg in
        --hosts) hosts_csv=$2 ;;
        --port) port=$2 ;;
        --repo-dir) repo_dir=$2 ;;
        --exe) exe=$2 ;;
        --retries) retries=$2 ;;
        --retry-delay) retry_delay=$2 ;;
        --log-dir) log_dir=$2 ;;
        --ssh-opt) ssh_opts+=("$2") ;;
      esac
      shift 2
      ;;
    --) shift; train_args=("$@"); break ;;
    *) train_args=("$@"); break ;;  # the first argument the launcher does not know starts TRAIN_ARGS
  esac
done

[[ $retries =~ ^[0-9]+$ ]] || die "--retries must be a non-negative integer, got $retries"
[[ $retry_delay =~ ^[0-9]+$ ]] || die "--retry-delay must be a non-negative integer, got $retry_delay"
[[ -z $port || $port =~ ^[0-9]+$ ]] || die "--port must be a number, got $port"
read -r -a exe_words <<<"$exe"
[[ ${#exe_words[@]} -gt 0 ]] || die "--exe is empty"

has_workdir=0
for a in ${train_args[@]+"${train_args[@]}"}; do
  [[ $a == --workdir || $a == --workdir=* ]] && has_workdir=1
done

# PROC_ARGV := the command of process $1 of $2 with coordinator $3 (host:port); process_command prints it.
PROC_ARGV=()
process_argv() {
  PROC_ARGV=(env MINICPM_COORDINATOR_ADDRESS="$3" MINICPM_NUM_PROCESSES="$2" MINICPM_PROCESS_ID="$1"
    "${exe_words[@]}" --coordinator-address "$3" --num-processes "$2" --process-id "$1"
    ${train_args[@]+"${train_args[@]}"})
}
process_command() {
  process_argv "$@"
  quote_all "${PROC_ARGV[@]}"
}

slurm_hostnames() {
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_NODELIST is not set (not inside a SLURM job?)"
  command -v scontrol >/dev/null || die "scontrol not found on PATH"
  scontrol show hostnames "$SLURM_JOB_NODELIST"
}

slurm_default_port() { echo $((20000 + ${SLURM_JOB_ID:-0} % 20000)); }

# ---------------------------------------------------------------------------------------------------------
# SLURM task: runs on every node under srun; computes its own flags from the SLURM environment.
if [[ $slurm_task == 1 ]]; then
  [[ -n ${SLURM_PROCID:-} ]] || die "--slurm-task runs under srun (SLURM_PROCID is not set)"
  mapfile -t nodes < <(slurm_hostnames)
  [[ ${#nodes[@]} -gt 0 ]] || die "scontrol returned no hosts for $SLURM_JOB_NODELIST"
  nprocs=${SLURM_NTASKS:-${SLURM_NPROCS:-${#nodes[@]}}}
  [[ -n $port ]] || port=$(slurm_default_port)
  [[ -n $repo_dir ]] || repo_dir=$(cd "$(dirname "$0")/.." && pwd)
  process_argv "$SLURM_PROCID" "$nprocs" "${nodes[0]}:$port"
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ cd %s && %s\n' "$(quote "$repo_dir")" "$(quote_all "${PROC_ARGV[@]}")"
    exit 0
  fi
  cd "$repo_dir"
  export PATH="$repo_dir/.venv/bin:$PATH"
  exec "${PROC_ARGV[@]}"
fi

[[ ${#train_args[@]} -gt 0 ]] || die "no train arguments: give them after --, e.g. -- --config FILE --workdir RUN"
[[ $has_workdir == 1 ]] || die "the train arguments need --workdir RUN (on storage every node reads)"

# ---------------------------------------------------------------------------------------------------------
# Host list: one ssh per host; a failure kills the rest of the group, then the whole group restarts.
if [[ -n $hosts_csv ]]; then
  IFS=, read -r -a hosts <<<"$hosts_csv"
  [[ ${#hosts[@]} -gt 0 ]] || die "--hosts is empty"
  for h in "${hosts[@]}"; do [[ -n $h ]] || die "--hosts has an empty entry: $hosts_csv"; done
  [[ -n $port ]] || port=12355
  [[ -n $repo_dir ]] || repo_dir=$(cd "$(dirname "$0")/.." && pwd)
  nprocs=${#hosts[@]}

  # pid file of process $1 in attempt $2 on its host; named after this launcher, so it is never a stale one
  pidfile() { echo "/tmp/minicpm-jax-$port-$$-$2-$1.pid"; }
  remote_command() {  # process $1 in attempt $2
    local pidfile
    pidfile=$(pidfile "$1" "$2")
    # shellcheck disable=SC2016  # $PWD, $PATH and $$ expand on the remote host
    printf 'cd %s && export PATH="$PWD/.venv/bin:$PATH" && echo $$ > %s && exec %s' \
      "$(quote "$repo_dir")" "$pidfile" "$(process_command "$1" "$nprocs" "${hosts[0]}:$((port + $2))")"
  }
  signal_remote() {  # signal $1 to process $2 of attempt $3
    # shellcheck disable=SC2029  # the pid file name is built here on purpose
    ssh "${ssh_opts[@]}" "${hosts[$2]}" \
      "f=$(pidfile "$2" "$3"); for _ in \$(seq 50); do [ -f \$f ] && break; sleep 0.1; done; [ -f \$f ] && kill -$1 \"\$(cat \$f)\" 2>/dev/null; rm -f \$f" \
      </dev/null >/dev/null 2>&1 || true
  }

  if [[ $DRY_RUN == 1 ]]; then
    for i in "${!hosts[@]}"; do
      printf '+ %s >>%s 2>&1 &\n' "$(quote_all ssh "${ssh_opts[@]}" "${hosts[$i]}" "$(remote_command "$i" 0)")" \
        "$(quote "$log_dir/process-$i.log")"
    done
    echo "# then: wait for all; if one fails, kill the others and restart all (up to $retries times, port + attempt)"
    exit 0
  fi

  mkdir -p "$log_dir"
  ATTEMPT=0
  on_signal() {  # user stop: SIGTERM every process (each saves, then exits 0)
    STOPPING=1
    local i
    for i in "${!hosts[@]}"; do signal_remote TERM "$i" "$ATTEMPT"; done
  }
  trap on_signal TERM INT

  kill_the_others() {  # process $1 exited $2
    [[ $STOPPING == 1 ]] && return 0  # stopping on purpose: the others are saving, let them finish
    log "process $1 on ${hosts[$1]} exited $2; killing the others"
    local j
    for j in "${!hosts[@]}"; do [[ $j == "$1" ]] || signal_remote KILL "$j" "$ATTEMPT"; done
  }
  host_attempt() {
    local i
    ATTEMPT=$1
    PIDS=()
    for i in "${!hosts[@]}"; do
      log "process $i on ${hosts[$i]} (log $log_dir/process-$i.log)"
      # shellcheck disable=SC2029  # the command is quoted for the remote shell
      ssh "${ssh_opts[@]}" "${hosts[$i]}" "$(remote_command "$i" "$1")" </dev/null >>"$log_dir/process-$i.log" 2>&1 &
      PIDS+=($!)
    done
    wait_group kill_the_others 1
  }
  restart_loop "the group" "$retries" "$retry_delay" host_attempt
  exit $?
fi

# ---------------------------------------------------------------------------------------------------------
# SLURM batch script (sbatch): srun one task per node, restart the whole step after a failure.
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  [[ -n $repo_dir ]] || repo_dir=${SLURM_SUBMIT_DIR:-$PWD}
  [[ -f $repo_dir/launch/gpu_hosts.sh ]] || die "$repo_dir/launch/gpu_hosts.sh not found: submit from the repo root or give --repo-dir"
  [[ -n $port ]] || port=$(slurm_default_port)
  nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

  SRUN_ARGV=()
  srun_argv() {  # attempt $1
    SRUN_ARGV=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1
      bash "$repo_dir/launch/gpu_hosts.sh" --slurm-task --repo-dir "$repo_dir" --port "$((port + $1))"
      --exe "$exe" -- "${train_args[@]}")
  }

  if [[ $DRY_RUN == 1 ]]; then
    srun_argv 0
    printf '+ %s\n' "$(quote_all "${SRUN_ARGV[@]}")"
    mapfile -t nodes < <(slurm_hostnames)
    for i in "${!nodes[@]}"; do
      printf '#   process %s on %s: %s\n' "$i" "${nodes[$i]}" "$(process_command "$i" "$nnodes" "${nodes[0]}:$port")"
    done
    echo "# then: if the step fails, run it again (up to $retries times, port + attempt)"
    exit 0
  fi

  trap stop_child TERM INT
  slurm_attempt() {
    srun_argv "$1"
    run_child "${SRUN_ARGV[@]}"
  }
  restart_loop "the group" "$retries" "$retry_delay" slurm_attempt
  exit $?
fi

die "give --hosts h1,h2,... or submit with sbatch (no SLURM_JOB_ID in the environment)"
