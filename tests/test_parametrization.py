"""μP: the init table, and the coordinate check that makes hyperparameters transfer across widths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax import optim
from minicpm_jax.config import ModelConfig
from minicpm_jax.model import MiniCPM
from minicpm_jax.train.step import make_train_step

WIDTHS = (64, 256, 1024)  # width ratios 1, 4 and 16 over dim_model_base = 64


def _config(width: int, parametrization: str, **overrides) -> ModelConfig:
    values = dict(vocab_size=64, hidden_size=width, intermediate_size=int(2.5 * width), num_layers=2,
                  num_heads=width // 32, num_kv_heads=width // 32, dim_model_base=64, scale_emb=12.0,
                  scale_depth=1.4, parametrization=parametrization)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.mark.parametrize("embedding_in_2d_group", [False, True])
def test_init_std_follows_the_table(embedding_in_2d_group):
    model = MiniCPM(_config(1024, "mup", embedding_in_2d_group=embedding_in_2d_group), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.std(model.layers.mlp.up_proj[...]), 0.1 / 4, rtol=0.02)  # 0.1/√16
    np.testing.assert_allclose(np.std(model.layers.self_attn.o_proj[...]), 0.1 / 4, rtol=0.02)
    np.testing.assert_allclose(np.std(model.embed_tokens[...]), 0.1 / 4 if embedding_in_2d_group else 0.1, rtol=0.05)
    np.testing.assert_array_equal(model.norm.weight[...], 1.0)
    standard = MiniCPM(_config(1024, "standard"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.std(standard.layers.mlp.up_proj[...]), 0.1, rtol=0.02)


def _rms(x) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


@nnx.jit
def _activation_rms(model: MiniCPM, tokens: jax.Array) -> jax.Array:
    """RMS of the residual stream after each layer, then of the logits."""
    cfg, length = model.config, tokens.shape[1]
    x = jnp.take(model.embed_tokens[...], tokens, axis=0) * cfg.scale_emb
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    graphdef, stacked = nnx.split(model.layers)
    values = []
    for layer in range(cfg.num_layers):
        x, _, _ = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], stacked))(x, positions, None)
        values.append(_rms(x))
    return jnp.stack(values + [_rms(model(tokens))])


def _coordinates(parametrization: str) -> np.ndarray:
    """[width, when (init, after 5 Adam steps at lr 0.01), layer] activation RMS."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (4, 33)), jnp.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": jnp.ones((4, 32), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(32), (4, 32)), "loss_mask": jnp.ones((4, 32), jnp.int32)}
    table = []
    for width in WIDTHS:
        cfg = _config(width, parametrization)
        model = MiniCPM(cfg, rngs=nnx.Rngs(0))
        at_init = _activation_rms(model, batch["tokens"])
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)
        tx = optim.make_optimizer({"weight_decay": 0.0}, optim.constant_schedule(0.01), params, cfg)
        step, opt_state = make_train_step(graphdef, tx), tx.init(params)
        for _ in range(5):
            params, opt_state, _ = step(params, opt_state, batch)
        table.append([at_init, _activation_rms(nnx.merge(graphdef, params), batch["tokens"])])
    return np.asarray(table)


def test_coordinate_check_mup_is_flat_and_standard_grows():
    mup, standard = _coordinates("mup"), _coordinates("standard")
    layers = slice(0, -1)  # the residual stream after each block
    # μP: every layer's activation scale is the same at widths 64, 256 and 1024, before and after training ...
    spread = mup[:, :, layers].max(axis=0) / mup[:, :, layers].min(axis=0)
    assert (spread < 1.1).all(), spread
    # ... and the logits do not grow with width.
    assert (mup[-1, :, -1] <= 1.2 * mup[0, :, -1]).all(), mup[:, :, -1]
    # Standard parametrization: the same layers grow with width (16x wider: more than 10x larger).
    growth = standard[-1, :, layers] / standard[0, :, layers]
    assert (growth > 10).all(), growth
