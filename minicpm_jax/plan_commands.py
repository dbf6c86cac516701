"""The `plan` subcommand: per-device memory of a config's training step, and whether it fits a device."""

from __future__ import annotations

import argparse

from minicpm_jax import memory_plan  # light: no jax

# jax device-kind prefixes -> the names `memory_plan.fits` knows (used when --device is not given).
_KIND_TO_DEVICE = (("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5", "v5p"),
                   ("TPU v6", "v6e"), ("NVIDIA H100", "h100"), ("NVIDIA H200", "h200"))


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="estimate per-device memory of a config's training step (nothing allocated)")
    p.add_argument("--config", required=True, help="config file, e.g. configs/minicpm_2b.py")
    p.add_argument("--devices", type=int, default=None, help="devices in the mesh (default: jax.device_count())")
    p.add_argument("--device", choices=tuple(memory_plan.DEVICE_MEMORY), default=None,
                   help="device to check the plan against (default: this machine's accelerator, or cpu)")
    p.add_argument("--headroom", type=float, default=0.9, help="fraction of the device memory usable (default 0.9)")
    p.set_defaults(func=plan, accepts_config_overrides=True)


def plan(args: argparse.Namespace) -> None:
    import jax

    from minicpm_jax import config
    from minicpm_jax.model import count_params

    cfg = config.load(args.config, args.config_overrides)
    num_devices = jax.device_count() if args.devices is None else args.devices
    if num_devices < 1:
        raise config.ConfigError(f"--devices must be positive, got {num_devices}")
    device = args.device or _local_device(jax)
    result = memory_plan.estimate(cfg, num_devices)
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
        print(f"  {name:<18}{_size(value):>12}")
    print(f"  {'total':<18}{_size(result.total_bytes):>12}")
    for note in result.notes:
        print(f"note: {note}")
    fit = memory_plan.fits(result, device, args.headroom)
    verdict = (f"fits, margin {_size(fit.margin_bytes)}" if fit
               else f"does NOT fit, short by {_size(-fit.margin_bytes)}")
    print(f"{device} ({_size(fit.capacity_bytes)}, {args.headroom:.0%} usable = {_size(fit.usable_bytes)}): {verdict}")


def _local_device(jax) -> str:
    local = jax.devices()[0]
    if local.platform == "cpu":
        return "cpu"
    name = next((name for prefix, name in _KIND_TO_DEVICE if local.device_kind.startswith(prefix)), None)
    if name is None:
        raise ValueError(f"unknown device kind {local.device_kind!r}: pass --device")
    return name


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"
