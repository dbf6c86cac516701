"""Ahead-of-time compilation of a run's real step for a TPU topology, on any machine (no TPU needed).

libtpu (the `aot` extra) carries the XLA:TPU compiler; `jax.experimental.topologies` describes the chips
of a pod slice without hardware. `compile_step(cfg, "v5e:8x8")` builds the step exactly as `train` does
(`plan_run` with the topology's devices, the same mesh, rules, optimizer and shardings, the task's loss),
lowers it on abstract inputs laid out on that mesh and compiles it. The result holds what the TPU
compiler says one chip needs (arguments, outputs, aliased and temporary bytes), the compile time, and
the collectives of one step (`hlo_collectives`), against the FSDP minimum.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from minicpm_jax.config import ConfigError
from minicpm_jax.parallel import devices, hlo_collectives
from minicpm_jax.parallel import mesh as sharding
from minicpm_jax.parallel.tpu_flags import TPU_COMPILER_OPTIONS
from minicpm_jax.run.plan import Plan, plan_run

TASKS = ("train", "sft", "dpo", "decode")


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """What the TPU compiler says about one step on one chip of `topology`."""

    topology: str
    num_slices: int
    task: str
    device_kind: str
    num_devices: int
    mesh_shape: dict[str, int]
    hbm_bytes: int  # one chip's memory
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated argument buffers
    temp_bytes: int
    compile_seconds: float
    collectives: hlo_collectives.Report
    fsdp_minimum_bytes: int  # 0 where the mesh has no FSDP

    @property
    def total_bytes(self) -> int:
        """Peak bytes of the step on one chip: arguments, outputs not aliased to them, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def headroom(self) -> float:
        """Fraction of the chip's memory left free (negative: it does not fit)."""
        return 1.0 - self.total_bytes / self.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes


class StepDoesNotFit(RuntimeError):
    """XLA:TPU refused the step: it needs more memory than one chip has (the compiler's own numbers)."""


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
    """The devices of `num_slices` slices of a TPU topology such as "v5e:8x8" or "v5p:4x4x4"."""
    # libtpu takes a machine-wide lock unless told otherwise; compiling needs no chip, so several processes
    # (parallel tests, a compile beside a notebook) may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401  (only to give a clear error where it is missing)
    except ImportError:
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install 'minicpm-jax[aot]' "
                           "(`make test` installs it)") from None
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices)
    except Exception as err:  # libtpu raises XlaRuntimeError for a bad name
        raise ConfigError(f"--topology {topology!r}: {err}. Use a name like v5e:8x8, v5p:4x4x4, v4:2x2x2") from err
    return list(description.devices)


def hbm_bytes(device_kind: str) -> int:
    """One chip's memory (the device table, parallel/devices.py), by jax device kind."""
    device = devices.from_kind(device_kind)
    if device is None or device.hbm_bytes is None:
        raise ConfigError(f"no memory size known for TPU device kind {device_kind!r}")
    return device.hbm_bytes


def _longest_seq_len(plan: Plan) -> int:
    """The longest sequence any phase trains on (a length curriculum compiles its decay length)."""
    return max(plan.data.seq_len(phase, plan.train.seq_len) for phase in ("stable", "decay"))


def _task_step(plan: Plan, cfg: ml_collections.ConfigDict, task: str):
    """(the `lower` of the jitted step, its abstract arguments) for `task`, built by the code paths training
    uses."""
    from minicpm_jax.data.pipeline import BATCH_KEYS
    from minicpm_jax.train import loop as train

    layout = plan.layout()
    rows, length = plan.train.global_batch_size, _longest_seq_len(plan)

    def batch(keys, shape=None):
        return {key: jax.ShapeDtypeStruct(shape or (rows, length), jnp.int32, sharding=layout.batch) for key in keys}

    if task in ("train", "sft"):  # SFT is language modelling with the chat data's loss masks: the same step
        step = train.make_train_step(plan.graphdef, plan.tx, plan.train.grad_accum_steps, layout)
        return step.lower, (plan.abstract_params, plan.abstract_opt_state, batch(BATCH_KEYS))
    if task == "dpo":
        from minicpm_jax.align import dpo

        dpo_task = dpo.dpo_task(cfg)
        frozen = (plan.abstract_params,) if dpo.dpo_config(cfg).reference == "online" else ()
        step = train.make_train_step(plan.graphdef, plan.tx, plan.train.grad_accum_steps, layout, dpo_task.loss_fn,
                                     dpo_task.batch_keys, jax.tree.map(lambda x: x.sharding, frozen))
        inputs = batch(dpo.SEQUENCE_KEYS) | batch([k for k in dpo_task.batch_keys if k not in dpo.SEQUENCE_KEYS],
                                                   (rows, 1))
        return step.lower, (plan.abstract_params, plan.abstract_opt_state, inputs, *frozen)
    return _decode_step(plan, rows, length)


