"""MiniCPM-MoE: transformers GraniteMoe parity, dispatch paths, router losses, upcycling, HF round trips."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax import config, hf
from minicpm_jax.config import ConfigError
from minicpm_jax.model import MiniCPM, count_params, moe
from minicpm_jax.model.moe import capacity_mask, dense_dispatch, grouped_dispatch, route, router_stats
from minicpm_jax.run.upcycle import upcycle_model

from conftest import random_granite, relative_max_error, tiny_config, torch_logits

TOLERANCE = 1e-4


def moe_config(**overrides):
    return tiny_config(num_experts=4, num_experts_per_tok=2, num_layers=2, **overrides)


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_logits_match_transformers_granitemoe(dispatch, tokens, tmp_path):
    cfg = moe_config(tie_word_embeddings=False)
    reference_model = random_granite(cfg)
    reference_model.save_pretrained(tmp_path)
    model, loaded_cfg = hf.load_hf(tmp_path, moe_dispatch=dispatch)

    assert (loaded_cfg.num_experts, loaded_cfg.num_experts_per_tok) == (4, 2)
    error = relative_max_error(model(jnp.asarray(tokens)), torch_logits(reference_model, tokens))
    assert error <= TOLERANCE, f"relative max error {error:.2e}"


def _random_moe_inputs(seed=0, tokens=12, experts=4, k=2, dim=8, width=6):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (2, tokens, dim))
    router = jax.random.normal(keys[1], (dim, experts))
    gate, up = (jax.random.normal(key, (experts, dim, width)) / 3 for key in keys[2:4])
    down = jax.random.normal(keys[4], (experts, width, dim)) / 3
    return x, router, gate, up, down, k


@pytest.mark.parametrize("kernel", ["blocks", "ragged_dot"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_dense_and_grouped_dispatch_agree_with_gradients(capacity_factor, kernel, monkeypatch):
    monkeypatch.setattr(moe, "ragged_dot_is_native", lambda: kernel == "ragged_dot")
    x, router, gate, up, down, k = _random_moe_inputs()

    def layer(dispatch, x, gate, up, down):
        routing, _, probs = route(x, router, k)
        if capacity_factor:
            keep = capacity_mask(routing.experts, probs.shape[-1], capacity_factor)
            assert not bool(keep.all())  # the factor really drops assignments here
            routing = routing._replace(weights=jnp.where(keep, routing.weights, 0.0))
        return dispatch(x, routing, gate, up, down)

    dense = layer(dense_dispatch, x, gate, up, down)
    grouped = layer(grouped_dispatch, x, gate, up, down)
    np.testing.assert_allclose(grouped, dense, rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda *w: jnp.sum(jnp.sin(layer(d, *w))), argnums=(0, 1, 2, 3))(x, gate, up, down)
             for d in (dense_dispatch, grouped_dispatch)]
    for dense_grad, grouped_grad in zip(*grads):
        np.testing.assert_allclose(grouped_grad, dense_grad, rtol=1e-4, atol=1e-5)


def test_router_renormalises_top_k_in_float32():
    x, router, *_ = _random_moe_inputs()
    routing, logits, probs = route(x.astype(jnp.bfloat16), router, 2)
    assert routing.weights.dtype == jnp.float32 and logits.dtype == jnp.float32
    np.testing.assert_allclose(jnp.sum(routing.weights, -1), 1.0, rtol=1e-6)
    top2 = np.sort(np.asarray(probs), -1)[..., -2:][..., ::-1]
    np.testing.assert_allclose(routing.weights, top2 / top2.sum(-1, keepdims=True), rtol=1e-6)


def test_load_balance_loss_matches_hand_computation():
    # 4 tokens, 3 experts, top-1; the router logits are given directly through an identity router.
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]]))
    routing, router_logits, probs = route(logits, jnp.eye(3), 1)
    stats = router_stats(routing.experts, router_logits, probs)
    fractions = np.array([3, 1, 0]) / 4  # experts chosen: 0, 0, 1, 0
    mean_probs = np.array([0.7 + 0.6 + 0.1 + 0.5, 0.2 + 0.3 + 0.8 + 0.25, 0.1 + 0.1 + 0.1 + 0.25]) / 4
    np.testing.assert_allclose(stats["expert_fraction"], fractions)
    np.testing.assert_allclose(stats["load_balance"], 3 * np.sum(fractions * mean_probs), rtol=1e-6)
    # The probabilities sum to 1 per token, so logsumexp of these logits is 0: the z-loss vanishes;
    # shifting every logit of a token by c shifts its logsumexp by c.
    np.testing.assert_allclose(stats["router_z"], 0.0, atol=1e-6)
    shifted = router_stats(routing.experts, router_logits + jnp.array([[1.0], [2.0], [0.0], [-1.0]]), probs)
    np.testing.assert_allclose(shifted["router_z"], (1 + 4 + 0 + 1) / 4, rtol=1e-6)


def test_capacity_mask_prefers_first_choices_then_earlier_tokens():
    experts = jnp.array([[0, 1], [0, 1], [0, 2], [1, 0]])  # 4 tokens, top-2 of 3 experts
    keep = capacity_mask(experts, 3, capacity_factor=0.75)  # capacity ceil(0.75·2·4/3) = 2 per expert
    # Expert 0 takes the first choices of tokens 0 and 1 (token 2's and token 3's second choice do not fit);
    # expert 1 takes token 3's first choice before token 0's second, so token 1's second choice is dropped.
    np.testing.assert_array_equal(keep, [[True, True], [True, False], [False, True], [True, False]])


def test_upcycled_model_has_the_dense_logits(tokens):
    dense = MiniCPM(tiny_config(), rngs=nnx.Rngs(1))
    for dispatch in ("dense", "grouped"):
        moe = upcycle_model(dense, tiny_config(num_experts=8, num_experts_per_tok=2, moe_dispatch=dispatch))
        router = np.asarray(moe.layers.mlp.router[...])
        assert router.shape == (3, 64, 8) and abs(router.std() - 0.1) < 0.01
        np.testing.assert_array_equal(moe.layers.mlp.gate_proj[...][:, 5], dense.layers.mlp.gate_proj[...])
        error = relative_max_error(moe(jnp.asarray(tokens)), dense(jnp.asarray(tokens)))
        assert error < 1e-5, f"{dispatch}: {error:.2e}"


def test_upcycle_rejects_a_different_shape():
    dense = MiniCPM(tiny_config(), rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match="model.hidden_size"):
        upcycle_model(dense, moe_config(hidden_size=128))
    with pytest.raises(ConfigError, match="num_experts=0"):
        upcycle_model(dense, tiny_config())


@pytest.mark.parametrize("arch", ["minicpm", "granite"])
def test_hf_round_trip_is_bitwise(arch, tmp_path):
    model = MiniCPM(moe_config(tie_word_embeddings=False), rngs=nnx.Rngs(3))
    hf.save_hf(model, None, tmp_path / "a", arch=arch)
    loaded, loaded_cfg = hf.load_hf(tmp_path / "a")
    assert loaded_cfg == model.config
    for ours, theirs in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(ours, theirs)
    hf.save_hf(loaded, None, tmp_path / "b", arch=arch)
    first, second = dict(hf.hf_tensors(model, arch=arch)), dict(hf.hf_tensors(loaded, arch=arch))
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[name], second[name]) for name in first)


def test_minicpm_moe_tensor_names_and_shapes():
    tensors = dict(hf.hf_tensors(MiniCPM(moe_config(), rngs=nnx.Rngs(0)), arch="minicpm"))
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (4, 64)
    assert tensors["model.layers.1.mlp.experts.3.w1.weight"].shape == (160, 64)
    assert tensors["model.layers.1.mlp.experts.3.w3.weight"].shape == (160, 64)
    assert tensors["model.layers.1.mlp.experts.3.w2.weight"].shape == (64, 160)
    assert not any("gate_proj" in name for name in tensors)


def test_granite_export_runs_natively_in_transformers(tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    model = MiniCPM(moe_config(), rngs=nnx.Rngs(4))
    hf.save_hf(model, None, tmp_path, arch="granite")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reference).__name__ == "GraniteMoeForCausalLM"
    error = relative_max_error(model(jnp.asarray(tokens)), torch_logits(reference, tokens))
    assert error <= TOLERANCE, f"relative max error {error:.2e}"


def test_published_parameter_counts():
    cfg = config.load("configs/minicpm_moe_8x2b.py").model
    assert count_params(cfg) == 13_590_468_864  # docs/recipe.md §1.2, the paper's 13.6B
    assert count_params(cfg, active=True) == 4_035_320_064  # ≈ 4.04B: 2 of 8 experts per token
    dense = dataclasses.replace(config.ModelConfig.from_config(cfg), num_experts=0)
    assert count_params(dense) == 2_442_057_984
