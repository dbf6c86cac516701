"""RoPE variants (docs/recipe.md §1.5) against transformers: GraniteForCausalLM logits with the same RoPE config,
loaded through our HF reader, and the closed forms of dynamic NTK (HF per-length and vLLM static)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax import hf
from minicpm_jax.model import rope

from conftest import random_granite, relative_max_error, tiny_config, torch_logits

TOLERANCE = 1e-4
_FACTORS = np.random.default_rng(3).uniform(1.0, 4.0, size=(2, 8)).round(3).tolist()  # head_dim 16 -> 8 values

# name -> (config overrides, sequence lengths: below and above the variant's switch-over length)
VARIANTS = {
    "default": ({}, (64,)),
    "abf": ({"rope_theta": 1e6}, (64,)),
    "linear": ({"rope_scaling": "linear", "rope_factor": 2.0}, (64,)),
    "dynamic": ({"rope_scaling": "dynamic", "rope_factor": 4.0, "max_position_embeddings": 32, "rope_theta": 1e6},
                (24, 64)),
    "longrope": ({"rope_scaling": "longrope", "rope_factor": 2.0, "max_position_embeddings": 64,
                  "rope_original_max_position_embeddings": 32, "rope_short_factor": _FACTORS[0],
                  "rope_long_factor": _FACTORS[1]}, (24, 48)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers_granite_with_the_same_rope(variant, tmp_path):
    overrides, lengths = VARIANTS[variant]
    cfg = tiny_config(num_layers=2, **overrides)
    reference_model = random_granite(cfg)
    reference_model.save_pretrained(tmp_path)
    model, loaded_cfg = hf.load_hf(tmp_path)
    assert loaded_cfg == cfg  # every rope_* field read back from transformers' own config.json
    for length in lengths:
        tokens = np.random.default_rng(length).integers(0, cfg.vocab_size, size=(2, length), dtype=np.int32)
        # A fresh reference per length: transformers caches the dynamic base across calls (docs/recipe.md §1.5).
        reference_model = random_granite(cfg)
        error = relative_max_error(model(jnp.asarray(tokens)), torch_logits(reference_model, tokens))
        assert error <= TOLERANCE, f"{variant} at T={length}: relative max error {error:.2e}"


def test_variants_differ_from_default_where_they_should(tokens):
    """Guards the parity test above: each variant really changes the frequencies at the tested lengths."""
    positions = jnp.broadcast_to(jnp.arange(64), (2, 64))
    default, _ = rope.frequencies(rope.RopeSpec.from_model(tiny_config()), positions)
    for variant, (overrides, lengths) in VARIANTS.items():
        spec = rope.RopeSpec.from_model(tiny_config(**overrides))
        inv_freq, scale = rope.frequencies(spec, positions[:, :lengths[-1]])
        changed = not np.allclose(inv_freq, default) or scale != 1.0
        assert changed == (variant != "default"), variant


def test_dynamic_ntk_per_length_rule_matches_transformers_init_function():
    from transformers import GraniteConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny_config(rope_scaling="dynamic", rope_factor=4.0, max_position_embeddings=32, rope_theta=1e6)
    hf_config = GraniteConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                              max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                                           "rope_theta": 1e6})
    spec = rope.RopeSpec.from_model(cfg)
    for length in (1, 31, 32, 33, 100, 1000):
        expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, seq_len=length)
        ours, _ = rope.frequencies(spec, jnp.arange(length)[None])
        np.testing.assert_allclose(ours, expected.numpy(), rtol=2e-6, err_msg=f"S={length}")


def test_minicpm_128k_dynamic_bases_hf_per_length_and_vllm_static():
    """docs/recipe.md §9: θ = 1e6, max_pos 65,536, factor 4, head_dim 64."""
    spec = rope.RopeSpec(head_dim=64, theta=1e6, scaling="dynamic", factor=4.0, max_position_embeddings=65536)
    assert float(rope.dynamic_ntk_base(spec, 4096)) == 1e6
    assert float(rope.dynamic_ntk_base(spec, 65536)) == 1e6
    expected = 1e6 * (4 * 131072 / 65536 - 3) ** (64 / 62)
    np.testing.assert_allclose(float(rope.dynamic_ntk_base(spec, 131072)), expected, rtol=1e-6)
    np.testing.assert_allclose(expected, 5.27e6, rtol=1e-3)
    static = rope.RopeSpec(**{**spec.__dict__, "dynamic_mode": "static"})
    vllm_base = 1e6 * (4 * 4 - 3) ** (64 / 62)  # vLLM: max_len = 65,536 · 4 at every length
    for length in (16, 4096, 131072):
        np.testing.assert_allclose(float(rope.dynamic_ntk_base(static, length)), vllm_base, rtol=1e-6)
    np.testing.assert_allclose(vllm_base, 1.41e7, rtol=2e-3)


def test_longrope_attention_factor_is_minicpm_closed_form():
    spec = rope.RopeSpec.from_model(tiny_config(**VARIANTS["longrope"][0]))
    assert spec.longrope_attention_scale == pytest.approx(math.sqrt(1 + math.log(2.0) / math.log(32)))
    short, scale = rope.frequencies(spec, jnp.arange(32)[None])  # S = 32 = original: short factors
    long, _ = rope.frequencies(spec, jnp.arange(33)[None])
    base = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(short, base / np.array(_FACTORS[0]), rtol=1e-6)
    np.testing.assert_allclose(long, base / np.array(_FACTORS[1]), rtol=1e-6)
    assert scale == spec.longrope_attention_scale


def test_minicpm_128k_config_round_trips_through_hf_with_untied_head_and_rope_scaling(tmp_path):
    import json

    from flax import nnx

    from minicpm_jax import config as config_lib
    from minicpm_jax.config import ModelConfig
    from minicpm_jax.model import MiniCPM

    from train_helpers import REPO

    full = ModelConfig.from_config(config_lib.load(REPO / "configs" / "minicpm_2b_128k.py").model)
    assert (full.rope_theta, full.max_position_embeddings, full.rope_scaling, full.rope_factor, full.vocab_size,
            full.tie_word_embeddings) == (1e6, 65536, "dynamic", 4.0, 122760, False)
    # The same RoPE and head settings on a tiny body, so the weights can really be written and read back.
    small = ModelConfig(**{**full.to_dict(), "vocab_size": 128, "hidden_size": 64, "intermediate_size": 160,
                           "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "dim_model_base": 16,
                           # a training setting, not part of an HF config: loading gives the default back
                           "remat_policy": ModelConfig().remat_policy})
    model = MiniCPM(small, rngs=nnx.Rngs(0))
    for arch in ("minicpm", "granite"):
        hf.save_hf(model, small, tmp_path / arch, arch=arch)
        written = json.loads((tmp_path / arch / "config.json").read_text())
        if arch == "minicpm":  # the exact keys MiniCPM's remote code and vLLM read (docs/recipe.md §2.1)
            assert written["rope_scaling"] == {"type": "dynamic", "factor": 4.0}
            assert written["rope_theta"] == 1e6 and written["tie_word_embeddings"] is False
        loaded, loaded_cfg = hf.load_hf(tmp_path / arch)
        assert loaded_cfg == small, arch
        tokens = jnp.asarray(np.arange(64).reshape(1, 64) % 128, jnp.int32)
        np.testing.assert_array_equal(loaded(tokens), model(tokens))
