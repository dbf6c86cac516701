"""Attention kernels: chunked (flash-style) attention equals jax.nn.dot_product_attention forward and backward,
the whole model agrees across kernels, and `auto` picks a kernel that the platform can run."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax.model import MiniCPM
from minicpm_jax.model.attention_kernels import (
    AUTO_XLA_MAX_LENGTH,
    attend_cache,
    attention_mask,
    resolve_impl,
    splash_attention,
)
from minicpm_jax.model.chunked_attention import chunked_attention

from conftest import tiny_config
from train_helpers import REPO


def _qkv(batch=2, length=40, heads=4, kv_heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, dim)), jnp.float32) for _ in range(2))
    # Packed rows: documents of random lengths, then padding (segment 0) as the data pipeline makes them.
    segments = np.sort(rng.integers(1, 4, size=(batch, length)), axis=1)
    segments[:, -5:] = 0
    return q, k, v, jnp.asarray(segments, jnp.int32), jnp.asarray(rng.normal(size=q.shape), jnp.float32)


def _reference(q, k, v, segment_ids):
    return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids, segment_ids), implementation="xla")


@pytest.mark.parametrize("packed", [True, False], ids=["segment_ids", "one_document"])
@pytest.mark.parametrize("heads,kv_heads,block", [(4, 2, 16), (4, 4, 8), (4, 1, 64)], ids=["gqa", "mha", "mqa_1block"])
def test_chunked_equals_dot_product_attention_forward_and_gradients(packed, heads, kv_heads, block):
    q, k, v, segments, weights = _qkv(heads=heads, kv_heads=kv_heads)  # T = 40: blocks of 16 and 8 pad the tail
    if not packed:
        segments = jnp.ones_like(segments)
    chunked = lambda q, k, v: chunked_attention(q, k, v, segments, segments, 0, block)
    reference = lambda q, k, v: _reference(q, k, v, segments)
    np.testing.assert_allclose(jax.jit(chunked)(q, k, v), reference(q, k, v), atol=2e-6)
    loss = lambda f: lambda *qkv: jnp.sum(f(*qkv) * weights)
    got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, err_msg=f"d{name}")


def test_chunked_queries_at_an_offset_see_the_keys_before_them():
    """A sequence shard's queries (offset into the gathered keys) get the rows of the full attention."""
    q, k, v, segments, _ = _qkv(length=48)
    full = _reference(q, k, v, segments)
    shard = slice(16, 32)
    got = chunked_attention(q[:, shard], k, v, segments[:, shard], segments, 16, 8)
    np.testing.assert_allclose(got, full[:, shard], atol=2e-6)


@pytest.mark.parametrize("impl,queries", [("auto", 1), ("auto", 6), ("chunked", 6)],
                         ids=["one_token_step", "prefill", "chunked_prefill"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_cache_attention_equals_dot_product_attention_on_the_slots(impl, queries, heads, kv_heads):
    """Queries at slots 30.. of a 48-slot cache stored [B, K, S, H], rows with left padding (segment 0 slots)."""
    q, k, v, _, _ = _qkv(length=48, heads=heads, kv_heads=kv_heads)
    q, offset = q[:, 30:30 + queries], 30
    slots = jnp.asarray(np.arange(48)[None, :] >= np.array([[0], [9]]), jnp.int32)  # row 1 starts at slot 9
    reference = jax.nn.dot_product_attention(
        q, k, v, mask=attention_mask(jnp.ones(q.shape[:2], jnp.int32), slots, offset), implementation="xla")
    got = jax.jit(attend_cache, static_argnames=("impl", "block_size"))(
        q, k.swapaxes(1, 2), v.swapaxes(1, 2), slots, jnp.int32(offset), impl=impl, block_size=16)
    np.testing.assert_allclose(got, reference, atol=2e-6)


def test_chunked_bfloat16_stays_close_to_float32():
    q, k, v, segments, _ = _qkv()
    expected = _reference(q, k, v, segments)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = chunked_attention(*low, segments, segments, 0, 16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), expected, atol=3e-2)


def _logits_and_grads(impl: str, tokens: jax.Array, segments: jax.Array):
    graphdef, params = nnx.split(MiniCPM(tiny_config(num_layers=2, attention_impl=impl, attention_block_size=16),
                                         rngs=nnx.Rngs(0)))

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, segment_ids=segments)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def test_model_logits_and_gradients_agree_between_xla_and_chunked(tokens):
    segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 30 + [3] * 14], 2, axis=0), jnp.int32)
    results = {impl: _logits_and_grads(impl, jnp.asarray(tokens), segments) for impl in ("xla", "chunked")}
    np.testing.assert_allclose(results["chunked"][0], results["xla"][0], atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), results["chunked"][1],
                 results["xla"][1])


