"""AdamW with μP's per-tensor learning rates and weight decay groups (docs/recipe.md §3).

A tensor's lr is schedule(step) × multiplier(group); under μP a 2-D tensor gets schedule(step)/r (r the width
ratio). The config section is `optim` (config.OptimConfig).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from minicpm_jax.config import ModelConfig, OptimConfig, typed_section
from minicpm_jax.model.parametrization import GROUPS, lr_multipliers, param_group, two_d_groups


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def param_labels(params: Any) -> Any:
    """The μP group ('matrix' | 'embedding' | 'head' | 'vector') of every leaf of a params pytree, same structure."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_group(tuple(_key_name(p) for p in path)), params)


def decayed_groups(on: str, model_cfg: ModelConfig) -> tuple[str, ...]:
    """The groups `optim.weight_decay_on` decays: all, none, or "2d", the tensors μP treats as 2-D (so the
    embedding and an untied head follow `embedding_in_2d_group`, as their lr does)."""
    if on == "all":
        return GROUPS
    if on == "none":
        return ()
    return two_d_groups(model_cfg)


def make_optimizer(optim_cfg: Any, schedule: optax.Schedule, params: Any,
                   model_cfg: ModelConfig) -> optax.GradientTransformation:
    """Clip → AdamW(schedule) → × the μP lr multiplier of each tensor's group.

    A tensor's lr is schedule(step) × multiplier(group); under μP a 2-D tensor gets schedule(step)/r (r the width
    ratio). The decoupled weight decay sits inside AdamW's lr scaling, so a decayed tensor shrinks by
    lr(step) × multiplier × weight_decay per step (PyTorch param-group semantics), not by a fixed amount.
    The state is a pytree of arrays (NamedTuples and dicts), ready for Orbax.
    """
    cfg = typed_section(OptimConfig, optim_cfg, "optim")
    param_labels(params)  # fail here, not in the first jitted step, on a params tree with unknown paths
    decayed = decayed_groups(cfg.weight_decay_on, model_cfg)
    multipliers = lr_multipliers(model_cfg)

    parts = []
    if cfg.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_grad_norm)))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=float(cfg.weight_decay) if decayed else 0.0,
                             mask=lambda p: jax.tree.map(lambda g: g in decayed, param_labels(p))))
    # Scaling the final update by the group's multiplier equals giving that group lr × multiplier.
    parts.append(optax.multi_transform({g: optax.scale(multipliers[g]) for g in GROUPS}, param_labels))
    return optax.chain(*parts)


def per_group_learning_rates(schedule: optax.Schedule, model_cfg: ModelConfig, step: int) -> dict[str, float]:
    """The lr each μP group gets at `step` (for logging); the base lr is `schedule(step)` itself."""
    base = float(schedule(step))
    return {group: base * mult for group, mult in lr_multipliers(model_cfg).items()}
