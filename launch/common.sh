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
