"""Long-context memory: peak memory of a tiny model's forward+backward on CPU, chunked vs XLA attention.

For each sequence length T and kernel (`model.attention_impl` = chunked | xla) a fresh subprocess builds a tiny
MiniCPM (hidden 64, 2 layers, 2 query heads of 32 dims sharing 1 kv head, vocab 256), compiles
`value_and_grad` of the mean log-sum-exp of the logits over one row of T tokens (packed: two documents, so
segment ids are used), and reports:

- XLA temp: the temporary buffers of the compiled program (`compiled.memory_analysis().temp_size_in_bytes`),
  i.e. what XLA's buffer assignment plans to hold at once beyond inputs and outputs. Known before running.
- peak RSS − base RSS: the process's measured high-water mark (VmHWM) after one step, minus its RSS after
  imports and model init. Includes compilation and allocator slack.

Each child runs under an address-space limit (`--limit-gb`, RLIMIT_AS) so that a quadratic program fails with
an allocation error instead of pushing a shared machine into swap; such a run is reported as "over limit".

    python benchmarks/long_context_memory.py                    # T = 1K, 4K, 16K, 32K; a few minutes on 2 cores
    python benchmarks/long_context_memory.py --lengths 1024,4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import _report

os.environ.setdefault("JAX_PLATFORMS", "cpu")

IMPLS = ("chunked", "xla")
MIB = 1 << 20


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(impl: str, length: int, block: int) -> None:
    """Child: prints one JSON line after compiling, and another after running one step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minicpm_jax.config import ModelConfig
    from minicpm_jax.model import MiniCPM

    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=length, dim_model_base=16, attention_impl=impl,
                      attention_block_size=block)
    graphdef, params = nnx.split(MiniCPM(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (1, length), 0, cfg.vocab_size, jnp.int32)
    segments = jnp.where(jnp.arange(length) < length // 3, 1, 2)[None].astype(jnp.int32)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, segment_ids=segments)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    base = _rss_kib("VmRSS")
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(json.dumps({"stage": "compiled", "temp_bytes": temp}), flush=True)
    start = time.perf_counter()
    value, grads = compiled(params)
    jax.block_until_ready(grads)
    print(json.dumps({"stage": "ran", "loss": float(value), "seconds": time.perf_counter() - start,
                      "base_rss": base * 1024, "peak_rss": _rss_kib("VmHWM") * 1024}), flush=True)


def run_child(impl: str, length: int, block: int, limit_gb: float) -> dict:
    limit = int(limit_gb * (1 << 30))

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.abspath(__file__), "--only", impl, str(length), "--block", str(block)]
    # The child imports this checkout's minicpm_jax, whatever is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit_memory, cwd=repo, env=env,
                          check=False)
    result = {"impl": impl, "length": length}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    result["status"] = "ok" if proc.returncode == 0 else f"over {limit_gb:g} GiB limit (exit {proc.returncode})"
    if proc.returncode and "temp_bytes" not in result:
        result["error"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    return result


def _fmt_mib(value) -> str:
    return "—" if value is None else f"{value / MIB:,.0f}"


def table(results: list[dict]) -> str:
    lines = ["| T | kernel | XLA temp (MiB) | peak RSS − base (MiB) | step (s) | status |",
             "|---:|---|---:|---:|---:|---|"]
    for r in results:
        grown = r["peak_rss"] - r["base_rss"] if "peak_rss" in r else None
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "—"
        lines.append(f"| {r['length']:,} | {r['impl']} | {_fmt_mib(r.get('temp_bytes'))} | {_fmt_mib(grown)} | "
                     f"{seconds} | {r['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,4096,16384,32768")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--block", type=int, default=512, help="model.attention_block_size of the chunked kernel")
    p.add_argument("--limit-gb", type=float, default=8.0, help="address-space limit of each child (RLIMIT_AS)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--only", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        measure(args.only[0], int(args.only[1]), args.block)
        return
    results = []
    for length in (int(x) for x in args.lengths.split(",")):
        for impl in args.impls.split(","):
            results.append(run_child(impl, length, args.block, args.limit_gb))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    _report.write_json(args.json, results)


if __name__ == "__main__":
    main()
