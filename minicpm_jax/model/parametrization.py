"""μP ("model wind tunnel", docs/recipe.md §3) and two standard controls, as one table read by init and optimizer.

Every parameter belongs to a group:
- `matrix`: the hidden 2-D weights (attention and MLP projections, MoE router and experts): both of their
  dimensions grow with the width;
- `embedding`: the input embedding (tied head included);
- `head`: an untied LM head. Like the embedding it has one width dimension and one vocabulary dimension,
  and the logits are already divided by the width ratio r in the forward pass, so μP (Tensor Programs V's
  output layer) keeps its init and lr independent of the width. It is treated exactly like the embedding,
  which it is at the moment `branch --untie-head` creates it: the same init, lr multiplier and weight decay;
- `vector`: the 1-D RMSNorm gains.

`embedding_in_2d_group` moves the two vocabulary tensors (embedding and head) into the 2-D treatment. The
paper's Table 7 literally scales "every 2-D tensor"; classic μP keeps them unscaled. The literal reading
starts the residual stream 1/√r smaller; with the classic one the coordinate check (science/coord_check.py,
tests/test_parametrization.py) keeps every activation's update flat across widths, so it is the default.

Under `mup`, a `matrix` tensor is initialised with std init_std/√r and trained with learning rate lr/r;
embedding and head keep init_std and lr; vectors start at 1.0 and keep lr. With `num_layers_base` > 0
(depth-μP for Adam), the `matrix` lr is further multiplied by √(num_layers_base/L).

The controls share one lr for every tensor:
- `standard`: every matrix drawn with std init_std (constant in width: the same model at every width,
  without width scaling);
- `standard_fanin`: standard parametrization proper, every matrix drawn with std ∝ 1/√fan_in, normalised
  to init_std at fan_in = dim_model_base (so init_std·√(dim_model_base/fan_in)); the embedding keeps init_std.
The forward multipliers (scale_emb, scale_depth/√L, the logit divisor r) are part of the architecture and
apply under every parametrization.
"""

from __future__ import annotations

import math
from typing import Any

from minicpm_jax.config import ModelConfig

GROUPS = ("matrix", "embedding", "head", "vector")
NORMAL_GROUPS = ("matrix", "embedding", "head")  # the groups drawn from a normal distribution


def two_d_groups(cfg: ModelConfig) -> tuple[str, ...]:
    """The groups μP scales as 2-D tensors (init std/√r, lr/r); also `weight_decay_on="2d"`'s groups."""
    return ("matrix", "embedding", "head") if cfg.embedding_in_2d_group else ("matrix",)


def init_std(cfg: ModelConfig, group: str, fan_in: int | None = None) -> float:
    """Std of the normal init of a parameter of `group` (vectors are initialised to 1).

    fan_in (the size of the contracted input dimensions) is needed by `standard_fanin` for matrices and heads.
    """
    if group not in NORMAL_GROUPS:
        raise ValueError(f"group {group!r} has no normal init; expected one of {NORMAL_GROUPS}")
    if cfg.parametrization == "mup" and group in two_d_groups(cfg):
        return cfg.init_std / math.sqrt(cfg.width_ratio)
    if cfg.parametrization == "standard_fanin" and group != "embedding":
        if not fan_in:
            raise ValueError(f"standard_fanin needs the fan_in of a {group!r} parameter")
        return cfg.init_std * math.sqrt(cfg.dim_model_base / fan_in)
    return cfg.init_std


def lr_multipliers(cfg: ModelConfig) -> dict[str, float]:
    """Learning-rate multiplier of each group, relative to the base (peak) learning rate."""
    if cfg.parametrization != "mup":
        return {group: 1.0 for group in GROUPS}
    scaled = two_d_groups(cfg)
    multipliers = {group: (1.0 / cfg.width_ratio if group in scaled else 1.0) for group in GROUPS}
    if cfg.num_layers_base:
        multipliers["matrix"] *= math.sqrt(cfg.num_layers_base / cfg.num_layers)
    return multipliers


def param_group(path: tuple[Any, ...]) -> str:
    """The group of a parameter from its path in the model's state (e.g. ('layers', 'mlp', 'up_proj'))."""
    names = tuple(str(p) for p in path)
    if names[0] == "embed_tokens":
        return "embedding"
    if names[0] == "lm_head":
        return "head"
    if names[-1] == "weight" and names[-2].endswith("norm"):
        return "vector"
    return "matrix"
