"""MiniCPM-2.4B pre-training on a TPU v5p-128 (64 chips, 16 hosts): FSDP over every chip, bf16 compute.

The paper's recipe at scale (docs/recipe.md §7.1): ~4M-token batches, WSD with an exponential decay over the
last ~10% of ~1.1T tokens. What this file does not set is base.py's: the paper's μP peak lr 0.01 decaying to
1e-3, async checkpoints keeping the latest 3, FSDP over all 64 chips (params, grads and Adam state sharded 64
ways) on one slice. Data paths are given at launch (they live on storage every host reads):
  launch/tpu_vm.sh train ... -- --config configs/minicpm_2b_v5p128.py --workdir /mnt/gcs/runs/minicpm-2b \\
      --config.data.mixtures.stable=/mnt/gcs/data/a:0.7,/mnt/gcs/data/b:0.3
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "minicpm_2b")  # the 2.4B shapes: d 2304, 40 layers, 36 heads, vocab 122,753

    cfg.model.dtype = "bfloat16"  # bf16 matmuls on the MXU; the loss is still computed in float32
    cfg.model.param_dtype = "float32"  # (the default) float32 master weights and Adam moments (~16 B/param)
    cfg.model.remat_policy = "save_dots_no_batch"  # (the default) keep matmul outputs (~1.9 MB/token)

    cfg.train.global_batch_size = 960  # 960 × 4096 = 3.93M tokens per step (the paper's ~4M); 15 per chip
    cfg.train.seq_len = 4096  # the paper's context length
    cfg.train.grad_accum_steps = 5  # 3 sequences per chip per micro-batch: fp32 logits of 122,753 columns fit
    cfg.train.steps = 280_000  # 280,000 × 3.93M = 1.10T tokens

    # Phases as fractions of train.steps, so that --config.train.steps=N alone rescales the run. Of 280,000 steps:
    cfg.schedule.warmup_steps = 0.007  # W: 1,960 steps, 7.7B tokens of linear warmup (the paper does not report W)
    cfg.schedule.stable_steps = 0.893  # S: 250,040 steps, holding the peak to step 252,000 (0.99T tokens)
    cfg.schedule.decay_steps = 0.1  # (the default) D: the last 10% (28,000 steps, 110B tokens), as in the paper

    cfg.checkpoint.every_steps = 1_000  # ~4B tokens (~1 h) of work lost at most on a preemption
    cfg.checkpoint.keep_every_steps = 10_000  # permanent stable checkpoints every ~39B tokens, to branch decays from

    cfg.data.num_workers = 4  # Grain worker processes per host (a v5p host has ~200 vCPUs)

    cfg.mesh.tensor = 1  # (the default) d 2304 is too small for tensor parallelism to pay on v5p's ICI
    return cfg
