"""Optimisation: learning-rate schedules (schedules.py: WSD and its decay shapes, Cosine(T), CosineLoop(T),
constant), AdamW with μP groups (adamw.py) and the optional per-step update statistics (update_stats.py)."""

from minicpm_jax.optim.adamw import make_optimizer, param_labels, per_group_learning_rates
from minicpm_jax.optim.schedules import (
                                         constant_schedule,
                                         cosine_horizon,
                                         cosine_loop_schedule,
                                         cosine_schedule,
                                         decay_start,
                                         exp_ratio_from_half_life,
                                         make_schedule,
                                         resolve_phases,
                                         wsd_branch_schedule,
                                         wsd_schedule,
)

__all__ = ["constant_schedule", "cosine_horizon", "cosine_loop_schedule", "cosine_schedule", "decay_start",
           "exp_ratio_from_half_life",
           "make_optimizer", "make_schedule", "param_labels", "per_group_learning_rates", "resolve_phases",
           "wsd_branch_schedule", "wsd_schedule"]
