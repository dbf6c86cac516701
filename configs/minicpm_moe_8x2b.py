"""MiniCPM-MoE-8x2B (docs/recipe.md §8): MiniCPM-2.4B with every MLP replaced by 8 SwiGLU experts, top-2.

13,590,468,864 non-embedding parameters (the paper's 13.6B), of which 4,035,320,064 are active per token
(2 of 8 experts; the paper's ~4B). Upcycle a stable 2.4B run into it with
`minicpm-jax upcycle --from RUN --step N --workdir NEW --config configs/minicpm_moe_8x2b.py`.
Run it with experts split over devices: --config.mesh.expert=8 (experts must divide over mesh.expert).
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "base")
    cfg.model.num_experts = 8  # top-2 and the paper's 0.01 load-balancing weight are base.py's defaults
    return cfg
