"""The training loop: a jitted, buffer-donating train step over Orbax-checkpointed, exactly resumable runs.

`train(cfg, workdir)` starts a run, or resumes it from its latest committed checkpoint: parameters,
optimizer state, step counter and every process's data position come back, so a resumed run computes
the same losses and parameters as one that was never interrupted. SIGTERM, SIGINT or a preemption
notice on any process makes every process save the same step and raise TrainingStopped, after which
the CLI exits 0 (step_decisions.py). A non-finite loss stops the run without saving, so the last good
checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from minicpm_jax import storage
from minicpm_jax.config import ConfigError
from minicpm_jax.data.feed import Feed
from minicpm_jax.data.pipeline import BATCH_KEYS, iter_eval_batches
from minicpm_jax.eval.evaluate import bits_per_byte, evaluate_prepared
from minicpm_jax.model import MiniCPM
from minicpm_jax.optim import update_stats
from minicpm_jax.parallel import mesh as sharding
from minicpm_jax.run import extend, inputs
from minicpm_jax.run.checkpoint import (
    CONFIG_FILE,
    CheckpointMeta,
    RunCheckpoints,
    is_run,
    read_run_config,
    run_lock,
    write_run_config,
)
from minicpm_jax.run.derive import WEIGHTS_ONLY_RUN, derive_config
from minicpm_jax.run.plan import Plan, plan_run
from minicpm_jax.train import metrics as metrics_lib
from minicpm_jax.train.health import DeadRunDetector
from minicpm_jax.train.progress import RunProgress
from minicpm_jax.train.step import Task, lm_loss, make_eval_step, make_train_step
from minicpm_jax.train.step_decisions import SaveTimer, StopRequests, TrainingStopped

log = logging.getLogger(__name__)


def evaluate(plan: Plan, eval_step: Callable, params: Any) -> dict[str, float]:
    """Mean loss and bits per byte over the first `train.eval_batches` batches of `data.val_dir`.

    The same computation as `minicpm-jax eval` (evaluate.evaluate_prepared); every process runs the same
    number of steps, as collectives must match. Batches hold train.eval_batch_size rows (0: the training batch's).
    """
    result = evaluate_prepared(eval_step, params, plan.data.val_dir, plan.train.seq_len, eval_batch_size(plan.train),
                               num_batches=plan.train.eval_batches,
                               place=lambda batch: sharding.global_batch(batch, plan.mesh))
    return {"eval_loss": result["loss"], "eval_bits_per_byte": result["bits_per_byte"]}


def _probe_stats(plan: Plan, task: Task) -> Callable[[Any, Any], dict[str, float]]:
    """(x_t, x_t+1) -> the decay-dynamics statistics on the fixed probe batch (optim/update_stats.py).

    The probe is the first train.update_stats_probe_batches evaluation batches of data.val_dir, read once:
    held out from training, and the same tokens at every logged step (and after a resume).
    """
    if not plan.data.val_dir:
        raise ConfigError("train.log_update_stats=True needs data.val_dir: the statistics are computed on a fixed "
                          "probe batch of held-out tokens")
    if task.loss_fn is not lm_loss:
        raise ConfigError("train.log_update_stats=True supports language-modelling runs only (its probe is a "
                          "batch of data.val_dir)")
    rows = eval_batch_size(plan.train) // jax.process_count()
    padding = {key: np.zeros((rows, plan.train.seq_len), np.int32) for key in BATCH_KEYS}
    batches = iter_eval_batches(plan.data.val_dir, plan.train.seq_len, eval_batch_size(plan.train))
    taken = [next(batches, padding) for _ in range(plan.train.update_stats_probe_batches)]
    probe = sharding.global_batch({key: np.concatenate([b[key] for b in taken]) for key in BATCH_KEYS}, plan.mesh)
    stats_fn = update_stats.make_probe_stats(plan.graphdef, lm_loss)
    return lambda before, after: update_stats.read_stats(stats_fn(before, after, probe))


def eval_batch_size(train_cfg: Any) -> int:
    return train_cfg.eval_batch_size or train_cfg.global_batch_size


def prepare_workdir(workdir: str, cfg: ml_collections.ConfigDict | None, overrides: Sequence[str] = (),
                    allow_data_change: bool = False) -> ml_collections.ConfigDict:
    """The config to train `workdir` with.

    A new run records `cfg`. An existing run resumes with its own config; a different `cfg` is an error,
    except in the `mesh` section (a run may resume on other hardware), in train.steps and the schedule's
    phases where the change continues the run exactly (a longer stable phase, extend.py), and for a
    weights-only run (import-hf), which is derived from its stored model and `cfg` by derive.py's rule: the
    stored shape and μP scalars, `cfg`'s compute settings and other sections. `overrides` are the --config.*
    overrides applied to `cfg`: of its model keys only they can state a shape (derive.py). Only process 0
    writes config.json.
    """
    writer = jax.process_index() == 0
    if not is_run(workdir):
        if cfg is None:
            raise ConfigError(f"{workdir} is not a run yet: give --config to start one")
        plan_run(cfg)  # fail on a bad config before the run directory is created
        if writer:
            write_run_config(workdir, cfg)
        return cfg
    stored = read_run_config(workdir)
    inputs.check_data_sources(workdir, stored if cfg is None else cfg, allow_change=allow_data_change, writer=writer)
    if cfg is not None and "train" not in stored:
        cfg = derive_config(stored, cfg, WEIGHTS_ONLY_RUN, overrides)
        plan_run(cfg)
        if writer:
            write_run_config(workdir, cfg)
        return cfg
    # Compared as JSON, the form config.json stores (a tuple there reads back as a list).
    as_json = lambda c: json.loads(json.dumps(c.to_dict()))
    differing = [] if cfg is None else [
        key for key in _differing_keys(as_json(cfg), as_json(stored)) if not key.startswith("mesh.")
        and not (key == "data.tokenizer" and _same_file(cfg.data.tokenizer, stored.data.tokenizer))]
    if set(differing) - set(extend.EXTENSION_KEYS):
        raise ConfigError(f"{workdir} already holds a run with another config (differs at "
                          f"{', '.join(differing[:5])}); resume it without --config, or start a new --workdir"
                          f"{extend.extend_hint(workdir, differing)}")
    cfg = stored if cfg is None else cfg
    try:
        extend.check_continuation(workdir, cfg)  # even unchanged: config.json may be newer than the latest checkpoint
    except ConfigError as err:
        changed = f"a config that differs at {', '.join(differing)}" if differing else f"its {CONFIG_FILE}"
        hint = "" if isinstance(err, extend.DecayStartedError) else extend.extend_hint(workdir, differing)
        raise ConfigError(f"{workdir} cannot resume with {changed}: {err}{hint}") from None
    if differing:
        plan_run(cfg)
        if writer:
            write_run_config(workdir, cfg)
        log.info("%s resumes with %s changed: the steps already trained keep their lr and data", workdir,
                 ", ".join(differing))
    return cfg


def _same_file(a: str, b: str) -> bool:
    """Whether two tokenizer paths hold the same bytes: the run's own copy (inputs.py) stands for the original."""
    return bool(a and b) and storage.is_file(a) and storage.is_file(b) and storage.sha256(a) == storage.sha256(b)


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differing_keys(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(prefix + key)
    return keys


def train(cfg: ml_collections.ConfigDict, workdir: str, task: Task = Task()) -> dict[str, Any]:
    """Runs (or resumes) the run in `workdir` to `train.steps` on `task`. Returns the last logged metrics.

    Process 0 holds RUN/train.lock throughout, so a second job started on the same run directory stops
    at once, before it writes anything.
    """
    with run_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        plan = plan_run(cfg)
        log.info("mesh %s with %s rules over %d devices in %d process(es)", dict(plan.mesh.shape),
                 plan.mesh_config.rules, jax.device_count(), jax.process_count())
        checkpoints = RunCheckpoints(workdir, plan.checkpoint.keep_last, plan.checkpoint.keep_every_steps,
                                     plan.checkpoint.async_save, plan.checkpoint.every_steps)
        feed = task.make_feed(plan, workdir)
        writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0, config=plan.resolved_config,
                                           wandb_project=plan.train.wandb_project)
        try:
            with plan.activate():
                return _run(plan, workdir, checkpoints, feed, writer, task)
        finally:
            feed.close()
            checkpoints.close()
            writer.close()


def _initial_state(plan: Plan, checkpoints: RunCheckpoints,
                   feed: Feed) -> tuple[int, Any, Any, dict[str, Any] | None, dict[str, Any] | None]:
    """(step, params, opt_state, parent, progress) from the newest checkpoint that restores, or freshly
    initialised (progress: the saved `RunProgress.state`, None for a fresh run or imported weights)."""
    init_opt_state = jax.jit(plan.tx.init, out_shardings=plan.layout().opt_state)
    # The targets carry this run's shardings, so a checkpoint saved on another mesh restores onto this one.
    restored = checkpoints.restore_latest_readable(plan.abstract_params, plan.abstract_opt_state)
    if restored is None:
        model = MiniCPM(plan.model, rngs=nnx.Rngs(plan.train.seed))  # born sharded: we are inside plan.activate()
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        feed.restore(0, None)
        return 0, params, init_opt_state(params), None, None
    parent = restored.meta.parent or None
    feed.restore(restored.step, restored.data_state)  # None for imported weights: the data starts afresh
    if restored.opt_state is None:  # weights only (import-hf, upcycle): a fresh optimizer
        log.info("starting from the imported weights of step %d", restored.step)
        return restored.step, restored.params, init_opt_state(restored.params), parent, None
    log.info("resuming from step %d of %s", restored.step, checkpoints.workdir)
    return restored.step, restored.params, restored.opt_state, parent, restored.meta.progress


def _run(plan: Plan, workdir: str, checkpoints: RunCheckpoints, feed: Feed,
         writer: metrics_lib.MetricsWriter, task: Task) -> dict[str, Any]:
    train_cfg, ckpt_cfg = plan.train, plan.checkpoint
    step, params, opt_state, parent, saved_progress = _initial_state(plan, checkpoints, feed)
    writer.truncate_after(step)
    if step >= train_cfg.steps:
        log.info("run %s is already complete at step %d", workdir, step)
        return {}
    frozen = task.frozen(plan, workdir)
    train_step = make_train_step(plan.graphdef, plan.tx, train_cfg.grad_accum_steps, plan.layout(), task.loss_fn,
                                 task.batch_keys, jax.tree.map(lambda x: x.sharding, frozen))
    eval_step = make_eval_step(plan.graphdef)
    probe_stats = _probe_stats(plan, task) if train_cfg.log_update_stats else None
    flops_per_token = metrics_lib.train_flops_per_token(plan.model, train_cfg.seq_len)
    peak = metrics_lib.total_peak_flops(train_cfg.peak_flops_per_device)

    def save(at_step: int, last_loss: jax.Array) -> None:
        if not math.isfinite(float(last_loss)):  # never let a diverged state become the latest checkpoint
            raise FloatingPointError(f"loss is {float(last_loss)} at step {at_step}; not saving. {last_good()}")
        meta = CheckpointMeta(at_step, plan.phase_of_step(at_step - 1), weights_only=False,
                              config=plan.resolved_config, parent=parent, progress=progress.state(),
                              data_sources=data_sources)
        writer.flush()  # every step the checkpoint holds has its metrics line, on object storage too
        checkpoints.save(at_step, params, opt_state, feed.state(), meta)

    last: dict[str, Any] = {}
    progress = RunProgress(train_cfg.steps, saved_progress)
    dead_run = DeadRunDetector(plan.model.vocab_size, train_cfg.dead_run_windows)

    def last_good() -> str:
        # Every checkpoint restored or saved here verified and had a finite loss (save refuses any other).
        latest = checkpoints.latest_step()
        return (f"The last good checkpoint is step {latest}" if latest is not None
                else "No checkpoint was saved yet")

    data_sources = inputs.manifest_digests(ml_collections.ConfigDict(plan.resolved_config))
    timer = SaveTimer(ckpt_cfg.every_minutes)
    with StopRequests() as stop_requests:
        log.info("training %s from step %d to %d (%s)", workdir, step, train_cfg.steps,
                 f"{train_cfg.global_batch_size}x{train_cfg.seq_len} tokens per step")
        while step < train_cfg.steps:
            checkpoints.raise_if_save_failed()
            batch = sharding.global_batch(feed.next_batch(step), plan.mesh)
            logged = (step + 1) % train_cfg.log_every_steps == 0 or step + 1 == train_cfg.steps
            # x_t for the decay-dynamics statistics of this step (the train step donates params)
            before = jax.tree.map(jnp.copy, params) if probe_stats and logged else None
            params, opt_state, step_metrics = train_step(params, opt_state, batch, *frozen)
            step += 1
            # Every sequence of the batch (DPO: chosen and rejected), at this phase's length (data.seq_lens).
            progress.add(step_metrics, sum(array.size for key, array in batch.items() if key.endswith("tokens")))

            if logged:
                means, tokens_per_sec, seconds_per_step = progress.window.flush()
                loss = means["loss"]
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}; stopping. {last_good()}")
                dead_run.check(step, loss, means["grad_norm"], last_good())
                bytes_per_token = feed.bytes_per_token()  # None where the loss is not per token (DPO)
                last = {**means, "lr": float(plan.schedule(step - 1)), "tokens_per_sec": tokens_per_sec,
                        "phase": plan.phase_of_step(step - 1), **progress.fields(seconds_per_step)}
                if bytes_per_token:
                    last.update(loss_per_byte=loss / bytes_per_token,
                                bits_per_byte=bits_per_byte(loss, bytes_per_token))
                if peak:
                    last["mfu"] = metrics_lib.mfu(tokens_per_sec, flops_per_token, peak)
                if before is not None:
                    last.update(probe_stats(before, params))
                    before = None
                    progress.window.restart_clock()  # the probe's passes are not training throughput either
                writer.write(step, last)
                log.info("step %d/%d (%.0f%%)  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s%s  %s", step,
                         train_cfg.steps, 100 * step / train_cfg.steps, loss, last["lr"], means["grad_norm"],
                         tokens_per_sec, f"  MFU {last['mfu']:.1%}" if peak else "",
                         progress.describe(step, seconds_per_step))

            if train_cfg.eval_every_steps and plan.data.val_dir and step % train_cfg.eval_every_steps == 0:
                results = evaluate(plan, eval_step, params)
                writer.write(step, results)
                log.info("step %d  eval_loss %.4f  eval_bits_per_byte %.4f", step, results["eval_loss"],
                         results["eval_bits_per_byte"])
                progress.window.restart_clock()  # evaluation time is not training throughput

            stop = stop_requests.stop_after(step)  # agreed on by every process, like the timer below
            timed = logged and timer.due()
            keep = ckpt_cfg.keep_every_steps and step % ckpt_cfg.keep_every_steps == 0
            if step % ckpt_cfg.every_steps == 0 or keep or step == train_cfg.steps or stop or timed:
                save(step, step_metrics["loss"])
                timer.saved()
            if stop:
                checkpoints.wait()
                raise TrainingStopped(workdir, step, stop)
    checkpoints.wait()
    return last
