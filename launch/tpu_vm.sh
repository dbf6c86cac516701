#!/usr/bin/env bash
# Cloud TPU VMs (single slice, or several slices through a queued resource) for minicpm-jax training.
#
# Run from a machine with gcloud (a laptop or a small VM); `train` starts a detached restart loop on every
# worker, so the launching machine can go away. `tpu_vm.sh help` prints the usage.
set -euo pipefail

SCRIPT_NAME=$(basename "$0")
DRY_RUN=${DRY_RUN:-0}

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [--dry-run] COMMAND [options] [-- train args]

Commands:
  create   create the TPU VM (or, with --queued, a queued resource)
  delete   delete it (a queued resource is deleted with its nodes)
  setup    copy this repository to every worker and install it ('.[tpu,gcs]': gs:// run directories) in REMOTE_DIR/.venv
  train    start 'minicpm-jax train ARGS' on every worker inside a restart loop (detached; logs per worker)
  stop     send SIGTERM to the loop on every worker: the run saves a checkpoint and exits
  logs     follow one worker's log
  status   describe the TPU and show each worker's loop and last log lines
  run-loop (runs on a worker; used by 'train') the restart loop itself

Options (every command):
  --name NAME            TPU VM / queued-resource name (or \$TPU_NAME)             [required]
  --zone ZONE            e.g. us-east5-a for v5p, us-west4-a for v5e (or \$TPU_ZONE) [required]
  --project PROJECT      GCP project (default: gcloud's configured project; or \$TPU_PROJECT)
  --queued               NAME is a queued resource (needed for --num-slices; use it consistently)
  --dry-run              print every gcloud/ssh command instead of running it (or DRY_RUN=1)

create:
  --accelerator-type T   e.g. v5p-128, v5litepod-64                                  [required]
  --runtime-version V    TPU software version (default from T: v5p -> v2-alpha-tpuv5,
                         v5litepod -> v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e, v4 -> tpu-ubuntu2204-base)
  --spot                 Spot capacity (preemptible at any time, no 24 h limit)
  --preemptible          legacy preemptible TPU (tpu-vm create only; 24 h limit)
  --num-slices N         multi-slice: N slices named NAME-0 .. NAME-(N-1) (needs --queued)
setup:
  --git URL [--ref REF]  clone URL on the workers instead of copying this working tree
  --remote-dir DIR       checkout on each worker, relative to its home (default: minicpm-jax)
  --python PY            interpreter for the venv (default: python3.11; jax needs >= 3.11)
train:
  --retries N            restarts after a crash before giving up (default: 20)
  --retry-delay S        seconds between attempts (default: 60)
  --log-dir DIR          per-worker log folder, relative to home (default: minicpm-jax-logs)
  -- ARGS                the train arguments: --config FILE --workdir RUN [--config.a.b=v ...];
                         RUN and the data must be on storage every worker reads (gcsfuse mount, NFS)
logs:
  --worker W             worker index (default: 0)   --slice S  slice of a multi-slice run (default: 0)
  --lines N              lines of history before following (default: 100)

Example (MiniCPM-2.4B on a v5p-128):
  $SCRIPT_NAME create --name minicpm --zone us-east5-a --accelerator-type v5p-128 --queued --spot
  $SCRIPT_NAME setup  --name minicpm --zone us-east5-a --queued
  $SCRIPT_NAME train  --name minicpm --zone us-east5-a --queued -- \\
      --config configs/minicpm_2b_v5p128.py --workdir /mnt/gcs/runs/minicpm-2b \\
      --config.data.mixtures.stable=/mnt/gcs/data/web:0.7,/mnt/gcs/data/code:0.3
  $SCRIPT_NAME logs   --name minicpm --zone us-east5-a --worker 0
EOF
}

HELP_HINT=help
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

log() { printf '[%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }


# Runs a command, or with --dry-run prints it (one line, shell-quoted, prefixed with '+ ').
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

default_runtime() {
  case $1 in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "" ;;
  esac
}

# ---------------------------------------------------------------------------------------------------------
# The restart loop, run on each worker: re-runs the command after a crash (non-zero exit) up to --retries
# times. Exit 0 ends it: the run finished, or it got SIGTERM, saved and stopped. SIGTERM/SIGINT to the loop
# is passed to the command and ends the loop once the command exits.
run_loop() {
  local retries=20 delay=60 log_dir="$HOME/minicpm-jax-logs" detach=0
  while [[ $# -gt 0 ]]; do
    case $1 in
      --retries) retries=${2:?--retries needs a value}; shift 2 ;;
      --retry-delay) delay=${2:?--retry-delay needs a value}; shift 2 ;;
      --log-dir) log_dir=${2:?--log-dir needs a value}; shift 2 ;;
      --detach) detach=1; shift ;;
      --) shift; break ;;
      *) die "run-loop: unknown option $1 (the command goes after --)" ;;
    esac
  done
  [[ $# -gt 0 ]] || die "run-loop: no command given after --"
  [[ $retries =~ ^[0-9]+$ ]] || die "--retries must be a non-negative integer, got $retries"
  [[ $delay =~ ^[0-9]+$ ]] || die "--retry-delay must be a non-negative integer, got $delay"
  mkdir -p "$log_dir"
  local host logfile pidfile
  host=$(hostname)
  logfile="$log_dir/train-$host.log"
  pidfile="$log_dir/train-$host.pid"
  if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "$host: a training loop is already running (pid $(cat "$pidfile")); '$SCRIPT_NAME stop' it first" >&2
    exit 1
  fi
  if [[ $detach == 1 ]]; then
    setsid nohup bash "$0" run-loop --retries "$retries" --retry-delay "$delay" --log-dir "$log_dir" -- "$@" \
      >>"$logfile" 2>&1 </dev/null &
    echo "$host: started training loop (pid $!), log $logfile"
    return 0
  fi

  echo $$ >"$pidfile"
  trap 'rm -f "$pidfile"' EXIT
  trap stop_child TERM INT
  local rc=0
  restart_loop "the command on $host" "$retries" "$delay" run_attempt "$@" || rc=$?
  exit "$rc"  # here, while the EXIT trap can still see the local pidfile
}

run_attempt() {  # attempt $1 of the command $2...
  shift
  run_child "$@"
}

# ---------------------------------------------------------------------------------------------------------
main() {
  local cmd=""
  local name=${TPU_NAME:-} zone=${TPU_ZONE:-} project=${TPU_PROJECT:-} queued=0
  local accelerator="" runtime="" spot=0 preemptible=0 num_slices=1
  local git_url="" git_ref="" remote_dir="minicpm-jax" python="python3.11"
  local retries=20 retry_delay=60 log_dir="minicpm-jax-logs"
  local worker=0 slice=0 lines=100
  local -a train_args=()

  while [[ $# -gt 0 ]]; do
    local arg=$1 value=""
    if [[ $arg == --*=* ]]; then
      value=${arg#*=}
      arg=${arg%%=*}
      shift
      set -- "$arg" "$value" "$@"
    fi
    case $arg in
      -h | --help | help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --queued) queued=1; shift ;;
      --spot) spot=1; shift ;;
      --preemptible) preemptible=1; shift ;;
      --name | --zone | --project | --accelerator-type | --runtime-version | --num-slices | --git | --ref | \
        --remote-dir | --python | --retries | --retry-delay | --log-dir | --worker | --slice | --lines)
        [[ $# -ge 2 && -n $2 ]] || die "$arg needs a value"
        case $arg in
          --name) name=$2 ;;
          --zone) zone=$2 ;;
          --project) project=$2 ;;
          --accelerator-type) accelerator=$2 ;;
          --runtime-version) runtime=$2 ;;
          --num-slices) num_slices=$2 ;;
          --git) git_url=$2 ;;
          --ref) git_ref=$2 ;;
          --remote-dir) remote_dir=$2 ;;
          --python) python=$2 ;;
          --retries) retries=$2 ;;
          --retry-delay) retry_delay=$2 ;;
          --log-dir) log_dir=$2 ;;
          --worker) worker=$2 ;;
          --slice) slice=$2 ;;
          --lines) lines=$2 ;;
        esac
        shift 2
        ;;
      --) shift; train_args=("$@"); break ;;
      run-loop)
        [[ -z $cmd ]] || die "run-loop must be the first argument"
        shift
        run_loop "$@"
        exit $?
        ;;
      create | delete | setup | train | stop | logs | status)
        [[ -z $cmd ]] || die "two commands given: $cmd and $arg"
        cmd=$arg
        shift
        ;;
      -*) die "unknown option $arg (train arguments go after --)" ;;
      *) die "unknown command $arg" ;;
    esac
  done

  [[ -n $cmd ]] || { usage >&2; die "no command given"; }
  [[ -n $name ]] || die "$cmd needs --name NAME (or \$TPU_NAME)"
  [[ -n $zone ]] || die "$cmd needs --zone ZONE (or \$TPU_ZONE)"
  [[ $num_slices =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got $num_slices"
  if ((num_slices > 1)) && [[ $queued != 1 ]]; then
    die "--num-slices needs --queued (multi-slice TPUs come only through queued resources)"
  fi
  if [[ $cmd != train && ${#train_args[@]} -gt 0 ]]; then
    die "arguments after -- are train arguments; '$cmd' takes none"
  fi

  local -a where=(--zone="$zone")
  [[ -n $project ]] && where+=(--project="$project")

  # ssh/scp to every worker of every slice
  local -a ssh_all scp_all
  if [[ $queued == 1 ]]; then
    ssh_all=(gcloud compute tpus queued-resources ssh "$name" "${where[@]}" --node=all --worker=all)
    scp_all=(gcloud compute tpus queued-resources scp "${where[@]}" --node=all --worker=all)
  else
    ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all)
    scp_all=(gcloud compute tpus tpu-vm scp "${where[@]}" --worker=all)
  fi

  case $cmd in
    create)
      [[ -n $accelerator ]] || die "create needs --accelerator-type (e.g. v5p-128, v5litepod-64)"
      [[ -n $runtime ]] || runtime=$(default_runtime "$accelerator")
      [[ -n $runtime ]] || die "create needs --runtime-version for accelerator type $accelerator"
      [[ $spot == 1 && $preemptible == 1 ]] && die "--spot and --preemptible exclude each other"
      if [[ $queued == 1 ]]; then
        [[ $preemptible == 1 ]] && die "--preemptible is for tpu-vm create; queued resources take --spot"
        local -a nodes=(--node-id="$name")
        ((num_slices > 1)) && nodes=(--node-count="$num_slices" --node-prefix="$name")
        local -a qr=(gcloud compute tpus queued-resources create "$name" "${where[@]}" "${nodes[@]}"
          --accelerator-type="$accelerator" --runtime-version="$runtime")
        [[ $spot == 1 ]] && qr+=(--spot)
        run "${qr[@]}"
        echo "Queued. Wait for state ACTIVE: $SCRIPT_NAME status --name $name --zone $zone --queued" >&2
      else
        local -a vm=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
          --accelerator-type="$accelerator" --version="$runtime")
        [[ $spot == 1 ]] && vm+=(--spot)
        [[ $preemptible == 1 ]] && vm+=(--preemptible)
        run "${vm[@]}"
      fi
      ;;

    delete)
      if [[ $queued == 1 ]]; then
        run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
      else
        run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
      fi
      ;;

    setup)
      local rdir install
      rdir=$(quote "$remote_dir")
      install="cd $rdir && { $(quote "$python") -c 'import ensurepip, venv' 2>/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $(quote "$python") $(quote "$python")-venv; }; }"
      install+=" && $(quote "$python") -m venv .venv && .venv/bin/pip install -q --upgrade pip"
      install+=" && .venv/bin/pip install -q -e '.[tpu,gcs]' && .venv/bin/minicpm-jax --help >/dev/null && echo \"\$(hostname): installed\""
      if [[ -n $git_url ]]; then
        local fetch
        fetch="{ [ -d $rdir/.git ] || git clone -q $(quote "$git_url") $rdir; }"
        [[ -n $git_ref ]] && fetch+=" && git -C $rdir fetch -q origin && git -C $rdir checkout -q $(quote "$git_ref")"
        run "${ssh_all[@]}" --command="$fetch && $install"
      else
        [[ -z $git_ref ]] || die "--ref goes with --git"
        local repo tarball
        repo=$(cd "$(dirname "$0")/.." && pwd)
        tarball="${TMPDIR:-/tmp}/minicpm-jax-$name.tar.gz"
        # tracked files and untracked ones git does not ignore: the working tree as it is, without .venv
        if [[ $DRY_RUN == 1 ]]; then
          printf '+ %s\n' "git -C $(quote "$repo") ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$tarball") --ignore-failed-read -C $(quote "$repo") --null -T -"
        else
          git -C "$repo" ls-files -z --cached --others --exclude-standard | tar -czf "$tarball" --ignore-failed-read -C "$repo" --null -T -
        fi
        run "${scp_all[@]}" "$tarball" "$name:minicpm-jax-src.tar.gz"
        run "${ssh_all[@]}" --command="mkdir -p $rdir && tar -xzf minicpm-jax-src.tar.gz -C $rdir && $install"
      fi
      ;;

    train)
      [[ ${#train_args[@]} -gt 0 ]] || die "train needs its arguments after --: -- --config FILE --workdir RUN"
      local has_workdir=0 a workdir=""
      for a in "${train_args[@]}"; do
        [[ $has_workdir == 2 ]] && { workdir=$a; has_workdir=1; }
        [[ $a == --workdir ]] && has_workdir=2
        [[ $a == --workdir=* ]] && { workdir=${a#--workdir=}; has_workdir=1; }
      done
      [[ $has_workdir == 1 && -n $workdir ]] || die "train needs --workdir RUN among its arguments (after --)"
      [[ $retries =~ ^[0-9]+$ ]] || die "--retries must be a non-negative integer, got $retries"
      [[ $retry_delay =~ ^[0-9]+$ ]] || die "--retry-delay must be a non-negative integer, got $retry_delay"
      if [[ $workdir != /* ]]; then
        echo "$SCRIPT_NAME: warning: --workdir $workdir is not an absolute path; every worker must see the same" \
          "run directory (a gcsfuse mount or NFS), not its own local copy" >&2
      fi
      local remote
      remote="cd $(quote "$remote_dir") && bash launch/tpu_vm.sh run-loop --detach --retries $retries"
      remote+=" --retry-delay $retry_delay --log-dir \"\$HOME\"/$(quote "$log_dir")"
      remote+=" -- .venv/bin/minicpm-jax train $(quote_all "${train_args[@]}")"
      run "${ssh_all[@]}" --command="$remote"
      echo "Follow a worker: $SCRIPT_NAME logs --name $name --zone $zone --worker 0" >&2
      ;;

    stop)
      local pidf
      pidf="\"\$HOME\"/$(quote "$log_dir")/train-\$(hostname).pid"
      run "${ssh_all[@]}" --command="if [ -f $pidf ]; then kill -TERM \"\$(cat $pidf)\" && echo \"\$(hostname): sent SIGTERM\"; else echo \"\$(hostname): no loop running\"; fi"
      ;;

    logs)
      [[ $worker =~ ^[0-9]+$ ]] || die "--worker must be a worker index, got $worker"
      [[ $slice =~ ^[0-9]+$ ]] || die "--slice must be a slice index, got $slice"
      local -a one=(gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$worker")
      [[ $queued == 1 ]] && one=(gcloud compute tpus queued-resources ssh "$name" "${where[@]}" --node="$slice" --worker="$worker")
      run "${one[@]}" --command="tail -n $(quote "$lines") -F \"\$HOME\"/$(quote "$log_dir")/train-\$(hostname).log"
      ;;

    status)
      if [[ $queued == 1 ]]; then
        run gcloud compute tpus queued-resources describe "$name" "${where[@]}"
      else
        run gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
      fi
      local base
      base="\"\$HOME\"/$(quote "$log_dir")/train-\$(hostname)"
      run "${ssh_all[@]}" --command="h=\$(hostname); if [ -f $base.pid ] && kill -0 \"\$(cat $base.pid)\" 2>/dev/null; then echo \"\$h: loop running (pid \$(cat $base.pid))\"; else echo \"\$h: no loop running\"; fi; tail -n 2 $base.log 2>/dev/null || true"
      ;;
  esac
}

main "$@"
