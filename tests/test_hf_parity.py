"""Our logits against transformers' PyTorch GraniteForCausalLM, the exact functional match of MiniCPM."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax import hf
from minicpm_jax.model import MiniCPM

from conftest import random_granite, relative_max_error, tiny_config, torch_logits

TOLERANCE = 1e-4

CASES = {
    "mha_tied": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
    "gqa_tied": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "gqa_untied": dict(num_heads=4, num_kv_heads=1, tie_word_embeddings=False, num_layers=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_granite(case, tokens, tmp_path):
    cfg = tiny_config(**CASES[case])
    reference_model = random_granite(cfg)
    reference_model.save_pretrained(tmp_path)
    model, loaded_cfg = hf.load_hf(tmp_path)

    assert loaded_cfg.num_layers >= 3 and tokens.shape[0] >= 2 and tokens.shape[1] >= 64
    assert loaded_cfg.tie_word_embeddings == cfg.tie_word_embeddings
    assert loaded_cfg.num_kv_heads == cfg.num_kv_heads
    assert loaded_cfg.scale_emb == 12.0 and loaded_cfg.dim_model_base == 16
    assert np.isclose(loaded_cfg.scale_depth, 1.4)
    error = relative_max_error(model(jnp.asarray(tokens)), torch_logits(reference_model, tokens))
    assert error <= TOLERANCE, f"{case}: relative max error {error:.2e}"


@pytest.mark.parametrize("tied", [True, False])
def test_granite_export_loads_natively_in_transformers(tied, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    model = MiniCPM(tiny_config(tie_word_embeddings=tied), rngs=nnx.Rngs(1))
    hf.save_hf(model, None, tmp_path, arch="granite")
    reference_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reference_model).__name__ == "GraniteForCausalLM"
    error = relative_max_error(model(jnp.asarray(tokens)), torch_logits(reference_model, tokens))
    assert error <= TOLERANCE, f"relative max error {error:.2e}"


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("arch", ["minicpm", "granite"])
def test_import_export_import_is_bitwise_identical(arch, tmp_path):
    reference_model = random_granite(tiny_config(tie_word_embeddings=False))
    reference_model.save_pretrained(tmp_path / "source")
    first, first_cfg = hf.load_hf(tmp_path / "source")
    hf.save_hf(first, first_cfg, tmp_path / "exported", arch=arch)
    second, second_cfg = hf.load_hf(tmp_path / "exported")

    assert second_cfg.tie_word_embeddings is False
    for key in ("vocab_size", "hidden_size", "num_layers", "num_kv_heads", "rope_theta", "rms_norm_eps"):
        assert getattr(second_cfg, key) == getattr(first_cfg, key)
    flat_first = dict(nnx.to_flat_state(nnx.state(first, nnx.Param)))
    flat_second = dict(nnx.to_flat_state(nnx.state(second, nnx.Param)))
    assert flat_first.keys() == flat_second.keys()
    for path, variable in flat_first.items():
        a, b = np.asarray(variable.get_value()), np.asarray(flat_second[path].get_value())
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path


def test_minicpm_layout_writes_what_vllm_and_llama_cpp_read(tmp_path):
    model = MiniCPM(tiny_config(), rngs=nnx.Rngs(0))
    hf.save_hf(model, None, tmp_path, arch="minicpm")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MiniCPMForCausalLM"] and config["model_type"] == "minicpm"
    assert (config["scale_emb"], config["scale_depth"], config["dim_model_base"]) == (12.0, 1.4, 16)
    assert config["num_hidden_layers"] == 3 and config["num_key_value_heads"] == 2
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_real_minicpm_config_quirks_are_accepted(tokens, tmp_path):
    """MiniCPM-2B-sft's config.json has no model_type, rope_theta or tie key; lm_head may be duplicated."""
    model = MiniCPM(tiny_config(), rngs=nnx.Rngs(2))
    hf.save_hf(model, None, tmp_path, arch="minicpm")
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("model_type", "rope_theta", "tie_word_embeddings"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded, cfg = hf.load_hf(tmp_path)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 10000.0
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(tokens))))


def test_sharded_bfloat16_export_round_trips(tokens, tmp_path):
    model = MiniCPM(tiny_config(), rngs=nnx.Rngs(3))
    files = hf.save_hf(model, None, tmp_path, arch="minicpm", dtype="bfloat16", max_shard_bytes=40_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and hf.SAFE_INDEX in files
    index = json.loads((tmp_path / hf.SAFE_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all(os.path.getsize(tmp_path / f) < 40_000 + 10_000 for f in shards)

    loaded, cfg = hf.load_hf(tmp_path)
    bf16 = lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))[path].get_value()
        np.testing.assert_array_equal(np.asarray(got), bf16(variable.get_value()), err_msg=str(path))
