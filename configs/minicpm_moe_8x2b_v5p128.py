"""MiniCPM-MoE-8x2B on a TPU v5p-128 (64 chips): experts split 8 ways (expert parallelism), FSDP over the rest.

13.6B non-embedding parameters, ~4B active per token. Each group of 8 chips along `expert` holds one expert
per chip and exchanges tokens inside the MoE layers (model/moe.py); weights, gradients and Adam moments are
also split 8 ways over `fsdp`. Upcycle a stable 2.4B run into it, then train:
  minicpm-jax upcycle --from RUN --step N --workdir NEW --config configs/minicpm_moe_8x2b_v5p128.py
Check it first with `minicpm-jax compile --config configs/minicpm_moe_8x2b_v5p128.py --topology v5p:4x4x4`.
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "minicpm_moe_8x2b")  # the 2.4B shapes, 8 SwiGLU experts per layer, top-2

    cfg.model.dtype = "bfloat16"  # bf16 matmuls on the MXU; the loss and the router in float32
    cfg.model.param_dtype = "float32"  # (the default) float32 master weights and Adam moments (~16 B/param)
    cfg.model.remat_policy = "full"  # each expert group gathers 8 chips' tokens: keep only layer inputs

    cfg.train.global_batch_size = 960  # 960 × 4096 = 3.93M tokens per step, as the dense 2.4B run
    cfg.train.seq_len = 4096
    cfg.train.grad_accum_steps = 5  # 3 rows per chip per micro-batch (24 per expert group)
    cfg.train.steps = 20_000  # continued pre-training after upcycling (~79B tokens)

    # base.py's WSD at the paper's peak lr 0.01 with an exponential decay.
    # Phases as fractions of train.steps, so that --config.train.steps=N alone rescales the run. Of 20,000 steps:
    cfg.schedule.warmup_steps = 0.025  # 500 steps re-warming the new routers
    cfg.schedule.stable_steps = 0.875  # 17,500 steps, to step 18,000
    cfg.schedule.decay_steps = 0.1  # (the default) the last 10%: 2,000 steps

    cfg.checkpoint.every_steps = 500
    cfg.checkpoint.keep_every_steps = 5_000

    cfg.data.num_workers = 4

    cfg.mesh.expert = 8  # 8 experts, one per chip of each expert group; FSDP (the default mesh) over 64 / 8 = 8
    return cfg
