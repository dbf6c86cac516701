"""The training loop: a jitted, buffer-donating train step over Orbax-checkpointed, exactly resumable runs.

`train(cfg, workdir)` starts a run, or resumes it from its latest committed checkpoint: parameters,
optimizer state, step counter and every process's data position come back, so a resumed run computes
the same losses and parameters as one that was never interrupted. SIGTERM/SIGINT save and exit
cleanly; a non-finite loss stops the run without saving, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from minicpm_jax import metrics as metrics_lib
from minicpm_jax import optim, sharding
from minicpm_jax.checkpoint import CONFIG_FILE, RunCheckpoints, read_run_config, write_run_config
from minicpm_jax.config import ConfigError, ModelConfig
from minicpm_jax.data.data_config import DataConfig
from minicpm_jax.data.feed import DataFeed
from minicpm_jax.data import records
from minicpm_jax.data.pipeline import iter_eval_batches
from minicpm_jax.model import MiniCPM, causal_lm_loss

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    global_batch_size: int
    seq_len: int
    seed: int = 0
    grad_accum_steps: int = 1
    log_every_steps: int = 10
    eval_every_steps: int = 0
    eval_batches: int = 8
    peak_flops_per_device: float = 0.0

    def __post_init__(self):
        for key in ("steps", "global_batch_size", "seq_len", "grad_accum_steps", "log_every_steps", "eval_batches"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{key} must be a positive integer, got {value!r}")
        if self.eval_every_steps < 0:
            raise ConfigError(f"train.eval_every_steps must be >= 0, got {self.eval_every_steps}")
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps} must divide "
                              f"train.global_batch_size={self.global_batch_size}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 3
    keep_every_steps: int = 0
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1 or self.keep_last < 1 or self.keep_every_steps < 0:
            raise ConfigError(f"checkpoint: every_steps and keep_last must be >= 1 and keep_every_steps >= 0, "
                              f"got {self.every_steps}, {self.keep_last}, {self.keep_every_steps}")


def _section(cls, section: Any, name: str):
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; known: {sorted(known)}")
    return cls(**values)


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
    mesh_config: sharding.MeshConfig
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


def _check_batch_layout(train_cfg: TrainConfig, mesh_shape: dict[str, int]) -> None:
    data_parallel = math.prod(mesh_shape[a] for a in sharding.BATCH_AXES)
    micro_batch = train_cfg.global_batch_size // train_cfg.grad_accum_steps
    if micro_batch % data_parallel:
        raise ConfigError(f"train.global_batch_size={train_cfg.global_batch_size} / train.grad_accum_steps="
                          f"{train_cfg.grad_accum_steps} = {micro_batch} rows per micro-batch do not divide over the "
                          f"{data_parallel} data-parallel devices (mesh data × fsdp)")
    if train_cfg.global_batch_size % jax.process_count():
        raise ConfigError(f"train.global_batch_size={train_cfg.global_batch_size} does not divide over "
                          f"{jax.process_count()} processes")
    if train_cfg.seq_len % mesh_shape["sequence"]:
        raise ConfigError(f"train.seq_len={train_cfg.seq_len} does not divide over mesh.sequence="
                          f"{mesh_shape['sequence']}")


def _with_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs whose shardings name the abstract mesh re-pointed at the concrete `mesh`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, x.sharding.spec)), tree)


def _abstract_opt_state(tx: optax.GradientTransformation, abstract_params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shapes and shardings of the optimizer state, as the compiler lays out `tx.init` (nothing allocated).

    Moments follow their parameters; state that depends on no parameter (the step count) would land on one
    device, so it is replicated over the mesh instead.
    """
    compiled = jax.jit(tx.init).lower(abstract_params).compile()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def on_mesh(shape, where):
        where = where if isinstance(where, jax.sharding.NamedSharding) else replicated
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where)

    return jax.tree.map(on_mesh, jax.eval_shape(tx.init, abstract_params), compiled.output_shardings)


