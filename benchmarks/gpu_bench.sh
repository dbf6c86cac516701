#!/usr/bin/env bash
# One-command accelerator benchmark of the 1.2B config (see benchmarks/gpu_bench.py and BENCHMARKS.md).
set -euo pipefail

SCRIPT_NAME=$(basename "$0")
export HELP_HINT=--help  # read by die() in common.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
# shellcheck source=../launch/common.sh source-path=SCRIPTDIR
source "$REPO/launch/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [--wheels DIR] [--python PY] [--out DIR] [--limit SECONDS] [--dry-run] [--smoke]
                    [-- GPU_BENCH_ARGS...]

Benchmarks our training step on this host's accelerators: configs/minicpm_1b.py in bfloat16 at sequence
4096, with the largest per-device batch that fits (searched), tokens/s and MFU against the device's
dense bf16 peak. Prints a table and writes OUT/gpu_bench.json. Finishes in under 8 minutes.

  --wheels DIR    install the Python packages this checkout needs but the interpreter lacks (grain,
                  ml-collections, ...) from the wheels in DIR, offline: pip install --no-index --find-links DIR.
                  Build DIR on a machine with internet (see BENCHMARKS.md, "GPU benchmark").
  --python PY     the interpreter (default: \$PYTHON, else python3)
  --out DIR       where gpu_bench.json goes (default: gpu_bench_out)
  --limit S       kill the benchmark after S seconds (default 450); its search stops starting trials
                  60 s before that, and it rewrites the JSON after every trial
  --dry-run       print the commands (prefixed '+ ') instead of running them
  --smoke         a CPU run of a tiny model (checks this script and the benchmark, not a measurement)
  -- ARGS         passed to benchmarks/gpu_bench.py (e.g. -- --remat full --batches 8,16)

Environment: XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.95 here (JAX's default 0.75 would hide a quarter
of the GPU from the batch search); XLA_FLAGS is passed through.
EOF
}

PY=${PYTHON:-python3}
WHEELS=""
OUT=gpu_bench_out
LIMIT=450
DRY_RUN=0
SMOKE=0
BENCH_ARGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --wheels) [[ $# -ge 2 ]] || die "--wheels needs a folder"; WHEELS=$2; shift 2 ;;
    --python) [[ $# -ge 2 ]] || die "--python needs an interpreter"; PY=$2; shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT=$2; shift 2 ;;
    --limit) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--limit needs a whole number of seconds"; LIMIT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    *) die "unknown option $1" ;;
  esac
done
(( LIMIT > 60 )) || die "--limit must be above 60 seconds, got $LIMIT"
[[ -z $WHEELS || -d $WHEELS ]] || die "--wheels $WHEELS is not a folder"
command -v "$PY" >/dev/null || die "python interpreter '$PY' not found (use --python)"

run() {
  echo "+ $(quote_all "$@")"
  if (( ! DRY_RUN )); then "$@"; fi
}

# The modules minicpm_jax imports for training, with the pip distribution that provides each; one
# interpreter start checks them all.
read -r -a missing <<<"$("$PY" - <<'EOF'
import importlib
required = {"jax": "jax", "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
            "numpy": "numpy", "grain": "grain", "ml_collections": "ml-collections"}
missing = []
for module, dist in required.items():
    try:
        importlib.import_module(module)
    except ImportError:
        missing.append(dist)
print(" ".join(missing))
EOF
)"
if (( ${#missing[@]} )); then
  [[ -n $WHEELS ]] || die "$PY lacks ${missing[*]}: pass --wheels DIR with their wheels (see BENCHMARKS.md)"
  run "$PY" -m pip install --no-index --find-links "$WHEELS" "${missing[@]}"
fi

if (( SMOKE )); then
  export JAX_PLATFORMS=cpu
  BENCH_ARGS=(--config "$REPO/configs/demo.py" --set model.vocab_size=128 --set model.hidden_size=64
              --set model.intermediate_size=160 --set model.num_layers=2 --set model.num_heads=2
              --set model.num_kv_heads=1 --set train.peak_flops_per_device=1e11 --seq 32 --dtype float32
              --remat full --batches 2 --steps 1 --warmup 1 "${BENCH_ARGS[@]}")
else
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
  if (( ! DRY_RUN )) && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
fi
if (( ! DRY_RUN )); then mkdir -p "$OUT"; fi
# Compiled steps are cached, so a second run (another --remat, or a rerun) skips most compilation.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
run timeout "$LIMIT" "$PY" "$REPO/benchmarks/gpu_bench.py" --time-budget $((LIMIT - 60)) \
  --json "$OUT/gpu_bench.json" "${BENCH_ARGS[@]}"
