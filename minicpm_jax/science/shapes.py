"""Wind-tunnel model shapes (docs/recipe.md §3.4, paper Table 8) and the sweep's shape pseudo-keys.

Every proxy keeps the paper's shape rules: d_ff = 2.5·d_m, head_dim 64, n_heads = d_m/64 (MHA). A sweep
may vary the shape through two pseudo-keys besides ordinary config keys:
    shape=9M    the table's d_m and L (and the rules above)
    width=D     hidden_size D, keeping the base config's d_ff/d_m ratio, head_dim and GQA group, so that
                only the width changes (what μP transfer across widths needs)
"""

from __future__ import annotations

from typing import Any

import ml_collections

from minicpm_jax.config import ConfigError

# name: (d_m, L) — N in the name is the paper's non-embedding count.
WINDTUNNEL_SHAPES = {
    "9M": (320, 8),
    "30M": (512, 12),
    "70M": (640, 14),
    "0.1B": (768, 16),
    "0.17B": (896, 18),
    "0.2B": (1024, 20),
    "0.5B": (1344, 24),
}
FFN_RATIO = 2.5
HEAD_DIM = 64
PSEUDO_KEYS = ("shape", "width")


def shape_settings(name: str) -> dict[str, int]:
    """model.* values of a wind-tunnel shape from the table."""
    if name not in WINDTUNNEL_SHAPES:
        raise ConfigError(f"unknown wind-tunnel shape {name!r}; known: {', '.join(WINDTUNNEL_SHAPES)}")
    hidden, layers = WINDTUNNEL_SHAPES[name]
    heads = hidden // HEAD_DIM
    return {"hidden_size": hidden, "intermediate_size": round(FFN_RATIO * hidden), "num_layers": layers,
            "num_heads": heads, "num_kv_heads": heads}


def width_settings(model: ml_collections.ConfigDict, width: int) -> dict[str, int]:
    """model.* values that change the base model's width to `width`, keeping its other shape ratios."""
    head_dim = model.hidden_size // model.num_heads
    group = model.num_heads // model.num_kv_heads
    if width % (head_dim * group):
        raise ConfigError(f"width={width} must be a multiple of head_dim × GQA group = {head_dim} × {group} "
                          f"(from the base config's model.hidden_size / num_heads / num_kv_heads)")
    heads = width // head_dim
    return {"hidden_size": width, "intermediate_size": round(model.intermediate_size * width / model.hidden_size),
            "num_heads": heads, "num_kv_heads": heads // group}


def apply_pseudo_key(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Applies a `shape` or `width` setting to cfg.model in place."""
    settings = shape_settings(value) if key == "shape" else width_settings(cfg.model, int(value))
    for name, setting in settings.items():
        cfg.model[name] = setting
