"""Sparse upcycling (docs/recipe.md §8): a dense run's checkpoint becomes the first checkpoint of an MoE run.

Attention, norms, embeddings (and an untied head) are copied; every expert of a layer is a copy of that
layer's dense MLP; the router is drawn from N(0, 0.1²). With identical experts and top-k weights that
sum to 1, the MoE layer computes exactly the dense MLP, so the upcycled model starts with the dense
model's logits (tested) and the router learns to specialise the copies from there.

The new run holds the weights only (like import-hf): its optimizer and data position start fresh, and
it trains with its own config's schedule (WSD) from step 0. Its lineage records the source run and step.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from minicpm_jax import storage
from minicpm_jax.config import ConfigError, ModelConfig
from minicpm_jax.model import MiniCPM
from minicpm_jax.run.checkpoint import (
    is_run,
    read_run_config,
    restore_model,
    save_model,
    start_creation,
    write_run_config,
)
from minicpm_jax.run.derive import UPCYCLE, derive_config, refuse_shape_changes
from minicpm_jax.run.inputs import run_tokenizer
from minicpm_jax.run.plan import plan_run

log = logging.getLogger(__name__)

ROUTER_INIT_STD = 0.1  # docs/recipe.md §8: router weights ~ N(0, variance 0.01)
_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def check_compatible(dense_cfg: ModelConfig, moe_cfg: ModelConfig) -> None:
    """Raises ConfigError unless `moe_cfg` is `dense_cfg` with experts (the rule of derive.py)."""
    if dense_cfg.is_moe:
        raise ConfigError(f"the source model already has model.num_experts={dense_cfg.num_experts}; "
                          f"upcycling starts from a dense run")
    if not moe_cfg.is_moe:
        raise ConfigError("the target config has model.num_experts=0; set it (e.g. --config.model.num_experts=8)")
    refuse_shape_changes(dense_cfg.to_dict(), moe_cfg.to_dict(), UPCYCLE)


def upcycle_params(dense_params: dict[str, Any], moe_cfg: ModelConfig, key: jax.Array,
                   router_std: float = ROUTER_INIT_STD) -> dict[str, Any]:
    """The MoE model's pure-dict params from the dense model's (`nnx.to_pure_dict` layout)."""
    dense_mlp = dense_params["layers"]["mlp"]
    layers, hidden, _ = dense_mlp["gate_proj"].shape
    experts = {name: jnp.repeat(dense_mlp[name][:, None], moe_cfg.num_experts, axis=1) for name in _EXPERT_WEIGHTS}
    router = router_std * jax.random.normal(key, (layers, hidden, moe_cfg.num_experts), jnp.float32)
    mlp = {**experts, "router": router.astype(dense_mlp["gate_proj"].dtype)}
    return {**dense_params, "layers": {**dense_params["layers"], "mlp": mlp}}


def upcycle_model(dense: MiniCPM, moe_cfg: ModelConfig, seed: int = 0) -> MiniCPM:
    check_compatible(dense.config, moe_cfg)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: MiniCPM(moe_cfg, rngs=nnx.Rngs(0))))
    params = upcycle_params(nnx.to_pure_dict(nnx.state(dense, nnx.Param)), moe_cfg, jax.random.key(seed))
    return nnx.merge(graphdef, params)


def create_upcycled_run(source: str, step: int | None, workdir: str,
                        cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Writes the MoE run `workdir` (weights at step 0 and config.json) from `source`'s checkpoint `step`.

    Returns the run's config: `cfg` with the model section derive.py's rule gives.
    """
    if is_run(workdir):
        raise ConfigError(f"{workdir} is already a run directory; upcycle into a new one")
    source_cfg = read_run_config(source)
    cfg = derive_config(source_cfg, cfg, UPCYCLE)
    plan_run(cfg)  # a bad training config fails before the (large) weights are touched
    dense, _ = restore_model(source, step)
    moe = upcycle_model(dense, ModelConfig.from_config(cfg.model), seed=cfg.train.seed)
    parent = {"run": storage.absolute(source), "step": step, "upcycled": True}
    # Weights before config.json: a crash in between leaves no run that looks complete, and a rerun redoes it.
    start_creation(workdir)
    save_model(workdir, 0, moe, parent=parent)
    write_run_config(workdir, cfg, run_tokenizer(source, source_cfg))
    log.info("upcycled %s (step %s, %d layers) into %s: %d experts, top-%d; train it with "
             "`minicpm-jax train --workdir %s`", source, step if step is not None else "latest",
             source_cfg.model.num_layers, workdir, cfg.model.num_experts, cfg.model.num_experts_per_tok, workdir)
    return cfg
