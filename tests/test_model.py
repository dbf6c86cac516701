"""Model behaviour that the HF parity tests do not cover: packing, remat, dtypes, sharding names, loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minicpm_jax.model import MiniCPM, causal_lm_loss, positions_from_segments

from conftest import tiny_config

LOGICAL_AXES = {"layers", "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp"}


def test_packed_row_equals_each_document_alone():
    model = MiniCPM(tiny_config(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    lengths = (23, 30, 11)
    documents = [rng.integers(0, 128, size=n, dtype=np.int32) for n in lengths]
    packed = np.concatenate(documents)[None]
    segment_ids = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])[None]

    packed_logits = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(segment_ids)))
    start = 0
    for document in documents:
        alone = np.asarray(model(jnp.asarray(document[None])))
        np.testing.assert_allclose(packed_logits[:, start:start + len(document)], alone, rtol=1e-5, atol=1e-5)
        start += len(document)
    # Without segment ids the later documents see the earlier ones, so the logits must differ.
    unpacked = np.asarray(model(jnp.asarray(packed)))
    assert not np.allclose(unpacked[:, lengths[0]:], packed_logits[:, lengths[0]:], atol=1e-3)


def test_positions_restart_in_each_segment():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    expected = [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    np.testing.assert_array_equal(positions_from_segments(segment_ids), expected)


def _loss_and_grads(policy: str, tokens):
    model = MiniCPM(tiny_config(remat_policy=policy), rngs=nnx.Rngs(0))

    def loss_fn(m):
        return causal_lm_loss(m(tokens[:, :-1]), tokens[:, 1:])[0]

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    return loss, nnx.to_pure_dict(grads)


def test_remat_policies_give_identical_loss_and_gradients(tokens):
    tokens = jnp.asarray(tokens)
    base_loss, base_grads = _loss_and_grads("none", tokens)
    assert np.isfinite(base_loss) and base_loss > 0
    for policy in ("full", "save_dots", "save_dots_no_batch"):
        loss, grads = _loss_and_grads(policy, tokens)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, base_grads)


def test_layers_are_stacked_and_every_param_has_logical_axes():
    cfg = tiny_config(tie_word_embeddings=False)
    model = MiniCPM(cfg, rngs=nnx.Rngs(0))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = variable.get_metadata()["out_sharding"]
        assert len(names) == variable.get_value().ndim, path
        assert set(names) <= LOGICAL_AXES, (path, names)
        if path[0] == "layers":
            assert names[0] == "layers" and variable.get_value().shape[0] == cfg.num_layers


def test_bfloat16_compute_with_float32_params(tokens):
    cfg32 = tiny_config()
    model32 = MiniCPM(cfg32, rngs=nnx.Rngs(0))
    model16 = MiniCPM(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
    logits16 = model16(jnp.asarray(tokens))
    assert logits16.dtype == jnp.float32  # logits always float32
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(model16, nnx.Param)))
    error = np.max(np.abs(np.asarray(logits16) - np.asarray(model32(jnp.asarray(tokens)))))
    assert 0 < error < 0.1 * np.max(np.abs(np.asarray(logits16)))


def test_bfloat16_params():
    model = MiniCPM(tiny_config(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert model.embed_tokens.get_value().dtype == jnp.bfloat16
    assert model(jnp.zeros((1, 8), jnp.int32)).dtype == jnp.float32


def test_loss_is_mean_cross_entropy_over_unmasked_positions():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 5)))
    mask = jnp.asarray([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    loss, count = causal_lm_loss(logits, targets, mask)
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    picked = np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]
    expected = -(picked * np.asarray(mask)).sum() / np.asarray(mask).sum()
    assert int(count) == 7
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    unmasked, _ = causal_lm_loss(logits, targets)
    np.testing.assert_allclose(unmasked, optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(),
                               rtol=1e-6)


def test_logit_divisor_is_applied():
    """Changing dim_model_base must change the logits exactly as the formula says."""
    tokens = jnp.arange(16, dtype=jnp.int32)[None]
    # Standard init, so that dim_model_base changes nothing but the divisor.
    base = MiniCPM(tiny_config(parametrization="standard"), rngs=nnx.Rngs(0))
    halved_divisor = MiniCPM(tiny_config(parametrization="standard", dim_model_base=32), rngs=nnx.Rngs(0))
    # logits = (h / m) · Eᵀ, so doubling dim_model_base halves m and doubles the logits.
    np.testing.assert_allclose(halved_divisor(tokens), 2 * base(tokens), rtol=1e-5)


def test_activations_probe_matches_the_forward():
    """MiniCPM.activations (the coordinate check's probe) computes the training forward: the same logits, the
    scaled embedding, and one residual and one [heads, T, T] attention-logit map per layer."""
    cfg = tiny_config(tie_word_embeddings=False)
    model = MiniCPM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    acts = model.activations(tokens)
    np.testing.assert_allclose(acts["logits"], model(tokens), rtol=1e-5, atol=1e-6)
    assert acts["embedding"].shape == (2, 12, cfg.hidden_size)
    assert acts["residual"].shape == (cfg.num_layers, 2, 12, cfg.hidden_size)
    assert acts["attention_logits"].shape == (cfg.num_layers, 2, cfg.num_heads, 12, 12)
    np.testing.assert_allclose(acts["embedding"], model.embed_tokens[...][tokens] * cfg.scale_emb, rtol=1e-6)
