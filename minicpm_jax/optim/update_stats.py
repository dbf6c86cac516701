"""Decay-dynamics statistics on a fixed probe batch (docs/recipe.md §5.8; paper §4.4, Fig. 7–8).

The paper follows, across the stable → decay transition, the gradient g_t and the update v_t = x_{t+1} − x_t:
    update size     max|v_t| (and ‖v_t‖)              (tracks the learning rate)
    gradient norm   ‖g_{t+1}‖                         (falls during the decay)
    grad_cosine     cos(g_{t+1}, g_t)                 (turns mostly positive during the decay)
    d1              D₁ = g_{t+1}·v_t / ‖v_t‖           (first directional derivative along the last step)
    d2              D₂ = (g_{t+1} − g_t)·v_t / ‖v_t‖²  (second directional derivative)
    curvature       K = |D₂| / (1 + D₁²)^{3/2}         (rises ~10× in the paper's decay)

Computed from minibatch gradients, g_{t+1} − g_t is mostly the difference between two batches' noise, not a
change of the loss surface: D₂ then scales like (noise)/‖v_t‖ ∝ 1/lr, and K·lr stays constant across phases
(what an earlier version of this module measured). Here both gradients are of one FIXED probe batch — the
same held-out tokens every time, never trained on — so L_probe is one fixed function and
g_{t+1} − g_t = ∇L_probe(x_{t+1}) − ∇L_probe(x_t) ≈ H v_t: D₂ is the curvature of the probe loss along the
step (exactly vᵀHv/‖v‖² on a quadratic), and D₁ its slope at the new point.

Every statistic is reported over all parameters ("global") and per tensor (each parameter of the
pure-dict state; the stacked layers form one tensor per kind, e.g. every layer's q_proj). A tensor's D₁, D₂
and K use its own slice of g and v: D₂ of tensor i is v_iᵀ(H v)_i / ‖v_i‖², the curvature along the whole
step as seen by that tensor's coordinates (it includes the coupling to the other tensors' moves).

The train loop (`train.log_update_stats`) computes them at each logged step t+1 from a copy of x_t kept
just for that step; nothing enters the optimizer state or the checkpoints, and with the flag off nothing
is computed or copied. Cost when on: two forward-backward passes on the probe per logged step. Under a
bfloat16 compute dtype, g_{t+1} − g_t of a tiny step carries rounding noise; on CPU the default is float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Per group of tensors, in metrics.jsonl as dyn/<stat> (all parameters) and dyn/<stat>/<tensor path>.
STATS = ("grad_norm", "grad_cosine", "update_norm", "update_max_abs", "d1", "d2", "curvature")
PREFIX = "dyn"

# params -> (probe loss, gradient of the probe loss); the gradient has the structure of params
GradFn = Callable[[Any], tuple[jax.Array, Any]]


def _f32(tree: Any) -> list[jax.Array]:
    return [x.astype(jnp.float32).ravel() for x in jax.tree.leaves(tree)]


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num/den, and 0 where den is 0 (a tensor that did not move has no direction)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def directional_statistics(g0: list[jax.Array], g1: list[jax.Array], v: list[jax.Array]) -> dict[str, jax.Array]:
    """The statistics of one group of flattened tensors: g0 = ∇L(x_t), g1 = ∇L(x_{t+1}), v = x_{t+1} − x_t."""
    dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(a, b))
    g1_sq, g0_sq, v_sq = dot(g1, g1), dot(g0, g0), dot(v, v)
    v_norm = jnp.sqrt(v_sq)
    g1_v = dot(g1, v)
    d1 = _safe_div(g1_v, v_norm)
    d2 = _safe_div(g1_v - dot(g0, v), v_sq)
    return {
        "grad_norm": jnp.sqrt(g1_sq),
        "grad_cosine": _safe_div(dot(g1, g0), jnp.sqrt(g1_sq * g0_sq)),
        "update_norm": v_norm,
        "update_max_abs": jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in v])),
        "d1": d1,
        "d2": d2,
        "curvature": jnp.abs(d2) / (1.0 + d1 ** 2) ** 1.5,
    }


def tensor_names(params: Any) -> list[str]:
    """Dotted paths of the leaves of `params`, in leaf order ("layers.attn.q_proj.kernel", "embed.embedding")."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names.append(".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path))
    return names


def probe_statistics(grad_fn: GradFn, before: Any, after: Any, per_tensor: bool = True) -> dict[str, jax.Array]:
    """Every statistic of the step before → after on the probe loss of `grad_fn`, global and per tensor.

    Keys: dyn/loss (probe loss at `after`), dyn/loss_change (L(after) − L(before)), dyn/<stat>, and with
    `per_tensor` dyn/<stat>/<tensor path>. Jittable.
    """
    loss0, grad0 = grad_fn(before)
    loss1, grad1 = grad_fn(after)
    g0, g1 = _f32(grad0), _f32(grad1)
    v = [b - a for a, b in zip(_f32(before), _f32(after))]
    out = {f"{PREFIX}/loss": loss1, f"{PREFIX}/loss_change": loss1 - loss0}
    out.update({f"{PREFIX}/{k}": value for k, value in directional_statistics(g0, g1, v).items()})
    if per_tensor:
        for i, name in enumerate(tensor_names(after)):
            stats = directional_statistics([g0[i]], [g1[i]], [v[i]])
            out.update({f"{PREFIX}/{k}/{name}": value for k, value in stats.items()})
    return out


def lm_probe_grad_fn(graphdef: Any, loss_fn: Callable, probe: dict[str, jax.Array]) -> GradFn:
    """The mean training objective on `probe` (a batch of `loss_fn`'s keys) and its gradient, as a GradFn."""

    def mean_objective(params):
        objective, stats = loss_fn(graphdef, params, probe)
        count = jnp.maximum(stats["count"], 1.0)
        return objective / count

    return jax.value_and_grad(mean_objective)


def make_probe_stats(graphdef: Any, loss_fn: Callable, per_tensor: bool = True) -> Callable:
    """(params before, params after, probe batch) -> probe_statistics, jitted."""

    def stats(before, after, probe):
        return probe_statistics(lm_probe_grad_fn(graphdef, loss_fn, probe), before, after, per_tensor)

    return jax.jit(stats)


def read_stats(stats: dict[str, jax.Array]) -> dict[str, float]:
    """The statistics as Python floats (one host sync)."""
    return {name: float(value) for name, value in jax.device_get(stats).items()}
