"""MiniCPM building blocks: RMSNorm, rotary embeddings, GQA attention and the SwiGLU MLP.

Numerics follow the HF reference (facts §1.2): RMSNorm variance, RoPE and the attention softmax run
in float32 whatever the compute dtype. Weights keep the head axes separate ([embed, heads, head_dim])
so that each axis has a logical name a sharding rule can refer to.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from minicpm_jax.config import ModelConfig
from minicpm_jax.model import parametrization
from minicpm_jax.model.kv_cache import LayerKV


def logical_param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """A Param annotated with logical axis names (DESIGN §4).

    Under a mesh (and logical-axis rules) Flax shards the value as it is created, so parameters are
    born sharded; without a mesh the names are kept as metadata only.
    """
    eager = not jax.sharding.get_abstract_mesh().empty
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=eager)


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], cfg: ModelConfig,
                 group: str = "matrix") -> nnx.Param:
    """A normally initialised Param; its std comes from the parametrization table (μP or standard)."""
    std = parametrization.init_std(cfg, group)
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
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """inv_freq_i = θ^(−2i/head_dim) for i < head_dim/2, in float32."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta ** exponents)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF/NeoX layout) on x [B, T, heads, head_dim], computed in float32.

    positions: [B, T] integer positions (they restart per document in packed rows).
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # broadcast over heads
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_mask(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Boolean [B, 1, T, T] mask: causal, and within one document when segment ids are given."""
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (batch, 1, length, length))
    same_document = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return causal & same_document


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and scale 1/√head_dim (MiniCPM does not use μP's 1/d)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = jnp.dtype(cfg.dtype)
        self.rope_theta = cfg.rope_theta
        self.q_proj = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
        self.k_proj = normal_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.v_proj = normal_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.o_proj = normal_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 cache: LayerKV | None = None, cache_index: jax.Array | None = None):
        """x [B, T, d] -> [B, T, d]. With a KV cache (decoding), this step's k/v are written into `cache` at
        slot `cache_index`, attention reads the whole cache (mask [B, 1, T, cache length]), and the result
        is (output, updated cache)."""
        cast = lambda p: p[...].astype(self.dtype)
        q = jnp.einsum("btd,dnh->btnh", x, cast(self.q_proj))
        k = jnp.einsum("btd,dkh->btkh", x, cast(self.k_proj))
        v = jnp.einsum("btd,dkh->btkh", x, cast(self.v_proj))
        inv_freq = rope_inverse_frequencies(q.shape[-1], self.rope_theta)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if cache is not None:
            cache = cache.write(k, v, cache_index)
            k, v = cache.k, cache.v
        # jax.nn.dot_product_attention handles GQA (query head j reads kv head j // group), scales by
        # 1/√head_dim and takes the softmax in float32, as the reference does.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        out = jnp.einsum("btnh,nhd->btd", out, cast(self.o_proj))
        return out if cache is None else (out, cache)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate x) ⊙ up x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate_proj = normal_param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.up_proj = normal_param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down_proj = normal_param(rngs, (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        cast = lambda p: p[...].astype(self.dtype)
        # On [tokens, d] rather than [B, T, d]: the same math, but XLA:CPU then gives the weight gradients
        # plain 2-D dots without transposed copies of the SwiGLU activations (1.1-1.2x faster train step
        # at d = 256-512, BENCHMARKS.md). Merging the two leading axes is free in a row-major layout.
        tokens = x.reshape(-1, x.shape[-1])
        gate = jax.nn.silu(tokens @ cast(self.gate_proj))
        return ((gate * (tokens @ cast(self.up_proj))) @ cast(self.down_proj)).reshape(x.shape)
