"""Causal, document-masked GQA attention behind one function, `attend`, with the kernel chosen by config
and platform (`model.attention_impl`):

- xla:     `jax.nn.dot_product_attention` with a [B, 1, T, S] boolean mask; memory O(T²), fastest for short T.
- chunked: `chunked_attention` (pure JAX, online softmax, custom backward); memory O(T·block); any platform.
- cudnn:   `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16 only). Packed documents
           need the same T×S mask as xla; without segment ids it runs with `is_causal` and no mask.
- splash:  the Pallas splash-attention kernel (TPU), which takes segment ids natively.
- auto:    splash on TPU; on GPU cudnn for bf16/fp16 when the mask is small (no segment ids, or
           T ≤ AUTO_XLA_MAX_LENGTH); elsewhere xla up to AUTO_XLA_MAX_LENGTH tokens and chunked above.

Decoding reads a KV cache stored heads-first ([B, K, S, H], `kv_cache.py`) through `attend_cache`, which
runs its dots on that layout and falls back to the chunked kernel for long prefills.

When the current mesh splits `sequence` over several devices, `attend` runs the chosen local kernel inside
`sequence_parallel.sequence_sharded_attention` (each shard's queries against all-gathered keys).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from minicpm_jax.model import sequence_parallel
from minicpm_jax.model.chunked_attention import chunked_attention
from minicpm_jax.parallel import mesh as sharding

log = logging.getLogger(__name__)

AUTO_XLA_MAX_LENGTH = 2048  # above this, auto stops materialising T×T scores (4096² f32 = 64 MiB per head)
_HALF = (jnp.bfloat16, jnp.float16)
_LARGE_NEGATIVE = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked scores, as jax.nn.dot_product_attention


def resolve_impl(impl: str, *, platform: str, dtype, length: int, has_segments: bool,
                 sequence_sharded: bool = False) -> str:
    """The kernel that `impl` means here; raises ValueError for a kernel this platform cannot run."""
    if sequence_sharded:
        # A shard's causal offset is known only inside shard_map (a traced index), which cuDNN's static
        # causal mask cannot take; splash runs one kernel per shard offset (see `attend`).
        if impl == "cudnn":
            raise ValueError("model.attention_impl='cudnn' does not run with a sequence-sharded mesh "
                             "(mesh.sequence > 1); use splash (TPU), chunked, xla or auto")
        if impl == "auto":
            return "splash" if platform == "tpu" else "xla" if length <= AUTO_XLA_MAX_LENGTH else "chunked"
        if impl == "splash" and platform != "tpu":
            raise ValueError(f"model.attention_impl='splash' needs a TPU (platform {platform}); "
                             f"use chunked for memory-efficient attention elsewhere")
        return impl
    if impl == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu" and jnp.dtype(dtype) in _HALF and (not has_segments or length <= AUTO_XLA_MAX_LENGTH):
            return "cudnn"
        return "xla" if length <= AUTO_XLA_MAX_LENGTH else "chunked"
    if impl == "cudnn" and (platform != "gpu" or jnp.dtype(dtype) not in _HALF):
        raise ValueError(f"model.attention_impl='cudnn' needs a GPU and bfloat16/float16 compute "
                         f"(platform {platform}, dtype {jnp.dtype(dtype).name})")
    if impl == "splash" and platform != "tpu":
        raise ValueError(f"model.attention_impl='splash' needs a TPU (platform {platform}); "
                         f"use chunked for memory-efficient attention elsewhere")
    return impl


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_offset: jax.Array | int = 0) -> jax.Array:
    """Boolean [B, 1, T, S]: key s is visible to query t iff s ≤ q_offset + t and both are in one document."""
    q_index = q_offset + jnp.arange(q_segment_ids.shape[1])
    causal = jnp.arange(kv_segment_ids.shape[1])[None, :] <= q_index[:, None]
    same_document = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (causal[None] & same_document)[:, None]


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, interpret: bool = False, q_offset: int = 0):
    """The Pallas splash kernel (TPU; `interpret=True` runs it, slowly, anywhere, for tests).

    q_offset: where the queries sit in the key sequence (a sequence shard's start); static, as the
    kernel's mask is.
    """
    # Imported here: the Pallas TPU kernels are neither needed nor importable everywhere else.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, dim = q.shape
    num_kv_heads = k.shape[2]
    group = heads // num_kv_heads
    mask = splash.MultiHeadMask([splash.CausalMask((length, k.shape[1]), offset=q_offset)] * group)
    kernel = splash.make_splash_mqa(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
    # Splash does not scale the scores; MQA form per kv head: q [G, T, H] against k, v [S, H].
    q = (q * (1.0 / dim ** 0.5)).reshape(batch, length, num_kv_heads, group, dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_row(q_row, k_row, v_row, q_seg, kv_seg):
        segments = splash.SegmentIds(q=q_seg, kv=kv_seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=segments))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(q, k, v, q_segment_ids, kv_segment_ids)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)


def splash_on_shard(q, k, v, q_segment_ids, kv_segment_ids, q_offset: jax.Array, shards: int,
                    interpret: bool = False):
    """Splash for one sequence shard's queries (at traced offset q_offset) against all the keys.

    The kernel's causal mask is static, so each of the `shards` possible offsets gets its own kernel and
    every shard runs its own (`lax.switch`): compile time grows with the shard count, run time does not.
    """
    branches = [functools.partial(splash_attention, interpret=interpret, q_offset=shard * q.shape[1])
                for shard in range(shards)]
    return jax.lax.switch(q_offset // q.shape[1], branches, q, k, v, q_segment_ids, kv_segment_ids)


def attend_local(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | None,
                 kv_segment_ids: jax.Array | None, impl: str, *, q_offset: jax.Array | int = 0,
                 block_size: int = 512) -> jax.Array:
    """One device's attention with a resolved kernel name (xla | chunked | cudnn | splash)."""
    if q_segment_ids is None and impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if q_segment_ids is None:
        q_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
        kv_segment_ids = jnp.ones(k.shape[:2], jnp.int32)
    if impl == "chunked":
        return chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, block_size)
    if impl == "splash":
        return splash_attention(q, k, v, q_segment_ids, kv_segment_ids)
    # jax.nn.dot_product_attention handles GQA (query head j reads kv head j // group), scales by
    # 1/√head_dim and takes the softmax in float32, as the reference does.
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn" if impl == "cudnn" else "xla")


