"""Branching: turn a stable-phase checkpoint of one run into the first checkpoint of a new decay run.

The branch's checkpoint at step N is the source's step-N state: parameters, optimizer state, data
position and step counter. Its schedule holds the peak until N and decays over D steps after it
(train.steps = N + D), optionally reading another data mixture in the decay (facts §5). The branch is
materialised once, when its directory is created; from then on it is an ordinary run, so restarting
it resumes its own latest checkpoint and never branches again.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Sequence

import jax
import ml_collections

from minicpm_jax import config as config_lib
from minicpm_jax import optim
from minicpm_jax.checkpoint import CONFIG_FILE, RunCheckpoints, read_run_config, write_run_config
from minicpm_jax.config import ConfigError
from minicpm_jax.run_plan import plan_run
from minicpm_jax.untie_head import carry_over_opt_state, untie_params

log = logging.getLogger(__name__)


def branch_config(source_cfg: ml_collections.ConfigDict, step: int, decay_steps: int | None,
                  overrides: Sequence[str] = (), untie_head: bool = False) -> ml_collections.ConfigDict:
    """The source's config with a WSD schedule that decays from `step` over `decay_steps` steps.

    `untie_head` gives the branch its own LM head (model.tie_word_embeddings=False), as MiniCPM-2.4B-128K does.
    """
    if source_cfg.schedule.name != "wsd":
        raise ConfigError(f"schedule.name={source_cfg.schedule.name!r}: only a wsd run can be branched into a decay")
    warmup, _, source_decay = optim.resolve_phases(source_cfg.schedule, source_cfg.train.steps)
    decay = source_decay if decay_steps is None else decay_steps
    if decay is None or decay < 1:
        raise ConfigError(f"--decay-steps must be >= 1 (the source run has decay_steps={source_decay})")
    if step < warmup:
        raise ConfigError(f"branch step {step} lies inside the warmup (schedule.warmup_steps={warmup})")
    cfg = copy.deepcopy(source_cfg)
    # Absolute steps: the branch's train.steps differs from the source's, so fractions would shift. The
    # section is rebuilt so the phases stay ints (a float field would read 1.0 as "the whole run").
    cfg.train.steps = step + decay
    cfg.schedule = ml_collections.ConfigDict(
        {**cfg.schedule.to_dict(), "warmup_steps": warmup, "stable_steps": step - warmup, "decay_steps": decay})
    if untie_head:
        if not source_cfg.model.tie_word_embeddings:
            raise ConfigError("--untie-head: the source run's head is already untied (model.tie_word_embeddings=False)")
        cfg.model.tie_word_embeddings = False
    config_lib.apply_overrides(cfg, overrides)
    if (cfg.train.steps, cfg.schedule.stable_steps) != (step + decay, step - warmup):
        raise ConfigError("train.steps and schedule.stable_steps of a branch follow from --step and --decay-steps; "
                          "do not override them")
    return config_lib.validate(cfg)


def create_branch(source: str, step: int, workdir: str, decay_steps: int | None = None,
                  overrides: Sequence[str] = (), untie_head: bool = False) -> ml_collections.ConfigDict:
    """Creates the branch run in `workdir` (or returns the config of the branch already there)."""
    if os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        log.info("%s already holds a branch; resuming it (never re-branching)", workdir)
        return read_run_config(workdir)
    source_cfg = read_run_config(source)
    cfg = branch_config(source_cfg, step, decay_steps, overrides, untie_head)
    # The source's state is read onto the branch's mesh, whatever mesh the source was saved from.
    source_cfg.mesh = cfg.mesh
    source_plan, plan = plan_run(source_cfg), plan_run(cfg)
    source_checkpoints = RunCheckpoints(source, async_save=False)
    try:
        restored = source_checkpoints.restore(step, source_plan.abstract_params, source_plan.abstract_opt_state)
    finally:
        source_checkpoints.close()
    if untie_head:
        params = untie_params(restored.params, plan.abstract_params["lm_head"].sharding)
        with plan.activate():
            fresh = jax.jit(plan.tx.init, out_shardings=plan.layout().opt_state)(params)
        restored = dataclasses.replace(restored, params=params,
                                       opt_state=carry_over_opt_state(restored.opt_state, fresh))
    # Save the state before writing config.json: a crash in between leaves no half-made branch behind.
    checkpoints = RunCheckpoints(workdir, plan.checkpoint.keep_last, plan.checkpoint.keep_every_steps, async_save=False)
    try:
        parent = {"run": os.path.abspath(source), "step": step}
        checkpoints.save(step, restored.params, restored.opt_state, restored.data_state,
                         {"phase": restored.meta.get("phase", "stable"), "config": plan.resolved_config,
                          "parent": parent})
        checkpoints.wait()
    finally:
        checkpoints.close()
    write_run_config(workdir, cfg)
    log.info("branched %s at step %d into %s: decay over %d steps to step %d", source, step, workdir,
             cfg.schedule.decay_steps, cfg.train.steps)
    return cfg
