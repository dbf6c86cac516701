"""Sequence-sharded attention on 8 fake CPU devices equals unsharded attention, forward and gradients.

The checks run in a subprocess (this file as a script) because the fake device count must be set before
jax starts, and the rest of the suite runs on one device.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest

from train_helpers import REPO


@pytest.mark.slow
def test_sequence_sharded_attention_and_model_equal_unsharded_on_8_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    result = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["attention:xla", "attention:chunked", "attention:splash", "model"], result.stdout


def _main() -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from minicpm_jax.model import MiniCPM, sequence_parallel
    from minicpm_jax.model.attention_kernels import attend, attention_mask, splash_on_shard
    from minicpm_jax.parallel import mesh as sharding

    from conftest import tiny_config

    assert jax.device_count() == 8
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, sequence=4))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "sequence"))
    rng = np.random.default_rng(0)
    batch, length, heads, kv_heads, dim = 2, 32, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, dim)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.sort(rng.integers(1, 4, size=(batch, length)), axis=1), jnp.int32)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * weights)

    reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segments, segments))
    expected_out, expected_grads = reference(q, k, v), jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for impl in ("xla", "chunked"):
        sharded = functools.partial(attend, segment_ids=segments, impl=impl, block_size=4)
        with sharding.activate(mesh, "fsdp"):
            assert "shard_map" in str(jax.make_jaxpr(sharded)(q, k, v))  # really the sequence-parallel path
            placed = [jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "sequence")))
                      for x in (q, k, v)]
            out = jax.jit(sharded)(*placed)
            grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(*placed)
        assert out.sharding.spec[1] == "sequence", out.sharding
        np.testing.assert_allclose(out, expected_out, atol=2e-6, err_msg=impl)
        for name, g, e in zip("qkv", grads, expected_grads):
            np.testing.assert_allclose(g, e, atol=1e-5, err_msg=f"{impl} d{name}")
        print(f"attention:{impl}")

    # Splash per shard (the Pallas interpreter runs the TPU kernel's code; forward only, it is slow): each
    # shard's queries sit at their own offset, 128 positions (splash's smallest block) per shard.
    long_q, long_k, long_v = (jnp.asarray(rng.normal(size=(2, 512, h, dim)), jnp.float32) for h in (2, 1, 1))
    long_segments = jnp.ones((2, 512), jnp.int32)
    local = functools.partial(splash_on_shard, shards=4, interpret=True)
    with sharding.activate(mesh, "fsdp"):
        out = jax.jit(lambda q, k, v: sequence_parallel.sequence_sharded_attention(local, q, k, v, long_segments))(
            long_q, long_k, long_v)
    expected = jax.nn.dot_product_attention(long_q, long_k, long_v, is_causal=True)
    np.testing.assert_allclose(out, expected, atol=2e-5)
    print("attention:splash")

    # The whole model: packed rows, chunked kernel, activations split over `sequence` at every block boundary.
    cfg = tiny_config(num_layers=2, attention_impl="chunked", attention_block_size=4)
    model = MiniCPM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(batch, length)), jnp.int32)
    graphdef, params = nnx.split(model)

    def model_loss(params, tokens, segments):
        logits = nnx.merge(graphdef, params)(tokens, segment_ids=segments)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    step = jax.jit(jax.value_and_grad(model_loss, has_aux=True))
    (_, expected_logits), expected_param_grads = step(params, tokens, segments)
    with sharding.activate(mesh, "fsdp"):
        replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        (_, logits), param_grads = step(replicated, jax.device_put(tokens, rows), jax.device_put(segments, rows))
    np.testing.assert_allclose(logits, expected_logits, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), param_grads,
                 expected_param_grads)
    print("model")


if __name__ == "__main__":
    _main()
