"""MiniCPM-2.4B-128K training at its longest sequence, 131,072 tokens, on a TPU v5p-128 (64 chips).

Sequence parallelism splits each sequence 8 ways (`mesh.sequence`): a chip holds 16,384 positions of a
row and attends them to the all-gathered keys with the Pallas splash kernel (model/sequence_parallel.py),
so no chip ever holds the 131,072² scores. FSDP splits the weights over the other 8.
Check it first with `minicpm-jax compile --config configs/minicpm_2b_128k_v5p128.py --topology v5p:4x4x4`.
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "minicpm_2b_128k")  # untied head, θ = 1e6, dynamic NTK ×4 over 65,536 positions

    cfg.model.dtype = "bfloat16"  # float32 parameters (the default); remat "full" as minicpm_2b_128k
    cfg.model.attention_impl = "splash"  # the TPU kernel; it needs mesh.sequence shards of whole blocks

    cfg.train.seq_len = 131_072  # 128K tokens per row; minicpm_2b_128k's 16 rows: 2.1M tokens per step
    cfg.train.grad_accum_steps = 2  # one row per FSDP group per micro-batch: float32 logits of 16K positions
    cfg.train.steps = 2_000  # a long-context decay stage (~4.2B tokens)

    # Phases as fractions of train.steps, so that --config.train.steps=N alone rescales the stage. Of 2,000 steps:
    cfg.schedule.warmup_steps = 0.05  # 100 steps
    cfg.schedule.stable_steps = 0
    cfg.schedule.decay_steps = 0.95  # 1,900 steps

    cfg.mesh.sequence = 8  # 131,072 / 8 = 16,384 positions per chip; FSDP (the default mesh) over 64 / 8 = 8
    return cfg
