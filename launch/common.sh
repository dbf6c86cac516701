# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, never run. Expects SCRIPT_NAME and HELP_HINT to be set.

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  echo "Run '$SCRIPT_NAME $HELP_HINT' for usage." >&2
  exit 2
}

# One shell word, single-quoted unless it is made only of characters that need no quoting.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# ---------------------------------------------------------------------------------------------------------
# Restarts. STOPPING is set to 1 by a script's SIGTERM/SIGINT trap (a stop on purpose: the processes save a
# checkpoint and exit); CHILD is the pid run_child waits on. restart_loop logs through the script's log().
STOPPING=0
CHILD=""

# The usual trap: note the stop and pass SIGTERM on to the command run_child is waiting on.
stop_child() {
  STOPPING=1
  if [[ -n $CHILD ]]; then kill -TERM "$CHILD" 2>/dev/null || true; fi
}

# Runs CMD... in the background as CHILD and returns its exit status; when a signal interrupts the wait,
# waits again for the command's own status.
run_child() {
  local rc=0
  "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  if [[ $STOPPING == 1 ]]; then
    rc=0
    wait "$CHILD" || rc=$?
  fi
  CHILD=""
  return "$rc"
}

# restart_loop WHAT RETRIES DELAY ATTEMPT_FN [ARGS...]: calls ATTEMPT_FN ATTEMPT ARGS... (ATTEMPT = 0, 1, ...)
# until it returns 0 (the run finished, or was stopped by SIGTERM after saving), a signal stops the loop, or
# RETRIES restarts have failed; waits DELAY seconds between attempts and returns the last exit status. WHAT
# names what ran, in the log ("the group", "the command on HOST").
restart_loop() {
  local what=$1 retries=$2 delay=$3 attempt_fn=$4 attempt=0 rc
  shift 4
  while :; do
    log "attempt $((attempt + 1))/$((retries + 1))${*:+: $(quote_all "$@")}"
    rc=0
    "$attempt_fn" "$attempt" "$@" || rc=$?
    if [[ $rc == 0 ]]; then
      log "$what exited 0 (run finished, or stopped by SIGTERM after saving); loop done"
      return 0
    fi
    if [[ $STOPPING == 1 ]]; then
      log "stopped by a signal; $what exited $rc"
      return "$rc"
    fi
    if ((attempt >= retries)); then
      log "$what exited $rc; no retries left, giving up"
      return "$rc"
    fi
    attempt=$((attempt + 1))
    log "$what exited $rc; restarting in ${delay}s (resumes from the latest checkpoint)"
    sleep "$delay" &
    wait $! || true
    [[ $STOPPING == 1 ]] && return "$rc"
  done
}

# wait_group ON_FAIL POLL: waits for every pid in PIDS (index i = process i) and returns the first non-zero
# exit status (0 when all exit 0); on that first failure calls ON_FAIL I RC, which stops the others. Polls
# every POLL seconds.
PIDS=()
wait_group() {
  local on_fail=$1 poll=$2 i rc first_rc=0
  local -a live=("${!PIDS[@]}") still
  while [[ ${#live[@]} -gt 0 ]]; do
    still=()
    for i in "${live[@]}"; do
      if kill -0 "${PIDS[$i]}" 2>/dev/null; then still+=("$i"); continue; fi
      rc=0
      wait "${PIDS[$i]}" || rc=$?
      if [[ $rc != 0 && $first_rc == 0 ]]; then
        first_rc=$rc
        "$on_fail" "$i" "$rc"
      fi
    done
    live=(${still[@]+"${still[@]}"})
    [[ ${#live[@]} -gt 0 ]] && sleep "$poll"
  done
  return "$first_rc"
}
