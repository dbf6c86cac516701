"""MiniCPM building blocks: RMSNorm, rotary embeddings, GQA attention and the SwiGLU MLP.

RoPE frequency variants live in `rope.py`, attention kernels in `attention_kernels.py`.

Numerics follow the HF reference (docs/recipe.md §1.4): RMSNorm variance, RoPE and the attention softmax run
in float32 whatever the compute dtype. Weights keep the head axes separate ([embed, heads, head_dim])
so that each axis has a logical name a sharding rule can refer to.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from minicpm_jax.config import ModelConfig
from minicpm_jax.model import parametrization, rope
from minicpm_jax.model.attention_kernels import attend, attend_cache
from minicpm_jax.model.kv_cache import LayerSlot
from minicpm_jax.parallel import mesh as sharding


def logical_param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """A Param annotated with logical axis names (DESIGN §4).

    Under a mesh (and logical-axis rules) Flax shards the value as it is created, so parameters are
    born sharded; without a mesh the names are kept as metadata only.
    """
    eager = not jax.sharding.get_abstract_mesh().empty
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=eager)


def compute_weight(param: nnx.Param, dtype) -> jax.Array:
    """A parameter in the compute dtype, laid out for use (FSDP gathers it here, `sharding.weight_for_use`).

    Inside the layer scan a stacked parameter's value has lost its leading `layers` axis while its
    metadata still names it, so the value's rank picks the trailing names.
    """
    value = param[...].astype(dtype)
    names = tuple(param.get_metadata()["out_sharding"])
    return sharding.weight_for_use(value, names[len(names) - value.ndim:])


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], cfg: ModelConfig,
                 group: str = "matrix", fan_in: int | None = None) -> nnx.Param:
    """A normally initialised Param; its std comes from the parametrization table (μP or a standard control).

    fan_in: the size of the input dimensions the weight contracts (standard_fanin's std is ∝ 1/√fan_in).
    """
    std = parametrization.init_std(cfg, group, fan_in)
    return logical_param(std * jax.random.normal(rngs.params(), tuple(shape), jnp.dtype(cfg.param_dtype)), names)


class RMSNorm(nnx.Module):
    """y = weight · x / sqrt(mean(x²) + eps), with the mean taken in float32 (Llama-style)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.eps = cfg.rms_norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        self.weight = logical_param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return compute_weight(self.weight, self.dtype) * normed.astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
    """Rotate-half RoPE (HF/NeoX layout) on x [B, T, heads, head_dim], computed in float32.

    positions: [B, T] integer positions (they restart per document in packed rows). `scale` multiplies
    cos and sin (LongRoPE's attention factor; 1 otherwise), see `rope.frequencies`.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # broadcast over heads
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * (jnp.cos(angles) * scale) + rotated * (jnp.sin(angles) * scale)).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and scale 1/√head_dim (MiniCPM does not use μP's 1/d)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = jnp.dtype(cfg.dtype)
        self.rope = rope.RopeSpec.from_model(cfg)
        self.attention_impl, self.attention_block_size = cfg.attention_impl, cfg.attention_block_size
        self.q_proj = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg, fan_in=d)
        self.k_proj = normal_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, fan_in=d)
        self.v_proj = normal_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, fan_in=d)
        self.o_proj = normal_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg, fan_in=n * h)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 cache: LayerSlot | None = None, cache_index: jax.Array | None = None):
        """x [B, T, d] -> [B, T, d], causal within the documents of segment_ids [B, T] (None: one document).

        With a KV cache (decoding), this step's k/v are written into `cache` at slot `cache_index`, the
        queries attend over the whole cache, segment_ids [B, S] mark its slots (0: left padding, never
        read), and the result is (output, updated cache).
        """
        cast = lambda p: compute_weight(p, self.dtype)
        q, k, v = self._project(x, positions)
        if cache is None:
            out = attend(q, k, v, segment_ids, self.attention_impl, self.attention_block_size)
            return jnp.einsum("btnh,nhd->btd", out, cast(self.o_proj))
        cache, cached_k, cached_v = cache.write(k, v, cache_index)
        # Query t sits at slot cache_index + t: causal over slots, reading only the row's own tokens.
        out = attend_cache(q, cached_k, cached_v, segment_ids, cache_index, self.attention_impl,
                           self.attention_block_size)
        return jnp.einsum("btnh,nhd->btd", out, cast(self.o_proj)), cache


    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, heads, head_dim] and k, v [B, T, kv_heads, head_dim]; q and k rotated."""
        cast = lambda p: compute_weight(p, self.dtype)
        q = jnp.einsum("btd,dnh->btnh", x, cast(self.q_proj))
        k = jnp.einsum("btd,dkh->btkh", x, cast(self.k_proj))
        v = jnp.einsum("btd,dkh->btkh", x, cast(self.v_proj))
        inv_freq, rope_scale = rope.frequencies(self.rope, positions)
        return apply_rope(q, positions, inv_freq, rope_scale), apply_rope(k, positions, inv_freq, rope_scale), v

    def scores(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The attention logits q·k/√head_dim [B, heads, T, T] in float32, before the causal mask.

        A probe for the coordinate check (the attention kernels never materialise them all).
        """
        q, k, _ = self._project(x, positions)
        k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)  # query head j reads kv head j // group
        return jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate x) ⊙ up x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate_proj = normal_param(rngs, (d, f), ("embed", "mlp"), cfg, fan_in=d)
        self.up_proj = normal_param(rngs, (d, f), ("embed", "mlp"), cfg, fan_in=d)
        self.down_proj = normal_param(rngs, (f, d), ("mlp", "embed"), cfg, fan_in=f)

    def __call__(self, x: jax.Array) -> jax.Array:
        cast = lambda p: compute_weight(p, self.dtype)
        # On [tokens, d] rather than [B, T, d]: the same math, but XLA:CPU then gives the weight gradients
        # plain 2-D dots without transposed copies of the SwiGLU activations (1.1-1.2x faster train step
        # at d = 256-512, BENCHMARKS.md). Merging the two leading axes is free in a row-major layout.
        tokens = x.reshape(-1, x.shape[-1])
        gate = jax.nn.silu(tokens @ cast(self.gate_proj))
        return ((gate * (tokens @ cast(self.up_proj))) @ cast(self.down_proj)).reshape(x.shape)
