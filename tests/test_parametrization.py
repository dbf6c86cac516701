"""μP: the init table, and the coordinate check (science/coord_check.py) that justifies each group of it.

The check trains each model for 5 Adam steps on one fixed batch and measures, per coordinate, how far every
activation moved (embedding output, each block's residual, each layer's attention logits, the logits).
μP must keep every curve flat across widths 64-512; fan-in standard parametrization with one lr must not.
Putting the untied head back in the `matrix` group (init/√r, lr/r) makes the logits' change fall ~1.3x per
doubling of the width, so the untied μP check fails.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from minicpm_jax.config import ModelConfig
from minicpm_jax.model import MiniCPM
from minicpm_jax.science import coord_check

WIDTHS = (64, 128, 256, 512)  # width ratios 1 to 8 over dim_model_base = 64
FLAT = 1.5  # μP: every activation's change within 1.5x across the widths


def _config(width: int, parametrization: str = "mup", **overrides) -> ModelConfig:
    values = dict(vocab_size=64, hidden_size=width, intermediate_size=int(2.5 * width), num_layers=2,
                  num_heads=width // 32, num_kv_heads=width // 32, dim_model_base=64, scale_emb=12.0,
                  scale_depth=1.4, max_position_embeddings=64, parametrization=parametrization)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.mark.parametrize("embedding_in_2d_group", [False, True])
def test_init_std_follows_the_table(embedding_in_2d_group):
    """Width 256 = 4x the base: μP matrices 0.1/2; embedding and untied head alike, 0.1 or (flag) 0.1/2."""
    model = MiniCPM(_config(256, embedding_in_2d_group=embedding_in_2d_group, tie_word_embeddings=False),
                    rngs=nnx.Rngs(0))
    vocab_std = 0.1 / 2 if embedding_in_2d_group else 0.1
    for weight, std in ((model.layers.mlp.up_proj, 0.05), (model.layers.self_attn.o_proj, 0.05),
                        (model.embed_tokens, vocab_std), (model.lm_head, vocab_std)):
        np.testing.assert_allclose(np.std(weight[...]), std, rtol=0.03)
    np.testing.assert_array_equal(model.norm.weight[...], 1.0)


def test_standard_controls_init():
    """`standard`: std 0.1 everywhere; `standard_fanin`: 0.1·√(64/fan_in) for matrices and head, embedding 0.1."""
    standard = MiniCPM(_config(256, "standard", tie_word_embeddings=False), rngs=nnx.Rngs(0))
    for weight in (standard.layers.mlp.down_proj, standard.lm_head, standard.embed_tokens):
        np.testing.assert_allclose(np.std(weight[...]), 0.1, rtol=0.03)
    fanin = MiniCPM(_config(256, "standard_fanin", tie_word_embeddings=False), rngs=nnx.Rngs(0))
    for weight, fan_in in ((fanin.layers.mlp.up_proj, 256), (fanin.layers.mlp.down_proj, 640),
                           (fanin.layers.self_attn.o_proj, 256), (fanin.lm_head, 256)):
        np.testing.assert_allclose(np.std(weight[...]), 0.1 * np.sqrt(64 / fan_in), rtol=0.03)
    np.testing.assert_allclose(np.std(fanin.embed_tokens[...]), 0.1, rtol=0.03)


def _spreads(sweep: coord_check.Sweep) -> dict[str, float]:
    return {name: round(sweep.spread(name), 3) for name in sweep.names}


def _hidden(sweep: coord_check.Sweep) -> list[str]:
    return [n for n in sweep.names if n.startswith(("block", "attention"))]


def test_coord_check_untied_head_mup_is_flat_and_standard_grows():
    mup = coord_check.width_sweep(_config(64, tie_word_embeddings=False), WIDTHS)
    # μP: the change of every activation, the logits included, is the same at widths 64 to 512.
    assert coord_check.flat(mup, FLAT), _spreads(mup)
    # Fan-in standard parametrization, one lr: the hidden activations' changes grow with the width
    # (measured 3-13x from 64 to 512).
    standard = coord_check.width_sweep(_config(64, "standard_fanin", tie_word_embeddings=False), WIDTHS)
    growth = {name: standard.growth(name) for name in _hidden(standard)}
    assert min(growth.values()) > 2.5, growth
    assert all(np.all(np.diff(standard.curve(name)) > 0) for name in growth), growth  # monotone


@pytest.mark.slow
def test_coord_check_tied_head_mup_is_flat():
    mup = coord_check.width_sweep(_config(64), WIDTHS)
    assert coord_check.flat(mup, FLAT), _spreads(mup)


@pytest.mark.slow
def test_coord_check_depth():
    """Width 64, L 2 → 16 under the paper's rule (α = 1.4/√L, lr independent of L): the residual stream's,
    the last attention logits' and the logits' changes stay flat, while the first block's output moves less
    (its branch is scaled by 1/√L: each block's share of the change shrinks). Depth-μP's Adam rule
    (lr × √(L_base/L)) is not needed here: it makes the residual stream's change fall with depth."""
    base = _config(64)
    plain = coord_check.depth_sweep(base, (2, 16))
    for name in ("embedding", "last block", "last attention logits", "logits"):
        assert plain.spread(name) < FLAT, _spreads(plain)
    assert plain.growth("block 1") < 0.5, _spreads(plain)  # ≈ √(2/16) = 0.35
    ruled = coord_check.depth_sweep(dataclasses.replace(base, num_layers_base=2), (2, 16))
    assert ruled.growth("last block") < 0.8, _spreads(ruled)


@pytest.mark.slow
def test_coord_check_command(tmp_path):
    """`minicpm-jax coord-check` on the wind-tunnel model (2 widths, μP only, no depth sweep)."""
    from minicpm_jax import cli

    out = tmp_path / "coord"
    assert cli.main(["coord-check", "--out", str(out), "--widths", "64,128", "--parametrizations", "mup",
                     "--depths", "", "--seeds", "1", "--config.model.vocab_size=64"]) == 0
    report = json.loads((out / "coord_check.json").read_text())
    assert sorted(report["width"]) == ["mup, tied head", "mup, untied head"] and report["depth"] == {}
    for sweep in report["width"].values():
        assert sweep["values"] == [64, 128] and max(sweep["spread"].values()) < FLAT, sweep["spread"]
    assert (out / "coord_check.png").stat().st_size > 0 and not (out / "coord_check_depth.png").exists()
