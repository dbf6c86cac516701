"""MoE dispatch benchmark: the grouped (sort + ragged_dot) path against the dense einsum path.

Both compute the same top-k MoE layer (model/moe.py); the dense path runs every expert on every token,
the grouped one only the k experts each token chose. Timed: forward + backward of one layer, jitted, on
[batch·seq, d] tokens, alternating the two paths in blocks so that machine noise hits both alike.
Reported: median milliseconds per call, tokens/s and the ratio grouped/dense. With E experts and top-k,
the grouped path does k/E of the dense path's expert FLOPs plus a sort and two gathers.

    python benchmarks/moe_dispatch.py                    # d 256, d_ff 640, 8 experts, top-2, 4096 tokens
    python benchmarks/moe_dispatch.py --experts 16 --tokens 8192
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from minicpm_jax.model.moe import dense_dispatch, grouped_dispatch, route  # noqa: E402

PATHS = {"dense": dense_dispatch, "grouped": grouped_dispatch}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=640)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per call (batch 8 × this / 8)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per path and block")
    p.add_argument("--blocks", type=int, default=3)
    return p.parse_args(argv)


def make_step(dispatch, router, k):
    def loss(x, gate, up, down):
        routing, _, _ = route(x, router, k)
        return jnp.sum(jnp.square(dispatch(x, routing, gate, up, down)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    keys = jax.random.split(jax.random.key(0), 5)
    d, f, e = args.hidden, args.ffn, args.experts
    x = jax.random.normal(keys[0], (8, args.tokens // 8, d))
    router = jax.random.normal(keys[1], (d, e)) * 0.1
    weights = [jax.random.normal(keys[2], (e, d, f)) * 0.05, jax.random.normal(keys[3], (e, d, f)) * 0.05,
               jax.random.normal(keys[4], (e, f, d)) * 0.05]
    steps = {name: make_step(path, router, args.top_k) for name, path in PATHS.items()}
    for step in steps.values():  # compile and warm up
        jax.block_until_ready(step(x, *weights))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.blocks):
        for name, step in steps.items():
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(step(x, *weights))
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"MoE layer forward+backward: d {d}, d_ff {f}, {e} experts, top-{args.top_k}, {args.tokens} tokens, "
          f"{jax.devices()[0].platform}, median of {args.blocks * args.repeats}")
    print(f"{'path':8} {'ms/call':>9} {'tokens/s':>10}")
    for name, seconds in medians.items():
        print(f"{name:8} {seconds * 1e3:9.1f} {args.tokens / seconds:10.0f}")
    ratio = medians["dense"] / medians["grouped"]
    print(f"grouped is {ratio:.2f}x the dense path's speed (expert FLOPs ratio {e / args.top_k:.1f}x)")
    return {**medians, "speedup": ratio}


if __name__ == "__main__":
    main()
