"""Extending a WSD run: a longer stable phase for the same run (the MiniCPM paper's continuous training, §4.3).

WSD holds the peak lr through its stable phase and any of its checkpoints can be decayed later, so a stable
phase need not have a planned end. `extend --workdir RUN --steps M` replans RUN for M steps in absolute
steps: the same warmup, the stable phase lengthened, and the decay (if any) moved to the end. A run with
schedule.decay_steps = 0 holds the peak forever, an open-ended stable phase: it is extended as its data
allows (or resumed with a larger train.steps), and its decays are branches (branch.py).

A new plan is accepted only where it continues the run exactly: the run has taken no decay step (else its
lr would jump back up to the peak), and every step it has trained keeps its lr and its stable-phase data.
The data position is the checkpoint's, so the resumed run computes the losses and parameters of a run
planned that long from the start.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from minicpm_jax import config as config_lib
from minicpm_jax import optim
from minicpm_jax.config import ConfigError
from minicpm_jax.run.branch import stable_checkpoint_steps, with_phases
from minicpm_jax.run.checkpoint import (
    CheckpointMeta,
    RunCheckpoints,
    UnreadableCheckpointError,
    read_run_config,
    write_run_config,
)

log = logging.getLogger(__name__)

# What an extension changes; besides the mesh, all that a resumed run's config may change.
EXTENSION_KEYS = ("train.steps", "schedule.warmup_steps", "schedule.stable_steps", "schedule.decay_steps")


class DecayStartedError(ConfigError):
    """The run has trained decay steps: its stable phase is over and can only be continued by a branch."""


def extend_hint(workdir: str, differing_keys: list[str]) -> str:
    """For a refused resume whose config changes train.steps: the command that lengthens the run instead."""
    if "train.steps" not in differing_keys:
        return ""
    return (f". To train it longer, `minicpm-jax extend --workdir {workdir} --steps N` replans it in absolute "
            f"steps, keeping the steps already trained as they are")


def _plan(cfg) -> tuple[int, tuple[int, int, int]]:
    """train.steps and the phases in steps of a config (a ConfigDict, or the dict in a checkpoint's metadata)."""
    steps = cfg["train"]["steps"]
    return steps, optim.resolve_phases(cfg["schedule"], steps)


def extended_config(cfg: ml_collections.ConfigDict, steps: int,
                    decay_steps: int | None = None) -> ml_collections.ConfigDict:
    """`cfg` replanned for `steps` steps: the same warmup, the decay (as long as before, or `decay_steps`) at
    the end, and the stable phase lengthened to fill the rest."""
    name = cfg.get("schedule", {}).get("name")
    if name != "wsd":
        raise ConfigError(f"schedule.name={name!r}: only a wsd run has a stable phase to extend")
    warmup, _, decay = optim.resolve_phases(cfg.schedule, cfg.train.steps)
    decay = decay if decay_steps is None else decay_steps
    if steps < warmup + decay:
        raise ConfigError(f"--steps {steps} is shorter than the run's {warmup}-step warmup and its {decay}-step decay")
    return config_lib.validate(with_phases(cfg, warmup, steps - warmup - decay, decay))


def check_continuation(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError unless training `cfg` from the latest checkpoint of `workdir` continues it exactly.

    The reference is the config that checkpoint was trained with (its metadata), not config.json: an
    extension may have rewritten config.json while the run went on into its old decay.
    """
    checkpoints = RunCheckpoints(workdir, async_save=False)
    try:
        latest, meta = _newest_metadata(checkpoints)
        if meta is None or meta.config is None or _plan(meta.config) == _plan(cfg):
            return  # nothing trained yet, weights only (import-hf, upcycle), or the same plan
        trained = ml_collections.ConfigDict(meta.config)
        if meta.phase == "decay":
            raise DecayStartedError(
                f"the latest checkpoint of {workdir}, step {latest}, is in its decay (from step "
                f"{optim.decay_start(trained.schedule, trained.train.steps)} on): lengthening its stable phase would "
                f"jump the lr back up to the peak. Branch from a stable-phase checkpoint instead, one of steps "
                f"{stable_checkpoint_steps(checkpoints, trained)}: `minicpm-jax branch --from {workdir} --step N "
                f"--workdir NEW --no-train`, then `minicpm-jax extend --workdir NEW --steps M`")
    finally:
        checkpoints.close()
    _check_trained_steps_unchanged(trained, cfg, latest)


def _newest_metadata(checkpoints: RunCheckpoints) -> tuple[int | None, CheckpointMeta | None]:
    """The newest committed step whose metadata reads, and that metadata ((None, None) for none).

    A newer step that does not read is left to the train loop, which sets it aside and resumes an older one.
    """
    for step in reversed(checkpoints.all_steps()):
        try:
            return step, checkpoints.restore_meta(step)
        except UnreadableCheckpointError:
            continue
    return None, None


def _check_trained_steps_unchanged(trained: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                                   latest: int) -> None:
    """Steps 0 .. latest − 1 keep their data phase (stable) and their lr under `cfg`."""
    steps = cfg.train.steps
    if steps < latest:
        raise ConfigError(f"train.steps={steps} is below the latest checkpoint, step {latest}: a run is not "
                          f"shortened past what it has trained")
    warmup, stable, decay = optim.resolve_phases(cfg.schedule, steps)
    plan = f"train.steps={steps} (warmup {warmup}, stable {stable}, decay {decay} steps)"
    start = optim.decay_start(cfg.schedule, steps)
    if start is not None and start < latest:
        raise ConfigError(f"with {plan} the decay would start at step {start}, before the latest checkpoint, step "
                          f"{latest}: steps already trained would change their lr and data. Start the decay at step "
                          f"{latest} or later (train.steps >= {latest + decay} for a {decay}-step decay at the end)")
    trained_steps = jnp.arange(latest)
    before, after = (np.asarray(optim.make_schedule(c.schedule, c.train.steps)(trained_steps)) for c in (trained, cfg))
    changed = np.flatnonzero(before != after)
    if changed.size:
        step = int(changed[0])
        raise ConfigError(f"with {plan} the lr of step {step}, which the run has already trained (its latest "
                          f"checkpoint is step {latest}), would change from {before[step]:.4g} to {after[step]:.4g}")


def extend_run(workdir: str, steps: int, decay_steps: int | None = None) -> ml_collections.ConfigDict:
    """Rewrites the config.json of the run in `workdir` for `steps` steps (see `extended_config`); returns it.

    A run in progress trains on to its old length and takes up the new one when it is next resumed; if it
    has entered its old decay by then, that resume is refused (`check_continuation`).
    """
    try:
        cfg = extended_config(read_run_config(workdir), steps, decay_steps)
        check_continuation(workdir, cfg)
    except ConfigError as err:
        raise ConfigError(f"cannot extend {workdir} to {steps} steps: {err}") from None
    if jax.process_index() == 0:
        write_run_config(workdir, cfg)
    log.info("extended %s to %d steps: stable to step %d, then %d decay steps; resume it with "
             "`minicpm-jax train --workdir %s`", workdir, steps, steps - cfg.schedule.decay_steps,
             cfg.schedule.decay_steps, workdir)
    return cfg
