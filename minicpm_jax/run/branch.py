"""Branching: turn a stable-phase checkpoint of one run into the first checkpoint of a new decay run.

The branch's checkpoint at step N is the source's step-N state: parameters, optimizer state, data
position and step counter. Its schedule holds the peak until N and decays over D steps after it
(train.steps = N + D), optionally reading another data mixture in the decay (docs/recipe.md §5.7). N must be a
stable-phase checkpoint: from a checkpoint of the source's decay the lr would jump from its annealed value
back up to the peak, which only --allow-decay-checkpoint asks for. The branch is
materialised once, when its directory is created; from then on it is an ordinary run, so restarting
it resumes its own latest checkpoint and never branches again.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Sequence

import jax
import ml_collections

from minicpm_jax import config as config_lib
from minicpm_jax import optim, storage
from minicpm_jax.config import ConfigError
from minicpm_jax.run.checkpoint import (
    CheckpointMeta,
    RunCheckpoints,
    UnreadableCheckpointError,
    is_run,
    read_run_config,
    start_creation,
    write_run_config,
)
from minicpm_jax.run.derive import BRANCH, UNTIE_HEAD, derive_config
from minicpm_jax.run.inputs import run_tokenizer
from minicpm_jax.run.plan import plan_run
from minicpm_jax.run.untie_head import carry_over_opt_state, untie_params

log = logging.getLogger(__name__)


def with_phases(cfg: ml_collections.ConfigDict, warmup: int, stable: int, decay: int) -> ml_collections.ConfigDict:
    """A copy of `cfg` with these WSD phases, in steps, and train.steps = their sum (for a branch or an extension).

    Absolute steps, because as fractions of train.steps the steps already trained would move with it. The
    section is rebuilt so the phases stay ints (a float field would read 1.0 as "the whole run").
    """
    cfg = copy.deepcopy(cfg)
    cfg.train.steps = warmup + stable + decay
    cfg.schedule = ml_collections.ConfigDict(
        {**cfg.schedule.to_dict(), "warmup_steps": warmup, "stable_steps": stable, "decay_steps": decay})
    return cfg


def stable_checkpoint_steps(checkpoints: RunCheckpoints, cfg: ml_collections.ConfigDict) -> list[int]:
    """The committed steps of a run that a decay can branch from: past the warmup and before any decay step."""
    warmup, _, _ = optim.resolve_phases(cfg.schedule, cfg.train.steps)
    return [step for step in checkpoints.all_steps()
            if step >= warmup and _phase_of_checkpoint(checkpoints, step) == "stable"]


def _phase_of_checkpoint(checkpoints: RunCheckpoints, step: int) -> str | None:
    """The phase in a step's metadata; None where that does not read (nor could the step be branched from)."""
    try:
        return checkpoints.restore_meta(step).phase
    except UnreadableCheckpointError:
        return None


def _refuse_decay_checkpoint(source: str, checkpoints: RunCheckpoints, source_cfg: ml_collections.ConfigDict,
                             step: int) -> None:
    """A branch holds the peak lr until its step, so one from an annealed checkpoint would jump the lr back up."""
    if checkpoints.restore_meta(step).phase == "decay":
        raise ConfigError(
            f"step {step} of {source} is a decay-phase checkpoint: its lr is already annealed, and a branch would "
            f"jump it back up to the peak. Branch from a stable-phase step of {source}: "
            f"{stable_checkpoint_steps(checkpoints, source_cfg)} (or pass --allow-decay-checkpoint to re-warm it)")


