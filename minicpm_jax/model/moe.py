"""The MiniCPM-MoE layer (docs/recipe.md §8): a top-k router over SwiGLU experts, in place of the dense MLP.

Routing: p = softmax(x·W_r) in float32 over all experts, the top k kept and renormalised to sum to 1;
the output is Σ_k p̂_k · expert_k(x). Each expert is down(silu(gate x) ⊙ up x), with HF's w1 = gate,
w3 = up, w2 = down. Two dispatch paths compute the same function:
- `dense`: every expert runs on every token and the outputs are mixed with the (mostly zero) routing
  weights. Exact and simple, E/k times the FLOPs: for tests and very small models.
- `grouped`: the (token, choice) pairs are grouped by expert and each expert multiplies only its own
  rows: `jax.lax.ragged_dot` on TPU, expert-aligned row blocks in a scan elsewhere (see
  `grouped_experts`). Dropless unless a capacity factor is set. Under a mesh it runs in a
  shard_map: each device holds num_experts / |expert| experts, gathers the tokens of its expert group,
  computes its experts' share, and a reduce-scatter returns every token's sum to the device that owns it.

The layer also reports router statistics: the Switch load-balancing loss E·Σ_i f_i·P_i (f_i: the share
of the k·tokens assignments that go to expert i, P_i: expert i's mean router probability; 1.0 when
perfectly balanced, whatever k), the router z-loss mean(logsumexp(logits)²), and f itself.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from minicpm_jax.config import ConfigError, ModelConfig
from minicpm_jax.model.layers import compute_weight, normal_param
from minicpm_jax.parallel import mesh as sharding
from minicpm_jax.parallel.mesh import BATCH_AXES

# The mesh axis that splits the experts; tokens are split over BATCH_AXES (which include it) and `sequence`.
EXPERT_AXIS = "expert"


class Routing(NamedTuple):
    """Each token's k experts [.., k] int32 and their renormalised weights [.., k] float32 (0 = dropped)."""

    experts: jax.Array
    weights: jax.Array


def route(x: jax.Array, router: jax.Array, k: int) -> tuple[Routing, jax.Array, jax.Array]:
    """(routing, router logits [.., E], router probabilities [.., E]), all in float32."""
    logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, experts = jax.lax.top_k(probs, k)
    return Routing(experts, top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)), logits, probs


def capacity_mask(experts: jax.Array, num_experts: int, capacity_factor: float) -> jax.Array:
    """[.., k] bool: which assignments fit in their expert's capacity ceil(c·k·tokens/E).

    Priority goes to first choices over second choices, then to earlier tokens (as in Switch/GShard),
    so the same tokens are dropped whichever dispatch path runs.
    """
    k = experts.shape[-1]
    flat = experts.reshape(-1, k)
    capacity = math.ceil(capacity_factor * k * flat.shape[0] / num_experts)
    by_priority = flat.T.reshape(-1)  # all first choices, then all second choices, ...
    one_hot = jax.nn.one_hot(by_priority, num_experts, dtype=jnp.int32)
    position = jnp.sum(jnp.cumsum(one_hot, axis=0) * one_hot, axis=-1) - 1
    return (position < capacity).reshape(k, -1).T.reshape(experts.shape)


def router_stats(experts: jax.Array, logits: jax.Array, probs: jax.Array) -> dict[str, jax.Array]:
    """Load-balancing loss, z-loss and per-expert assignment fractions over all tokens."""
    num_experts = probs.shape[-1]
    assignments = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [.., k, E]
    fraction = jnp.mean(assignments.reshape(-1, num_experts), axis=0)  # f_i, sums to 1
    mean_prob = jnp.mean(probs.reshape(-1, num_experts), axis=0)  # P_i
    z = jax.nn.logsumexp(logits, axis=-1)
    return {"load_balance": num_experts * jnp.sum(fraction * mean_prob), "router_z": jnp.mean(jnp.square(z)),
            "expert_fraction": fraction}


