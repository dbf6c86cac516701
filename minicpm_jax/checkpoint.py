"""Run directories and their Orbax checkpoints.

    RUN/config.json              the resolved config (ConfigDict as JSON): enough to rebuild everything
    RUN/checkpoints/<step>/      one Orbax composite checkpoint per saved step, with the items
        params                   model weights (a pure dict of arrays, stacked layer layout)
        opt_state                the optimizer state
        data                     every process's Grain iterator state (one JSON file per process)
        meta                     step, data phase, layout, the resolved config, parent run (for branches)
    RUN/metrics.jsonl, RUN/tensorboard/

Weights are their own item so that export, evaluation and generation restore only them. Orbax writes
each step into a temporary folder and renames it when the save commits, so a crash in the middle of
a save leaves no step that `latest_step` would pick up: the previous checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from minicpm_jax import config as config_lib
from minicpm_jax.model.transformer import MiniCPM

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
PARAMS_LAYOUT = "stacked-v1"  # layers stacked on a leading axis; recorded so a future layout can convert


class RunDirError(ValueError):
    """A run directory is missing, empty, or lacks the requested step."""


def write_run_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(cfg.to_json(indent=2, sort_keys=True) + "\n")
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"{workdir} is not a run directory: {CONFIG_FILE} is missing")
    with open(path) as f:
        return config_lib.validate(ml_collections.ConfigDict(json.load(f)))


@dataclasses.dataclass
class _IteratorStateSnapshot:
    """Hands a data-iterator state to Grain's Orbax handler (which writes one file per process).

    The state is captured when the save starts, so an asynchronous save never sees a later position.
    """

    state: dict[str, Any] | None = None

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by Grain's handler after a restore; nothing to prefetch
        pass


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    data_state: dict[str, Any] | None
    meta: dict[str, Any]


class RunCheckpoints:
    """Saves and restores the checkpoints of one run.

    Retention: the latest `keep_last` steps are kept for resuming, and every step divisible by
    `keep_every_steps` is kept permanently, so that stable-phase checkpoints stay available to branch.
    """

    def __init__(self, workdir: str, keep_last: int = 3, keep_every_steps: int = 0, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every_steps or None,
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options)
        self.workdir = workdir

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any | None, data_state: dict[str, Any] | None,
             meta: dict[str, Any]) -> None:
        """Saves a step; a weights-only checkpoint (import-hf, upcycle) passes opt_state=None."""
        items = {"params": ocp.args.StandardSave(params),
                 "data": grain.checkpoint.CheckpointSave(_IteratorStateSnapshot(data_state)),
                 "meta": ocp.args.JsonSave({**meta, "step": step, "layout": PARAMS_LAYOUT})}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> Restored:
        self._require(step)
        snapshot = _IteratorStateSnapshot()
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=grain.checkpoint.CheckpointRestore(snapshot),
            meta=ocp.args.JsonRestore(),
        ))
        return Restored(step, restored["params"], restored["opt_state"], snapshot.state, dict(restored["meta"]))

    def restore_meta(self, step: int) -> dict[str, Any]:
        self._require(step)
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        self._require(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return restored["params"]

    def _require(self, step: int) -> None:
        steps = self.all_steps()
        if not steps:
            raise RunDirError(f"{self.workdir} has no committed checkpoint in {CHECKPOINT_DIR}/")
        if step not in steps:
            raise RunDirError(f"{self.workdir} has no checkpoint for step {step}; committed steps: {steps}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_params(model_cfg: Any) -> tuple[nnx.GraphDef, Any]:
    """The model's graph and its parameters' shapes on this process's first device (nothing allocated).

    Naming the device lets a checkpoint saved on any mesh, by any number of processes, restore here.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MiniCPM(model_cfg, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                  nnx.to_pure_dict(state))


def restore_model(workdir: str, step: int | None = None) -> tuple[MiniCPM, ml_collections.ConfigDict]:
    """Rebuilds a run's model from its config and the `params` item of `step` (default: the latest)."""
    cfg = read_run_config(workdir)
    checkpoints = RunCheckpoints(workdir, async_save=False)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise RunDirError(f"{workdir} has no committed checkpoint in {CHECKPOINT_DIR}/")
        graphdef, abstract = abstract_params(cfg.model)
        params = checkpoints.restore_params(step, abstract)
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, params), cfg


def save_model(workdir: str, step: int, model: MiniCPM, parent: dict[str, Any] | None = None) -> None:
    """Writes a model as a weights-only checkpoint `step` of a run (import-hf, upcycling, fine-tuning).

    `parent` ({"run": dir, "step": n}) records where the weights came from.
    """
    checkpoints = RunCheckpoints(workdir, async_save=False)
    meta = {"phase": "imported", **({"parent": parent} if parent else {})}
    try:
        checkpoints.save(step, nnx.to_pure_dict(nnx.state(model, nnx.Param)), None, None, meta)
        checkpoints.wait()
    finally:
        checkpoints.close()
