"""Supervised fine-tuning (`minicpm-jax sft`), the paper's recipe (docs/recipe.md §7.3).

The model's shape and μP scalars are the source run's (`sft --from`); its compute settings (dtype, remat,
attention) are this file's and its overrides' (minicpm_jax/run/derive.py). SFT continues from the end of the decay:
lr 1e-3 (the end-of-decay lr of the 1e-2 base) down to 1e-4, a WSD schedule with an exponential decay,
and μP's per-tensor lr split as in pre-training (MiniCPM issue #40). The paper's SFT saw about 6B tokens; set
train.steps, global_batch_size and seq_len for your data (base.py's defaults otherwise).
"""

import ml_collections

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "base")
    # Where the run starts: set by the command (--from/--step). "" parametrization keeps the source's.
    cfg.init = ml_collections.ConfigDict({"run": "", "step": -1, "parametrization": ""})

    # WSD (base.py's exponential decay) with the phases of fine-tuning; W is the default, given with S and D.
    cfg.schedule.peak_lr = 1e-3
    cfg.schedule.warmup_steps = 0.01
    cfg.schedule.stable_steps = 0.79
    cfg.schedule.decay_steps = 0.2
    cfg.schedule.final_lr_ratio = 0.1  # (the default) 1e-3 -> 1e-4
    return cfg
