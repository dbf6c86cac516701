"""The fsdp axis split along the TPU torus, so that a weight's gradient is reduce-scattered in two stages.

A v5e 8x8 or v5p 4x4x4 slice under FSDP puts 64 chips on one mesh axis, `fsdp`, that spans two or three
torus dimensions. XLA:TPU lowers a gradient's reduce-scatter over such an axis as an all-reduce of the
whole gradient followed by a slice: each chip sends twice the bytes of a reduce-scatter. Constrained
first to a layout split only along the torus dimension over which fsdp's devices vary slowest
(`fsdp_outer`, 8 or 4 chips), and then to the stored one, the gradient is reduce-scattered along that
dimension (a fused reduce-scatter, one ring per row of the torus), and only the remaining eighth or
quarter crosses the other dimensions. Measured in BENCHMARKS.md ("TPU pod configs"): the 1.2B step on
v5e:8x8 goes from 1.34× to 1.11× of the FSDP minimum, the 2.4B step on v5p:4x4x4 from 1.96× to 1.24×.
Three stages on the 4x4x4 cube measured worse than two (1.25×).

The split view has the same devices in the same order as the mesh, so (`fsdp_outer`, `fsdp_inner`)
together lay a tensor out exactly as `fsdp` does; the stages change nothing but the collectives.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

OUTER, INNER = "fsdp_outer", "fsdp_inner"


def fsdp_split_view(mesh: Mesh) -> Mesh | None:
    """`mesh` with `fsdp` split into (`fsdp_outer`, `fsdp_inner`): the torus dimension along which fsdp's
    devices vary slowest, and the rest. None where that gains nothing or cannot be read: fsdp spans at
    most one torus dimension, or the devices have no torus coordinates (CPU, GPU)."""
    fsdp = mesh.axis_names.index("fsdp")
    grid = np.moveaxis(mesh.devices, fsdp, -1)  # [..., fsdp]
    if grid.shape[-1] < 4 or not hasattr(grid.flat[0], "coords"):
        return None
    coords = np.vectorize(lambda d: tuple(d.coords) + (d.core_on_chip,), otypes=[object])(grid)
    coords = np.array(coords.tolist())  # [..., fsdp, coordinate]
    line = coords.reshape(-1, *coords.shape[-2:])[0]  # the devices of one fsdp group
    varying = [k for k in range(line.shape[-1]) if len(set(line[:, k])) > 1]
    if len(varying) < 2:
        return None
    # The slowest dimension is the one whose coordinate first changes furthest along the axis.
    slowest = max(varying, key=lambda k: np.argmax(line[:, k] != line[0, k]))
    outer = len(set(line[:, slowest]))
    if grid.shape[-1] % outer:
        return None
    # Outer-major everywhere: along fsdp, `outer` blocks, each constant in the slowest dimension and all
    # walking the same path through the others (a snake order on a small slice is neither).
    blocks = coords.reshape(*coords.shape[:-2], outer, grid.shape[-1] // outer, coords.shape[-1])
    rest = np.delete(blocks, slowest, axis=-1)
    if not (np.all(blocks[..., slowest] == blocks[..., :1, slowest]) and np.all(rest == rest[..., :1, :, :])):
        return None
    split = mesh.devices.reshape(mesh.devices.shape[:fsdp] + (outer, -1) + mesh.devices.shape[fsdp + 1:])
    names = mesh.axis_names[:fsdp] + (OUTER, INNER) + mesh.axis_names[fsdp + 1:]
    return Mesh(split, names, axis_types=(AxisType.Auto,) * len(names))


def first_stage(view: Mesh, stored: PartitionSpec) -> NamedSharding:
    """The layout a gradient stored as `stored` (split over `fsdp`) is reduce-scattered to first: split
    over `fsdp_outer` only, summed over `fsdp_inner` still to come."""
    def outer_only(entry):
        axes = tuple(OUTER if a == "fsdp" else a for a in ((entry,) if isinstance(entry, str) else entry or ()))
        return None if not axes else axes[0] if len(axes) == 1 else axes

    return NamedSharding(view, PartitionSpec(*(outer_only(entry) for entry in stored)))
