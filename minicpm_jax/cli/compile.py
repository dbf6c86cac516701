"""The `compile` subcommand: a config's real step compiled by the XLA:TPU compiler for a TPU topology.

It needs no TPU, only libtpu (the `aot` extra). It is the check to run before launching on a pod: the
per-chip memory and the collectives come from the compiler itself, not from an estimate.
"""

from __future__ import annotations

import argparse

TASK_HELP = "train (default), sft (the same step: language modelling with loss masks), dpo, decode (one token)"


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compile", help="AOT-compile a config's step for a TPU topology: per-chip memory, "
                                              "collectives (no TPU needed)")
    p.add_argument("--config", required=True, help="config file, e.g. configs/minicpm_1b_v5e64.py")
    p.add_argument("--topology", required=True, help="TPU slice topology, e.g. v5e:8x8 (v5e-64), v5p:4x4x4 (v5p-128)")
    p.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (the mesh's dcn_data × dcn_fsdp)")
    p.add_argument("--task", default="train", choices=("train", "sft", "dpo", "decode"), help=TASK_HELP)
    p.add_argument("--dump-hlo", metavar="DIR", default=None, help="write the optimized HLO of the step to DIR")
    p.set_defaults(func=compile_command, accepts_config_overrides=True)


def compile_only_environment() -> None:
    """Defaults for a process that compiles for a topology and runs nothing: the compiler runs on this host's
    CPU. Without them jax probes for local TPU chips and libtpu asks the (absent) TPU metadata server about
    this host, printing a page of warnings; neither changes what is compiled, since the topology names the
    chips (checked: the same memory and collectives with and without)."""
    import os

    for name, value in (("JAX_PLATFORMS", "cpu"), ("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_ACCELERATOR_TYPE", "v5litepod-8")):
        os.environ.setdefault(name, value)


def compile_command(args: argparse.Namespace) -> int:
    import logging
    import time

    compile_only_environment()
    from minicpm_jax import config
    from minicpm_jax.parallel import aot

    log = logging.getLogger("minicpm_jax.compile")
    cfg = config.load(args.config, args.config_overrides)
    log.info("compiling the %s step of %s for %d × %s with the XLA:TPU compiler (minutes for a full-size model)",
             args.task, args.config, args.num_slices, args.topology)
    started = time.perf_counter()
    try:
        result = aot.compile_step(cfg, args.topology, args.num_slices, args.task, args.dump_hlo)
    except aot.StepDoesNotFit as err:
        print(f"{args.config}: does NOT fit: {err}")
        return 1
    log.info("done in %.0f s", time.perf_counter() - started)
    print(report(result, args.config))
    return 0 if result.fits else 1


def report(result, config_path: str) -> str:
    """The human-readable summary `compile` prints."""
    from minicpm_jax.cli.plan import format_size as size

    lines = [f"{config_path}: {result.task} step on {result.num_slices} × {result.topology} "
             f"({result.num_devices} × {result.device_kind}), mesh "
             + " ".join(f"{axis}={n}" for axis, n in result.mesh_shape.items() if n > 1),
             f"compile time {result.compile_seconds:.1f} s (XLA:TPU)",
             "per chip (from the compiler):"]
    for name, value in (("arguments", result.argument_bytes), ("outputs", result.output_bytes),
                        ("aliased (donated)", result.alias_bytes), ("temporaries", result.temp_bytes)):
        lines.append(f"  {name:<20}{size(value):>12}")
    lines.append(f"  {'total':<20}{size(result.total_bytes):>12}  of {size(result.hbm_bytes)} HBM: "
                 + (f"fits, headroom {result.headroom:.1%} ({size(result.hbm_bytes - result.total_bytes)})"
                    if result.fits else f"does NOT fit, short by {size(result.total_bytes - result.hbm_bytes)}"))
    collectives = result.collectives
    lines.append("collectives per step (loop trip counts multiplied in): count, logical bytes, bytes one chip sends")
    for c in collectives.by_kind.values():
        lines.append(f"  {c.kind:<20}{c.count:>8} ×{size(c.bytes):>12}{size(c.wire_bytes):>12}")
    lines.append(f"  {'sent per chip':<20}{'':>22}{size(collectives.wire_bytes):>12}  (ring algorithms over each "
                 "replica group; an all-reduce sends twice)")
    if result.fsdp_minimum_bytes:
        ratio = collectives.wire_bytes / result.fsdp_minimum_bytes
        lines.append(f"  FSDP minimum {size(result.fsdp_minimum_bytes)}: {ratio:.2f}× (per micro-batch: two gathers of "
                     "the weights and one reduce-scatter of their gradients, compute dtype)")
    if collectives.unknown_trip_counts:
        lines.append(f"  note: {collectives.unknown_trip_counts} loop(s) with data-dependent bounds counted once")
    return "\n".join(lines)
