"""MiniCPM-1.2B pre-training on a TPU v5e-64 (v5litepod-64: 64 chips of 16 GB, 16 hosts): FSDP, bf16.

Same recipe as configs/minicpm_2b_v5p128.py scaled to v5e's smaller memory: ~4M-token batches, WSD
with the last ~10% of ~1.1T tokens decayed exponentially. Data paths are given at launch. What this file does
not set is base.py's: the paper's μP peak lr 0.01 decaying to 1e-3, async checkpoints keeping the latest 3,
FSDP over all 64 chips (params, grads and Adam state sharded 64 ways) on one slice (configs/minicpm_1b_v5e64x2.py
is the two-slice run).
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "minicpm_1b")  # the 1.2B shapes: d 1536, 52 layers, GQA 24/8, vocab 73,440

    cfg.model.dtype = "bfloat16"  # bf16 matmuls on the MXU; the loss is still computed in float32
    cfg.model.param_dtype = "float32"  # (the default) float32 master weights and Adam moments (~22 GB, 0.35 GB/chip)
    cfg.model.remat_policy = "full"  # 16 GB of HBM: keep only each layer's input, recompute the rest

    cfg.train.global_batch_size = 1024  # 1024 × 4096 = 4.19M tokens (~4M); 16 per chip, splits into micro-batches of 2
    cfg.train.seq_len = 4096  # the paper's context length
    cfg.train.grad_accum_steps = 8  # 2 sequences per chip per micro-batch: fp32 logits (73,440 columns) fit in 16 GB
    cfg.train.steps = 262_000  # 262,000 × 4.19M = 1.10T tokens

    # Phases as fractions of train.steps, so that --config.train.steps=N alone rescales the run. Of 262,000 steps:
    cfg.schedule.warmup_steps = 0.0076  # W: 1,991 steps, 8.4B tokens of linear warmup (the paper does not report W)
    cfg.schedule.stable_steps = 0.8924  # S: 233,809 steps, holding the peak to step 235,800 (0.99T tokens)
    cfg.schedule.decay_steps = 0.1  # (the default) D: the last 10% (26,200 steps, 110B tokens), as in the paper

    cfg.checkpoint.every_steps = 1_000  # ~4B tokens of work lost at most on a preemption
    cfg.checkpoint.keep_every_steps = 10_000  # permanent stable checkpoints every ~42B tokens, to branch decays from

    cfg.data.num_workers = 4  # Grain worker processes per host (a v5e host has 112+ vCPUs)

    cfg.mesh.tensor = 1  # (the default) d 1536 is too small for tensor parallelism to pay
    return cfg
