"""MiniCPM-2.4B-128K (docs/recipe.md §9): the 2.4B model with an untied head, ABF base θ = 1e6,
max_position_embeddings 65,536 and dynamic NTK scaling with factor 4 (HF's per-length rule), vocab 122,760.

This is the released end state; the paper's per-stage bases and lengths are not published (docs/recipe.md §9).
A run reaches it from a stable 2.4B checkpoint with one command:

    minicpm-jax branch --from runs/2b --step N --workdir runs/2b_128k --untie-head --decay-steps D \\
        --config.model.rope_theta=1e6 --config.model.max_position_embeddings=65536 \\
        --config.model.rope_scaling=dynamic --config.model.rope_factor=4.0 --config.train.seq_len=32768

(the vocabulary stays the source's 122,753 there; 122,760 is the released checkpoint's size). Attention is
`auto`: chunked on CPU at these lengths, cuDNN on GPU, splash on TPU; mesh.sequence shards the length.
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "base")
    cfg.model.vocab_size = 122760  # docs/recipe.md §1.2: the 128K checkpoint's vocabulary (7 more than 2.4B's)
    cfg.model.tie_word_embeddings = False
    cfg.model.rope_theta = 1e6
    cfg.model.max_position_embeddings = 65536
    cfg.model.rope_scaling = "dynamic"
    cfg.model.rope_factor = 4.0
    cfg.model.remat_policy = "full"  # activations at 32K+ tokens dominate memory
    cfg.train.seq_len = 32768
    cfg.train.global_batch_size = 16
    return cfg
