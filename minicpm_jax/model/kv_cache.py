"""The key/value cache of incremental decoding: preallocated, stacked over layers, written in place.

Layout [layers, batch, kv_heads, slots, head_dim]: the same leading `layers` axis as the stacked
parameters, so the cache rides through the same `jax.lax.scan` as the weights (one layer's slice per
scan step), and then heads before slots, so that each (row, kv head) holds its keys as one contiguous
[slots, head_dim] matrix, the operand layout of the attention dots (`attention_kernels.attend_cache`).
A slots-before-heads layout made XLA:CPU transpose every layer's whole cache on every step: half of a
batch-8 decoding step (BENCHMARKS.md).

Rows of a batch are left-padded to a common prompt length: row b's tokens occupy slots `start[b]`
onwards, every row writes its next token into the same slot, and the slots' segment ids hide the
padding slots in front of each row. One write index for the whole batch keeps each step a single
`dynamic_update_slice`, with shapes that never change from one token to the next.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from minicpm_jax.config import ModelConfig


class LayerKV(NamedTuple):
    """Keys and values of every layer, [L, B, kv_heads, S, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def slots(self) -> int:
        return self.k.shape[3]


class LayerSlot(NamedTuple):
    """One layer's view of the stacked cache, as a decoder block sees it inside the layer scan.

    Writes go into the stacked arrays, which the scan carries: XLA updates them in place, so a decoding
    step writes only the new tokens' keys and values instead of copying the cache (a scanned-over cache
    would be rebuilt as a new stacked output every step).
    """

    stacked: LayerKV
    layer: jax.Array

    def write(self, k: jax.Array, v: jax.Array, index: jax.Array) -> tuple[LayerSlot, jax.Array, jax.Array]:
        """k, v [B, T, kv_heads, head_dim] stored at slots index .. index + T - 1 of this layer; returns
        (the updated view, this layer's keys and values [B, kv_heads, S, head_dim])."""
        put = lambda cache, new: jax.lax.dynamic_update_slice(
            cache, new.swapaxes(1, 2)[None].astype(cache.dtype), (self.layer, 0, 0, index, 0))
        stacked = LayerKV(put(self.stacked.k, k), put(self.stacked.v, v))
        return LayerSlot(stacked, self.layer), stacked.k[self.layer], stacked.v[self.layer]


def init_cache(cfg: ModelConfig, batch: int, slots: int) -> LayerKV:
    """An empty cache for every layer, in the compute dtype."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
    return LayerKV(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))


def cache_positions(starts: jax.Array, index: jax.Array, length: int) -> jax.Array:
    """[B, T] RoPE positions of the tokens written at slots index .. index + T - 1 (0 at each row's start)."""
    return jnp.maximum(index + jnp.arange(length)[None, :] - starts[:, None], 0)


def cache_segments(starts: jax.Array, slots: int) -> jax.Array:
    """[B, S] segment ids of the cache slots: 1 from row b's start on, 0 for its left padding (never read).

    With the queries in segment 1 at slots index .. index + T - 1, causal attention over these segments
    sees exactly slots start[b] .. index + t: the same mask as training (`attention_kernels.attention_mask`).
    """
    return (jnp.arange(slots)[None, :] >= starts[:, None]).astype(jnp.int32)