def plan_run(cfg: ml_collections.ConfigDict) -> Plan:
    """Validates every section and builds schedule and optimizer; raises ConfigError naming the key."""
    model_cfg = ModelConfig.from_config(cfg.model)
    train_cfg = _section(TrainConfig, cfg.train, "train")
    checkpoint_cfg = _section(CheckpointConfig, cfg.checkpoint, "checkpoint")
    try:
        data_cfg = DataConfig.from_config(cfg.data)
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    schedule = optim.make_schedule(cfg.schedule, train_cfg.steps)
    decay_start = None
    if cfg.schedule.name == "wsd":
        warmup, stable, decay = optim.resolve_phases(cfg.schedule, train_cfg.steps)
        decay_start = warmup + stable if decay else None

    mesh_cfg = sharding.MeshConfig.from_config(cfg.get("mesh"))
    mesh = sharding.make_mesh(mesh_cfg)
    _check_batch_layout(train_cfg, dict(mesh.shape))
    build = lambda: MiniCPM(model_cfg, rngs=nnx.Rngs(0))
    sharding.check_divisibility(nnx.eval_shape(build), dict(mesh.shape), mesh_cfg.rules)
    with sharding.activate(mesh, mesh_cfg.rules):
        graphdef, state = nnx.split(nnx.eval_shape(build))
    abstract = _with_mesh(nnx.to_pure_dict(state), mesh)
    tx = optim.make_optimizer(cfg.optim, schedule, abstract, model_cfg)
    return Plan(model_cfg, train_cfg, checkpoint_cfg, data_cfg, mesh_cfg, mesh, schedule, decay_start, tx, graphdef,
                abstract, _abstract_opt_state(tx, abstract, mesh), cfg.to_dict())


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, grad_accum_steps: int = 1,
                    layout: StepLayout | None = None) -> Callable:
    """(params, opt_state, batch) -> (params, opt_state, metrics), jitted; params and opt_state are donated.

    params is the model's pure-dict state (`nnx.to_pure_dict`), batch a dict of [B, T] int32 arrays
    (tokens, targets, segment_ids, positions, loss_mask). With grad_accum_steps = k the batch is split
    into k micro-batches whose token-summed losses and gradients are accumulated in a scan, then
    divided by the total token count: the update equals that of the whole batch at once, in 1/k of
    the activation memory. `layout` pins inputs and outputs to their mesh shardings.
    """
    accum = grad_accum_steps

    def summed_loss(params, micro):
        logits = nnx.merge(graphdef, params)(micro["tokens"], segment_ids=micro["segment_ids"],
                                              positions=micro["positions"])
        mean, count = causal_lm_loss(logits, micro["targets"], micro["loss_mask"])
        return mean * count, count

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def train_step(params, opt_state, batch):
        # Strided split: micro-batch i takes rows i, i+k, ...; each device keeps its own rows in every micro-batch.
        micro_batches = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, micro):
            (loss_sum, count), grads = grad_fn(params, micro)
            total_loss, total_count, total_grads = carry
            return (total_loss + loss_sum, total_count + count, jax.tree.map(jnp.add, total_grads, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, count, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro_batches)
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss_sum / jnp.maximum(count, 1.0), "grad_norm": optax.tree.norm(grads),
                                   "tokens": count}

    if layout is None:
        return jax.jit(train_step, donate_argnums=(0, 1))
    batch_layout = {key: layout.batch for key in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    return jax.jit(train_step, donate_argnums=(0, 1), in_shardings=(layout.params, layout.opt_state, batch_layout),
                   out_shardings=(layout.params, layout.opt_state, layout.replicated))


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """(params, batch) -> (summed token loss, token count), jitted."""

    def eval_step(params, batch):
        logits = nnx.merge(graphdef, params)(batch["tokens"], segment_ids=batch["segment_ids"],
                                              positions=batch["positions"])
        mean, count = causal_lm_loss(logits, batch["targets"], batch["loss_mask"])
        return mean * count, count

    return jax.jit(eval_step)


def evaluate(plan: Plan, eval_step: Callable, params: Any) -> dict[str, float]:
    """Mean loss and bits per byte over the first `train.eval_batches` batches of `data.val_dir`.

    Every process runs the same number of steps (collectives must match): a host whose share of the
    held-out data runs out contributes all-padding rows, which carry no loss.
    """
    loss_sum, count = 0.0, 0.0
    batches = iter_eval_batches(plan.data.val_dir, plan.train.seq_len, plan.train.global_batch_size)
    local_rows = plan.train.global_batch_size // jax.process_count()
    padding = {key: np.zeros((local_rows, plan.train.seq_len), np.int32) for key in
               ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    for _ in range(plan.train.eval_batches):
        batch = next(batches, padding)
        batch_loss, batch_count = eval_step(params, sharding.global_batch(batch, plan.mesh))
        loss_sum, count = loss_sum + float(batch_loss), count + float(batch_count)
    loss = loss_sum / max(count, 1.0)
    bytes_per_token = records.read_manifest(plan.data.val_dir)["bytes_per_token"]
    return {"eval_loss": loss, "eval_bits_per_byte": loss / math.log(2) / bytes_per_token}


class _LogWindow:
    """Training metrics summed on the device between log lines (no host sync per step), then averaged.

    The logged loss and grad norm are means over the steps since the previous log line (after a resume:
    since the resume), which is far less noisy than one step's value.
    """

    def __init__(self):
        self.restart_clock()
        self._loss = self._grad_norm = 0.0
        self._steps = self._tokens = 0

    def restart_clock(self) -> None:
        self._start = time.perf_counter()
        self._tokens = 0

    def add(self, step_metrics: dict[str, jax.Array], tokens: int) -> None:
        self._loss = self._loss + step_metrics["loss"]
        self._grad_norm = self._grad_norm + step_metrics["grad_norm"]
        self._steps += 1
        self._tokens += tokens

    def flush(self) -> tuple[float, float, float]:
        """(mean loss, mean grad norm, tokens per second) of the window, then starts a new one."""
        loss, grad_norm = float(self._loss) / self._steps, float(self._grad_norm) / self._steps
        tokens_per_sec = self._tokens / (time.perf_counter() - self._start)
        self.__init__()
        return loss, grad_norm, tokens_per_sec


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (save, then exit cleanly)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prepare_workdir(workdir: str, cfg: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The config to train `workdir` with.

    A new run records `cfg`. An existing run resumes with its own config; a different `cfg` is an error,
    except in the `mesh` section (a run may resume on other hardware) and for a weights-only run
    (import-hf, upcycle), which takes `cfg`'s training settings and keeps its own model section.
    Only process 0 writes config.json.
    """
    writer = jax.process_index() == 0
    if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        if cfg is None:
            raise ConfigError(f"{workdir} is not a run yet: give --config to start one")
        plan_run(cfg)  # fail on a bad config before the run directory is created
        if writer:
            write_run_config(workdir, cfg)
        return cfg
    stored = read_run_config(workdir)
    if cfg is None:
        return stored
    if "train" not in stored:
        cfg.model = stored.model
        plan_run(cfg)
        if writer:
            write_run_config(workdir, cfg)
        return cfg
    differing = [key for key in _differing_keys(cfg.to_dict(), stored.to_dict()) if not key.startswith("mesh.")]
    if differing:
        raise ConfigError(f"{workdir} already holds a run with another config (differs at {', '.join(differing[:5])}); "
                          f"resume it without --config, or start a new --workdir")
    return cfg


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differing_keys(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(prefix + key)
    return keys


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the run in `workdir` to `train.steps`. Returns the last logged metrics."""
    plan = plan_run(cfg)
    log.info("mesh %s with %s rules over %d devices in %d process(es)", dict(plan.mesh.shape),
             plan.mesh_config.rules, jax.device_count(), jax.process_count())
    checkpoints = RunCheckpoints(workdir, plan.checkpoint.keep_last, plan.checkpoint.keep_every_steps,
                                 plan.checkpoint.async_save)
    feed = DataFeed(plan.data, plan.phase_of_step, plan.train.seq_len, plan.train.global_batch_size)
    writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    try:
        with plan.activate():
            return _run(plan, workdir, checkpoints, feed, writer)
    finally:
        feed.close()
        checkpoints.close()
        writer.close()


def _initial_state(plan: Plan, checkpoints: RunCheckpoints, feed: DataFeed) -> tuple[int, Any, Any, dict[str, Any]]:
    """(step, params, opt_state, lineage) from the latest checkpoint, or freshly initialised."""
    latest = checkpoints.latest_step()
    init_opt_state = jax.jit(plan.tx.init, out_shardings=plan.layout().opt_state)
    if latest is None:
        model = MiniCPM(plan.model, rngs=nnx.Rngs(plan.train.seed))  # born sharded: we are inside plan.activate()
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        feed.restore(0, None)
        return 0, params, init_opt_state(params), {}
    meta = checkpoints.restore_meta(latest)
    lineage = {"parent": meta["parent"]} if meta.get("parent") else {}
    if meta.get("phase") == "imported":  # weights only (import-hf, upcycle): fresh optimizer and data
        params = checkpoints.restore_params(latest, plan.abstract_params)
        feed.restore(latest, None)
        log.info("starting from the imported weights of step %d", latest)
        return latest, params, init_opt_state(params), lineage
    # The targets carry this run's shardings, so a checkpoint saved on another mesh restores onto this one.
    restored = checkpoints.restore(latest, plan.abstract_params, plan.abstract_opt_state)
    feed.restore(latest, restored.data_state)
    log.info("resuming from step %d of %s", latest, checkpoints.workdir)
    return latest, restored.params, restored.opt_state, lineage


def _run(plan: Plan, workdir: str, checkpoints: RunCheckpoints, feed: DataFeed,
         writer: metrics_lib.MetricsWriter) -> dict[str, Any]:
    train_cfg, ckpt_cfg = plan.train, plan.checkpoint
    step, params, opt_state, lineage = _initial_state(plan, checkpoints, feed)
    writer.truncate_after(step)
    if step >= train_cfg.steps:
        log.info("run %s is already complete at step %d", workdir, step)
        return {}
    train_step = make_train_step(plan.graphdef, plan.tx, train_cfg.grad_accum_steps, plan.layout())
    eval_step = make_eval_step(plan.graphdef)
    flops_per_token = metrics_lib.train_flops_per_token(plan.model, train_cfg.seq_len)
    peak = metrics_lib.peak_flops_per_device(train_cfg.peak_flops_per_device) * jax.device_count()

    def save(at_step: int, last_loss: jax.Array) -> None:
        if not math.isfinite(float(last_loss)):  # never let a diverged state become the latest checkpoint
            raise FloatingPointError(f"loss is {float(last_loss)} at step {at_step}; not saving. The last good "
                                     f"checkpoint is step {checkpoints.latest_step()}")
        checkpoints.save(at_step, params, opt_state, feed.state(),
                         {"phase": plan.phase_of_step(at_step - 1), "config": plan.resolved_config, **lineage})

    last: dict[str, Any] = {}
    window = _LogWindow()
    with _StopRequest() as stop:
        log.info("training %s from step %d to %d (%s)", workdir, step, train_cfg.steps,
                 f"{train_cfg.global_batch_size}x{train_cfg.seq_len} tokens per step")
        while step < train_cfg.steps:
            batch = sharding.global_batch(feed.next_batch(step), plan.mesh)
            params, opt_state, step_metrics = train_step(params, opt_state, batch)
            step += 1
            window.add(step_metrics, train_cfg.global_batch_size * train_cfg.seq_len)

            if step % train_cfg.log_every_steps == 0 or step == train_cfg.steps:
                loss, grad_norm, tokens_per_sec = window.flush()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                                             f"is step {checkpoints.latest_step()}")
                bytes_per_token = feed.bytes_per_token()
                last = {"loss": loss, "loss_per_byte": loss / bytes_per_token,
                        "bits_per_byte": loss / math.log(2) / bytes_per_token, "lr": float(plan.schedule(step - 1)),
                        "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                        "phase": plan.phase_of_step(step - 1)}
                if peak:
                    last["mfu"] = tokens_per_sec * flops_per_token / peak
                writer.write(step, last)
                log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s%s", step, train_cfg.steps,
                         loss, last["lr"], grad_norm, tokens_per_sec, f"  MFU {last['mfu']:.1%}" if peak else "")

            if train_cfg.eval_every_steps and plan.data.val_dir and step % train_cfg.eval_every_steps == 0:
                results = evaluate(plan, eval_step, params)
                writer.write(step, results)
                log.info("step %d  eval_loss %.4f  eval_bits_per_byte %.4f", step, results["eval_loss"],
                         results["eval_bits_per_byte"])
                window.restart_clock()  # evaluation time is not training throughput

            keep = ckpt_cfg.keep_every_steps and step % ckpt_cfg.keep_every_steps == 0
            if step % ckpt_cfg.every_steps == 0 or keep or step == train_cfg.steps or stop.signal_name:
                save(step, step_metrics["loss"])
            if stop.signal_name:
                checkpoints.wait()
                log.warning("%s received: saved step %d and stopped; run `train --workdir %s` to resume",
                            stop.signal_name, step, workdir)
                break
    checkpoints.wait()
    return last
