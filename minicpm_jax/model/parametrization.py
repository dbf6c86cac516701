"""μP ("model wind tunnel", docs/recipe.md §3) and the standard control, as one table read by init and optimizer.

Every parameter belongs to a group:
- `matrix`: the 2-D weights (attention and MLP projections, an untied LM head);
- `embedding`: the input embedding (tied head included), a 2-D tensor or not by `embedding_in_2d_group`.
  The paper's Table 7 literally scales "every 2-D tensor"; classic μP keeps input embeddings unscaled.
  Measured here (tests/test_parametrization.py), the literal reading shrinks the residual stream as
  1/√r, while the classic one keeps every layer's activations flat across widths, so it is the default;
- `vector`: the 1-D RMSNorm gains.

Under `mup`, with width ratio r = hidden_size / dim_model_base, a 2-D tensor is initialised with std
init_std/√r and trained with learning rate lr/r; vectors start at 1.0 and keep lr. Under `standard`,
every matrix is drawn with std init_std and all share one lr: the same model, without width scaling.
The forward multipliers (scale_emb, scale_depth/√L, the logit divisor r) are part of the architecture
and apply under both.
"""

from __future__ import annotations

import math
from typing import Any

from minicpm_jax.config import ModelConfig

GROUPS = ("matrix", "embedding", "vector")


def _two_d_groups(cfg: ModelConfig) -> tuple[str, ...]:
    return ("matrix", "embedding") if cfg.embedding_in_2d_group else ("matrix",)


def init_std(cfg: ModelConfig, group: str) -> float:
    """Std of the normal init of a `matrix` or `embedding` parameter (vectors are initialised to 1)."""
    if group not in ("matrix", "embedding"):
        raise ValueError(f"group {group!r} has no normal init; expected 'matrix' or 'embedding'")
    if cfg.parametrization == "mup" and group in _two_d_groups(cfg):
        return cfg.init_std / math.sqrt(cfg.width_ratio)
    return cfg.init_std


def lr_multipliers(cfg: ModelConfig) -> dict[str, float]:
    """Learning-rate multiplier of each group, relative to the base (peak) learning rate."""
    if cfg.parametrization == "standard":
        return {group: 1.0 for group in GROUPS}
    return {group: (1.0 / cfg.width_ratio if group in _two_d_groups(cfg) else 1.0) for group in GROUPS}


def param_group(path: tuple[Any, ...]) -> str:
    """The group of a parameter from its path in the model's state (e.g. ('layers', 'mlp', 'up_proj'))."""
    names = tuple(str(p) for p in path)
    if names[0] == "embed_tokens":
        return "embedding"
    if names[-1] == "weight" and names[-2].endswith("norm"):
        return "vector"
    return "matrix"
