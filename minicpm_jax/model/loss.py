"""The causal-LM loss: mean token cross-entropy over the positions that count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def causal_lm_loss(logits: jax.Array, targets: jax.Array,
                   loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns (mean cross-entropy, number of counted tokens).

    logits [B, T, V] (float32), targets [B, T] already shifted (targets[:, t] is the token after
    position t), loss_mask [B, T] with 1 where the position counts (0 on padding, prompts, and
    positions whose target crosses a document boundary). Cross-entropy is computed in float32.
    """
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if loss_mask is None:
        loss_mask = jnp.ones_like(per_token)
    loss_mask = loss_mask.astype(jnp.float32)
    count = loss_mask.sum()
    return (per_token * loss_mask).sum() / jnp.maximum(count, 1.0), count