def test_auto_selection_by_platform_dtype_and_length():
    pick = lambda **kw: resolve_impl("auto", **{"dtype": jnp.float32, "has_segments": True, **kw})
    assert pick(platform="cpu", length=AUTO_XLA_MAX_LENGTH) == "xla"
    assert pick(platform="cpu", length=AUTO_XLA_MAX_LENGTH + 1) == "chunked"
    assert pick(platform="tpu", length=128) == "splash"
    assert pick(platform="gpu", length=128, dtype=jnp.bfloat16) == "cudnn"
    assert pick(platform="gpu", length=32768, dtype=jnp.bfloat16, has_segments=False) == "cudnn"
    # cuDNN would need a T×T mask for packed rows at this length, and it has no float32 flash kernel.
    assert pick(platform="gpu", length=32768, dtype=jnp.bfloat16) == "chunked"
    assert pick(platform="gpu", length=128, dtype=jnp.float32) == "xla"
    assert pick(platform="tpu", length=32768, sequence_sharded=True) == "splash"  # one kernel per shard offset
    assert pick(platform="cpu", length=32768, sequence_sharded=True) == "chunked"
    assert resolve_impl("xla", platform="tpu", dtype=jnp.float32, length=8, has_segments=True) == "xla"


@pytest.mark.parametrize("impl,platform,dtype,message", [
    ("cudnn", "cpu", jnp.bfloat16, "needs a GPU and bfloat16/float16"),
    ("cudnn", "gpu", jnp.float32, "needs a GPU and bfloat16/float16"),
    ("splash", "gpu", jnp.bfloat16, "needs a TPU"),
])
def test_kernels_the_platform_cannot_run_are_refused(impl, platform, dtype, message):
    with pytest.raises(ValueError, match=message):
        resolve_impl(impl, platform=platform, dtype=dtype, length=128, has_segments=True)
    with pytest.raises(ValueError, match="does not run with a sequence-sharded mesh" if impl == "cudnn" else message):
        resolve_impl(impl, platform=platform, dtype=dtype, length=128, has_segments=True, sequence_sharded=True)


def test_splash_kernel_in_interpret_mode_equals_dot_product_attention():
    """The TPU kernel's own code, run by the Pallas interpreter on CPU (forward only: the interpreter is slow)."""
    q, k, v, segments, _ = _qkv(batch=1, length=128, dim=64)  # splash's smallest block is 128 tokens
    got = splash_attention(q, k, v, segments, segments, interpret=True)
    np.testing.assert_allclose(got, _reference(q, k, v, segments), atol=2e-6)


def test_cpu_model_never_imports_the_tpu_kernels():
    script = ("import sys, jax.numpy as jnp; from minicpm_jax.model.attention_kernels import attend; "
              "x = jnp.ones((1, 8, 2, 4)); attend(x, x, x, None, 'auto'); "
              "print(sorted(m for m in sys.modules if 'splash' in m or 'pallas.ops' in m))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    assert result.stdout.strip() == "[]"
