"""MiniCPM-1.2B (docs/recipe.md §1.2): d 1536, 52 layers, GQA 24/8 heads, vocab 73,440, tied head.

1,247,442,432 non-embedding parameters.
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "base")
    cfg.model.vocab_size = 73440
    cfg.model.hidden_size = 1536
    cfg.model.intermediate_size = 3840
    cfg.model.num_layers = 52
    cfg.model.num_heads = 24
    cfg.model.num_kv_heads = 8
    return cfg
