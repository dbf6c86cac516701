"""Device meshes and the one table that maps logical axis names onto them.

Every parameter carries logical names (`layers`, `vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`) and activations at block boundaries carry `act_batch`, `act_length`, `act_embed`. A rules preset
maps each name to mesh axes (`data`, `fsdp`, `tensor`, `expert`, `sequence`); no PartitionSpec is
written by hand anywhere else. The mesh uses Auto axis types: jax ≥ 0.10 defaults to Explicit, under
which plain NNX layers fail.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from minicpm_jax.config import MESH_AXES, MESH_RULES, ConfigError, MeshConfig
from minicpm_jax.parallel import torus

# The global batch is split over every data-parallel axis. `expert` is one too: outside the MoE layers its
# devices work on different rows, and inside them they exchange tokens for their experts (model/moe.py).
BATCH_AXES = ("data", "fsdp", "expert")

_ACTIVATIONS = (("act_batch", BATCH_AXES), ("act_length", "sequence"), ("act_embed", None))
# Logical name -> mesh axis (or axes, or None = replicated), per preset.
RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    # Pure data parallel: every parameter replicated.
    "dp": _ACTIVATIONS + tuple((name, None) for name in
                               ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert")),
    # ZeRO-3 style: every weight split over `fsdp` along its model dimension, gathered per layer on use.
    "fsdp": _ACTIVATIONS + (("embed", "fsdp"), ("layers", None), ("vocab", None), ("heads", None),
                            ("kv_heads", None), ("head_dim", None), ("mlp", None), ("expert", "expert")),
    # FSDP plus Megatron-style tensor parallelism over heads, MLP width and vocabulary.
    "fsdp_tp": _ACTIVATIONS + (("embed", "fsdp"), ("layers", None), ("vocab", "tensor"), ("heads", "tensor"),
                               ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("expert", "expert")),
}
assert tuple(RULES) == MESH_RULES, "config.MESH_RULES names the presets a config may choose: keep the two in step"


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The mesh over `devices` (default: all), laid out on the chips' physical torus by jax's mesh_utils.

    An axis whose size is no product of whole physical axes (8 on a v5p 4x4x4 cube) splits one of them:
    still neighbours on the torus, at some cost in ring bandwidth for that axis.
    """
    from jax.experimental import mesh_utils

    devices = list(devices or jax.devices())
    try:
        mesh_cfg.shape(len(devices))  # raises ConfigError, naming the keys, when the devices do not split so
    except ConfigError as err:
        raise ConfigError(f"{err}{cpu_device_hint(mesh_cfg, devices)}") from None
    ici = mesh_cfg.ici_shape(len(devices) // mesh_cfg.num_slices)
    if mesh_cfg.num_slices == 1:
        grid = mesh_utils.create_device_mesh([ici[a] for a in MESH_AXES], devices, allow_split_physical_axes=True)
    else:
        dcn = {axis: 1 for axis in MESH_AXES} | {"data": mesh_cfg.dcn_data, "fsdp": mesh_cfg.dcn_fsdp}
        grid = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices,
                                                    allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 5)


def cpu_device_hint(mesh_cfg: MeshConfig, devices: Sequence[jax.Device]) -> str:
    """On CPU, how to get the devices a mesh needs: XLA fakes them (the tests' and the README's multi-device runs)."""
    needed = math.prod(size for axis in MESH_AXES if (size := getattr(mesh_cfg, axis)) != -1) * mesh_cfg.num_slices
    if needed <= len(devices) or any(device.platform != "cpu" for device in devices):
        return ""
    return (f"; on CPU, jax can fake {needed} devices: start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} in the environment")


def partition_spec(names: Sequence[str | None], rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
    table = dict(rules)
    return PartitionSpec(*(table.get(name) if name is not None else None for name in names))


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules_name: str) -> Iterator[None]:
    """Makes `mesh` and the rules preset current: parameters created inside are born sharded."""
    token = _FSDP_SPLIT_VIEW.set(torus.fsdp_split_view(mesh))
    try:
        with jax.set_mesh(mesh), spmd.logical_axis_rules(RULES[rules_name]):
            yield
    finally:
        _FSDP_SPLIT_VIEW.reset(token)


def is_active() -> bool:
    """Whether a mesh and a rules preset are current (inside `activate`); else code runs unsharded."""
    return bool(spmd.get_logical_axis_rules()) and not jax.sharding.get_abstract_mesh().empty


def target_platform() -> str:
    """The platform the code being traced will run on: the current mesh's devices (an ahead-of-time compile
    for a TPU topology traces on a CPU host), else this process's default devices."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.devices()[0].platform


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activate` (one device, no rules)."""
    if not is_active():
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(names, spmd.get_logical_axis_rules()))


# The axes that split a weight only to store it (ZeRO-3); a weight is gathered over them for use.
STORAGE_AXES = ("fsdp",)
# The current mesh with fsdp split along the TPU torus (parallel/torus.py), or None; set by `activate`.
_FSDP_SPLIT_VIEW: contextvars.ContextVar[jax.sharding.Mesh | None] = contextvars.ContextVar("fsdp_split_view",
                                                                                          default=None)