def dense_dispatch(x: jax.Array, routing: Routing, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Every expert on every token, mixed by the routing weights: [B, T, d] -> [B, T, d]."""
    mix = jnp.sum(jax.nn.one_hot(routing.experts, gate.shape[0], dtype=jnp.float32)
                  * routing.weights[..., None], axis=-2).astype(x.dtype)  # [B, T, E]
    hidden = jax.nn.silu(jnp.einsum("btd,edf->btef", x, gate)) * jnp.einsum("btd,edf->btef", x, up)
    return jnp.einsum("btef,efd,bte->btd", hidden, down, mix)


def grouped_experts(x: jax.Array, experts: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
                    down: jax.Array, first_expert: jax.Array | int = 0) -> jax.Array:
    """Σ_k weight·expert(x) over the assignments to the experts held here; [M, d] tokens -> [M, d].

    gate/up/down hold experts first_expert .. first_expert + E_local - 1; assignments to other experts
    and dropped ones (weight 0) are skipped. The TPU runs `ragged_dot` natively; elsewhere (XLA lowers
    ragged_dot to a dense matmul per group there) each expert's rows are padded to whole blocks and
    a scan multiplies every block by its one expert, for k/E of the dense path's FLOPs plus padding.
    """
    local_experts, k = gate.shape[0], experts.shape[-1]
    local = experts.reshape(-1) - first_expert
    held = (local >= 0) & (local < local_experts) & (weights.reshape(-1) > 0)
    group = jnp.where(held, local, local_experts)  # past the last expert: skipped
    row_weights = jnp.where(held, weights.reshape(-1), 0.0).astype(x.dtype)
    token = jnp.arange(group.shape[0]) // k
    if ragged_dot_is_native():
        order = jnp.argsort(group, stable=True)
        sizes = jnp.bincount(group, length=local_experts + 1)[:local_experts].astype(jnp.int32)
        out_rows = _ragged_swiglu(x[token[order]], gate, up, down, sizes)
        return jnp.zeros_like(x).at[token[order]].add(out_rows * row_weights[order][:, None])
    out_rows = _blocked_swiglu(x[token], group, gate, up, down)
    return jnp.zeros_like(x).at[token].add(out_rows * row_weights[:, None])


def ragged_dot_is_native() -> bool:
    """Whether XLA has a grouped-matmul kernel for ragged_dot here (elsewhere it lowers to dense matmuls)."""
    return sharding.target_platform() == "tpu"


def _ragged_swiglu(rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, sizes: jax.Array) -> jax.Array:
    hidden = jax.nn.silu(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
    return jax.lax.ragged_dot(hidden, down, sizes)


def _blocked_swiglu(rows: jax.Array, group: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                    max_block: int = 128) -> jax.Array:
    """Each row through expert `group[row]` (rows whose group is out of range give 0), in expert blocks."""
    num_rows, num_experts = rows.shape[0], gate.shape[0]
    block = int(min(max_block, max(8, 2 ** math.ceil(math.log2(max(1, num_rows // num_experts))))))
    num_blocks = -(-num_rows // block) + num_experts  # enough for every expert's last, partial block
    one_hot = jax.nn.one_hot(group, num_experts, dtype=jnp.int32)  # all zeros for skipped rows
    rank = jnp.sum(jnp.cumsum(one_hot, axis=0) * one_hot, axis=-1) - 1  # the row's position in its expert
    padded_sizes = -(-jnp.sum(one_hot, axis=0) // block) * block
    padded_ends = jnp.cumsum(padded_sizes)
    slot = jnp.where(group < num_experts, (padded_ends - padded_sizes)[jnp.minimum(group, num_experts - 1)] + rank,
                     num_blocks * block)  # out of range: dropped by the scatter, zero-filled by the gather
    blocks = jnp.zeros((num_blocks * block, rows.shape[1]), rows.dtype).at[slot].set(rows, mode="drop")
    block_expert = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(num_blocks) * block, side="right"),
                               num_experts - 1)

    def expert_block(_, block_and_expert):
        x, e = block_and_expert
        hidden = jax.nn.silu(x @ gate[e]) * (x @ up[e])
        return None, hidden @ down[e]

    _, out = jax.lax.scan(expert_block, None, (blocks.reshape(num_blocks, block, -1), block_expert))
    return out.reshape(num_blocks * block, -1).at[slot].get(mode="fill", fill_value=0)


def grouped_dispatch(x: jax.Array, routing: Routing, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """The grouped path on [B, T, d]; expert-parallel through shard_map when a mesh is active."""
    batch, length, dim = x.shape
    if not sharding.is_active():
        out = grouped_experts(x.reshape(-1, dim), routing.experts.reshape(-1, routing.experts.shape[-1]),
                              routing.weights.reshape(-1, routing.weights.shape[-1]), gate, up, down)
        return out.reshape(x.shape)
    return _expert_parallel(x, routing, gate, up, down)


def _expert_parallel(x: jax.Array, routing: Routing, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    num_experts, groups = gate.shape[0], mesh.shape[EXPERT_AXIS]
    if num_experts % groups:
        raise ConfigError(f"model.num_experts={num_experts} must divide over mesh.expert={groups}")
    tokens = PartitionSpec(BATCH_AXES, "sequence")  # every device's own rows (and sequence chunk)
    experts = PartitionSpec(EXPERT_AXIS)  # each expert group holds E/|expert| experts, whole

    def local(x, experts_, weights, gate, up, down):
        dim, k = x.shape[-1], experts_.shape[-1]
        # The expert group's tokens: each device then serves them for its own experts only.
        gather = lambda a, width: jax.lax.all_gather(a.reshape(-1, width), EXPERT_AXIS, axis=0, tiled=True)
        first = jax.lax.axis_index(EXPERT_AXIS) * gate.shape[0]
        partial = grouped_experts(gather(x, dim), gather(experts_, k), gather(weights, k), gate, up, down, first)
        # Sum the experts' shares and hand each device back its own tokens in one reduce-scatter.
        out = jax.lax.psum_scatter(partial, EXPERT_AXIS, scatter_dimension=0, tiled=True)
        return out.reshape(x.shape)

    return jax.shard_map(local, in_specs=(tokens, tokens, tokens, experts, experts, experts), out_specs=tokens,
                         check_vma=False)(x, routing.experts, routing.weights, gate, up, down)


class MoE(nnx.Module):
    """num_experts SwiGLU experts behind a top-k router; returns (output, router statistics)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        self.dtype = jnp.dtype(cfg.dtype)
        self.k = cfg.num_experts_per_tok
        self.dispatch = cfg.moe_dispatch
        self.capacity_factor = cfg.moe_capacity_factor
        self.router = normal_param(rngs, (d, e), ("embed", None), cfg, fan_in=d)  # HF mlp.gate.weight, transposed
        self.gate_proj = normal_param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg, fan_in=d)  # w1
        self.up_proj = normal_param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg, fan_in=d)  # w3
        self.down_proj = normal_param(rngs, (e, f, d), ("expert", "mlp", "embed"), cfg, fan_in=f)  # w2

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        routing, logits, probs = route(x, self.router[...], self.k)
        stats = router_stats(routing.experts, logits, probs)
        if self.capacity_factor:
            keep = capacity_mask(routing.experts, probs.shape[-1], self.capacity_factor)
            routing = Routing(routing.experts, jnp.where(keep, routing.weights, 0.0))
        weights = [compute_weight(p, self.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        dispatch = dense_dispatch if self.dispatch == "dense" else grouped_dispatch
        return dispatch(x, routing, *weights), stats
