"""A run's plan: every config section validated, and the mesh, schedule, optimizer and shapes built from them.

`plan_run(cfg)` is the first thing `train` and `branch` do, so a bad config (a key, a phase that does not
fit, a dimension that does not divide its mesh axes) fails here, naming the key, before any compute.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import ml_collections
import optax
from flax import nnx

from minicpm_jax import optim
from minicpm_jax.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    typed_section,
)
from minicpm_jax.data import records
from minicpm_jax.model import MiniCPM
from minicpm_jax.parallel import mesh as sharding


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Where the train step's inputs and outputs live on the mesh (so donated buffers are reused in place)."""

    params: Any
    opt_state: Any
    batch: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding


@dataclasses.dataclass
class Plan:
    """Everything the loop needs, built and validated before any compute."""

    model: ModelConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    data: DataConfig
    mesh_config: MeshConfig
    mesh: jax.sharding.Mesh
    schedule: optax.Schedule
    decay_start: int | None
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    abstract_params: Any  # ShapeDtypeStructs with this mesh's shardings: restore targets
    abstract_opt_state: Any
    resolved_config: dict[str, Any]  # stored in every checkpoint's metadata

    def phase_of_step(self, step: int) -> str:
        return "decay" if self.decay_start is not None and step >= self.decay_start else "stable"

    def layout(self) -> StepLayout:
        shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
        return StepLayout(shardings(self.abstract_params), shardings(self.abstract_opt_state),
                          sharding.batch_sharding(self.mesh),
                          jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    def activate(self):
        """Context in which the mesh and its logical rules are current (parameters are born sharded)."""
        return sharding.activate(self.mesh, self.mesh_config.rules)


def _check_vocabulary(model_cfg: ModelConfig, data_cfg: DataConfig) -> None:
    """Every prepared folder's token ids fit the embedding: an id past model.vocab_size would read no row of it
    (and train to NaN), so refuse before any compute."""
    folders = {path for mixture in data_cfg.mixtures.values() for path, _ in mixture}
    for folder in sorted(folders | ({data_cfg.val_dir} if data_cfg.val_dir else set())):
        vocab = records.read_manifest(folder).get("tokenizer", {}).get("vocab_size")
        if vocab is not None and vocab > model_cfg.vocab_size:
            raise ConfigError(f"{folder} was tokenized with a {vocab}-token vocabulary, but model.vocab_size="
                              f"{model_cfg.vocab_size}: ids {model_cfg.vocab_size}..{vocab - 1} have no embedding "
                              f"(set model.vocab_size >= {vocab})")


def _check_batch_layout(train_cfg: TrainConfig, data_cfg: DataConfig, mesh_shape: dict[str, int]) -> None:
    data_parallel = math.prod(mesh_shape[a] for a in sharding.BATCH_AXES)
    micro_batch = train_cfg.global_batch_size // train_cfg.grad_accum_steps
    if micro_batch % data_parallel:
        raise ConfigError(f"train.global_batch_size={train_cfg.global_batch_size} / train.grad_accum_steps="
                          f"{train_cfg.grad_accum_steps} = {micro_batch} rows per micro-batch do not divide over the "
                          f"{data_parallel} data-parallel devices (mesh data × fsdp)")
    if train_cfg.eval_batch_size and train_cfg.eval_batch_size % (data_parallel * jax.process_count()):
        raise ConfigError(f"train.eval_batch_size={train_cfg.eval_batch_size} does not divide over the "
                          f"{data_parallel} data-parallel devices (mesh data × fsdp) and {jax.process_count()} "
                          f"process(es)")
    if train_cfg.global_batch_size % jax.process_count():
        raise ConfigError(f"train.global_batch_size={train_cfg.global_batch_size} does not divide over "
                          f"{jax.process_count()} processes")
    for key, length in [("train.seq_len", train_cfg.seq_len)] + [(f"data.seq_lens.{p}", n)
                                                                 for p, n in data_cfg.seq_lens.items()]:
        if length % mesh_shape["sequence"]:
            raise ConfigError(f"{key}={length} does not divide over mesh.sequence={mesh_shape['sequence']}")


def _with_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs whose shardings name the abstract mesh re-pointed at the concrete `mesh`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, x.sharding.spec)), tree)


def plan_run(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
             check_data: bool = True) -> Plan:
    """Validates every section and builds schedule and optimizer; raises ConfigError naming the key.

    The mesh spans `devices` (default: every device of the job); an ahead-of-time compile passes a TPU
    topology's devices, and check_data=False, since it reads no data.
    """
    model_cfg = ModelConfig.from_config(cfg.model)
    train_cfg = typed_section(TrainConfig, cfg.train, "train")
    checkpoint_cfg = typed_section(CheckpointConfig, cfg.checkpoint, "checkpoint")
    try:
        data_cfg = DataConfig.from_config(cfg.data, check_paths=check_data)
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    if check_data:
        _check_vocabulary(model_cfg, data_cfg)
    schedule = optim.make_schedule(cfg.schedule, train_cfg.steps)
    decay_start = optim.decay_start(cfg.schedule, train_cfg.steps)

    mesh_cfg = MeshConfig.from_config(cfg.get("mesh"))
    mesh = sharding.make_mesh(mesh_cfg, devices)
    _check_batch_layout(train_cfg, data_cfg, dict(mesh.shape))
    build = lambda: MiniCPM(model_cfg, rngs=nnx.Rngs(0))
    sharding.check_divisibility(nnx.eval_shape(build), dict(mesh.shape), mesh_cfg.rules)
    with sharding.activate(mesh, mesh_cfg.rules):
        graphdef, state = nnx.split(nnx.eval_shape(build))
    abstract = _with_mesh(nnx.to_pure_dict(state), mesh)
    tx = optim.make_optimizer(cfg.optim, schedule, abstract, model_cfg)
    opt_state = sharding.shard_like_params(jax.eval_shape(tx.init, abstract), abstract, mesh)
    return Plan(model_cfg, train_cfg, checkpoint_cfg, data_cfg, mesh_cfg, mesh, schedule, decay_start, tx, graphdef,
                abstract, opt_state, cfg.to_dict())