def branch_config(source_cfg: ml_collections.ConfigDict, step: int, decay_steps: int | None,
                  overrides: Sequence[str] = (), untie_head: bool = False) -> ml_collections.ConfigDict:
    """The source's config with a WSD schedule that decays from `step` over `decay_steps` steps.

    `untie_head` gives the branch its own LM head (model.tie_word_embeddings=False), as MiniCPM-2.4B-128K does.
    `overrides` may change the compute and context settings of the model, not its shape (derive.py).
    """
    if source_cfg.schedule.name != "wsd":
        raise ConfigError(f"schedule.name={source_cfg.schedule.name!r}: only a wsd run can be branched into a decay")
    warmup, _, source_decay = optim.resolve_phases(source_cfg.schedule, source_cfg.train.steps)
    decay = source_decay if decay_steps is None else decay_steps
    if decay is None or decay < 1:
        raise ConfigError(f"--decay-steps must be >= 1 (the source run has decay_steps={source_decay})")
    if step < warmup:
        raise ConfigError(f"branch step {step} lies inside the warmup (schedule.warmup_steps={warmup})")
    cfg = with_phases(source_cfg, warmup, step - warmup, decay)
    if untie_head:
        if not source_cfg.model.tie_word_embeddings:
            raise ConfigError("--untie-head: the source run's head is already untied (model.tie_word_embeddings=False)")
        cfg.model.tie_word_embeddings = False
    config_lib.apply_overrides(cfg, overrides)
    if (cfg.train.steps, cfg.schedule.stable_steps) != (step + decay, step - warmup):
        raise ConfigError("train.steps and schedule.stable_steps of a branch follow from --step and --decay-steps; "
                          "do not override them")
    return derive_config(source_cfg, config_lib.validate(cfg), UNTIE_HEAD if untie_head else BRANCH)


def create_branch(source: str, step: int, workdir: str, decay_steps: int | None = None,
                  overrides: Sequence[str] = (), untie_head: bool = False,
                  allow_decay_checkpoint: bool = False) -> ml_collections.ConfigDict:
    """Creates the branch run in `workdir` (or returns the config of the branch already there).

    A decay-phase `step` is refused unless `allow_decay_checkpoint`: the branch would re-warm its annealed lr.
    """
    if is_run(workdir):
        log.info("%s already holds a branch; resuming it (never re-branching)", workdir)
        return read_run_config(workdir)
    source_cfg = read_run_config(source)
    cfg = branch_config(source_cfg, step, decay_steps, overrides, untie_head)
    source_checkpoints = RunCheckpoints(source, async_save=False)
    try:
        if not allow_decay_checkpoint:
            _refuse_decay_checkpoint(source, source_checkpoints, source_cfg, step)
        # The source's state is read onto the branch's mesh, whatever mesh the source was saved from.
        source_cfg.mesh = cfg.mesh
        source_plan, plan = plan_run(source_cfg), plan_run(cfg)
        restored = source_checkpoints.restore(step, source_plan.abstract_params, source_plan.abstract_opt_state)
    finally:
        source_checkpoints.close()
    if untie_head:
        params = untie_params(restored.params, plan.abstract_params["lm_head"].sharding)
        with plan.activate():
            fresh = jax.jit(plan.tx.init, out_shardings=plan.layout().opt_state)(params)
        restored = dataclasses.replace(restored, params=params,
                                       opt_state=carry_over_opt_state(restored.opt_state, fresh))
    # Save the state before writing config.json: a crash in between leaves no branch that looks complete, and a
    # rerun redoes it.
    start_creation(workdir)
    checkpoints = RunCheckpoints(workdir, plan.checkpoint.keep_last, plan.checkpoint.keep_every_steps, async_save=False)
    try:
        parent = {"run": storage.absolute(source), "step": step}
        # The progress (tokens seen, open log window) continues: the branch logs as its parent would have.
        meta = CheckpointMeta(step, restored.meta.phase, restored.meta.weights_only, plan.resolved_config, parent,
                              progress=restored.meta.progress)
        checkpoints.save(step, restored.params, restored.opt_state, restored.data_state, meta)
        checkpoints.wait()
    finally:
        checkpoints.close()
    write_run_config(workdir, cfg, run_tokenizer(source, source_cfg))
    log.info("branched %s at step %d into %s: decay over %d steps to step %d", source, step, workdir,
             cfg.schedule.decay_steps, cfg.train.steps)
    return cfg
