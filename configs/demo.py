"""A tiny MiniCPM (about 3M parameters) that trains in minutes on a laptop CPU.

Same shape rules as the real models (head_dim 64, d_ff = 2.5 · d, GQA) and the same μP scalars.
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "base")
    cfg.model.vocab_size = 4096
    cfg.model.hidden_size = 256
    cfg.model.intermediate_size = 640
    cfg.model.num_layers = 4
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 2
    cfg.model.max_position_embeddings = 512
    return cfg
