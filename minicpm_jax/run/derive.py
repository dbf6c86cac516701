"""One rule for every run made from another run's weights: which model keys come from where.

A branch (`branch`, `branch --untie-head`), an upcycled MoE run (`upcycle`), the start of an SFT or DPO run
(`sft`, `dpo`) and a weights-only run trained with a config (`train --config` on an `import-hf` run) all
start from a source run's weights and a config the user gives. Whatever the kind, the new run's config is:

- the model's shape and μP scalars (every model key that is not a compute setting) from the source: they
  describe the weights. A user config that changes one is a ConfigError naming the key with the source's
  and the config's value, except for the keys the kind exists to change (`DeriveKind.changes`: upcycle's
  MoE keys; the context keys, RoPE and max_position_embeddings, of a branch, which can start a long-context
  run; --untie-head's tie_word_embeddings). SFT/DPO change model.parametrization only through
  init.parametrization;
- the compute settings (`ModelConfig.COMPUTE_FIELDS`: dtype, remat policy, attention kernel and block size,
  MoE dispatch and capacity) from the user's config: they follow the hardware the new run trains on;
- every other section (train, schedule, optim, data, checkpoint, mesh, ...) from the user's config.

What the user's config says about the model depends on the command. `branch` starts from the source's own
config and `upcycle` is given the whole MoE config, so every model key there is the user's. The config file
of `sft`, `dpo` and of `train` on a weights-only run stands for any source (configs/sft.py has the 2.4B
shape), so there only the `--config.model.*` overrides say something about the shape, while its compute
settings (with their overrides) are taken as they are.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from minicpm_jax.config import ConfigError, ModelConfig, split_override


@dataclasses.dataclass(frozen=True)
class DeriveKind:
    """One command's way of deriving a run: what it may change of the model, and where the user says so."""

    name: str  # what errors call the new run
    changes: frozenset[str] = frozenset()  # the shape/μP keys this kind may take from the user's config
    # The user's config file stands for any source: only its --config.model.* overrides state model keys.
    model_from_overrides: bool = False


BRANCH = DeriveKind("a branch", ModelConfig.CONTEXT_FIELDS)
UNTIE_HEAD = DeriveKind("a branch with --untie-head", ModelConfig.CONTEXT_FIELDS | {"tie_word_embeddings"})
UPCYCLE = DeriveKind("an upcycled run", frozenset({"num_experts", "num_experts_per_tok", "router_aux_loss_coef",
                                                   "router_z_loss_coef"}))
FINETUNE_START = DeriveKind("a fine-tuning run", model_from_overrides=True)
WEIGHTS_ONLY_RUN = DeriveKind("a weights-only run trained with --config", ModelConfig.CONTEXT_FIELDS,
                              model_from_overrides=True)


def derive_config(source_cfg: ml_collections.ConfigDict, user_cfg: ml_collections.ConfigDict, kind: DeriveKind,
                  overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """A copy of `user_cfg` with the model section the module's rule gives; ConfigError on a changed shape key.

    `overrides` are the --config.* overrides already applied to `user_cfg` (read where the config file's
    model section stands for any source, `kind.model_from_overrides`).
    """
    source = ModelConfig.from_config(source_cfg.model).to_dict()
    user = ModelConfig.from_config(user_cfg.model).to_dict()
    stated = _stated_model_keys(user, kind, overrides)
    refuse_shape_changes(source, {key: user[key] for key in stated}, kind)
    # Both sections as they stand, not retyped (a list read from config.json stays a list), so that the
    # derived section reads back as stored; a key the user's section lacks means its default.
    user_section = user_cfg.model.to_dict()
    taken = {key: user_section.get(key, user[key])
             for key in ModelConfig.COMPUTE_FIELDS | (kind.changes & stated)}
    cfg = copy.deepcopy(user_cfg)
    cfg.model = ml_collections.ConfigDict({**source_cfg.model.to_dict(), **taken})
    ModelConfig.from_config(cfg.model)  # the user's settings must also fit the source's model
    return cfg


def refuse_shape_changes(source_model: Mapping[str, Any], user_model: Mapping[str, Any], kind: DeriveKind) -> None:
    """ConfigError naming each shape/μP key of `user_model` (typed values) that differs from the source's."""
    fixed = sorted(set(user_model) - ModelConfig.COMPUTE_FIELDS - kind.changes)
    differing = [f"model.{key} (source {source_model[key]!r}, config {user_model[key]!r})"
                 for key in fixed if user_model[key] != source_model[key]]
    if differing:
        free = ", ".join(sorted(ModelConfig.COMPUTE_FIELDS | kind.changes))
        raise ConfigError(f"{kind.name} keeps the source's model shape and μP scalars, but the config changes "
                          f"{', '.join(differing)}; of the model section only {free} may differ")


def _stated_model_keys(user_model: Mapping[str, Any], kind: DeriveKind, overrides: Sequence[str]) -> set[str]:
    """The model keys whose value in the user's config is the user's choice (see the module docstring)."""
    if not kind.model_from_overrides:
        return set(user_model)
    keys = (split_override(item)[0] for item in overrides)
    return {key[len("model."):] for key in keys if key.startswith("model.")}