def attend_cache(q: jax.Array, k: jax.Array, v: jax.Array, kv_segment_ids: jax.Array, q_offset: jax.Array,
                 impl: str = "auto", block_size: int = 512) -> jax.Array:
    """Queries q [B, T, N, H] at cache slots q_offset .. q_offset + T - 1 against a KV cache k, v [B, K, S, H]
    (the `kv_cache` layout); kv_segment_ids [B, S] (0: empty or padding slot). Returns [B, T, N, H].

    A prefill of several tokens with model.attention_impl chunked, or of more than AUTO_XLA_MAX_LENGTH
    tokens, goes through the chunked kernel, which never holds T×S scores. Everything else, in particular
    every single-token step (its scores are only [B, N, 1, S]), runs its dots on the cache as stored,
    with the numerics of `jax.nn.dot_product_attention` (float32 scores and softmax): that kernel wants
    [B, S, K, H] operands, and transposing every layer's cache into them cost more than the attention.
    """
    q_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    batch, length, heads, dim = q.shape
    if length > 1 and (impl == "chunked" or length > AUTO_XLA_MAX_LENGTH):
        return chunked_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), q_segment_ids, kv_segment_ids, q_offset,
                                 block_size)
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)  # query head j reads kv head j // group
    logits = jnp.einsum("btkgh,bksh->bkgts", grouped, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(dim))
    visible = attention_mask(q_segment_ids, kv_segment_ids, q_offset)[:, :, None]  # [B, 1, 1, T, S]
    logits = jnp.where(visible, logits, _LARGE_NEGATIVE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(batch, length, heads, dim)


def sequence_axis_size() -> int:
    """Devices that the current mesh splits the sequence over (1 without a mesh or logical rules)."""
    if not sharding.is_active():
        return 1
    return dict(jax.sharding.get_abstract_mesh().shape).get(sequence_parallel.SEQUENCE_AXIS, 1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, impl: str = "auto",
           block_size: int = 512) -> jax.Array:
    """Causal self-attention of q [B, T, N, H] over k, v [B, T, K, H]; segment_ids [B, T] or None (one document)."""
    shards = sequence_axis_size()
    resolved = resolve_impl(impl, platform=sharding.target_platform(), dtype=q.dtype, length=q.shape[1],
                            has_segments=segment_ids is not None, sequence_sharded=shards > 1)
    # Under a mesh a Pallas kernel runs per device in shard_map (XLA cannot partition a Mosaic kernel),
    # and a sequence-sharded one attends its queries to the all-gathered keys.
    if not (shards > 1 or (resolved == "splash" and sharding.is_active())):
        return attend_local(q, k, v, segment_ids, segment_ids, resolved, block_size=block_size)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)

    def local(q, k, v, q_segment_ids, kv_segment_ids, q_offset):
        if resolved == "splash":
            return splash_on_shard(q, k, v, q_segment_ids, kv_segment_ids, q_offset, shards)
        return attend_local(q, k, v, q_segment_ids, kv_segment_ids, resolved, q_offset=q_offset,
                            block_size=block_size)

    return sequence_parallel.sequence_sharded_attention(local, q, k, v, segment_ids)