def _decode_step(plan: Plan, rows: int, slots: int):
    """One single-token generation step over a KV cache of `slots` slots, as `generate` runs it."""
    from minicpm_jax.infer import generate
    from minicpm_jax.model import kv_cache

    cache = jax.eval_shape(lambda: kv_cache.init_cache(plan.model, rows, slots))
    rules = sharding.RULES[plan.mesh_config.rules]
    spec = lambda names: NamedSharding(plan.mesh, sharding.partition_spec(names, rules))
    # [L, B, K, S, H]: rows over the data-parallel axes, kv heads over tensor.
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec(
        ("layers", "act_batch", "kv_heads", None, "head_dim") if x.ndim == 5 else (None,) * x.ndim)), cache)
    rows_spec = spec(("act_batch",))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=spec(()))
    args = (plan.graphdef, plan.abstract_params, jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rows_spec), cache,
            scalar(jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rows_spec),
            jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=spec(())),
            jax.ShapeDtypeStruct((3,), jnp.float32, sharding=spec((None,))))
    return (lambda *a: generate._step.lower(*a, greedy=True)), args  # greedy: the static sampling branch


def fsdp_minimum_bytes(plan: Plan, task: str) -> int:
    """The bytes one device must send per step for FSDP, in `hlo_collectives`' ring units: per micro-batch,
    every fsdp-split weight is gathered twice (forward, and again for the backward) and its gradient
    reduce-scattered once, all in the compute dtype and each over the n devices of the fsdp axis, of which
    a device sends (n-1)/n; one gather (forward only) for decoding. 0 without an fsdp axis."""
    ways = plan.mesh.shape["fsdp"]
    if ways == 1:
        return 0
    compute = jnp.dtype(plan.model.dtype).itemsize
    split = [x for x in jax.tree.leaves(plan.abstract_params) if "fsdp" in jax.tree.leaves(tuple(x.sharding.spec))]
    weight_bytes = sum(x.size for x in split) * compute * (ways - 1) // ways
    if task == "decode":
        return weight_bytes
    return plan.train.grad_accum_steps * weight_bytes * 3


def compile_step(cfg: ml_collections.ConfigDict, topology: str, num_slices: int = 1, task: str = "train",
                 dump_hlo: str | None = None) -> CompiledStep:
    """AOT-compiles `task`'s step of `cfg` for `num_slices` slices of `topology` and reads the result."""
    if task not in TASKS:
        raise ConfigError(f"--task {task!r} must be one of {TASKS}")
    devices = topology_devices(topology, num_slices)
    plan = plan_run(cfg, devices, check_data=False)
    if plan.mesh_config.num_slices != num_slices:
        raise ConfigError(f"the config's mesh has mesh.dcn_data × mesh.dcn_fsdp = {plan.mesh_config.num_slices} "
                          f"slices, but --num-slices is {num_slices}")
    with plan.activate():
        lower, args = _task_step(plan, cfg, task)
        started = time.perf_counter()
        lowered = lower(*args)
        try:
            compiled = lowered.compile(compiler_options=TPU_COMPILER_OPTIONS)
        except jax.errors.JaxRuntimeError as err:  # XLA:TPU stops at the first allocation it cannot place
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            raise StepDoesNotFit(f"the {task} step does not fit one chip of {topology}: "
                                 f"{str(err).splitlines()[0].removeprefix('RESOURCE_EXHAUSTED: ')}") from None
        seconds = time.perf_counter() - started
    hlo = compiled.as_text()
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, f"{task}_step.hlo.txt"), "w") as f:
            f.write(hlo)
    memory = compiled.memory_analysis()
    return CompiledStep(topology, num_slices, task, devices[0].device_kind, len(devices), dict(plan.mesh.shape),
                        hbm_bytes(devices[0].device_kind), memory.argument_size_in_bytes,
                        memory.output_size_in_bytes, memory.alias_size_in_bytes, memory.temp_size_in_bytes,
                        seconds, hlo_collectives.collectives(hlo, len(devices)), fsdp_minimum_bytes(plan, task))
