"""Run directories: the resolved config plus Orbax checkpoints, one folder per step.

    RUN/config.json              the full config (ConfigDict as JSON), enough to rebuild the model
    RUN/checkpoints/<step>/      Orbax composite checkpoint; the `params` item holds the model weights

Parameters are their own item so that export, evaluation and generation restore only the weights,
never the optimizer state. Orbax writes to a temporary folder and renames it on commit, so a crash
during a save never leaves a half-written step that `latest_step` would pick up.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from minicpm_jax import config as config_lib
from minicpm_jax.model.transformer import MiniCPM

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class RunDirError(ValueError):
    """A run directory is missing, empty, or lacks the requested step."""


def write_run_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(cfg.to_json(indent=2, sort_keys=True) + "\n")


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"{workdir} is not a run directory: {CONFIG_FILE} is missing")
    with open(path) as f:
        return config_lib.validate(ml_collections.ConfigDict(json.load(f)))


def _manager(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)))


def save_params(workdir: str, step: int, model: MiniCPM) -> None:
    """Saves the model's parameters as step `step` and waits until the save has committed."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with _manager(workdir) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()


def restore_model(workdir: str, step: int | None = None) -> tuple[MiniCPM, ml_collections.ConfigDict]:
    """Rebuilds the model of a run from its config and the `params` item of `step` (default: latest)."""
    cfg = read_run_config(workdir)
    with _manager(workdir) as manager:
        steps = manager.all_steps()
        if not steps:
            raise RunDirError(f"{workdir} has no committed checkpoint in {CHECKPOINT_DIR}/")
        step = manager.latest_step() if step is None else step
        if step not in steps:
            raise RunDirError(f"{workdir} has no checkpoint for step {step}; committed steps: {sorted(steps)}")
        model = nnx.eval_shape(lambda: MiniCPM(cfg.model, rngs=nnx.Rngs(0)))
        abstract: Any = nnx.state(model, nnx.Param)
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(nnx.to_pure_dict(abstract))))
    nnx.replace_by_pure_dict(abstract, restored["params"])
    nnx.update(model, abstract)
    return model, cfg
