"""Chunked ("flash-style") causal attention in pure JAX: memory linear in the sequence length.

The scores are never materialised as T×S. Queries are processed in blocks of `block_q`; for each
query block the key blocks are visited in order with an online softmax (running max `m`, running sum
`row_sum` and the unnormalised output, all in float32), and key blocks that lie wholly in the causal future
are skipped. The backward pass is a custom VJP in the FlashAttention-2 form: it recomputes each
block's probabilities from the saved log-sum-exp instead of storing them, so training memory is also
O(T·block) rather than O(T²) (a remat-ed scan would still store every step's running output).

Layouts follow `jax.nn.dot_product_attention`: q [B, T, N, H], k and v [B, S, K, H] with K dividing N
(query head j reads kv head j // (N/K)). Masking is causal on absolute indices, where the queries sit
at `q_offset + [0, T)` of the keys' [0, S) (an offset lets a sequence shard attend to gathered keys),
and within one document: a query sees a key only if their segment ids are equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_PAD_Q, _PAD_KV = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).min + 1  # padding never matches anything
_MASKED = -1e30  # finite, so a row with no visible key so far never produces inf − inf


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                      kv_segment_ids: jax.Array, q_offset: jax.Array | int = 0, block_size: int = 512) -> jax.Array:
    """softmax(q kᵀ/√H + causal/document mask) v, blockwise; pads T and S up to whole blocks."""
    length, kv_length = q.shape[1], k.shape[1]
    block_q, block_kv = min(block_size, length), min(block_size, kv_length)
    pad_q, pad_kv = -length % block_q, -kv_length % block_kv
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
        q_segment_ids = jnp.pad(q_segment_ids, ((0, 0), (0, pad_q)), constant_values=_PAD_Q)
    if pad_kv:
        k, v = (jnp.pad(x, ((0, 0), (0, pad_kv), (0, 0), (0, 0))) for x in (k, v))
        kv_segment_ids = jnp.pad(kv_segment_ids, ((0, 0), (0, pad_kv)), constant_values=_PAD_KV)
    offset = jnp.asarray(q_offset, jnp.int32)
    out = _attention(q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32), offset,
                     block_q, block_kv)
    return out[:, :length]


def _grouped(q: jax.Array, num_kv_heads: int, block_q: int) -> jax.Array:
    """[B, T, N, H] -> [B, T/block_q, block_q, K, G, H]: query blocks, heads grouped by their kv head."""
    batch, length, heads, dim = q.shape
    return q.reshape(batch, length // block_q, block_q, num_kv_heads, heads // num_kv_heads, dim)


def _varying_like(value: jax.Array, reference: jax.Array) -> jax.Array:
    """`value` typed as varying over the manual mesh axes `reference` varies over (inside shard_map), so a
    loop carry initialised from constants has the type of the carry the loop body returns."""
    aval = jax.typeof(reference)
    # jax 0.10 keeps the varying axes in `aval.mat.varying`; earlier versions called them `aval.vma`.
    axes = tuple(sorted(aval.mat.varying if hasattr(aval, "mat") else getattr(aval, "vma", ())))
    return jax.lax.pcast(value, axes, to="varying") if axes else value


def _key_blocks_needed(block: jax.Array, offset: jax.Array, block_q: int, block_kv: int, num_kv_blocks: int):
    """Key blocks 0..n-1 hold every key the query block can see; later ones lie wholly in its future."""
    last_query = offset + (block + 1) * block_q - 1
    return jnp.clip(last_query // block_kv + 1, 0, num_kv_blocks)


class _Blocks:
    """One query block's view of one key block: scores and the visibility mask, in float32."""

    def __init__(self, q_block, q_segments, q_start, k, kv_segments, block_kv, scale):
        self.q_block, self.q_segments, self.q_start = q_block, q_segments, q_start
        self.k, self.kv_segments, self.block_kv, self.scale = k, kv_segments, block_kv, scale

    def key(self, x: jax.Array, j: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(x, j * self.block_kv, self.block_kv, axis=1)

    def scores(self, j: jax.Array) -> tuple[jax.Array, jax.Array]:
        """([B, K, G, bq, bk] scaled scores with invisible entries at _MASKED, visibility mask)."""
        k_j = self.key(self.k, j)
        s = jnp.einsum("bqkgh,bskh->bkgqs", self.q_block, k_j, preferred_element_type=jnp.float32) * self.scale
        q_index = self.q_start + jnp.arange(self.q_block.shape[1])
        k_index = j * self.block_kv + jnp.arange(self.block_kv)
        same_doc = self.q_segments[:, :, None] == self.key(self.kv_segments[..., None], j)[:, None, :, 0]
        visible = ((k_index[None, :] <= q_index[:, None])[None] & same_doc)[:, None, None]
        return jnp.where(visible, s, _MASKED), visible


def _forward(q, k, v, q_segments, kv_segments, offset, block_q, block_kv):
    batch, length, heads, dim = q.shape
    num_kv_heads, num_kv_blocks = k.shape[2], k.shape[1] // block_kv
    scale = 1.0 / jnp.sqrt(jnp.float32(dim))
    q_blocks = _grouped(q, num_kv_heads, block_q)
    seg_blocks = q_segments.reshape(batch, -1, block_q)

    def one_query_block(i):
        blocks = _Blocks(q_blocks[:, i], seg_blocks[:, i], offset + i * block_q, k, kv_segments, block_kv, scale)

        def step(j, carry):
            m, row_sum, acc = carry
            s, visible = blocks.scores(j)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), blocks.key(v, j),
                            preferred_element_type=jnp.float32)
            return m_new, row_sum * correction + p.sum(axis=-1), acc * correction[..., None] + pv

        stats_shape = (batch, num_kv_heads, heads // num_kv_heads, block_q)
        init = (jnp.full(stats_shape, _MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
                jnp.zeros(stats_shape + (dim,), jnp.float32))
        init = jax.tree.map(lambda x: _varying_like(x, q), init)
        n = _key_blocks_needed(i, offset, block_q, block_kv, num_kv_blocks)
        m, row_sum, acc = jax.lax.fori_loop(0, n, step, init)
        # A query with no visible key (only padding rows) gets output 0 and log-sum-exp 0.
        seen = row_sum > 0
        out = acc / jnp.where(seen, row_sum, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, row_sum, 1.0)), 0.0)
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse  # [B, bq, K, G, H], [B, K, G, bq]

    out, lse = jax.lax.map(one_query_block, jnp.arange(length // block_q))
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(batch, length, heads, dim)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, q_segments, kv_segments, offset, block_q, block_kv):
    return _forward(q, k, v, q_segments, kv_segments, offset, block_q, block_kv)[0]


def _attention_fwd(q, k, v, q_segments, kv_segments, offset, block_q, block_kv):
    out, lse = _forward(q, k, v, q_segments, kv_segments, offset, block_q, block_kv)
    return out, (q, k, v, q_segments, kv_segments, offset, out, lse)


def _attention_bwd(block_q, block_kv, residuals, d_out):
    q, k, v, q_segments, kv_segments, offset, out, lse = residuals
    batch, length, _, dim = q.shape
    num_kv_heads, num_kv_blocks = k.shape[2], k.shape[1] // block_kv
    scale = 1.0 / jnp.sqrt(jnp.float32(dim))
    q_blocks, d_out_blocks = _grouped(q, num_kv_heads, block_q), _grouped(d_out, num_kv_heads, block_q)
    # D_i = rowsum(dO ∘ O), the softmax-Jacobian term of every query row.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta_blocks = _grouped(delta[..., None], num_kv_heads, block_q)[..., 0].transpose(0, 1, 3, 4, 2)
    seg_blocks = q_segments.reshape(batch, -1, block_q)

    def one_query_block(carry, i):
        blocks = _Blocks(q_blocks[:, i], seg_blocks[:, i], offset + i * block_q, k, kv_segments, block_kv, scale)
        d_out_i, delta_i, lse_i = d_out_blocks[:, i], delta_blocks[:, i], lse[i]

        def step(j, inner):
            dq_i, dk, dv = inner
            s, visible = blocks.scores(j)
            p = jnp.where(visible, jnp.exp(s - lse_i[..., None]), 0.0)
            dp = jnp.einsum("bqkgh,bskh->bkgqs", d_out_i, blocks.key(v, j), preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dv_j = jnp.einsum("bkgqs,bqkgh->bskh", p, d_out_i.astype(jnp.float32))
            dk_j = jnp.einsum("bkgqs,bqkgh->bskh", ds, blocks.q_block.astype(jnp.float32))
            dq_i = dq_i + jnp.einsum("bkgqs,bskh->bqkgh", ds, blocks.key(k, j).astype(jnp.float32))
            add = lambda total, part: jax.lax.dynamic_update_slice_in_dim(
                total, blocks.key(total, j) + part, j * block_kv, axis=1)
            return dq_i, add(dk, dk_j), add(dv, dv_j)

        n = _key_blocks_needed(i, offset, block_q, block_kv, num_kv_blocks)
        dq_i = _varying_like(jnp.zeros(blocks.q_block.shape, jnp.float32), q)
        dq_i, dk, dv = jax.lax.fori_loop(0, n, step, (dq_i, *carry))
        return (dk, dv), dq_i

    zeros = _varying_like(jnp.zeros(k.shape, jnp.float32), k)
    (dk, dv), dq = jax.lax.scan(one_query_block, (zeros, zeros), jnp.arange(length // block_q))
    dq = dq.transpose(1, 0, 2, 3, 4, 5).reshape(q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