def _drop_storage_axes(spec: PartitionSpec) -> PartitionSpec:
    def kept(entry):
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else tuple(entry or ())) if a not in STORAGE_AXES)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    return PartitionSpec(*(kept(entry) for entry in spec))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather_for_use(weight: jax.Array, gathered: PartitionSpec, stored: PartitionSpec,
                    reduce_first_to: NamedSharding | None) -> jax.Array:
    return jax.lax.with_sharding_constraint(weight, gathered)


def _gather_forward(weight, gathered, stored, reduce_first_to):
    return _gather_for_use(weight, gathered, stored, reduce_first_to), None


def _gather_backward(gathered, stored, reduce_first_to, _, cotangent):
    # The weight's gradient is a partial sum on every device (each saw its own rows); constraining it to
    # the stored layout asks for a reduce-scatter, not an all-reduce of the whole gradient. On a TPU torus
    # it goes there in two stages (parallel/torus.py), or XLA:TPU lowers it as an all-reduce.
    if reduce_first_to is not None:
        cotangent = jax.lax.with_sharding_constraint(cotangent, reduce_first_to)
    return (jax.lax.with_sharding_constraint(cotangent, stored),)


_gather_for_use.defvjp(_gather_forward, _gather_backward)


def weight_for_use(weight: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """FSDP's all-gather of one weight where it is used, and the reduce-scatter of its gradient.

    `weight` is the compute-dtype copy (so bfloat16 moves, not the float32 master) with logical `names`;
    it comes back split only over the axes that compute on it (tensor, expert). Both directions are pinned,
    so the per-layer gather and the gradient's reduce-scatter are explicit in the program rather than left
    to the partitioner; on a TPU torus the reduce-scatter goes in two stages (parallel/torus.py). A no-op
    outside `activate`.
    """
    if not is_active():
        return weight
    stored = partition_spec(names, spmd.get_logical_axis_rules())
    gathered = _drop_storage_axes(stored)
    if gathered == stored:
        return weight
    # Not the embedding: XLA:TPU all-reduces its gradient (the lookup's scatter-add plus the tied head's) in
    # float32 staged or not, and the staged copy cost 2.3 GiB of temporaries on v5p for 0.7% fewer bytes.
    view = None if "vocab" in names else _FSDP_SPLIT_VIEW.get()
    return _gather_for_use(weight, gathered, stored, torus.first_stage(view, stored) if view else None)


def logical_axes(model: nnx.Module) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Each parameter's path → its logical axis names (from the Param metadata)."""
    return {tuple(str(p) for p in path): tuple(variable.get_metadata()["out_sharding"])
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def check_divisibility(model: nnx.Module, mesh_shape: Mapping[str, int], rules_name: str) -> None:
    """Raises ConfigError, before any compilation, when a dimension does not divide its mesh axes."""
    rules = RULES[rules_name]
    for path, names in logical_axes(model).items():
        shape = _param_at(model, path).get_value().shape
        for dim, (name, axes) in enumerate(zip(names, partition_spec(names, rules))):
            axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = math.prod(mesh_shape[a] for a in axes_tuple)
            if shape[dim] % ways:
                raise ConfigError(
                    f"parameter {'.'.join(path)} dimension {dim} ({name}) has size {shape[dim]}, which does not "
                    f"divide over mesh axes {axes_tuple} of size {ways} (mesh {dict(mesh_shape)}, mesh.rules="
                    f"{rules_name!r}); change the mesh or the rules")


def _param_at(model: nnx.Module, path: tuple[str, ...]) -> nnx.Variable:
    node = model
    for name in path:
        node = getattr(node, name)
    return node


def key_names(path) -> tuple[str, ...]:
    """A pytree key path as plain names (dict keys, attribute names, sequence indices)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_owners(state: Any, params: Any) -> list[tuple[Any, tuple[str, ...] | None]]:
    """Each leaf of an optimizer state with the path of the parameter it belongs to, or None.

    A leaf belongs to a parameter when the parameter's path ends its own path and the shapes agree: that
    is how optax nests per-parameter state (Adam's mu and nu, masked and multi_transform groups alike).
    The rest (step counts, scalars) belongs to no parameter.
    """
    shapes = {key_names(path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    owners = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = key_names(path)
        owners.append((leaf, next((keys[i:] for i in range(len(keys)) if shapes.get(keys[i:]) == leaf.shape), None)))
    return owners


def shard_like_params(state: Any, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs of an optimizer state laid out by construction (ZeRO-3): every leaf that belongs to
    a parameter takes that parameter's sharding, and every other leaf is replicated over `mesh`.

    `params` are ShapeDtypeStructs carrying their shardings. The layout is never left to what the compiler
    picks for `tx.init`'s constants: those depend on no input, and it replicates them.
    """
    sharding_of = {key_names(path): leaf.sharding for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())
    leaves = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_of[owner] if owner else replicated)
              for leaf, owner in state_owners(state, params)]
    return jax.tree.unflatten(jax.tree.structure(state), leaves)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[batch, length] inputs: batch over the data-parallel axes, length over `sequence`."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "sequence"))


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays laid out on the mesh (no gather on one host)."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local.items()}
