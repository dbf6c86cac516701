"""The `plan` subcommand: per-device memory of a config's training step, and whether it fits a device."""

from __future__ import annotations

import argparse

from minicpm_jax.parallel import devices  # light: no jax
from minicpm_jax.parallel import memory as memory_plan


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="estimate per-device memory of a config's training step (nothing "
                                           "allocated); exit code 0 when it fits, 1 when it does not")
    p.add_argument("--config", required=True, help="config file, e.g. configs/minicpm_2b.py")
    p.add_argument("--devices", type=int, default=None, help="devices in the mesh (default: jax.device_count())")
    p.add_argument("--device", choices=tuple(memory_plan.DEVICE_MEMORY), default=None,
                   help="device to check the plan against (default: this machine's accelerator, or cpu)")
    p.add_argument("--headroom", type=float, default=0.9, help="fraction of the device memory usable (default 0.9)")
    p.add_argument("--topology", default=None,
                   help="a TPU topology (v5e:8x8, v5p:4x4x4): also compile the step with XLA:TPU (libtpu, the aot "
                        "extra) and report the compiler's per-chip memory, which supersedes the estimate")
    p.add_argument("--num-slices", type=int, default=1, help="with --topology: slices joined over DCN")
    p.add_argument("--estimate-only", action="store_true",
                   help="never compile: with a TPU --device and libtpu installed, plan otherwise compiles for the "
                        "usual slice of --devices chips")
    p.set_defaults(func=plan, accepts_config_overrides=True)


def plan(args: argparse.Namespace) -> int:
    if not args.topology and not args.estimate_only:
        args.topology = _compilable_topology(args)
        if args.topology:
            print(f"note: libtpu is installed, so the XLA:TPU compiler checks this plan on {args.topology} "
                  f"(--topology picks another, --estimate-only skips it)")
    if args.topology:
        from minicpm_jax.cli.compile import compile_only_environment

        compile_only_environment()
    import jax

    from minicpm_jax import config
    from minicpm_jax.model import count_params

    cfg = config.load(args.config, args.config_overrides)
    if args.topology:  # the compiler's numbers; the estimate is printed for comparison
        from minicpm_jax.cli import compile as compile_commands
        from minicpm_jax.parallel import aot

        try:
            compiled = aot.compile_step(cfg, args.topology, args.num_slices)
        except aot.StepDoesNotFit as err:
            print(f"{args.config}: does NOT fit (XLA:TPU compiler): {err}")
            return 1
        args.devices, args.device = compiled.num_devices, memory_plan.device_name(compiled.device_kind)
    num_devices = jax.device_count() if args.devices is None else args.devices
    if num_devices < 1:
        raise config.ConfigError(f"--devices must be positive, got {num_devices}")
    device = args.device or _local_device(jax)
    result = memory_plan.estimate(cfg, num_devices, _platform(device))
    m = cfg.model
    print(f"memory plan for {args.config}: {count_params(m, include_embedding=True):,} parameters "
          f"({m.param_dtype}), compute {m.dtype}, remat {m.remat_policy}  [an estimate]")
    print(f"mesh ({num_devices} devices, rules {result.rules}): "
          + " ".join(f"{axis}={size}" for axis, size in result.mesh_shape.items()))
    print(f"micro-batch per device: {result.rows_per_device} rows × {result.tokens_per_row} tokens "
          f"(global batch {cfg.train.global_batch_size}, grad_accum_steps {cfg.train.get('grad_accum_steps', 1)}, "
          f"seq_len {cfg.train.seq_len})")
    rows = (("parameters", result.param_bytes), ("optimizer state", result.opt_state_bytes),
            ("gradients", result.grad_bytes), ("gathered weights", result.gathered_bytes),
            ("activations", result.activation_bytes))
    print("per device:")
    for name, value in rows:
        print(f"  {name:<18}{format_size(value):>12}")
    print(f"  {'total':<18}{format_size(result.total_bytes):>12}")
    for note in result.notes:
        print(f"note: {note}")
    fit = memory_plan.fits(result, device, args.headroom)
    verdict = (f"fits, margin {format_size(fit.margin_bytes)}" if fit
               else f"does NOT fit, short by {format_size(-fit.margin_bytes)}")
    print(f"{device} ({format_size(fit.capacity_bytes)}, {args.headroom:.0%} usable = "
          f"{format_size(fit.usable_bytes)}): {verdict}")
    if args.topology:
        print("\nfrom the XLA:TPU compiler (this supersedes the estimate above):")
        print(compile_commands.report(compiled, args.config))
        return 0 if compiled.fits else 1
    return 0 if fit else 1


def _compilable_topology(args: argparse.Namespace) -> str | None:
    """The slice to compile for when the user named TPU chips and libtpu is here, else None."""
    import importlib.util

    if _platform(args.device) != "tpu" or not args.devices or importlib.util.find_spec("libtpu") is None:
        return None
    if args.devices % args.num_slices:
        return None
    return memory_plan.slice_topology(args.device, args.devices // args.num_slices)


def _platform(device: str | None) -> str:
    """The jax platform of a device-table name (v5e -> tpu, h100 -> gpu); cpu otherwise."""
    return devices.BY_NAME[device].platform if device in devices.BY_NAME else "cpu"


def _local_device(jax) -> str:
    local = jax.devices()[0]
    if local.platform == "cpu":
        return "cpu"
    name = memory_plan.device_name(local.device_kind)
    if name is None:
        raise ValueError(f"unknown device kind {local.device_kind!r}: pass --device")
    return name


def format_size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"
