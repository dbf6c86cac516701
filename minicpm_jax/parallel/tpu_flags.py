"""The XLA:TPU options every step of ours is compiled with: ahead of time (`aot.compile_step`) and on a pod.

One table, two ways in: the AOT compile passes it as compiler options, and a run on TPU gets it through
LIBTPU_INIT_ARGS, which the console script extends before jax starts (`extend_libtpu_init_args`), so the
program a pod runs is the program `minicpm-jax compile` measured. No jax import here: it runs first.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# On square slices (v5e 8x8) XLA:TPU otherwise gathers FSDP weights by all-reducing zero-padded shards,
# twice the bytes of an all-gather (measured: BENCHMARKS.md, "TPU pod configs").
TPU_COMPILER_OPTIONS = {"xla_tpu_prefer_async_allgather_to_allreduce": "true"}


def extend_libtpu_init_args(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds each option that LIBTPU_INIT_ARGS does not already set (a user's own setting wins)."""
    current = environ.get("LIBTPU_INIT_ARGS", "")
    extra = [f"--{name}={value}" for name, value in TPU_COMPILER_OPTIONS.items() if f"--{name}=" not in current]
    if extra:
        environ["LIBTPU_INIT_ARGS"] = " ".join([current, *extra]).strip()
