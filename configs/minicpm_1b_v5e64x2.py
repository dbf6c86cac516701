"""MiniCPM-1.2B on two TPU v5e-64 slices (128 chips) joined over the data-center network (DCN).

configs/minicpm_1b_v5e64.py with `mesh.dcn_data = 2`: inside each slice FSDP over its 64 chips (ICI), and
the two slices are data parallel, so only the gradients cross DCN (one all-reduce per step). The global
batch stays ~4M tokens; each chip now sees half the rows.
Check it first with `minicpm-jax compile --config configs/minicpm_1b_v5e64x2.py --topology v5e:8x8 --num-slices 2`.
"""

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "minicpm_1b_v5e64")
    cfg.mesh.dcn_data = 2  # two slices, data parallel across DCN
    cfg.train.grad_accum_steps = 4  # 1024 / 128 chips = 8 rows per chip: 2 per micro-batch, as on one slice
    return cfg
