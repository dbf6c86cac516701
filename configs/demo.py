"""A tiny MiniCPM (about 3.8M parameters) that trains in minutes on a laptop CPU: what `make demo` runs.

Same shape rules as the real models (head_dim 64, d_ff = 2.5 · d, GQA) and the same μP scalars. The
data paths are where `make demo` (`minicpm-jax demo --out demo_out`) prepares the bundled corpus.
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

    cfg.train.steps = 240
    cfg.train.seq_len = 128
    cfg.train.eval_every_steps = 20
    # WSD as fractions of train.steps, so that --config.train.steps=N alone rescales the run; of 240 steps:
    # 12 warmup, 168 stable (to step 180), 60 decay steps.
    cfg.schedule.warmup_steps = 0.05
    cfg.schedule.stable_steps = 0.7
    cfg.schedule.decay_steps = 0.25
    cfg.checkpoint.every_steps = 20
    cfg.checkpoint.keep_every_steps = 60  # permanent stable checkpoints at 60, 120, 180 to branch from

    cfg.data.mixtures.stable = "demo_out/data/shakespeare/train:0.8,demo_out/data/bible/train:0.2"
    cfg.data.val_dir = "demo_out/data/shakespeare/val"
    cfg.data.tokenizer = "demo_out/data/tokenizer/demo.model"
    return cfg
