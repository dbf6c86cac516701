"""Per-step optimisation statistics across a stable → decay transition (docs/recipe.md §5.8; paper §4.4, Fig. 7–8).

With g_t the flattened gradient at step t and v_t = x_{t+1} − x_t the update applied there:
    grad_cosine     cos(g_{t+1}, g_t)                 (turns mostly positive during the decay)
    update_norm     ‖v_{t+1}‖, update_max_abs  max|v_{t+1}|  (track the learning rate)
    directional_d1  D₁ = g_{t+1}·v_t / ‖v_t‖           (first directional derivative along the last step)
    directional_d2  D₂ = (g_{t+1} − g_t)·v_t / ‖v_t‖²  (second directional derivative)
    curvature       K = |D₂| / (1 + D₁²)^{3/2}         (rises ~10× in the paper's decay)
The training loop already logs ‖g‖ as grad_norm.

The statistics are computed inside the optimizer: `with_update_stats(tx)` keeps the previous gradient and
update in its state, so the train step itself is unchanged and a resumed run continues the sequence
exactly. The cost is two more copies of the parameters in the optimizer state (and checkpoints), which is
why it is off unless `train.log_update_stats` is set. A branch inherits the setting from its source run
(its optimizer state must have the same structure).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

STATS = ("grad_cosine", "update_norm", "update_max_abs", "directional_d1", "directional_d2", "curvature")


class UpdateStatsState(NamedTuple):
    inner: Any
    prev_grad: Any
    prev_update: Any
    stats: dict[str, jax.Array]


def _dot(a: Any, b: Any) -> jax.Array:
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num/den, and 0 where den is 0 (the first step has no previous gradient or update)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def step_statistics(grad: Any, update: Any, prev_grad: Any, prev_update: Any) -> dict[str, jax.Array]:
    grad_sq, prev_grad_sq, prev_update_sq = _dot(grad, grad), _dot(prev_grad, prev_grad), _dot(prev_update, prev_update)
    d1 = _safe_div(_dot(grad, prev_update), jnp.sqrt(prev_update_sq))
    d2 = _safe_div(_dot(grad, prev_update) - _dot(prev_grad, prev_update), prev_update_sq)
    return {
        "grad_cosine": _safe_div(_dot(grad, prev_grad), jnp.sqrt(grad_sq * prev_grad_sq)),
        "update_norm": jnp.sqrt(_dot(update, update)),
        "update_max_abs": jnp.max(jnp.stack([jnp.max(jnp.abs(u)).astype(jnp.float32)
                                             for u in jax.tree.leaves(update)])),
        "directional_d1": d1,
        "directional_d2": d2,
        "curvature": jnp.abs(d2) / (1.0 + d1 ** 2) ** 1.5,
    }


def with_update_stats(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` whose state also carries the statistics of its latest step (read them with `read_stats`)."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return UpdateStatsState(tx.init(params), zeros, zeros, {name: jnp.zeros((), jnp.float32) for name in STATS})

    def update(grads, state, params=None):
        updates, inner = tx.update(grads, state.inner, params)
        stats = step_statistics(grads, updates, state.prev_grad, state.prev_update)
        return updates, UpdateStatsState(inner, grads, updates, stats)

    return optax.GradientTransformation(init, update)


def read_stats(opt_state: UpdateStatsState) -> dict[str, float]:
    """The latest step's statistics as Python floats (one host sync)."""
    return {name: float(value) for name, value in jax.device_get(opt_state.stats).items()}
