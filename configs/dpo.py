"""Direct preference optimisation (`minicpm-jax dpo`), MiniCPM-DPO's setting (docs/recipe.md §7.4).

1 epoch over the preference pairs (train.steps follows from dpo.epochs), lr 1e-5 with a cosine schedule,
and no μP lr split in this stage (MiniCPM issue #40): init.parametrization "standard" gives every tensor the same lr
(parametrization changes only init and lr multipliers, never the forward pass). β, batch size and
length are not reported; β = 0.1 is TRL's default, not a MiniCPM number, and the batch and length are base.py's
(train.global_batch_size preference pairs per step, train.seq_len tokens of prompt + response per side).
"""

import ml_collections

from minicpm_jax.config import sibling


def get_config():
    cfg = sibling(__file__, "base")
    cfg.init = ml_collections.ConfigDict({"run": "", "step": -1, "parametrization": "standard"})
    cfg.dpo = ml_collections.ConfigDict({
        "beta": 0.1,  # KL strength
        "loss": "sigmoid",  # sigmoid (DPO) | ipo
        "label_smoothing": 0.0,  # conservative DPO's ε (sigmoid only)
        "reference": "cached",  # cached: reference log-probs once up front | online: reference forward every step
        "epochs": 1.0,
    })

    cfg.train.steps = 1  # replaced by ceil(epochs · pairs / global_batch_size) when the run is created
    cfg.schedule.name = "cosine"
    cfg.schedule.peak_lr = 1e-5
    cfg.schedule.warmup_steps = 0.1
    cfg.schedule.stable_steps = 0  # (WSD phases; a cosine has only its warmup)
    cfg.schedule.decay_steps = 0
    cfg.schedule.final_lr_ratio = 0.1  # (the default) ends at 1e-6, as the paper's cosine baselines end at 10%
    cfg.optim.weight_decay = 0.0
    return cfg
