"""The MiniCPM model family in Flax NNX."""

from minicpm_jax.model.loss import causal_lm_loss
from minicpm_jax.model.transformer import MiniCPM, count_params, positions_from_segments

__all__ = ["MiniCPM", "causal_lm_loss", "count_params", "positions_from_segments"]
