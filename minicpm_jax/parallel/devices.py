"""The devices we know (a TPU chip, an NVIDIA GPU, this machine's CPU): the one table behind the memory plan
(memory.py, `plan --device`), the compiler's headroom (aot.py) and MFU (train/metrics.py).

Light: no jax. A jax device kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3") names the device whose first
kind prefix it starts with, in table order ("TPU v5 lite" is a v5e, not a v5p).
"""

from __future__ import annotations

import dataclasses

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Device:
    name: str  # what `plan --device` takes
    platform: str  # the jax platform: tpu, gpu or cpu
    kind_prefixes: tuple[str, ...]  # jax device kinds that start with one of these are this device
    hbm_bytes: int | None  # memory per device that programs may use; None: this machine's RAM (cpu)
    peak_flops: float  # dense bf16 FLOP/s per device, from the vendor's spec sheet; 0 = unknown
    torus: str | None = None  # TPU slices: "2d" or "3d" torus of chips


DEVICES = (
    Device("v4", "tpu", ("TPU v4",), 32 * GiB, 275e12, "3d"),
    # v5e: the 15.75 GiB of its 16 GiB that the runtime leaves to programs.
    Device("v5e", "tpu", ("TPU v5 lite", "TPU v5e"), 63 * GiB // 4, 197e12, "2d"),
    Device("v5p", "tpu", ("TPU v5p", "TPU v5"), 95 * GiB, 459e12, "3d"),
    Device("v6e", "tpu", ("TPU v6 lite", "TPU v6e"), 32 * GiB, 918e12, "2d"),  # Trillium
    # SXM; the PCIe card's peak is lower: pass train.peak_flops_per_device for it.
    Device("h100", "gpu", ("NVIDIA H100",), 80 * GiB, 989e12),
    Device("h200", "gpu", ("NVIDIA H200",), 141 * GiB, 989e12),
    Device("cpu", "cpu", (), None, 0.0),
)
BY_NAME = {device.name: device for device in DEVICES}


def from_kind(device_kind: str) -> Device | None:
    """The device a jax device kind names ("TPU v5 lite" -> v5e), or None if unknown."""
    return next((d for d in DEVICES if device_kind.startswith(d.kind_prefixes)), None)
